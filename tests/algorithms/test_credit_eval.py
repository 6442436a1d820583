"""algorithms/credit_eval: precision@k and AUROC of saliency against known pivotal tokens — hand-computed cases,
the chance levels, and the saliency bugs the probe exists to catch (a shifted span, a flipped sign)."""

import pytest
import torch

from oar_megatron.algorithms.credit_eval import precision_at_k, saliency_auroc, saliency_quality
from oar_megatron.data.pivot import PivotTask, pivotal_mask


def test_hand_computed_rows():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.0],   # pivot (1) on top: perfect
                           [0.5, 0.5, 0.9, 0.1, 7.0],   # pivots 0, 1 tied below token 2; token 4 masked out
                           [1.0, 1.0, 1.0, 1.0, 1.0]])  # constant: chance
    pivotal = torch.tensor([[0, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    p = precision_at_k(scores, pivotal, mask)
    # row 1: k = 2, top-2 = {2 (0.9), one of the tied 0.5s}: 0 + 1 slot x 2 tied pivots / 2 tied = 1 hit → 0.5
    assert p.tolist() == pytest.approx([1.0, 0.5, 0.2])
    a = saliency_auroc(scores, pivotal, mask)
    # row 1: pairs (pivot, non-pivot) over {2: 0.9, 3: 0.1}: each pivot beats 3, loses to 2 → 2/4
    assert a.tolist() == pytest.approx([1.0, 0.5, 0.5])


def test_undefined_rows_are_nan_and_left_out_of_the_means():
    scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    pivotal = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]]).bool()
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert precision_at_k(scores, pivotal, mask)[0].isnan() and saliency_auroc(scores, pivotal, mask)[0].isnan()
    q = saliency_quality(scores, pivotal, mask, generator=torch.Generator().manual_seed(1))
    assert q["rows"] == 1.0 and q["uniform/auroc"] == 0.5 and q["uniform/precision_at_k"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pivotal: shape"):
        precision_at_k(scores, pivotal[:, :3], mask)


def _pivot_rows(n=16):
    task = PivotTask(base=3, pivots=2, filler_len=20)
    ex = task.probe_examples(n)
    width = max(len(r) for _, r, _ in ex)
    ids = torch.zeros(n, width, dtype=torch.long)
    valid = torch.zeros(n, width, dtype=torch.bool)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for b, (_, r, _) in enumerate(ex):
        ids[b, : len(r)] = torch.tensor(r)
        valid[b, : len(r)] = True
        mask[b, : len(r) - 3] = True  # the scored span: the reasoning, before '#', digit, eos
    return ex, ids, valid, mask


def test_a_saliency_on_the_pivots_scores_one_and_bugs_drop_to_chance_or_below():
    ex, ids, valid, mask = _pivot_rows()
    pivotal = pivotal_mask(ids, valid)
    assert not (pivotal & ~mask).any()  # pivots lie in the scored span
    assert all(pivotal[b].nonzero().flatten().tolist() == piv for b, (_, _, piv) in enumerate(ex))
    g = torch.Generator().manual_seed(0)
    good = torch.rand(ids.shape, generator=g) * 0.1 + pivotal.double()  # pivots well above every filler token
    q = saliency_quality(good, pivotal, mask)
    assert q["precision_at_k"] == 1.0 and q["auroc"] == 1.0
    # off-by-one: the same scores one position late (the classic misalignment of logits and tokens)
    shifted = torch.roll(good, shifts=1, dims=1)
    qs = saliency_quality(shifted, pivotal, mask)
    assert qs["precision_at_k"] <= 0.5 and qs["auroc"] < 0.8, qs  # 2 pivots: the second keeps the first's score
    shifted2 = torch.roll(good, shifts=2, dims=1)
    assert saliency_quality(shifted2, pivotal, mask)["precision_at_k"] == 0.0
    # a flipped sign ranks the pivots last
    flipped = saliency_quality(-good, pivotal, mask)
    assert flipped["precision_at_k"] == 0.0 and flipped["auroc"] == 0.0
    # the references sit at chance: uniform exactly, random close to it
    assert q["uniform/auroc"] == 0.5 and q["uniform/precision_at_k"] == pytest.approx(2 / 22)
    assert abs(q["random/auroc"] - 0.5) < 0.2
