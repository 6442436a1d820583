"""megatron-core DDP, optimizer and learning-rate schedule for the policy.

``wrap_ddp`` puts each model chunk in megatron's ``DistributedDataParallel`` (contiguous gradient buffers, gradient
all-reduce / reduce-scatter over the data-parallel group); ``build_optimizer`` returns megatron's Adam (optionally
the distributed optimizer, ZeRO-1) and ``OptimizerParamScheduler`` for linear warm-up then constant / linear /
cosine decay. On CPU the optimizer is torch's AdamW (megatron falls back when apex/TE are absent).

Precision comes from the model (``model.params_dtype`` → the chunks' ``TransformerConfig``), never from a second
switch: :func:`chunk_precision` reads it from the built chunks and ``config.optim.resolve_precision`` turns it into
the DDP config (fp32 main grads, reduced in fp32) and the ``OptimizerConfig`` (``bf16`` / ``fp16``, ``params_dtype``,
fp32 main weights, loss scaling), so megatron builds its mixed-precision optimizer for every 16-bit model.

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

from ..config.optim import OptimConfig, Precision, resolve_precision

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def chunk_precision(chunks, optim: OptimConfig) -> Precision:
    """The :class:`Precision` of model chunks (bare ``GPTModel`` s or wrapped: anything with ``.config``) built from
    a ``ModelConfig``: their ``TransformerConfig.params_dtype`` (``model.params_dtype``) and FP8 recipe. Every
    floating parameter must be in that dtype (``build_model`` casts them all, as megatron-LM's Float16Module does);
    a mismatch is a one-line error rather than a failure inside the optimizer's first step."""
    config = chunks[0].config
    name = _DTYPE_NAMES.get(config.params_dtype)
    if name is None:
        raise ValueError(f"model.params_dtype: megatron config has {config.params_dtype}; known: "
                         f"{', '.join(_DTYPE_NAMES.values())}")
    for chunk in chunks:
        for param in chunk.parameters():
            if param.is_floating_point() and param.dtype != config.params_dtype:
                raise ValueError(f"model.params_dtype: the model was configured {name} but holds {param.dtype} "
                                 f"parameters (build it with policy.model.build_model)")
    return resolve_precision(name, optim, fp8_recipe=config.fp8_recipe if getattr(config, "fp8", None) else None)


def ddp_config(precision: Precision, *, distributed_optimizer: bool, overlap_grad_reduce: bool,
               overlap_param_gather: bool = False) -> DistributedDataParallelConfig:
    """megatron DDP settings: gradient buffers in ``precision.main_grads_dtype`` (fp32: bf16/fp16 gradients are
    accumulated over micro-batches and reduced over data-parallel ranks in fp32, megatron-LM's requirement for bf16)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.main_grads_dtype == "float32",
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )


def optimizer_config(precision: Precision, cfg: OptimConfig, *, distributed_optimizer: bool,
                     overlap_param_gather: bool = False) -> OptimizerConfig:
    """megatron ``OptimizerConfig``: Adam from ``cfg``, precision from ``precision`` (``bf16`` / ``fp16`` make
    megatron build ``Float16OptimizerWithFloat16Params`` — or the ``DistributedOptimizer`` — with fp32 main weights;
    fp16 gets a dynamic or static grad scaler, bf16 a static one only when ``optim.loss_scale`` is set)."""
    return OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=precision.bf16,
        fp16=precision.fp16,
        params_dtype=_TORCH_DTYPES[precision.params_dtype],
        main_params_dtype=_TORCH_DTYPES[precision.main_params_dtype],
        main_grads_dtype=_TORCH_DTYPES[precision.main_grads_dtype],
        use_precision_aware_optimizer=False,
        loss_scale=precision.loss_scale,
        initial_loss_scale=precision.initial_loss_scale,
        fp8_recipe=precision.fp8_recipe,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )


def wrap_ddp(
    chunks: list[torch.nn.Module], *, distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> list[DistributedDataParallel]:
    """Wrap every model chunk (one per virtual pipeline stage) in megatron DDP.

    Gradient reduction averages over the data-parallel (× context-parallel) group, as megatron always does; the
    training step's loss scaling (``train_step.schedule_loss_scale``) undoes that average so the update is the
    gradient of the global-batch loss."""
    # Loss-scale settings do not shape the DDP buffers: the default OptimConfig is enough to read the dtype here.
    ddp_cfg = ddp_config(chunk_precision(chunks, OptimConfig()), distributed_optimizer=distributed_optimizer,
                         overlap_grad_reduce=overlap_grad_reduce, overlap_param_gather=overlap_param_gather)
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
    opt_cfg = optimizer_config(chunk_precision(chunks, cfg), cfg, distributed_optimizer=distributed_optimizer,
                               overlap_param_gather=overlap_param_gather)
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
