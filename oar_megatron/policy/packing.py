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
configuration error. The arithmetic here is tested on CPU; the packed forward itself has not been executed in this
project (no TE on CPU, no GPU lent): see docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.model import ModelConfig
from ..config.parallel import ParallelConfig

__all__ = ["PackedBatch", "check_packing_supported", "pack_rows", "packed_seq_params", "packing_multiples", "unpack"]


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
