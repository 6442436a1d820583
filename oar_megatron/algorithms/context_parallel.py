"""Context parallel (CP) layout and the sequence-level reductions the RL losses need under it (pure torch).

Megatron's CP layout (load-balanced "zigzag" for causal attention): each sequence of length L is cut into 2·cp
equal chunks and CP rank r holds chunks r and 2·cp−1−r, concatenated in that order, so every rank gets the same
amount of causal-attention work. Per-token quantities (log-probs, entropy, token losses) stay local; what needs care
are the quantities defined over a whole response:

- sums / counts over the sequence (GSPO's length-normalised log-ratio (1/|y|) Σ_t (log π_θ − log π_old), token
  counts of loss denominators): ``seq_sum_over_cp`` / ``seq_mean_over_cp`` all-reduce a partial sum and a count
  over the CP group (a few floats per row);
- order statistics over a row (OAR's per-row min-max normalisation and quantile threshold, ``oar.oar_weights``):
  they need the full row, so ``gather_zigzag`` all-gathers the local pieces and puts them back in sequence order.

Gradients follow megatron's CP convention: every CP rank computes the same (replicated) loss from the reduced /
gathered quantity, and the gradients of the parameters are then summed over the CP ranks (megatron multiplies the
loss by cp and averages over the dp×cp group). So the backward of a reduction or gather returns, on each rank, the
gradient of that rank's *own* local values only: identity for the sum (megatron's reduce-from-region pattern),
the rank's two chunks of the full gradient for the gather. Summed over CP ranks, this is the unsharded gradient.

CP attention itself (ring attention over the zigzag chunks) needs Transformer Engine's attention kernels, which
are not installed in this CPU environment; only these layout helpers and reductions are implemented and tested here
(against single-process results, under gloo). ``group=None`` (or a group of size 1) means no communication.
"""

from __future__ import annotations

import torch

from .. import collectives
from ._validate import check_int, check_tensor
from .reduce import ProcessGroup, group_rank, group_size

__all__ = ["gather_zigzag", "seq_mean_over_cp", "seq_sum_over_cp", "sum_over_cp", "zigzag_indices", "zigzag_split"]


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim: {dim} is out of range for a tensor with {x.ndim} dimensions")
    return dim % x.ndim


def zigzag_indices(length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Sequence positions held by CP rank ``cp_rank``, in local order: chunk r then chunk 2·cp−1−r, [length/cp]."""
    check_int("cp_size", cp_size, minimum=1)
    check_int("cp_rank", cp_rank, minimum=0)
    if cp_rank >= cp_size:
        raise ValueError(f"cp_rank: {cp_rank} is not in [0, cp_size={cp_size})")
    if length % (2 * cp_size):
        raise ValueError(f"length: {length} must be divisible by 2·cp_size = {2 * cp_size} (megatron's CP layout)")
    c = length // (2 * cp_size)
    ar = torch.arange(c, device=device)
    return torch.cat([cp_rank * c + ar, (2 * cp_size - 1 - cp_rank) * c + ar])


def zigzag_split(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of ``x`` along ``dim`` (the sequence dimension): chunks r and 2·cp−1−r of 2·cp equal
    chunks, concatenated. ``x.shape[dim]`` must be divisible by 2·cp_size. Differentiable (a view-free index)."""
    check_tensor("x", x)
    dim = _dim(x, dim)
    if cp_size == 1:
        return x
    idx = zigzag_indices(x.shape[dim], cp_size, cp_rank, device=x.device)
    return x.index_select(dim, idx)


def _unsplit(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of ``zigzag_split`` over all ranks: the full tensor from every rank's local part, in rank order."""
    cp = len(parts)
    halves = [p.chunk(2, dim=dim) for p in parts]
    return torch.cat([halves[i][0] for i in range(cp)] + [halves[i][1] for i in reversed(range(cp))], dim=dim)


class _GatherZigzag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group, dim):
        size = group_size(group)
        ctx.group, ctx.dim, ctx.size, ctx.rank = group, dim, size, group_rank(group)
        return _unsplit(collectives.all_gather(local, group=group), dim)

    @staticmethod
    def backward(ctx, grad):
        return zigzag_split(grad, ctx.size, ctx.rank, ctx.dim), None, None


def gather_zigzag(local: torch.Tensor, cp_group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Full sequences from the CP-local pieces: all-gather over ``cp_group`` and undo the zigzag along ``dim``.

    local: this rank's part (``zigzag_split`` layout), the same shape on every CP rank. Returns the full tensor
    (sequence length cp·local.shape[dim]), identical on every CP rank. Differentiable: the backward hands each rank
    the gradient of its own two chunks (module docstring: the consumer is replicated over CP).
    """
    check_tensor("local", local)
    dim = _dim(local, dim)
    if group_size(cp_group) == 1:
        return local
    if local.shape[dim] % 2:
        raise ValueError(f"local: sequence dimension {dim} has odd length {local.shape[dim]} (two chunks per rank)")
    return _GatherZigzag.apply(local, cp_group, dim)


class _SumOverCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group):
        return collectives.all_reduce(local.detach().clone(), group=group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_cp(local: torch.Tensor, cp_group: ProcessGroup | None) -> torch.Tensor:
    """Σ over ``cp_group`` of every rank's ``local`` (same shape everywhere), identical on every CP rank; e.g. the
    OAR P_final logits of answer positions, each held by one CP rank (zeros elsewhere). Differentiable with an
    identity backward: each rank gets the gradient of its own term (module docstring: the consumer is replicated)."""
    check_tensor("local", local)
    if group_size(cp_group) == 1:
        return local
    return _SumOverCP.apply(local, cp_group)


class _SumCountOverCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, total, count, group):
        buf = torch.stack([total.detach(), count.to(total.dtype)])
        collectives.all_reduce(buf, group=group)
        out_total, out_count = buf[0].clone(), buf[1].clone()
        ctx.mark_non_differentiable(out_count)
        return out_total, out_count

    @staticmethod
    def backward(ctx, grad_total, grad_count):
        return grad_total, None, None


def seq_sum_over_cp(
    values_local: torch.Tensor, mask_local: torch.Tensor, cp_group: ProcessGroup | None, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row Σ_t mask·values and Σ_t mask over the whole sequence, from CP-local pieces.

    values_local, mask_local: [..., L/cp] (this rank's tokens along ``dim``; mask bool or 0/1). Returns (sum,
    count) with ``dim`` reduced, summed over ``cp_group`` in one all-reduce, identical on every CP rank; count in
    the values' dtype. The sum is differentiable w.r.t. ``values_local`` with an identity backward (module
    docstring). Positions outside the mask are never read (NaN there is fine).
    """
    check_tensor("values_local", values_local)
    if tuple(mask_local.shape) != tuple(values_local.shape):
        raise ValueError(f"mask_local: shape {tuple(mask_local.shape)} does not match values_local shape "
                         f"{tuple(values_local.shape)}")
    dim = _dim(values_local, dim)
    m = mask_local.bool()
    zero = torch.zeros((), dtype=values_local.dtype, device=values_local.device)
    total = torch.where(m, values_local, zero).sum(dim=dim)
    count = m.sum(dim=dim).to(values_local.dtype)
    if group_size(cp_group) == 1:
        return total, count
    return _SumCountOverCP.apply(total, count, cp_group)


def seq_mean_over_cp(
    values_local: torch.Tensor, mask_local: torch.Tensor, cp_group: ProcessGroup | None, dim: int = -1
) -> torch.Tensor:
    """Per-row masked mean over the whole sequence (sum / max(count, 1)) from CP-local pieces, e.g. the log of
    GSPO's sequence ratio: ``seq_mean_over_cp(logp − old_logp, mask, cp_group)``. Differentiable like the sum."""
    total, count = seq_sum_over_cp(values_local, mask_local, cp_group, dim)
    return total / count.clamp(min=1)
