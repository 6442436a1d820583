"""The resolved plan of a run: parallel layout, batch arithmetic and a per-rank memory estimate (``oar-train
trainer.dry_run=true`` prints it and exits, before any process group or weight exists).

Memory per GPU (an estimate: what a serious reader checks before asking for nodes, not a measurement):

* weights: non-expert parameters split over ``tp·pp``, expert parameters over ``ep·etp·pp``;
* mixed precision (``model.params_dtype`` bfloat16 or float16): 2 B 16-bit weights + 4 B fp32 gradient buffer +
  12 B fp32 master weights and Adam moments; fp32: 4 + 4 + 8 B. The distributed optimizer divides the master/moment
  bytes by the (expert-)data-parallel size (ZeRO-1, megatron ``DistributedOptimizer``);
* activations of one micro-batch without recompute: ``s·b·h·(34 + 5·a·s/h)`` bytes per layer divided by ``tp``
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 2 with tensor
  parallelism, Table 2; the attention-score term vanishes with flash attention, which TE uses — we keep it, an
  upper bound); ``full`` recompute keeps only each layer's input, ``2·s·b·h``; ``selective`` drops the
  ``5·a·s/h`` term. With 1F1B pipelining the first stage holds ``pp`` micro-batches in flight;
* response-only logits: ``b·s·V/tp`` fp32 values for the log-prob pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.parallel import ParallelLayout
from ..config.train import TrainConfig

GiB = 1024**3


@dataclass(frozen=True)
class BatchPlan:
    prompts_per_step: int
    n_samples: int
    rows: int
    rows_per_dp_rank: int
    micro_batch_size: int
    micro_batches: int
    mini_batches: int
    micro_batches_per_update: int
    seq_len: int


@dataclass(frozen=True)
class MemoryPlan:
    params_per_rank: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    reference_host_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.logits_gib


@dataclass(frozen=True)
class Plan:
    layout: ParallelLayout
    batch: BatchPlan
    memory: MemoryPlan


def prompt_tokens_estimate(cfg: TrainConfig) -> int:
    """Longest prompt the plan assumes: the synthetic task's (``<bos>a+b=``), else ``data.max_prompt_tokens`` or 1024."""
    if cfg.data.path == "synthetic":
        return 5
    return cfg.data.max_prompt_tokens or 1024


def _expert_params(cfg: TrainConfig) -> int:
    m = cfg.model
    if not m.is_moe:
        return 0
    gate = 2 if m.swiglu else 1
    return m.num_layers * m.num_moe_experts * (m.hidden_size * gate * m.moe_ffn_size + m.moe_ffn_size * m.hidden_size)


def make_plan(cfg: TrainConfig, world_size: int) -> Plan:
    """Validate ``cfg`` for ``world_size`` ranks and derive the plan (module docstring)."""
    layout = cfg.validate(world_size)
    r, t, m = cfg.rollout, cfg.trainer, cfg.model
    rows = r.prompts_per_step * r.n_samples
    per_rank = rows // layout.dp
    micro = per_rank // t.micro_batch_size
    k = cfg.algorithm.updates_per_batch
    seq = prompt_tokens_estimate(cfg) + r.max_new_tokens
    batch = BatchPlan(r.prompts_per_step, r.n_samples, rows, per_rank, t.micro_batch_size, micro, k, micro // k, seq)

    expert = _expert_params(cfg)
    dense = m.num_params(layout.tp) - expert
    params = dense // (layout.tp * layout.pp) + expert // (layout.ep * layout.etp * layout.pp)
    dense_rank, expert_rank = dense // (layout.tp * layout.pp), expert // (layout.ep * layout.etp * layout.pp)
    weight_b, grad_b, opt_b = (2, 4, 12) if cfg.model.params_dtype != "float32" else (4, 4, 8)
    if cfg.parallel.distributed_optimizer:
        opt_bytes = opt_b * (dense_rank / layout.dp + expert_rank / layout.expert_dp)
    else:
        opt_bytes = opt_b * params
    s, b, h, a = seq, t.micro_batch_size, m.hidden_size, m.num_attention_heads
    per_layer = {None: s * b * h * (34 + 5 * a * s / h), "selective": s * b * h * 34, "full": 2 * s * b * h}[t.recompute]
    layers_per_stage = m.num_layers // layout.pp
    in_flight = layout.pp  # 1F1B: the first stage holds pp micro-batches
    act = per_layer / layout.tp * layers_per_stage * in_flight
    logits = b * s * m.padded_vocab_size(layout.tp) / layout.tp * 4
    ref_host = params * weight_b if cfg.algorithm.kl.coef > 0 else 0
    memory = MemoryPlan(params, params * weight_b / GiB, params * grad_b / GiB, opt_bytes / GiB, act / GiB,
                        logits / GiB, ref_host / GiB)
    return Plan(layout, batch, memory)


def format_plan(cfg: TrainConfig, plan: Plan) -> str:
    """The dry-run text: one section per concern, numbers a reader can check by hand."""
    lo, b, mem = plan.layout, plan.batch, plan.memory
    a = cfg.algorithm
    vpp = f" x vpp {lo.virtual_pp}" if lo.virtual_pp else ""
    lines = [
        f"model      {cfg.model.name or 'custom'}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{cfg.model.num_params(lo.tp) / 1e6:,.1f}M params"
        + (f", MoE {cfg.model.num_moe_experts} experts top-{cfg.model.moe_router_topk}" if cfg.model.is_moe else ""),
        f"layout     world {lo.world_size} = tp {lo.tp} x pp {lo.pp}{vpp} x cp {lo.cp} x dp {lo.dp}"
        + (f"; ep {lo.ep} x etp {lo.etp} x edp {lo.expert_dp}" if cfg.model.is_moe else "")
        + (" ; sequence parallel" if cfg.parallel.sequence_parallel else ""),
        f"algorithm  {a.name}: loss {a.loss.name}, advantage {a.advantage.estimator}"
        + (f", shaper oar ({a.shaper.saliency})" if a.shaper.name == "oar" else "")
        + (f", kl {a.kl.kind} x {a.kl.coef}" if a.kl.coef > 0 else "")
        + (", dynamic sampling" if a.advantage.filter_groups else ""),
        f"rollout    {cfg.rollout.engine}: {b.prompts_per_step} prompts x {b.n_samples} samples = {b.rows} rows/step, "
        f"max_new_tokens {cfg.rollout.max_new_tokens}, T={cfg.rollout.temperature}",
        f"batch      {b.rows_per_dp_rank} rows per dp rank = {b.micro_batches} micro-batches of {b.micro_batch_size}; "
        f"{b.mini_batches} update(s) per step of {b.micro_batches_per_update} micro-batches; seq_len <= {b.seq_len}",
        f"memory/GPU ~{mem.total_gib:.2f} GiB: weights {mem.weights_gib:.2f} + grads {mem.grads_gib:.2f} + optimizer "
        f"{mem.optimizer_gib:.2f} + activations {mem.activations_gib:.2f} + logits {mem.logits_gib:.2f}"
        f" ({mem.params_per_rank / 1e6:,.1f}M params/rank)"
        + (f"; reference weights on host {mem.reference_host_gib:.2f} GiB" if mem.reference_host_gib else ""),
        f"steps      {cfg.trainer.steps}; checkpoint every {cfg.checkpoint.every or 'end'} (keep {cfg.checkpoint.keep_last})"
        f"; eval every {cfg.eval.every or 'end'}; run_dir {cfg.logging.run_dir}",
    ]
    return "\n".join(lines)
