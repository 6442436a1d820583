"""The ``optim`` config group: Adam, learning-rate schedule, gradient clipping, fp16 loss scaling.

Precision is not an optimizer setting: ``model.params_dtype`` is its one source of truth. :func:`resolve_precision`
derives from it what megatron's DDP and optimizer need (:class:`Precision`), and refuses, with one line naming the
key, an ``optim`` setting that contradicts it:

* ``float32``: megatron's FP32Optimizer (the DistributedOptimizer with ``parallel.distributed_optimizer``); the
  parameters are the main weights; fp32 grads; no loss scaling (``optim.loss_scale`` is refused).
* ``bfloat16``: Float16OptimizerWithFloat16Params or the DistributedOptimizer (``bf16=True``); fp32 main weights
  and fp32 main grads (DDP buffers, reduced in fp32); no loss scaling unless a static ``optim.loss_scale`` is set.
* ``float16``: the same with ``fp16=True``; a dynamic loss scale (``optim.initial_loss_scale``, default 2^16) or a
  static ``optim.loss_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # model.params_dtype
DEFAULT_INITIAL_LOSS_SCALE = 2.0**16  # fp16 dynamic scale start (torch GradScaler's); megatron's 2^32 overflows at first


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6  # peak learning rate (ASPO / GSPO, verl example: 1e-6)
    min_lr: float = 0.0  # learning rate at the end of the decay
    lr_warmup_steps: int = 0  # linear warm-up length, in optimizer steps
    lr_decay_steps: int | None = None  # None: constant after warm-up
    lr_decay_style: str = "constant"  # schedule after warm-up
    weight_decay: float = 0.01  # Adam weight decay (Archer2.0 uses 0.1)
    adam_beta1: float = 0.9  # Adam β1
    adam_beta2: float = 0.999  # Adam β2
    adam_eps: float = 1e-8  # Adam ε
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables

    # ZeRO-1 sharding and gradient-reduce overlap are layout choices: ParallelConfig.distributed_optimizer /
    # overlap_grad_reduce, passed to policy.optim.wrap_ddp / build_optimizer.
    # Loss scaling (16-bit models only; the dtype is model.params_dtype, see resolve_precision).
    loss_scale: float | None = None  # static scale; None: dynamic for float16, none for bfloat16
    initial_loss_scale: float | None = None  # float16 dynamic scale start; None: 2^16

    def validate(self) -> OptimConfig:
        if not self.lr > 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"optim.lr_warmup_steps: must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"optim.lr_decay_style: unknown {self.lr_decay_style!r}; known: {', '.join(LR_DECAY_STYLES)}")
        if self.lr_decay_style != "constant" and (self.lr_decay_steps is None or self.lr_decay_steps <= self.lr_warmup_steps):
            raise ValueError("optim.lr_decay_steps: must exceed lr_warmup_steps when lr_decay_style is not 'constant'")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ValueError("optim.adam_beta1/adam_beta2/adam_eps: need 0 <= beta < 1 and eps > 0")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("optim.weight_decay / optim.clip_grad: must be >= 0")
        for key in ("loss_scale", "initial_loss_scale"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"optim.{key}: must be > 0, got {value}")
        return self


@dataclass(frozen=True, kw_only=True)
class Precision:
    """What ``model.params_dtype`` decides for megatron's DDP and optimizer (module table). Main weights and main
    grads are fp32 for every dtype: megatron-core 0.16-0.19 allows lower ones only with its precision-aware optimizer
    (Transformer Engine's FusedAdam and the distributed optimizer), which this project does not enable."""

    params_dtype: str  # float32 | bfloat16 | float16: weights, activations, pipeline messages
    main_params_dtype: str = "float32"  # optimizer master weights (16-bit models keep an fp32 copy)
    main_grads_dtype: str = "float32"  # DDP gradient buffers, accumulated and reduced in fp32
    loss_scale: float | None = None  # static scale (megatron ConstantGradScaler)
    dynamic_loss_scale: bool = False  # float16 without a static scale (megatron DynamicGradScaler)
    initial_loss_scale: float = DEFAULT_INITIAL_LOSS_SCALE
    fp8_recipe: str | None = None  # the model's FP8 recipe (the distributed optimizer handles FP8 params by it)

    @property
    def bf16(self) -> bool:
        return self.params_dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.params_dtype == "float16"

    @property
    def mixed(self) -> bool:
        """16-bit parameters with fp32 main weights: megatron must build a mixed-precision optimizer."""
        return self.params_dtype != "float32"


def resolve_precision(params_dtype: str, optim: OptimConfig, *, fp8_recipe: str | None = None) -> Precision:
    """The :class:`Precision` of a model whose parameters are ``params_dtype`` (``model.params_dtype``) trained with
    ``optim``; a one-line ``ValueError`` naming the key when ``optim`` contradicts the dtype."""
    if params_dtype not in MODEL_DTYPES:
        raise ValueError(f"model.params_dtype: unknown {params_dtype!r}; known: {', '.join(MODEL_DTYPES)}")
    optim.validate()
    if params_dtype == "float32" and optim.loss_scale is not None:
        raise ValueError(f"optim.loss_scale: loss scaling is for 16-bit models; model.params_dtype is float32 "
                         f"(unset optim.loss_scale, got {optim.loss_scale})")
    if params_dtype != "float16" and optim.initial_loss_scale is not None:
        raise ValueError(f"optim.initial_loss_scale: the dynamic loss scale is for float16 models; model.params_dtype "
                         f"is {params_dtype} (unset optim.initial_loss_scale)")
    if optim.loss_scale is not None and optim.initial_loss_scale is not None:
        raise ValueError("optim.initial_loss_scale: set together with a static optim.loss_scale; unset one")
    dynamic = params_dtype == "float16" and optim.loss_scale is None
    initial = optim.initial_loss_scale if optim.initial_loss_scale is not None else DEFAULT_INITIAL_LOSS_SCALE
    return Precision(params_dtype=params_dtype, loss_scale=optim.loss_scale, dynamic_loss_scale=dynamic,
                     initial_loss_scale=initial, fp8_recipe=fp8_recipe)
