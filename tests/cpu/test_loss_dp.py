"""Data-parallel split of a global batch over real gloo ranks gives the loss and gradient of the unsplit batch,
and whitening over a process group uses the global moments."""

import pytest
import torch
import torch.distributed as dist

from oar_megatron.algorithms import loss_denominators, policy_loss, whiten
from tests.dist_harness import run_ranks

pytestmark = pytest.mark.dist
B, T = 8, 10


def _global_batch():
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, mask, adv


CASES = [("grpo", "token-mean"), ("gspo_token", "seq-mean-token-mean"), ("aspo", "seq-mean-token-sum"), ("grpo", "seq-mean-token-sum-norm")]


def _dp_rank(rank, world_size):
    logp0, old, mask, adv = _global_batch()
    rows = slice(rank * B // world_size, (rank + 1) * B // world_size)
    # Two micro-batches per rank.
    half = B // world_size // 2
    micro = [slice(rows.start, rows.start + half), slice(rows.start + half, rows.stop)]
    g_tok, g_seq = loss_denominators([mask[s] for s in micro], group=dist.group.WORLD)
    out = {}
    for name, agg in CASES:
        total = torch.zeros((), dtype=torch.float64)
        grad = torch.zeros(B, T, dtype=torch.float64)
        for s in micro:
            lp = logp0[s].clone().requires_grad_(True)
            loss, _ = policy_loss(name, lp, old[s], adv[s], mask[s], agg=agg, norm_len=T, global_tokens=g_tok, global_seqs=g_seq)
            loss.backward()
            total += loss.detach()
            grad[s] = lp.grad
        dist.all_reduce(total)
        dist.all_reduce(grad)  # rows are disjoint across ranks: the sum assembles the global gradient
        out[(name, agg)] = (total, grad)
    v = torch.arange(rank * 4, rank * 4 + 4, dtype=torch.float64)
    out["whiten"] = whiten(v, group=dist.group.WORLD, eps=0.0)
    return out


def test_dp_split_matches_single_process():
    logp0, old, mask, adv = _global_batch()
    results = run_ranks(_dp_rank, 2)
    for name, agg in CASES:
        lp = logp0.clone().requires_grad_(True)
        ref, _ = policy_loss(name, lp, old, adv, mask, agg=agg, norm_len=T)
        ref.backward()
        for r in results:
            total, grad = r[(name, agg)]
            assert float(total) == pytest.approx(float(ref), abs=1e-12), (name, agg)
            torch.testing.assert_close(grad, lp.grad, rtol=0, atol=1e-13)
    full = whiten(torch.arange(8, dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(torch.cat([r["whiten"] for r in results]), full)
