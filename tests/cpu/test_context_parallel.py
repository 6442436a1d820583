"""algorithms.context_parallel: megatron's zigzag CP layout, the full-sequence gather and the sequence sums, against
single-process results. One 4-rank gloo spawn (pure torch, no megatron import) checks cp=2 (two groups {0,1},
{2,3}) and cp=4 (all ranks): the GSPO log sequence ratio from CP shards equals ``losses._seq_log_ratio`` on the
full rows (value and, summed over CP ranks as megatron does, the gradient); OAR weights from gathered scores equal
``oar_weights`` on the full rows; the gather's gradient is each rank's slice of the full gradient; ``sum_over_cp`` of
per-rank terms is the full sum, its gradient on each rank that of its own term.
"""

import pytest
import torch

from oar_megatron.algorithms.context_parallel import (
    gather_zigzag, seq_mean_over_cp, seq_sum_over_cp, sum_over_cp, zigzag_indices, zigzag_split,
)
from tests.dist_harness import run_ranks

B, L = 3, 16


def test_zigzag_layout_and_errors():
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert zigzag_indices(16, 4, 1).tolist() == [2, 3, 12, 13]
    x = torch.arange(2 * L).view(2, L)
    for cp in (1, 2, 4, 8):
        parts = [zigzag_split(x, cp, r, dim=1) for r in range(cp)]
        assert sorted(torch.cat(parts, 1)[0].tolist()) == list(range(L))
        assert all(p.shape == (2, L // cp) for p in parts)
    assert torch.equal(zigzag_split(x.t(), 2, 1, dim=0), zigzag_split(x, 2, 1, dim=1).t())
    # No group: nothing to reduce or gather.
    v, m = torch.randn(B, L), torch.rand(B, L) > 0.3
    total, count = seq_sum_over_cp(v, m, None)
    torch.testing.assert_close(total, (v * m).sum(-1))
    torch.testing.assert_close(count, m.sum(-1).float())
    assert gather_zigzag(v, None) is v
    with pytest.raises(ValueError, match="length"):
        zigzag_split(x, 3, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_split(x, 2, 2)
    with pytest.raises(ValueError, match="mask_local"):
        seq_sum_over_cp(v, m[:, :3], None)


def _full_data():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B, L, generator=g) > 0.25
    mask[2, 5:] = False  # a short response
    w = torch.randn(B, generator=g, dtype=torch.float64)
    scores = torch.rand(B, L, generator=g, dtype=torch.float64) * 5
    wg = torch.randn(B, L, generator=g, dtype=torch.float64)
    return logp, old, mask, w, scores, wg


def _ranks(rank, world_size):
    import torch.distributed as dist

    from oar_megatron.algorithms.oar import oar_weights

    logp, old, mask, w, scores, wg = _full_data()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    everyone = dist.new_group([0, 1, 2, 3])
    out = {}
    for cp, group, cp_rank in ((2, pairs[rank // 2], rank % 2), (4, everyone, rank)):
        split = lambda t: zigzag_split(t, cp, cp_rank, dim=1)  # noqa: E731
        local = split(logp).requires_grad_(True)
        log_s = seq_mean_over_cp(local - split(old), split(mask), group)
        (log_s * w).sum().backward()  # the replicated per-rank loss
        total, count = seq_sum_over_cp(split(scores), split(mask), group)

        s_local = split(scores).requires_grad_(True)
        full = gather_zigzag(s_local, group, dim=1)
        (full * wg).sum().backward()
        weights = oar_weights(full.detach(), gather_zigzag(split(mask).float(), group, dim=1).bool())

        part = split(scores).requires_grad_(True)  # each rank's term of a per-row total (OAR's P_final under CP)
        summed = sum_over_cp(part.sum(-1), group)
        (summed * w).sum().backward()
        out[cp] = dict(log_s=log_s.detach(), grad=local.grad, count=count, total=total, full=full.detach(),
                       gather_grad=s_local.grad, weights=weights, summed=summed.detach(), sum_grad=part.grad)
    return out


def test_cp_reductions_match_single_process():
    from oar_megatron.algorithms.losses import _seq_log_ratio
    from oar_megatron.algorithms.oar import oar_weights

    logp, old, mask, w, scores, wg = _full_data()
    ref_logp = logp.clone().requires_grad_(True)
    ref_log_s = _seq_log_ratio(ref_logp, old, mask)
    (ref_log_s * w).sum().backward()
    ref_weights = oar_weights(scores, mask)
    results = run_ranks(_ranks, 4)
    for cp in (2, 4):
        for rank, res in enumerate(results):
            r = res[cp]
            cp_rank = rank % cp
            torch.testing.assert_close(r["log_s"], ref_log_s.detach())
            torch.testing.assert_close(r["count"], mask.sum(-1).double())
            torch.testing.assert_close(r["total"], (scores * mask).sum(-1))
            torch.testing.assert_close(r["full"], scores)
            torch.testing.assert_close(r["weights"], ref_weights)
            # Each rank's gradient is the full gradient on its own positions (summed over CP ranks: the full one).
            torch.testing.assert_close(r["grad"], zigzag_split(ref_logp.grad, cp, cp_rank))
            torch.testing.assert_close(r["gather_grad"], zigzag_split(wg, cp, cp_rank))
            torch.testing.assert_close(r["summed"], scores.sum(-1))
            torch.testing.assert_close(r["sum_grad"], w[:, None].expand(B, L // cp))  # identity: own term only
        rebuilt = torch.zeros(B, L, dtype=torch.float64)
        for cp_rank in range(cp):
            rebuilt[:, zigzag_indices(L, cp, cp_rank)] += results[cp_rank][cp]["grad"]
        torch.testing.assert_close(rebuilt, ref_logp.grad)
