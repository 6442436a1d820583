"""Masked reductions and reductions over a process group.

Convention for every numerics function in this package: ``group=None`` means *no communication* (the caller is
a single process, or the quantity is already local). Pass a real ``torch.distributed`` process group to reduce
over it; a group of size 1 is also a no-op. This keeps the numerics free of global parallel state (no Megatron
``mpu`` lookups), so they run unchanged under gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    """World size of ``group``; 1 when ``group`` is None or torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """Rank within ``group``; 0 when ``group`` is None or torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce(x: torch.Tensor, op: str = "sum", group: ProcessGroup | None = None) -> torch.Tensor:
    """Out-of-place all-reduce of ``x`` over ``group`` (``op`` in sum/max/min). Not differentiable: use it on
    detached statistics; the autograd-aware collectives live inside the autograd Functions that need them."""
    if group_size(group) == 1:
        return x
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op: unknown reduction {op!r}; known: {', '.join(map(repr, ops))}")
    out = x.detach().clone()
    dist.all_reduce(out, op=ops[op], group=group)
    return out


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is True. Masked-out values never enter (``where``, not multiply), so NaN or
    inf in padding cannot leak into the result or its gradient."""
    vals = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return vals.sum() if dim is None else vals.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over masked entries (along ``dim``); an empty selection gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def global_token_count(mask: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Number of selected tokens summed over ``group`` (e.g. all micro-batches and DP ranks of a step)."""
    return all_reduce(mask.sum().to(torch.float64), "sum", group)


def global_seq_count(mask: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Number of rows with at least one selected token, summed over ``group``."""
    return all_reduce(mask.any(dim=-1).sum().to(torch.float64), "sum", group)
