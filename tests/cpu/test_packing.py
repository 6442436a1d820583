"""policy.packing: THD packing arithmetic (cu_seqlens by hand, round trips, padding multiples) and the
configuration errors where THD attention does not exist (local attention, Transformer Engine absent), the THD
context-parallel partition by hand and its gather on 2 gloo ranks. The packed forward with TE's kernels needs a GPU
and is not run here; the actor's packed path runs with a test attention in test_actor_context_parallel.py
(docs/scaling.md)."""

import pytest
import torch

from oar_megatron.config import ParallelConfig, model_preset
from oar_megatron.policy.packing import (
    check_packing_supported,
    gather_packed_cp,
    pack_rows,
    packed_seq_params,
    packing_multiples,
    thd_cp_indices,
    unpack,
)
from tests.dist_harness import run_ranks

# Three rows of real lengths 3, 5, 2 (prompt | response): right-padded to L = 6 with pad 0.
IDS = torch.tensor([[11, 12, 13, 0, 0, 0], [21, 22, 23, 24, 25, 0], [31, 32, 0, 0, 0, 0]])
LENGTHS = [3, 5, 2]
MASK = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)


def test_no_padding_layout_by_hand():
    p = pack_rows(IDS, MASK, LENGTHS)
    assert p.input_ids.tolist() == [[11, 12, 13, 21, 22, 23, 24, 25, 31, 32]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert p.response_mask.int().tolist() == [[0, 1, 1, 0, 0, 1, 1, 1, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 3, 8, 10] and p.cu_seqlens.dtype == torch.int32
    assert p.cu_seqlens_padded.tolist() == [0, 3, 8, 10]
    assert p.max_seqlen == 5 and p.total == 10 and p.num_rows == 3


def test_row_and_total_multiples_by_hand():
    # CP=2: rows padded to multiples of 4 (3→4, 5→8, 2→4: 16); total multiple 12 → 24, the tail on the last row
    p = pack_rows(IDS, MASK, LENGTHS, row_multiple=4, total_multiple=12, pad_id=7)
    assert p.cu_seqlens.tolist() == [0, 3, 8, 10]  # real lengths: what attention attends over
    assert p.cu_seqlens_padded.tolist() == [0, 4, 12, 24]  # offsets in the packed sequence
    assert p.total == 24 and p.max_seqlen == 12
    assert p.input_ids[0, :4].tolist() == [11, 12, 13, 7] and p.input_ids[0, 12:].tolist() == [31, 32] + [7] * 10
    assert p.position_ids[0, 4:12].tolist() == list(range(8)) and p.position_ids[0, 12:].tolist() == list(range(12))
    assert not p.response_mask[0, 3] and int(p.response_mask.sum()) == int(MASK.sum())


def test_round_trip_and_unpacked_log_probs():
    g = torch.Generator().manual_seed(0)
    n, width = 5, 9
    lengths = torch.randint(2, width + 1, (n,), generator=g)
    ids = torch.randint(1, 50, (n, width), generator=g) * (torch.arange(width) < lengths[:, None])
    mask = (torch.arange(width) >= 1) & (torch.arange(width) < lengths[:, None])
    for row_m, total_m in ((1, 1), (2, 8), (4, 16), (1, 32)):
        p = pack_rows(ids, mask, lengths, row_multiple=row_m, total_multiple=total_m)
        assert p.total % total_m == 0
        assert all((b - a) % row_m == 0 for a, b in zip(p.cu_seqlens_padded[:-2].tolist(),
                                                        p.cu_seqlens_padded[1:-1].tolist()))
        assert torch.equal(unpack(p.input_ids, p, width), ids)
        assert torch.equal(unpack(p.response_mask, p, width), mask)
        # per-token values (e.g. log-probs) made on the packed row come back to their [N, L] cells
        values = torch.randn(p.total, generator=g)
        rows = unpack(values, p)
        for i in range(n):
            s = int(p.cu_seqlens_padded[i])
            assert torch.equal(rows[i, : lengths[i]], values[s: s + int(lengths[i])])
            assert not rows[i, int(lengths[i]):].any()
        # the predicting position of every packed response token lies in the same row
        t = p.response_mask[0].nonzero().squeeze(1)
        row_of = torch.bucketize(t, p.cu_seqlens_padded[1:].long(), right=True)
        assert torch.equal(torch.bucketize(t - 1, p.cu_seqlens_padded[1:].long(), right=True), row_of)


def test_multiples_from_the_layout():
    dense, fp8 = model_preset("tiny"), model_preset("tiny", transformer_impl="transformer_engine", fp8="hybrid",
                                            params_dtype="bfloat16")
    assert packing_multiples(dense, ParallelConfig()) == (1, 1)
    assert packing_multiples(dense, ParallelConfig(tp=2, sequence_parallel=True)) == (1, 2)
    assert packing_multiples(dense, ParallelConfig(cp=2)) == (4, 4)
    assert packing_multiples(fp8, ParallelConfig(tp=2, sequence_parallel=True, cp=2)) == (4, 16 * 2 * 4)
    fp8_mx = model_preset("tiny", transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="mxfp8",
                          params_dtype="bfloat16")
    assert packing_multiples(fp8_mx, ParallelConfig()) == (1, 32)


@pytest.mark.megatron
def test_packed_seq_params_fields():
    p = pack_rows(IDS, MASK, LENGTHS, row_multiple=2)
    psp = packed_seq_params(p)
    assert psp.qkv_format == "thd"
    assert psp.cu_seqlens_q.tolist() == psp.cu_seqlens_kv.tolist() == [0, 3, 8, 10]
    assert psp.cu_seqlens_q_padded.tolist() == psp.cu_seqlens_kv_padded.tolist() == [0, 4, 10, 12]
    assert psp.max_seqlen_q == psp.max_seqlen_kv == 6


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="^lengths: each must lie in"):
        pack_rows(IDS, MASK, [3, 7, 2])
    with pytest.raises(ValueError, match="^lengths: expected 3 row lengths"):
        pack_rows(IDS, MASK, [3, 5])
    with pytest.raises(ValueError, match="^response_mask: position 0"):
        pack_rows(IDS, MASK | (torch.arange(6) == 0), LENGTHS)
    with pytest.raises(ValueError, match="^response_mask: a response token lies past"):
        pack_rows(IDS, MASK, [3, 4, 2])
    with pytest.raises(ValueError, match="^row_multiple"):
        pack_rows(IDS, MASK, LENGTHS, row_multiple=0)
    p = pack_rows(IDS, MASK, LENGTHS)
    with pytest.raises(ValueError, match="^values: expected 10 packed tokens"):
        unpack(torch.zeros(9), p)
    with pytest.raises(ValueError, match="^width: 4 is shorter"):
        unpack(p.input_ids, p, 4)


def test_packing_is_a_configuration_error_without_te_attention(monkeypatch):
    import oar_megatron.policy.model as model_mod
    from oar_megatron.policy.model import MissingDependencyError

    with pytest.raises(ValueError, match=r"^model.transformer_impl: packed THD batches \(cu_seqlens\) need "
                                         "Transformer Engine attention; 'local'"):
        check_packing_supported(model_preset("tiny"))
    monkeypatch.setattr(model_mod, "te_installed", lambda: False)
    with pytest.raises(MissingDependencyError, match="^model.transformer_impl: packed THD batches need Transformer "
                                                     "Engine, which is not installed"):
        check_packing_supported(model_preset("tiny", transformer_impl="transformer_engine"))
    monkeypatch.setattr(model_mod, "te_installed", lambda: True)
    check_packing_supported(model_preset("tiny", transformer_impl="transformer_engine"))  # no error


def test_thd_cp_partition_by_hand():
    # rows padded to 4 and 8 (cp = 2: chunks of 1 and 2 per row); rank 0 holds chunk 0 and 3 of each row
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert thd_cp_indices(cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert thd_cp_indices(cu, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]
    assert thd_cp_indices(cu, 1, 0).tolist() == list(range(12))
    with pytest.raises(ValueError, match="cu_seqlens_padded: row length 6"):
        thd_cp_indices(torch.tensor([0, 6]), 2, 0)


def _gather(rank, world_size):
    p = pack_rows(IDS, MASK, LENGTHS, row_multiple=4, total_multiple=4)  # padded rows 4, 8, 4
    full = torch.arange(p.total, dtype=torch.float32)[None, :] * 1.5 + 1  # [1, T]
    local = full[:, thd_cp_indices(p.cu_seqlens_padded, world_size, rank)].requires_grad_()
    out = gather_packed_cp(local, p, torch.distributed.group.WORLD, world_size, rank)
    (out * torch.arange(p.total)).sum().backward()  # replicated consumer: grad of own positions = their weights
    return out.detach(), full, local.grad, thd_cp_indices(p.cu_seqlens_padded, world_size, rank)


def test_gather_packed_cp_on_two_ranks():
    for out, full, grad, idx in run_ranks(_gather, 2):
        assert torch.equal(out, full)
        assert torch.equal(grad, idx.float()[None, :])
