"""Vocab-parallel log-prob / entropy / KL over real gloo TP groups (TP=2 and TP=4, and two TP=2 subgroups of a
4-rank world) equal the single-process fp64 reference on the full logits; each rank's gradient is the matching
vocabulary slice of the reference gradient."""

import io

import pytest
import torch
import torch.distributed as dist

from oar_megatron.algorithms import reference_logprob_entropy, vocab_parallel_kl, vocab_parallel_logprob_entropy
from tests.dist_harness import run_ranks

pytestmark = pytest.mark.dist
D = torch.float64
SHAPE, V, TEMP = (3, 5), 24, 0.7


def _full():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(*SHAPE, V, generator=g, dtype=D) * 4
    q_logits = logits + torch.randn(*SHAPE, V, generator=g, dtype=D)
    target = torch.randint(0, V, SHAPE, generator=g)
    w = torch.randn(3, *SHAPE, generator=g, dtype=D)  # weights of logp, entropy, KL in the loss
    return logits, q_logits, target, w


def _shard_run(rank, tp, group, dtype, chunk_size):
    """Forward + backward of w0·logp + w1·H + w2·KL on this rank's vocab slice."""
    logits, q_logits, target, w = _full()
    vs = V // tp
    cols = slice(rank * vs, (rank + 1) * vs)
    x = logits[..., cols].to(dtype).requires_grad_(True)
    q = q_logits[..., cols].to(dtype).requires_grad_(True)
    lp, h = vocab_parallel_logprob_entropy(x, target, tp_group=group, temperature=TEMP, chunk_size=chunk_size)
    kl = vocab_parallel_kl(x, q, tp_group=group, temperature=TEMP, chunk_size=chunk_size)
    wd = w.to(lp.dtype)
    ((lp * wd[0]).sum() + (h * wd[1]).sum() + (kl * wd[2]).sum()).backward()
    # Log-prob only, entropy not computed (the other backward path).
    y = logits[..., cols].to(dtype).requires_grad_(True)
    lp2, none = vocab_parallel_logprob_entropy(y, target, tp_group=group, temperature=TEMP, compute_entropy=False)
    (lp2 * wd[0]).sum().backward()
    return dict(lp=lp.detach(), h=h.detach(), kl=kl.detach(), gx=x.grad, gq=q.grad, lp_only=y.grad, none=none)


def _tp_rank(rank, world_size):
    out = {}
    world = dist.group.WORLD
    for dtype in (D, torch.float32):
        for chunk in (None, 4):
            out[(world_size, dtype, chunk)] = _shard_run(rank, world_size, world, dtype, chunk)
    # Target ids of other ranks' slices are valid; ids past V_total = V/TP × TP are not.
    logits, _, target, _ = _full()
    vs = V // world_size
    try:
        vocab_parallel_logprob_entropy(logits[..., :vs], torch.full_like(target, V), tp_group=world)
        out["range_error"] = None
    except ValueError as e:
        out["range_error"] = str(e)
    if world_size == 4:
        # Two TP=2 groups {0, 1} and {2, 3}: the rank inside the group, not the world rank, picks the slice.
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        out[(2, D, "sub")] = _shard_run(rank % 2, 2, groups[rank // 2], D, 3)
    # Serialised to bytes: many tensors sent through the queue as shared-memory handles can outlive the child.
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def _reference():
    logits, q_logits, target, w = _full()
    x = logits.clone().requires_grad_(True)
    q = q_logits.clone().requires_grad_(True)
    lp, h = reference_logprob_entropy(x, target, TEMP)
    lpx, lqx = torch.log_softmax(x / TEMP, -1), torch.log_softmax(q / TEMP, -1)
    kl = (lpx.exp() * (lpx - lqx)).sum(-1)
    ((lp * w[0]).sum() + (h * w[1]).sum() + (kl * w[2]).sum()).backward()
    y = logits.clone().requires_grad_(True)
    (reference_logprob_entropy(y, target, TEMP)[0] * w[0]).sum().backward()
    return dict(lp=lp.detach(), h=h.detach(), kl=kl.detach(), gx=x.grad, gq=q.grad, lp_only=y.grad)


def _check(res, ref, rank, tp, dtype):
    tol = dict(atol=1e-10, rtol=0) if dtype == D else dict(atol=1e-5, rtol=1e-5)
    vs = V // tp
    cols = slice(rank * vs, (rank + 1) * vs)
    assert res["none"] is None
    for key in ("lp", "h", "kl"):
        assert res[key].dtype == (D if dtype == D else torch.float32)
        torch.testing.assert_close(res[key].to(D), ref[key], **tol)
    for key in ("gx", "gq", "lp_only"):
        assert res[key].dtype == dtype and res[key].shape == (*SHAPE, vs)
        torch.testing.assert_close(res[key].to(D), ref[key][..., cols], **tol)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_single_process_reference(tp):
    ref = _reference()
    results = [torch.load(io.BytesIO(b)) for b in run_ranks(_tp_rank, tp)]
    for rank, out in enumerate(results):
        for dtype in (D, torch.float32):
            for chunk in (None, 4):
                _check(out[(tp, dtype, chunk)], ref, rank, tp, dtype)
        assert out["range_error"] is not None and out["range_error"].startswith("target")
        assert f"[0, {V})" in out["range_error"]
        if tp == 4:
            _check(out[(2, D, "sub")], ref, rank % 2, 2, D)
