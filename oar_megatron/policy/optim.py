"""megatron-core DDP, optimizer and learning-rate schedule for the policy.

``wrap_ddp`` puts each model chunk in megatron's ``DistributedDataParallel`` (contiguous gradient buffers, gradient
all-reduce / reduce-scatter over the data-parallel group); ``build_optimizer`` returns megatron's Adam (optionally
the distributed optimizer, ZeRO-1) and ``OptimizerParamScheduler`` for linear warm-up then constant / linear /
cosine decay. On CPU the optimizer is torch's AdamW (megatron falls back when apex/TE are absent).

``overlap_param_gather`` (``parallel.overlap_param_gather``, distributed optimizer only) sets the field of the same
name in megatron's ``DistributedDataParallelConfig`` and ``OptimizerConfig`` (megatron-core 0.16; 0.17-0.19 keep both
names): the optimizer step then no longer all-gathers the updated parameter shards; DDP's forward pre-hooks gather
each bucket at the next forward, overlapped with compute. Parameters read outside a forward (reference-weight swap,
checkpoint, rollout weights) are stale until then, so the actor calls ``sync_params`` after its last update of a
rollout batch; the updates within a batch keep the overlap.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..config.optim import OptimConfig


def wrap_ddp(
    chunks: list[torch.nn.Module], *, distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> list[DistributedDataParallel]:
    """Wrap every model chunk (one per virtual pipeline stage) in megatron DDP.

    Gradient reduction averages over the data-parallel (× context-parallel) group, as megatron always does; the
    training step's loss scaling (``train_step.schedule_loss_scale``) undoes that average so the update is the
    gradient of the global-batch loss."""
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )
    if overlap_param_gather and not distributed_optimizer:
        raise ValueError("parallel.overlap_param_gather: needs distributed_optimizer: true")
    wrapped = []
    for i, chunk in enumerate(chunks):
        # The schedules reduce gradients over DP (and embedding/layernorm grads over PP) only through this hook;
        # without it every data-parallel rank would step on its own local gradient.
        chunk.config.finalize_model_grads_func = finalize_model_grads
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config, ddp_config=ddp_cfg, module=chunk,
                # Only the first chunk may skip bucketing (megatron's own rule for virtual pipelines).
                disable_bucketing=i > 0,
            )
        )
    if overlap_grad_reduce:
        no_sync = [w.no_sync for w in wrapped]
        for w in wrapped:
            w.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return wrapped


def sync_params(chunks: list[DistributedDataParallel]) -> None:
    """Finish the parameter all-gather that ``overlap_param_gather`` defers to the next forward (module docstring):
    synchronous, after which every rank holds the full updated parameters. A no-op without the overlap."""
    for chunk in chunks:
        if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(chunks: list[DistributedDataParallel], cfg: OptimConfig, *, distributed_optimizer: bool = False,
                    overlap_param_gather: bool = False):
    """(megatron optimizer, OptimizerParamScheduler) for DDP-wrapped chunks; ``scheduler.step(1)`` per update.
    ``distributed_optimizer`` / ``overlap_param_gather`` must match what the chunks were wrapped with
    (``ParallelConfig``)."""
    cfg.validate()
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.bf16,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    for chunk in chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss  # fp16/bf16 loss scaling inside the schedule
    decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else max(cfg.lr_warmup_steps + 1, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
