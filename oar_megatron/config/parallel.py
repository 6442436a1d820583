"""The ``parallel`` config group: how a policy is laid out over ranks (TP, PP, virtual PP, CP, EP, expert TP, DP).

``ParallelConfig.validate(world_size, model)`` runs before any process group or weight exists and mirrors what
megatron-core 0.16 asserts deep inside ``parallel_state.initialize_model_parallel``, ``TransformerConfig`` and the
MoE layer, so a bad layout fails at once with one line naming the key instead of a traceback on every rank:

* ``world_size % (tp·pp·cp) == 0``; ``dp = world_size / (tp·pp·cp)``.
* Expert layout (megatron's expert rank generator): ``world_size % (etp·ep·pp) == 0``, i.e. ``etp·ep`` divides
  ``tp·cp·dp``; expert data parallel ``edp = world_size / (etp·ep·pp)``. ``etp`` defaults to ``tp``.
* ``num_attention_heads % tp == 0``; ``num_query_groups`` a multiple or a divisor of ``tp`` (below ``tp``, megatron
  gathers the KV heads); ``num_layers % (pp·virtual_pp) == 0``; ``num_moe_experts % ep == 0``.
* sequence parallel needs ``tp > 1`` and Transformer Engine (megatron's local spec builds torch norms, which assert
  ``not sequence_parallel``); a MoE model with ``tp > 1`` needs sequence parallel (megatron's MoE layer
  refuses to train without it); virtual PP needs ``pp > 1``; CP needs Transformer Engine attention.
* ``packing`` (THD micro-batches, ``policy.packing``) needs Transformer Engine attention and ``pp = 1`` (variable
  packed lengths over pipeline stages are not wired).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model import ModelConfig, load_structured

ORDERS = ("tp-cp-ep-dp-pp", "tp-dp-pp")


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel stages
    virtual_pp: int | None = None  # model chunks per stage (interleaved 1F1B); needs pp > 1
    cp: int = 1  # context parallel (Transformer Engine attention only)
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel; None = tp (megatron's default)
    sequence_parallel: bool = False  # shard layer-norm/dropout activations over the TP group; needs tp > 1
    distributed_optimizer: bool = True  # shard optimizer state over DP (ZeRO-1)
    overlap_grad_reduce: bool = False  # overlap the DP gradient reduce with the backward pass
    overlap_param_gather: bool = False  # needs distributed_optimizer
    packing: bool = False  # THD-packed micro-batches (cu_seqlens); Transformer Engine attention, pp=1
    order: str = "tp-cp-ep-dp-pp"  # megatron rank order
    timeout_minutes: int = 30  # process-group (NCCL/gloo) collective timeout

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else self.tp

    def validate(self, world_size: int, model: ModelConfig) -> ParallelLayout:
        """Check this layout against ``world_size`` ranks and ``model``; return the derived sizes.

        Each failure is a one-line ``ValueError`` naming ``parallel.<key>`` (or ``model.<key>``)."""
        model.validate()
        for key in ("tp", "pp", "cp", "ep", "timeout_minutes"):
            _positive(key, getattr(self, key))
        if self.etp is not None:
            _positive("etp", self.etp)
        if self.virtual_pp is not None:
            _positive("virtual_pp", self.virtual_pp)
        if self.order not in ORDERS:
            raise ValueError(f"parallel.order: unknown {self.order!r}; known: {', '.join(ORDERS)}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: must be a positive integer, got {world_size!r}")
        tp, pp, cp, ep, etp = self.tp, self.pp, self.cp, self.ep, self.expert_tp
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ValueError(f"parallel.tp/pp/cp: world size {world_size} is not divisible by tp*pp*cp = "
                             f"{tp}*{pp}*{cp} = {model_parallel}")
        dp = world_size // model_parallel
        # attention heads over TP
        if model.num_attention_heads % tp:
            raise ValueError(f"parallel.tp: model.num_attention_heads ({model.num_attention_heads}) is not divisible "
                             f"by tp ({tp})")
        groups = model.query_groups
        if groups % tp and tp % groups:
            raise ValueError(f"parallel.tp: model.num_query_groups ({groups}) must be a multiple or a divisor of "
                             f"tp ({tp})")
        if self.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel: needs tp > 1")
        if self.sequence_parallel and model.transformer_impl != "transformer_engine":
            raise ValueError("parallel.sequence_parallel: needs model.transformer_impl: transformer_engine (the local "
                             "spec's torch norms refuse sequence parallel in megatron-core 0.16)")
        # layers over pipeline stages and chunks
        if self.virtual_pp is not None and pp == 1:
            raise ValueError("parallel.virtual_pp: interleaved pipelining needs pp > 1")
        chunks = pp * (self.virtual_pp or 1)
        if model.num_layers % chunks:
            raise ValueError(f"parallel.pp: model.num_layers ({model.num_layers}) does not split evenly over "
                             f"pp*virtual_pp = {chunks} model chunks")
        # context parallel
        if cp > 1 and model.transformer_impl != "transformer_engine":
            raise ValueError("parallel.cp: context parallelism needs model.transformer_impl: transformer_engine "
                             "(megatron's local attention has no CP ring)")
        if self.packing and model.transformer_impl != "transformer_engine":
            raise ValueError("parallel.packing: THD packing needs model.transformer_impl: transformer_engine "
                             "(megatron's local attention ignores cu_seqlens and would attend across rows)")
        if self.packing and pp > 1:
            raise ValueError(f"parallel.packing: THD packing is wired for pp=1 (got pp={pp}): packed lengths vary "
                             "per micro-batch and the pipeline communicates one fixed shape")
        # experts
        if not model.is_moe:
            if ep > 1 or self.etp not in (None, tp):
                raise ValueError("parallel.ep/etp: expert parallelism needs a MoE model (model.num_moe_experts unset)")
        else:
            if model.num_moe_experts % ep:
                raise ValueError(f"parallel.ep: model.num_moe_experts ({model.num_moe_experts}) is not divisible by "
                                 f"ep ({ep})")
            if world_size % (etp * ep * pp):
                raise ValueError(f"parallel.ep/etp: etp*ep = {etp}*{ep} must divide tp*cp*dp = {tp * cp * dp} "
                                 f"(world size {world_size} / pp {pp})")
            if tp > 1 and not self.sequence_parallel:
                raise ValueError("parallel.sequence_parallel: a MoE model with tp > 1 needs sequence_parallel: true "
                                 "(megatron's MoE layer refuses to train without it)")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ValueError("parallel.overlap_param_gather: needs distributed_optimizer: true")
        return ParallelLayout(world_size=world_size, tp=tp, pp=pp, virtual_pp=self.virtual_pp, cp=cp, ep=ep, etp=etp,
                              dp=dp, expert_dp=world_size // (etp * ep * pp),
                              layers_per_chunk=model.num_layers // chunks,
                              padded_vocab_size=model.padded_vocab_size(tp),
                              token_multiple=self.token_multiple(model))

    def token_multiple(self, model: ModelConfig) -> int:
        """What a (packed) sequence length must be a multiple of under this layout: ``tp`` with sequence parallel
        (the sequence is split over TP), ``2·cp`` with CP (load-balanced halves), times the FP8 alignment of each
        rank's share (``model.fp8_pad_multiple()``)."""
        multiple = model.fp8_pad_multiple()
        if self.sequence_parallel:
            multiple *= self.tp
        if self.cp > 1:
            multiple *= 2 * self.cp
        return multiple


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Sizes derived by :meth:`ParallelConfig.validate` (all ints; ``virtual_pp`` None when not interleaved)."""

    world_size: int
    tp: int
    pp: int
    virtual_pp: int | None
    cp: int
    ep: int
    etp: int
    dp: int  # data parallel, without CP
    expert_dp: int  # data parallel of the expert layers: world / (etp·ep·pp)
    layers_per_chunk: int  # transformer layers per (virtual) pipeline chunk
    padded_vocab_size: int
    token_multiple: int


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"parallel.{key}: must be a positive integer, got {value!r}")


def load_parallel(source: str | Path | dict[str, Any], **overrides: Any) -> ParallelConfig:
    """A :class:`ParallelConfig` from a YAML path, a name in ``configs/parallel/`` or a dict (validated later,
    against the world size and model, by ``validate``)."""
    return load_structured(ParallelConfig, "parallel", source, overrides)
