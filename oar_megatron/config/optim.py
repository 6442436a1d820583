"""The ``optim`` config group: Adam, learning-rate schedule, gradient clipping."""

from __future__ import annotations

from dataclasses import dataclass

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6  # ASPO / GSPO (verl example) use 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0  # optimizer steps
    lr_decay_steps: int | None = None  # None: constant after warm-up
    lr_decay_style: str = "constant"
    weight_decay: float = 0.01  # Archer2.0 uses 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables
    # ZeRO-1 sharding and gradient-reduce overlap are layout choices: ParallelConfig.distributed_optimizer /
    # overlap_grad_reduce, passed to policy.optim.wrap_ddp / build_optimizer.
    bf16: bool = False  # bf16 params with fp32 main grads/params (GPU)

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
        return self
