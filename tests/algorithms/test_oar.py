"""oar_weights, credit_metrics and the advantage-shaper registry (ALGORITHMS.md §1.4, §1.5, §5.6-5.8; API.md)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oar_megatron.algorithms.oar import (
    advantage_shapers,
    credit_metrics,
    get_advantage_shaper,
    oar_weights,
    register_advantage_shaper,
    shape_advantages,
)


def _scores_from_log(ells):
    """Raw scores whose log1p is exactly ``ells`` (so the hand arithmetic starts from ℓ)."""
    return [math.expm1(x) for x in ells]


# ------------------------------------------------------------------------------------------- oar_weights pins


def test_oar_weights_hand_example_integer_quantile_position():
    # ℓ = [0, 1, 2, 3, 4] → n = [0, .25, .5, .75, 1]; R = 5, q = .25: pos = .25·4 = 1 → τ = n[1] = .25.
    # n < τ: n = 0 → max(0/.25, .1) = .1.   n ≥ τ: 1 + (n − .25)/.75 → 1, 4/3, 5/3, 2.
    # Σ = .1 + 1 + 4/3 + 5/3 + 2 = 6.1 → w · 5/6.1 = [.5, 5, 20/3, 25/3, 10]/6.1.
    # Position 5 is unscored (NaN there must not matter): w = 1.
    scores = torch.tensor([_scores_from_log([0, 1, 2, 3, 4]) + [float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[True] * 5 + [False]])
    w = oar_weights(scores, mask)
    expected = torch.tensor([[0.0819672131, 0.8196721311, 1.0928961749, 1.3661202186, 1.6393442623, 1.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=1e-7, atol=1e-8)
    assert w[0, 5].item() == 1.0
    assert w[0, :5].sum().item() == pytest.approx(5.0, abs=1e-12)


def test_oar_weights_hand_example_interpolated_quantile():
    # ℓ = [0, 1, 3, 4] → n = [0, .25, .75, 1]; q = .25, R = 4: pos = .75 → τ = 0 + .75·(.25 − 0) = .1875.
    # n = 0 → .1 (floor);  n = .25 → 1 + .0625/.8125 = 14/13;  n = .75 → 1 + .5625/.8125 = 22/13;  n = 1 → 2.
    # Σ = 2.1 + 36/13 = 63.3/13 → w · 4·13/63.3 = [5.2, 56, 88, 104]/63.3.
    scores = torch.tensor([_scores_from_log([0, 1, 3, 4])], dtype=torch.float64)
    w = oar_weights(scores, torch.ones(1, 4, dtype=torch.bool))
    expected = torch.tensor([[5.2, 56.0, 88.0, 104.0]], dtype=torch.float64) / 63.3
    torch.testing.assert_close(w, expected, rtol=1e-7, atol=1e-8)


def test_oar_weights_hand_example_low_tier_above_floor_and_beta():
    # ℓ = [0, .4, 2, 4] → n = [0, .1, .5, 1]; q = .5, R = 4: pos = 1.5 → τ = .1 + .5·(.5 − .1) = .3.
    # n = 0 → .1;  n = .1 → .1/.3 = 1/3;  β = 2: n = .5 → 1 + 2·.2/.7 = 11/7;  n = 1 → 1 + 2 = 3.
    # Σ = .1 + 1/3 + 11/7 + 3 = (2.1 + 7 + 33 + 63)/21 = 105.1/21 → w · 84/105.1 = [8.4, 28, 132, 252]/105.1.
    scores = torch.tensor([_scores_from_log([0, 0.4, 2, 4])], dtype=torch.float64)
    w = oar_weights(scores, torch.ones(1, 4, dtype=torch.bool), quantile=0.5, beta=2.0)
    expected = torch.tensor([[8.4, 28.0, 132.0, 252.0]], dtype=torch.float64) / 105.1
    torch.testing.assert_close(w, expected, rtol=1e-7, atol=1e-8)


def test_oar_weights_float32_default_dtype_and_permutation():
    ells = [0, 1, 2, 3, 4]
    perm = [3, 0, 4, 1, 2]
    scores = torch.tensor([[_scores_from_log(ells)[p] for p in perm]], dtype=torch.float32)
    w = oar_weights(scores, torch.ones(1, 5))
    assert w.dtype == torch.float32
    base = torch.tensor([0.0819672131, 0.8196721311, 1.0928961749, 1.3661202186, 1.6393442623])
    torch.testing.assert_close(w[0], base[perm], rtol=1e-5, atol=1e-6)


def test_oar_weights_clamps_negative_scores_and_fallbacks():
    nan = float("nan")
    scores = torch.tensor(
        [
            [-3.0, -0.5, 2.0, 5.0],  # clamped to [0, 0, 2, 5]: reshaped
            [-2.0, -1.5, -7.0, 0.0],  # all clamp to 0: constant → 1
            [4.0, 4.0, 4.0, nan],  # constant → 1
            [9.0, nan, nan, nan],  # R = 1 → 1
            [nan, nan, nan, nan],  # R = 0 → 1
        ]
    )
    mask = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool
    )
    w = oar_weights(scores, mask)
    assert torch.equal(w[1:], torch.ones(4, 4))
    # Row 0 equals the same row with the negatives replaced by 0.
    torch.testing.assert_close(w[0], oar_weights(torch.tensor([[0.0, 0.0, 2.0, 5.0]]), torch.ones(1, 4))[0])
    assert w[0, 0] == w[0, 1] and w[0, 0] < 1 < w[0, 3]


def test_oar_weights_matches_torch_quantile_semantics():
    torch.manual_seed(1)
    for q in (0.0, 0.1, 0.25, 0.5, 0.9):
        s = torch.rand(7, dtype=torch.float64) * 3
        n = torch.log1p(s)
        n = (n - n.min()) / (n.max() - n.min())
        tau = torch.quantile(n, q)
        w = oar_weights(s[None], torch.ones(1, 7), quantile=q)[0]
        raw = torch.where(n < tau, (n / (tau + 1e-8)).clamp(min=0.1), 1 + (n - tau) / (1 - tau + 1e-8))
        torch.testing.assert_close(w, raw * 7 / raw.sum(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- oar_weights properties


def _reference_weights(scores, mask, q, beta, floor):
    """Row-by-row reference straight from ALGORITHMS.md §1.4 (torch.quantile, float64)."""
    out = torch.ones(scores.shape, dtype=torch.float64)
    for b in range(scores.shape[0]):
        s = scores[b][mask[b]].double().clamp(min=0)
        if s.numel() < 2:
            continue
        ell = torch.log1p(s)
        if ell.max() == ell.min():
            continue
        n = (ell - ell.min()) / (ell.max() - ell.min())
        tau = torch.quantile(n, q)
        w = torch.where(n < tau, (n / (tau + 1e-8)).clamp(min=floor), 1 + beta * (n - tau) / (1 - tau + 1e-8))
        out[b, mask[b]] = w * s.numel() / w.sum()
    return out


@st.composite
def _cases(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 12))
    vals = st.one_of(st.floats(-2, 50, allow_nan=False, width=32), st.sampled_from([0.0, 1.0, 1.0, 3.0]))
    scores = torch.tensor(draw(st.lists(st.lists(vals, min_size=t, max_size=t), min_size=b, max_size=b)))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    q = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.99]))
    beta = draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    floor = draw(st.sampled_from([0.05, 0.1, 0.5, 1.0]))
    return scores.double(), mask, q, beta, floor


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_oar_weights_properties(case):
    scores, mask, q, beta, floor = case
    scores = torch.where(mask, scores, torch.full_like(scores, float("nan")))  # padding garbage is ignored
    w = oar_weights(scores, mask, quantile=q, beta=beta, floor=floor)
    assert w.shape == scores.shape and w.dtype == torch.float64
    assert torch.isfinite(w).all() and (w > 0).all()
    assert (w[~mask] == 1.0).all()
    count = mask.sum(-1).double()
    torch.testing.assert_close(torch.where(mask, w, 0.0).sum(-1), count, rtol=1e-12, atol=1e-12)
    assert (w >= floor / (1 + beta) - 1e-12).all()
    assert (w <= (1 + beta) / floor + 1e-12).all()
    torch.testing.assert_close(w, _reference_weights(scores, mask, q, beta, floor), rtol=1e-10, atol=1e-12)
    # Monotone: a higher (clamped) score never gets a lower weight within a row.
    for b in range(scores.shape[0]):
        s, ww = scores[b][mask[b]].clamp(min=0), w[b][mask[b]]
        order = torch.argsort(s, stable=True)
        assert (ww[order].diff() >= -1e-12).all()
    # Rows with < 2 scored tokens or constant clamped scores are all 1.
    for b in range(scores.shape[0]):
        s = scores[b][mask[b]].clamp(min=0)
        if s.numel() < 2 or bool((s == s[0]).all()):
            assert (w[b] == 1.0).all()


def test_oar_weights_vectorised_rows_independent():
    torch.manual_seed(0)
    scores, mask = torch.rand(6, 9) * 5, torch.rand(6, 9) > 0.3
    w = oar_weights(scores, mask)
    for b in range(6):
        torch.testing.assert_close(w[b : b + 1], oar_weights(scores[b : b + 1], mask[b : b + 1]))


def test_oar_weights_empty():
    assert oar_weights(torch.empty(0, 5), torch.zeros(0, 5, dtype=torch.bool)).shape == (0, 5)
    assert torch.equal(oar_weights(torch.empty(2, 0), torch.zeros(2, 0, dtype=torch.bool)), torch.ones(2, 0))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(scores=[[1.0, 2.0]]), "scores"),
        (dict(scores=torch.ones(3)), "scores"),
        (dict(scores=torch.ones(1, 2, dtype=torch.long)), "scores"),
        (dict(score_mask=torch.ones(1, 3, dtype=torch.bool)), "score_mask"),
        (dict(score_mask=torch.tensor([[0.5, 1.0]])), "score_mask"),
        (dict(scores=torch.tensor([[1.0, float("nan")]])), "scores"),
        (dict(scores=torch.tensor([[1.0, float("inf")]])), "scores"),
        (dict(quantile=1.0), "quantile"),
        (dict(quantile=-0.1), "quantile"),
        (dict(beta=-1.0), "beta"),
        (dict(floor=0.0), "floor"),
        (dict(floor=1.5), "floor"),
    ],
)
def test_oar_weights_bad_input(kwargs, name):
    args = dict(scores=torch.tensor([[1.0, 2.0]]), score_mask=torch.ones(1, 2, dtype=torch.bool))
    args.update(kwargs)
    scores, score_mask = args.pop("scores"), args.pop("score_mask")
    with pytest.raises(ValueError, match=f"^{name}"):
        oar_weights(scores, score_mask, **args)


# ------------------------------------------------------------------------------------------- credit_metrics


def test_credit_metrics_grpo_uniform_exact():
    # Uniform |Â| over T tokens: ESS = (T a)²/(T · T a²) = 1; top-⌈T/10⌉ mass = ⌈T/10⌉/T.
    adv = torch.tensor([0.7, -1.3, 0.1, 2.9])
    mask = torch.zeros(4, 30, dtype=torch.bool)
    mask[0, :10] = mask[1, :20] = mask[2, :30] = mask[3, :7] = True
    tok = shape_advantages("none", adv, mask)
    m = credit_metrics(tok, mask)
    assert m["ess_ratio"].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert m["top10_mass"].dtype == torch.float32
    assert (m["top10_mass"][:3] == 0.1).all()  # the float32 nearest 0.1, exactly
    m64 = credit_metrics(tok.double(), mask)
    assert m64["ess_ratio"].tolist() == [1.0] * 4 and m64["top10_mass"][:3].tolist() == [0.1] * 3
    assert m["top10_mass"][3].item() == pytest.approx(1 / 7, rel=1e-7)  # ⌈0.7⌉ = 1 of 7 tokens


def test_credit_metrics_hand_case():
    # Row 0: |Â| = [1, 2, 3, 4]: ESS = 10²/(4·30) = 5/6; top ⌈0.4⌉ = 1 → 4/10.
    # Row 1: |Â| = [1]·10 + [6, 4] (T = 12): Σ = 20, Σ² = 10 + 36 + 16 = 62 → ESS = 400/(12·62) = 100/186;
    #        top ⌈1.2⌉ = 2 → (6 + 4)/20 = .5. Signs do not matter; padding (NaN) is ignored.
    nan = float("nan")
    adv = torch.tensor([[1.0, -2.0, 3.0, -4.0] + [nan] * 8, [1.0] * 10 + [-6.0, 4.0]])
    mask = torch.tensor([[True] * 4 + [False] * 8, [True] * 12])
    m = credit_metrics(adv, mask)
    torch.testing.assert_close(m["ess_ratio"], torch.tensor([5 / 6, 100 / 186]))
    torch.testing.assert_close(m["top10_mass"], torch.tensor([0.4, 0.5]))


def test_credit_metrics_oar_weighted_concentrates():
    torch.manual_seed(0)
    mask = torch.ones(3, 40, dtype=torch.bool)
    scores = torch.rand(3, 40) ** 4 * 10
    tok = shape_advantages("oar", torch.tensor([1.0, -0.5, 2.0]), mask, scores=scores, score_mask=mask)
    m = credit_metrics(tok, mask)
    assert (m["ess_ratio"] < 1).all() and (m["ess_ratio"] > 0).all()
    assert (m["top10_mass"] > 0.1).all() and (m["top10_mass"] <= 1).all()


def test_credit_metrics_rows_without_credit():
    # No tokens → ess 1, top10 0.1; all-zero advantages over T = 15 → ess 1, top10 ⌈1.5⌉/15 = 2/15.
    adv = torch.zeros(2, 15)
    mask = torch.zeros(2, 15, dtype=torch.bool)
    mask[1] = True
    m = credit_metrics(adv, mask)
    assert m["ess_ratio"].tolist() == [1.0, 1.0]
    torch.testing.assert_close(m["top10_mass"], torch.tensor([0.1, 2 / 15]))
    assert credit_metrics(torch.zeros(2, 0), torch.zeros(2, 0))["ess_ratio"].tolist() == [1.0, 1.0]


def test_credit_metrics_scale_free_and_dtype():
    torch.manual_seed(0)
    adv, mask = torch.randn(3, 11, dtype=torch.float64), torch.rand(3, 11) > 0.2
    m1, m2 = credit_metrics(adv, mask), credit_metrics(adv * 1e-30, mask)
    assert m1["ess_ratio"].dtype == torch.float64
    torch.testing.assert_close(m1["ess_ratio"], m2["ess_ratio"])
    torch.testing.assert_close(m1["top10_mass"], m2["top10_mass"])
    assert credit_metrics(adv.to(torch.bfloat16), mask)["ess_ratio"].dtype == torch.float32


@pytest.mark.parametrize(
    "adv, mask, name",
    [
        ([[1.0]], torch.ones(1, 1), "token_advantages"),
        (torch.ones(3), torch.ones(3), "token_advantages"),
        (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), "token_advantages"),
        (torch.ones(2, 3), torch.ones(2, 4), "mask"),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), "token_advantages"),
        (torch.ones(1, 2), torch.tensor([[2, 0]]), "mask"),
    ],
)
def test_credit_metrics_bad_input(adv, mask, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        credit_metrics(adv, mask)


# ------------------------------------------------------------------------------------------------- registry


def test_shaper_none_broadcast_and_passthrough():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = shape_advantages("none", torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    tok = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    assert torch.equal(shape_advantages("none", tok, mask), torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))


def test_shaper_oar_preserves_sign_and_mass():
    torch.manual_seed(0)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[2, 9:] = False
    score_mask = mask.clone()
    score_mask[:, 8:] = False  # answer span and EOS are not scored
    scores = torch.rand(4, 12) * 3
    adv = torch.tensor([1.5, -0.5, 2.0, -3.0])
    out = shape_advantages("oar", adv, mask, scores=scores, score_mask=score_mask)
    w = oar_weights(scores, score_mask)
    torch.testing.assert_close(out, torch.where(mask, adv[:, None] * w, 0.0))
    assert (torch.sign(out[mask]) == torch.sign(adv[:, None].expand(4, 12)[mask])).all()
    # Outside the scored span the advantage is unchanged; inside, its total is A·R.
    assert torch.equal(out[:, 8:][mask[:, 8:]], adv[:, None].expand(4, 4)[mask[:, 8:]])
    torch.testing.assert_close((out * score_mask).sum(-1), adv * 8)
    # Per-token input advantages are multiplied the same way, in their dtype.
    tok = adv[:, None].expand(4, 12).double()
    out64 = shape_advantages("oar", tok, mask, scores=scores, score_mask=score_mask)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out.double(), rtol=1e-6, atol=1e-7)


def test_shaper_registry():
    assert {"none", "oar"} <= set(advantage_shapers())
    with pytest.raises(ValueError, match=r"^name: unknown advantage shaper 'nope'; known: .*'none'.*'oar'"):
        get_advantage_shaper("nope")
    with pytest.raises(ValueError, match="^name"):
        shape_advantages("nope", torch.ones(1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="^name: advantage shaper 'oar' is already registered"):
        register_advantage_shaper("oar")(lambda a, m: a)

    @register_advantage_shaper("test_double")
    def _double(advantages, mask, *, factor=2.0):
        return advantages * factor

    assert get_advantage_shaper("test_double") is _double
    out = shape_advantages("test_double", torch.ones(1), torch.ones(1, 2), factor=3.0)
    assert torch.equal(out, torch.full((1, 2), 3.0))


@pytest.mark.parametrize(
    "name, adv, mask, kwargs, err",
    [
        ("none", torch.ones(2), torch.ones(3, 4), {}, "advantages"),
        ("none", torch.ones(2, 3), torch.ones(2, 4), {}, "mask"),
        ("none", torch.ones(2, 3, 1), torch.ones(2, 3), {}, "advantages"),
        ("none", torch.ones(2, dtype=torch.long), torch.ones(2, 3), {}, "advantages"),
        ("none", torch.tensor([1.0, float("nan")]), torch.ones(2, 3), {}, "advantages"),
        ("none", torch.ones(2), torch.ones(2), {}, "mask"),
        ("none", torch.ones(2), torch.ones(2, 3), dict(scores=torch.ones(2, 3)), "kwargs"),
        ("oar", torch.ones(2), torch.ones(2, 3), {}, "kwargs"),
        ("oar", torch.ones(2), torch.ones(2, 3), dict(scores=torch.ones(2, 3), score_mask=torch.ones(2, 4)),
         "score_mask"),
        ("oar", torch.ones(2), torch.ones(2, 3), dict(scores=torch.ones(2, 4), score_mask=torch.ones(2, 3)), "scores"),
        ("oar", torch.ones(2), torch.tensor([[1, 1, 0], [1, 1, 1]]),
         dict(scores=torch.ones(2, 3), score_mask=torch.ones(2, 3)), "score_mask"),
        ("oar", torch.ones(2), torch.ones(2, 3),
         dict(scores=torch.ones(2, 3), score_mask=torch.ones(2, 3), beta=-1.0), "beta"),
    ],
)
def test_shape_advantages_bad_input(name, adv, mask, kwargs, err):
    with pytest.raises(ValueError, match=f"^{err}"):
        shape_advantages(name, adv, mask, **kwargs)
