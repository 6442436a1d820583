"""One optimizer update through megatron-core's pipeline schedules, with the loss scaling written down.

Loss scaling. The policy losses of ``oar_megatron.algorithms`` are computed with global-batch denominators
(``loss_denominators`` over every micro-batch of every data-parallel rank), so the gradient we want is

    ∇ Σ_{dp ranks} Σ_{micro-batches} loss_mb                                             (1)

megatron-core changes that sum twice: the schedule divides each micro-batch loss by ``num_microbatches`` (2-tuple
loss functions, ``schedules.forward_step_calc_loss``; also multiplying by the context-parallel size, which DDP's
average over the dp × cp group takes back), and DDP averages gradients over the data-parallel group (divides by
``dp_size``). Returning ``loss_mb × num_microbatches × dp_size`` from the loss function therefore yields exactly
(1): any split of the global batch into micro-batches and DP ranks gives the same update (tested in
``tests/cpu/test_train_step.py`` against a single process). ``schedule_loss_scale`` is that factor.

The learning-rate scheduler is stepped before the optimizer, so update k (1-based) uses the warm-up rate
lr·k/warmup, never 0; an update the optimizer skips (fp16 loss-scale overflow) steps it back, so the schedule
counts applied updates only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

# forward_fn(model_chunk, micro_batch) -> (output_tensor, loss_fn); on the last pipeline stage the schedule calls
# loss_fn(output_tensor) -> (loss scalar with global denominators, {metric name: 0-d tensor}).
ForwardFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, dict]]]]


def schedule_loss_scale(num_microbatches: int, dp_size: int) -> int:
    """Factor that cancels megatron's ``/num_microbatches`` (schedule) and ``/dp_size`` (DDP average), see (1)."""
    if num_microbatches < 1 or dp_size < 1:
        raise ValueError(f"num_microbatches/dp_size: must be >= 1, got {num_microbatches}/{dp_size}")
    return num_microbatches * dp_size


@dataclass
class StepResult:
    """What one update reports: ``loss`` is Σ over this rank's micro-batches of the unscaled losses (add over DP
    ranks for the global loss); ``metrics`` the per-micro-batch metric tensors summed likewise."""

    updated: bool
    grad_norm: float
    lr: float
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def train_step(
    chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    micro_batches: Sequence[Any],
    forward_fn: ForwardFn,
    *,
    dp_size: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Forward/backward every micro-batch with megatron's schedule for the current layout, then one optimizer step.

    Args:
        chunks: DDP-wrapped model chunks (``policy.optim.wrap_ddp``), one per virtual pipeline stage.
        optimizer, scheduler: from ``policy.optim.build_optimizer``.
        micro_batches: this rank's micro-batches, in order (the same count on every rank).
        forward_fn: see ``ForwardFn``.
        dp_size: data-parallel world size WITHOUT context parallel (for the loss scale): the schedule's ×cp
            cancels DDP's ÷cp when every CP rank returns the same (replicated) loss, see ``policy.actor``.
        seq_length, micro_batch_size: the [B, S] shape the pipeline communicates (PP > 1 only).
    """
    n = len(micro_batches)
    if n == 0:
        raise ValueError("micro_batches: empty; a step needs at least one micro-batch")
    scale = schedule_loss_scale(n, dp_size)
    totals: dict[str, torch.Tensor] = {}

    def forward_step(data_iterator, model):
        output, loss_fn = forward_fn(model, next(data_iterator))

        def scaled(out):
            loss, metrics = loss_fn(out)
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float()
            return loss * scale, {}

        return output, scaled

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks],
        model=list(chunks),
        num_microbatches=n,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    scheduler.step(increment=1)
    updated, grad_norm, _ = optimizer.step()
    if not updated:  # fp16 overflow: the update was skipped, so the schedule does not advance (as megatron-LM)
        scheduler.step(increment=-1)
    lr = optimizer.param_groups[0]["lr"]
    values = {k: float(v) for k, v in totals.items()}
    return StepResult(
        updated=bool(updated),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=float(lr),
        loss=values.pop("loss", 0.0),
        metrics=values,
    )
