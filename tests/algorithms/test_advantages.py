"""Group advantages, estimator registry, group filtering, whitening, rollout-mismatch correction."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oar_megatron.algorithms import (
    compute_advantages,
    filter_groups,
    get_advantage_estimator,
    group_advantages,
    rollout_correction,
    whiten,
)


def test_grpo_hand_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4, eps=0.0)
    # group 1: mean 0.25, unbiased std sqrt(((0.75)^2 + 3*(0.25)^2)/3) = 0.5
    torch.testing.assert_close(a[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    torch.testing.assert_close(a[4:], torch.zeros(4))  # all equal → 0 (not NaN) even with eps = 0
    a_eps = group_advantages(r, 4)  # default eps = 1e-6 added to the std
    assert float(a_eps[0]) == pytest.approx(0.75 / (0.5 + 1e-6), rel=1e-7)  # fp32


def test_dr_grpo_and_rloo():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0])
    torch.testing.assert_close(group_advantages(r, 2, scale_by_std=False), torch.tensor([0.5, -0.5, -1.0, 1.0]))
    torch.testing.assert_close(compute_advantages("dr_grpo", r, 2), torch.tensor([0.5, -0.5, -1.0, 1.0]))
    r3 = torch.tensor([3.0, 0.0, 0.0])
    # RLOO: r_i − mean of the others: 3 − 0, 0 − 1.5, 0 − 1.5
    torch.testing.assert_close(compute_advantages("rloo", r3, 3), torch.tensor([3.0, -1.5, -1.5]))


def test_singleton_groups_give_zero():
    r = torch.tensor([1.0, 0.0, 5.0])
    for est in ("grpo", "dr_grpo", "rloo"):
        torch.testing.assert_close(compute_advantages(est, r, 1), torch.zeros(3))


@settings(max_examples=50, deadline=None)
@given(g=st.integers(2, 8), n=st.integers(1, 6), seed=st.integers(0, 9999))
def test_property_group_advantages(g, n, seed):
    r = torch.randint(0, 2, (n * g,), generator=torch.Generator().manual_seed(seed)).double()
    a = group_advantages(r, g).view(n, g)
    # zero mean per group, and unit unbiased std wherever the group is not constant
    torch.testing.assert_close(a.sum(1), torch.zeros(n, dtype=torch.float64), atol=1e-9, rtol=0)
    for row, rr in zip(a, r.view(n, g)):
        if rr.max() > rr.min():
            assert float(row.std()) == pytest.approx(1.0, rel=1e-5)
            assert torch.equal(torch.sign(row), torch.sign(rr - rr.mean()))


def test_filter_groups_counts():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    f = filter_groups(r, 2)
    assert f.keep.tolist() == [False, False, True, True, False, False, False, False]
    assert (f.num_groups, f.num_dropped, f.num_all_correct, f.num_all_wrong) == (4, 3, 1, 1)


def test_whiten_local_and_masked():
    v = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([True, True, True, False])
    w = whiten(v, m, eps=0.0)
    # mean 2, biased var 2/3
    torch.testing.assert_close(w[:3], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3))
    assert float(w[3]) == 100.0
    w2 = whiten(v, m, shift_mean=False, eps=0.0)
    torch.testing.assert_close(w2[:3], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3) + 2.0)


def test_rollout_correction_tis_and_icepop_token_level():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]]))
    roll = torch.log(torch.tensor([[0.5, 0.05, 0.3], [0.5, 0.3, 0.1]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # ρ = old/rollout: [1, 4, 3], [0.6, 1, (pad)]
    w, m = rollout_correction(old, roll, mask, mode="tis")
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 2.0], [0.6, 1.0, 1.0]]))
    assert m["clip_frac"] == pytest.approx(2 / 5)
    assert m["ratio_mean"] == pytest.approx((1 + 4 + 3 + 0.6 + 1) / 5, rel=1e-6)
    assert m["logp_diff_max"] == pytest.approx(math.log(4), rel=1e-6)
    assert m["logp_diff_mean"] == pytest.approx((0 + math.log(4) + math.log(3) + math.log(5 / 3) + 0) / 5, rel=1e-6)
    w, m = rollout_correction(old, roll, mask, mode="icepop")
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0], [0.6, 1.0, 1.0]]))
    assert m["mask_frac"] == pytest.approx(2 / 5)
    # weight ESS over masked tokens: (1+0+0+0.6+1)^2 / (5 * (1+0.36+1))
    assert m["weight_ess"] == pytest.approx(2.6**2 / (5 * 2.36), rel=1e-6)


def test_rollout_correction_sequence_levels():
    old = torch.log(torch.tensor([[0.5, 0.4], [0.2, 0.2]]))
    roll = torch.log(torch.tensor([[0.25, 0.4], [0.4, 0.1]]))
    mask = torch.tensor([[1, 1], [1, 1]], dtype=torch.bool)
    w, _ = rollout_correction(old, roll, mask, mode="tis", level="sequence", high=5.0)
    # products: row 0: 2·1 = 2; row 1: 0.5·2 = 1
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    w, _ = rollout_correction(old, roll, mask, mode="tis", level="geometric")
    torch.testing.assert_close(w, torch.tensor([[math.sqrt(2)] * 2, [1.0, 1.0]]))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_advantages(torch.zeros(5), 2), "rewards: length 5 is not a multiple of group_size=2"),
        (lambda: group_advantages(torch.zeros(2, 2), 2), "rewards: expected a 1-D"),
        (lambda: group_advantages(torch.zeros(4, dtype=torch.long), 2), "rewards: expected a floating"),
        (lambda: group_advantages(torch.zeros(4), 0), "group_size: must be >= 1"),
        (lambda: group_advantages(torch.tensor([1.0, float("nan")]), 2), "rewards: contains NaN"),
        (lambda: group_advantages(torch.zeros(0), 2), "rewards: empty"),
        (lambda: group_advantages(torch.zeros(4), 2, eps=-1.0), "eps: must be >= 0"),
        (lambda: get_advantage_estimator("ppo"), "name: unknown advantage estimator 'ppo'"),
        (lambda: compute_advantages("grpo", torch.zeros(4), 2, scale=1), "options:"),
        (lambda: filter_groups(torch.zeros(4), 3), "rewards: length 4"),
        (lambda: whiten(torch.zeros(3), torch.zeros(3, dtype=torch.bool)), "mask: selects no entries"),
        (lambda: whiten(torch.zeros(3), torch.ones(4, dtype=torch.bool)), "mask: shape"),
        (lambda: rollout_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mode="x"), "mode: unknown"),
        (lambda: rollout_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), level="x"), "level: unknown"),
        (lambda: rollout_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), low=3.0, high=2.0), "low: must be below"),
        (lambda: rollout_correction(torch.zeros(1, 2), torch.zeros(2, 1), torch.ones(1, 2)), "rollout_logp: shape"),
        (lambda: rollout_correction(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2)), "mask: selects no tokens"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
