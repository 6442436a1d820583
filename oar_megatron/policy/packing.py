"""Packed THD batches: variable-length rows concatenated into one sequence, with ``cu_seqlens`` for megatron.

A right-padded rollout batch [N, L] spends attention and MLP work on padding. Packing concatenates the rows'
real tokens into one sequence [1, T] (megatron's ``thd`` layout: batch 1, sequence T) and tells attention where
each row starts with cumulative lengths, megatron's ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=...,
cu_seqlens_kv=..., max_seqlen_q=..., max_seqlen_kv=...)``; attention then never crosses a row boundary.

Layout (``pack_rows``). Row i of real length n_i is padded to p_i = ⌈n_i / m_row⌉·m_row (m_row = 2·cp with context
parallelism: megatron splits every sequence into 2·cp zigzag chunks; else 1) and the last row is padded further
so that T = Σ p_i is a multiple of ``ParallelConfig.token_multiple(model)`` (TP under sequence parallel, 2·cp
under CP, times the FP8 alignment ``ModelConfig.fp8_pad_multiple()``). Two cumulative-length vectors [N+1] int32
describe it, as Transformer Engine expects when sequences carry padding: ``cu_seqlens`` = (0, n_0, n_0+n_1, ...),
the real tokens attention attends over, and ``cu_seqlens_padded`` = (0, p_0, p_0+p_1, ..., T), the row offsets:
row i occupies packed positions [cu_seqlens_padded[i], cu_seqlens_padded[i+1]), its first n_i tokens real.
Position ids restart at 0 in every row. The response mask is packed the same way; the log-prob pass reads the
token at packed position t from the hidden state at t − 1, which stays inside the row because a row's first token
is never a response token. ``unpack`` puts a packed per-token tensor back into [N, L].

Where it runs. THD attention exists only in Transformer Engine (``TEDotProductAttention``, fused/flash backends on
a GPU): megatron's local attention (``transformer_impl: local``, the CPU path) takes a dense mask and ignores
``cu_seqlens``. ``check_packing_supported`` turns asking for packing there, or without Transformer Engine, into a
configuration error. ``policy.actor`` packs its micro-batches with ``parallel.packing``; with context parallelism each
CP rank feeds its ``thd_cp_indices`` share and ``gather_packed_cp`` puts per-token results back together. On CPU this
runs with a test-only THD/CP-correct attention in place of TE's (``tests/cpu/test_actor_context_parallel.py``); TE's
own THD kernels have not been executed in this project (no TE on CPU, no GPU lent): see docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.model import ModelConfig
from ..config.parallel import ParallelConfig

__all__ = ["PackedBatch", "check_packing_supported", "gather_packed_cp", "pack_rows", "packed_seq_params",
           "packing_multiples", "thd_cp_indices", "unpack"]


def check_packing_supported(model: ModelConfig) -> None:
    """Raise when ``model`` cannot run packed THD batches: local attention, or Transformer Engine not installed."""
    from .model import MissingDependencyError, te_installed

    if model.transformer_impl != "transformer_engine":
        raise ValueError(f"model.transformer_impl: packed THD batches (cu_seqlens) need Transformer Engine "
                         f"attention; {model.transformer_impl!r} attention only takes padded batches with a mask "
                         "(turn packing off or use transformer_impl: transformer_engine)")
    if not te_installed():
        raise MissingDependencyError("model.transformer_impl: packed THD batches need Transformer Engine, which is "
                                     "not installed; turn packing off or install transformer-engine[pytorch] on a "
                                     "CUDA machine (pip install -e '.[gpu]')")


def packing_multiples(model: ModelConfig, parallel: ParallelConfig) -> tuple[int, int]:
    """(per-row multiple, total multiple) for ``pack_rows`` under this layout: 2·cp per row with CP (else 1), and
    ``parallel.token_multiple(model)`` for the packed length (module docstring)."""
    return (2 * parallel.cp if parallel.cp > 1 else 1), parallel.token_multiple(model)


@dataclass(frozen=True)
class PackedBatch:
    """Rows packed into one THD sequence of T tokens (module docstring).

    input_ids, position_ids [1, T] long; response_mask [1, T] bool; lengths [N] the real row lengths;
    cu_seqlens [N+1] int32 cumulative real lengths; cu_seqlens_padded [N+1] int32 row offsets in the packed
    sequence (last = T); max_seqlen: the longest padded row (what attention kernels size for).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def total(self) -> int:
        return self.input_ids.shape[1]


def pack_rows(input_ids: torch.Tensor, response_mask: torch.Tensor, lengths, *, row_multiple: int = 1,
              total_multiple: int = 1, pad_id: int = 0) -> PackedBatch:
    """Pack right-padded rows input_ids, response_mask [N, L] with real lengths ``lengths`` [N] (each ≥ 1, ≤ L;
    tokens past a row's length are dropped) into one THD sequence (module docstring). ``row_multiple`` /
    ``total_multiple``: from ``packing_multiples``. Padding tokens are ``pad_id``, never response tokens."""
    if input_ids.dim() != 2 or tuple(response_mask.shape) != tuple(input_ids.shape):
        raise ValueError("input_ids/response_mask: expected matching [N, L] tensors")
    for key, value in (("row_multiple", row_multiple), ("total_multiple", total_multiple)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}: expected an int >= 1, got {value!r}")
    n, width = input_ids.shape
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1).cpu()
    if lengths.shape[0] != n:
        raise ValueError(f"lengths: expected {n} row lengths, got {lengths.shape[0]}")
    if n and (int(lengths.min()) < 1 or int(lengths.max()) > width):
        raise ValueError(f"lengths: each must lie in [1, {width}], got {lengths.tolist()}")
    mask = response_mask.bool()
    if width and bool(mask[:, 0].any()):
        raise ValueError("response_mask: position 0 cannot be a response token (nothing precedes it to predict it)")
    col = torch.arange(width)[None, :]
    if bool((mask.cpu() & (col >= lengths[:, None])).any()):
        raise ValueError("response_mask: a response token lies past its row's length")
    padded = -(-lengths // row_multiple) * row_multiple  # [N]
    total = int(padded.sum())
    extra = -total % total_multiple
    if n:
        padded[-1] += extra  # the tail padding belongs to the last row's segment
    total += extra
    dev = input_ids.device
    ids = torch.full((1, total), pad_id, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros((1, total), dtype=torch.long, device=dev)
    resp = torch.zeros((1, total), dtype=torch.bool, device=dev)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    for i in range(n):
        s, k, p = int(offsets[i]), int(lengths[i]), int(padded[i])
        ids[0, s: s + k] = input_ids[i, :k]
        resp[0, s: s + k] = mask[i, :k]
        pos[0, s: s + p] = torch.arange(p, device=dev)  # restart per row; padding continues the row's positions
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    return PackedBatch(ids, pos, resp, lengths, cu.to(dev), offsets.to(torch.int32).to(dev),
                       int(padded.max()) if n else 0)


def unpack(values: torch.Tensor, packed: PackedBatch, width: int | None = None) -> torch.Tensor:
    """A packed per-token tensor [1, T] or [T] (e.g. response log-probs) back to rows [N, width] (default: the
    longest real row), 0 past each row's real length."""
    flat = values.reshape(-1)
    if flat.shape[0] != packed.total:
        raise ValueError(f"values: expected {packed.total} packed tokens, got {flat.shape[0]}")
    longest = int(packed.lengths.max()) if packed.num_rows else 0
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width: {width} is shorter than the longest row ({longest})")
    out = flat.new_zeros(packed.num_rows, width)
    starts = packed.cu_seqlens_padded[:-1].long().cpu()
    for i in range(packed.num_rows):
        s, k = int(starts[i]), int(packed.lengths[i])
        out[i, :k] = flat[s: s + k]
    return out


def packed_seq_params(packed: PackedBatch):
    """megatron ``PackedSeqParams`` for ``packed``: THD format, real and padded cumulative lengths (the same for
    queries and keys: self-attention), ``max_seqlen`` of the padded rows."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=packed.cu_seqlens, cu_seqlens_kv=packed.cu_seqlens,
                           cu_seqlens_q_padded=packed.cu_seqlens_padded, cu_seqlens_kv_padded=packed.cu_seqlens_padded,
                           max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen)


# ------------------------------------------------------------------------------------------- context parallel


def thd_cp_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Packed positions held by CP rank ``cp_rank`` of a THD row, in local order: for every row i (padded length
    p_i, a multiple of 2·cp), its chunks r and 2·cp−1−r of length p_i/(2·cp), row after row. This is Transformer
    Engine's THD partition (``thd_get_partitioned_indices``, used by megatron's ``get_batch_on_this_cp_rank``): the
    per-row form of ``algorithms.context_parallel.zigzag_indices``. Returns [T/cp] long."""
    offsets = cu_seqlens_padded.long().cpu()
    parts = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"cu_seqlens_padded: row length {length} is not a multiple of 2·cp = {2 * cp_size}")
        c = length // (2 * cp_size)
        ar = torch.arange(c)
        parts += [start + cp_rank * c + ar, start + (2 * cp_size - 1 - cp_rank) * c + ar]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def gather_packed_cp(local: torch.Tensor, packed: PackedBatch, cp_group, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The full packed row [1, T] of a per-token tensor from every CP rank's THD share [1, T/cp]
    (``thd_cp_indices`` layout), identical on every CP rank; differentiable like ``gather_zigzag``, which does
    the communication. The local share is reordered to [chunks r of all rows | chunks 2·cp−1−r of all rows], whose
    zigzag gather is the packed row in chunk-major order (every row's chunk 0, then every row's chunk 1, ...); one
    fixed permutation puts it back in row order."""
    from ..algorithms.context_parallel import gather_zigzag

    if cp_size == 1:
        return local
    lengths = (packed.cu_seqlens_padded[1:] - packed.cu_seqlens_padded[:-1]).long().cpu() // (2 * cp_size)  # c_i
    local_start = torch.cat([torch.zeros(1, dtype=torch.long), (2 * lengths).cumsum(0)[:-1]])
    first = torch.cat([s + torch.arange(c) for s, c in zip(local_start.tolist(), lengths.tolist())])
    second = torch.cat([s + c + torch.arange(c) for s, c in zip(local_start.tolist(), lengths.tolist())])
    halves = local.index_select(1, torch.cat([first, second]).to(local.device))
    chunk_major = gather_zigzag(halves, cp_group, dim=1)  # [1, T]
    # position of (row i, chunk j, offset o): chunk-major j·(T/2cp) + Σ_{k<i} c_k + o; packed off_i + j·c_i + o
    per_chunk = int(lengths.sum())
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    perm = torch.cat([torch.cat([j * per_chunk + r0 + torch.arange(c) for j in range(2 * cp_size)])
                      for r0, c in zip(row_start.tolist(), lengths.tolist())])
    return chunk_major.index_select(1, perm.to(local.device))
