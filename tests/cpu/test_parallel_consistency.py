"""The parallel-consistency harness in CI: one saved batch, the single-rank references (tiny, tiny-moe) in one
spawn, then TP2, PP2, PP2 × virtual PP2, DP2, DP2 with the distributed optimizer (dense) and EP2 (MoE) in one
two-rank spawn; per-token π_old / reference / post-update log-probs, OAR-G and OAR-P scores (``pipeline`` under
PP), token advantages, loss and grad norm within ``consistency.TOLERANCES``. TP2×PP2 runs on four ranks in its own
test (also ``tools/parallel_consistency.py --layouts tp2pp2``)."""

import os

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

LAYOUTS = ["tp2", "pp2", "pp2-vpp2", "dp2", "dp2-zero1", "ep2"]


@pytest.fixture(autouse=True)
def _post_update_tolerance(monkeypatch):
    """Post-update log-probs: Adam's first step is close to sign descent (m/√v = ±1), so a gradient element whose
    fp32 value is near zero can flip sign between TP splits and move by a full lr. Since the padded vocabulary rows
    are masked (policy.forward), tp2 sits at ~5e-4 against the 1e-4 of consistency.TOLERANCES, while the gradients
    themselves still agree (grad_norm within 1e-5 here; per-parameter TP2 = TP1 gradients under masking within
    1e-5 in test_policy_forward (e)). 1e-3 until the harness compares parameter updates element-wise."""
    from oar_megatron.policy import consistency as C

    monkeypatch.setitem(C.TOLERANCES, "new_logp", 1e-3)


def _references(path, names):
    from oar_megatron.policy import consistency as C

    res = run_ranks(C.run_layouts, 1, path, names)
    refs = {n: C.assemble(res, n) for n in names}
    for name, ref in refs.items():
        # the comparisons are not vacuous: a real loss, gradient and parameter change, scored tokens
        assert ref["grad_norm"] > 1e-3 and abs(ref["loss"]) > 1e-4, name
        assert (ref["new_logp"] - ref["old_logp"]).abs().max() > 1e-3, name
        assert float(ref["scores"].max()) > 0, name
        C.save_reference(path, C.LAYOUTS[name].preset, ref)
    return refs


def _check_layouts(path, refs, layouts, world_size):
    from oar_megatron.policy import consistency as C

    res = run_ranks(C.run_layouts, world_size, path, layouts)
    failures = {}
    for name in layouts:
        got = C.assemble(res, name)
        checks = C.compare(refs[C.LAYOUTS[name].reference], got)
        want = {"old_logp", "ref_logp", "new_logp", "loss", "grad_norm", "scores", "oar_p_scores",
                "token_advantages"}
        assert set(checks) == want, (name, checks)
        failures.update({f"{name}/{q}": v for q, v in checks.items() if not v[2]})
    assert not failures, failures


def _case(tmp_path):
    from oar_megatron.policy import consistency as C

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path = str(tmp_path / "case.pt")
    case = C.save_case(path)
    assert set(torch.load(path, weights_only=True)) == set(case)
    return path


def test_layouts_match_the_single_rank_layout(tmp_path):
    path = _case(tmp_path)
    refs = _references(path, ["tp1", "tp1-moe"])
    _check_layouts(path, refs, LAYOUTS, 2)


def test_tp2_pp2_on_four_ranks_matches_the_single_rank_layout(tmp_path):
    path = _case(tmp_path)
    refs = _references(path, ["tp1"])
    _check_layouts(path, refs, ["tp2pp2"], 4)
