"""Masked reductions and reductions over a process group.

Convention for every numerics function in this package: ``group=None`` means *no communication* (the caller is
a single process, or the quantity is already local). Pass a real ``torch.distributed`` process group to reduce
over it; a group of size 1 is also a no-op. This keeps the numerics free of global parallel state (no Megatron
``mpu`` lookups), so they run unchanged under gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import collectives

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
    if op not in ("sum", "max", "min"):
        raise ValueError(f"op: unknown reduction {op!r}; known: 'sum', 'max', 'min'")
    if group_size(group) == 1:
        return x
    return collectives.all_reduce(x.detach().clone(), op, group)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is True. Masked-out values never enter (``where``, not multiply), so NaN or
    inf in padding cannot leak into the result or its gradient."""
    vals = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return vals.sum() if dim is None else vals.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over masked entries (along ``dim``); an empty selection gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def loss_denominators(
    masks: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], group: ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global_tokens, global_seqs)`` of a whole step, computed once before the micro-batch loop.

    ``masks``: the [B_k, T_k] response masks of every micro-batch this rank will run (a single tensor or a list);
    ``group``: the data-parallel (× context-parallel) group. Passing these to ``policy_loss`` makes the sum of the
    micro-batch losses over all micro-batches and ranks equal the loss of the unsplit global batch, whatever the split.
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("masks: empty list; pass the mask of every micro-batch of the step")
    tokens = sum(m.bool().sum().to(torch.float64) for m in masks)
    seqs = sum(m.bool().any(dim=-1).sum().to(torch.float64) for m in masks)
    tokens, seqs = all_reduce(torch.stack([tokens, seqs]), "sum", group).unbind(0)
    return tokens, seqs
