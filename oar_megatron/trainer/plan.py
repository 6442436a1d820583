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

Before a real run builds anything, :func:`check_memory` compares this estimate with the memory of the device the
rank runs on (:func:`device_memory`: the free memory of its GPU, or on CPU the host's available memory divided by
the ranks on the host, the reference weights' host copy counted there) and refuses a plan that cannot fit with one
line naming the estimate, the limit and the settings that would fit (:func:`fitting_settings`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config.parallel import ParallelLayout
from ..config.train import SGLANG_TIMEOUT_S, RolloutConfig, TrainConfig

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
    r, t = cfg.rollout, cfg.trainer
    rows = r.prompts_per_step * r.n_samples
    per_rank = rows // layout.dp
    micro = per_rank // t.micro_batch_size
    k = cfg.algorithm.updates_per_batch
    seq = prompt_tokens_estimate(cfg) + r.max_new_tokens
    batch = BatchPlan(r.prompts_per_step, r.n_samples, rows, per_rank, t.micro_batch_size, micro, k, micro // k, seq)
    return Plan(layout, batch, estimate_memory(cfg, layout))


def estimate_memory(cfg: TrainConfig, layout: ParallelLayout) -> MemoryPlan:
    """The per-rank memory estimate of ``cfg`` under ``layout`` (module docstring; no validation)."""
    r, t, m = cfg.rollout, cfg.trainer, cfg.model
    seq = prompt_tokens_estimate(cfg) + r.max_new_tokens
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
    return MemoryPlan(params, params * weight_b / GiB, params * grad_b / GiB, opt_bytes / GiB, act / GiB,
                      logits / GiB, ref_host / GiB)


def _servers(r: RolloutConfig) -> str:
    """The sglang engine's servers and request timeout, as the plan shows them."""
    if r.engine != "sglang":
        return ""
    timeout = r.timeout_s if r.timeout_s is not None else SGLANG_TIMEOUT_S
    if not r.server_urls:
        n = r.local_servers or 1
        where = f"{n} local server(s) started by the run{' behind a router' if r.local_router else ''}"
    else:
        where = f"{len(r.server_urls)} server(s) {', '.join(r.server_urls)}"
        where += f" behind router {r.router_url}" if r.router_url else ""
    return (f"; {where}, request timeout {timeout:g} s, "
            f"weight sync {r.weight_sync or 'disk'}")


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
        f"max_new_tokens {cfg.rollout.max_new_tokens}, T={cfg.rollout.temperature}" + _servers(cfg.rollout),
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


# ------------------------------------------------------------------------------------- does the plan fit?


@dataclass(frozen=True)
class DeviceMemory:
    """What one rank may use: ``gib`` on the device it runs on. ``shared_host``: the ranks of a host share it (CPU
    runs: the host's available memory divided by the local ranks), so more ranks on the host leave less for each;
    on a GPU every rank has its own device."""

    gib: float
    where: str  # for the message, e.g. "cuda:0 free memory" or "host memory available / 2 local ranks"
    shared_host: bool

    def for_ranks(self, factor: float) -> float:
        """The limit per rank when the job has ``factor`` times as many ranks (on the same hosts, for CPU)."""
        return self.gib / factor if self.shared_host else self.gib


def local_ranks() -> int:
    """Ranks on this host, from the launcher (torchrun ``LOCAL_WORLD_SIZE``, Slurm ``SLURM_NTASKS_PER_NODE``); 1
    without a launcher."""
    from ..policy.parallel import rank_env

    return rank_env().local_world_size or 1


def device_memory() -> DeviceMemory:
    """The memory of the device this rank will run on: the free memory of its CUDA device (the local rank's), else
    the host's available memory divided by the ranks on the host."""
    import torch

    from ..policy.parallel import rank_env

    if torch.cuda.is_available():
        index = rank_env().local_rank % max(torch.cuda.device_count(), 1)
        free, _total = torch.cuda.mem_get_info(index)
        return DeviceMemory(free / GiB, f"cuda:{index} free memory", shared_host=False)
    import psutil

    n = local_ranks()
    avail = psutil.virtual_memory().available
    return DeviceMemory(avail / n / GiB, f"host memory available {avail / GiB:.1f} GiB / {n} local rank"
                        + ("s" if n > 1 else ""), shared_host=True)


def needed_gib(mem: MemoryPlan, device: DeviceMemory) -> float:
    """The estimate compared with the device: on a CPU the reference weights' host copy is in the same memory."""
    return mem.total_gib + (mem.reference_host_gib if device.shared_host else 0.0)


def _with(cfg: TrainConfig, **groups) -> TrainConfig:
    """A copy of ``cfg`` with fields of its groups replaced: ``_with(cfg, trainer={"recompute": "full"})``."""
    return dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g), **kv) for g, kv in groups.items()})


def _estimate(cfg: TrainConfig, world: int, device: DeviceMemory, factor: float) -> tuple[float, bool] | None:
    """(needed GiB per rank, fits) of ``cfg`` on ``world`` ranks (``factor`` × today's), None if the layout is
    invalid."""
    try:
        layout = cfg.parallel.validate(world, cfg.model)
    except ValueError:
        return None
    need = needed_gib(estimate_memory(cfg, layout), device)
    return need, need <= device.for_ranks(factor)


def fitting_settings(cfg: TrainConfig, plan: Plan, device: DeviceMemory, *, max_tp: int = 8) -> list[str]:
    """Settings that would make ``plan`` fit ``device``, each with its estimate: full recompute; the largest smaller
    micro-batch; the distributed optimizer (dp > 1); the smallest larger TP (up to ``max_tp``, a node's GPUs) and
    the smallest larger PP; if no single change fits, the smallest TP×PP layout with full recompute and the
    smallest micro-batch; if nothing fits, the largest smaller model preset that fits the current settings (the
    one entry, ``model=NAME (...)``)."""
    lo, t = plan.layout, cfg.trainer
    world = lo.world_size
    out: list[str] = []

    def add(label: str, c: TrainConfig, w: int = world) -> bool:
        got = _estimate(c, w, device, w / world)
        if got is None or not got[1]:
            return False
        ranks = f"{w} ranks, " if w != world else ""
        out.append(f"{label} ({ranks}~{got[0]:.1f} GiB)")
        return True

    if t.recompute != "full":
        add("trainer.recompute=full", _with(cfg, trainer={"recompute": "full"}))
    rows, k = plan.batch.rows_per_dp_rank, cfg.algorithm.updates_per_batch
    smaller = [b for b in range(t.micro_batch_size - 1, 0, -1) if rows % b == 0 and (rows // b) % k == 0]
    for b in smaller:  # largest first: the first that fits
        if add(f"trainer.micro_batch_size={b}", _with(cfg, trainer={"micro_batch_size": b})):
            break
    if lo.dp > 1 and not cfg.parallel.distributed_optimizer:
        add("parallel.distributed_optimizer=true", _with(cfg, parallel={"distributed_optimizer": True}))
    for tp in range(lo.tp + 1, max_tp + 1):
        if add(f"parallel.tp={tp}", _with(cfg, parallel={"tp": tp}), world * tp // lo.tp):
            break
    pp_note = " with rollout=sglang" if cfg.rollout.engine == "local" else ""
    for pp in range(lo.pp + 1, cfg.model.num_layers + 1):
        if add(f"parallel.pp={pp}{pp_note}", _with(cfg, parallel={"pp": pp}), world * pp // lo.pp):
            break
    if out:
        return out
    # no single change: the smallest model-parallel size with everything else at its most frugal
    frugal = _with(cfg, trainer={"recompute": "full", "micro_batch_size": smaller[-1] if smaller else t.micro_batch_size})
    for size in range(lo.tp * lo.pp + 1, max_tp * cfg.model.num_layers + 1):
        for tp in range(lo.tp, max_tp + 1):
            if size % tp or size // tp < lo.pp:
                continue
            pp = size // tp
            label = (f"parallel.tp={tp} parallel.pp={pp}{pp_note if pp > 1 else ''} trainer.recompute=full "
                     f"trainer.micro_batch_size={frugal.trainer.micro_batch_size}")
            if add(label, _with(frugal, parallel={"tp": tp, "pp": pp}), world * size // (lo.tp * lo.pp)):
                return out
    from ..config.model import MODEL_PRESETS

    fitting = []
    for name, preset in MODEL_PRESETS.items():
        got = _estimate(dataclasses.replace(cfg, model=preset), world, device, 1)
        if got is not None and got[1] and preset.num_params() < cfg.model.num_params():
            fitting.append((preset.num_params(), name, got[0]))
    if fitting:
        _, name, gib = max(fitting)
        out.append(f"model={name} (~{gib:.1f} GiB)")
    return out


def check_memory(cfg: TrainConfig, plan: Plan, device: DeviceMemory | None = None) -> DeviceMemory:
    """Refuse a plan whose per-rank estimate exceeds the memory of the device it will run on: one ``ValueError``
    line with the estimate, the limit and the settings that would fit (:func:`fitting_settings`). Returns the
    device memory it compared with."""
    device = device or device_memory()
    mem = plan.memory
    need = needed_gib(mem, device)
    if need <= device.gib:
        return device
    parts = (f"weights {mem.weights_gib:.1f} + grads {mem.grads_gib:.1f} + optimizer {mem.optimizer_gib:.1f} + "
             f"activations {mem.activations_gib:.1f} + logits {mem.logits_gib:.1f}"
             + (f" + reference weights {mem.reference_host_gib:.1f}" if device.shared_host and mem.reference_host_gib
                else ""))
    fits = fitting_settings(cfg, plan, device)
    if not fits:
        hint = "no tp/pp layout or smaller model preset fits this device"
    elif fits[0].startswith("model="):
        hint = f"no tp/pp layout fits this device; a smaller model does: {fits[0]}"
    else:
        hint = "would fit: " + " | ".join(fits)
    raise ValueError(f"memory: the plan needs ~{need:.1f} GiB per rank ({parts}), more than the {device.gib:.1f} GiB "
                     f"this rank has ({device.where}); {hint}; trainer.memory_check=false skips this check")
