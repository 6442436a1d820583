"""``oar-train trainer.preflight=true``: check a cluster job's machinery in a minute, before it burns GPU-hours.

On the real layout (same world size, same ``parallel`` settings, same launcher) and before any data is read, in
this order, each timed:

1. ``memory``: the plan's per-rank estimate against this device (``plan.check_memory``);
2. ``layer spec``: the machine checks for the model (Transformer Engine, FP8 capability) and its megatron layer spec;
3. ``process groups``: ``init_parallel`` (default group, megatron's groups, RNG);
4. ``data plane``: one all-reduce on every process group of :class:`~oar_megatron.policy.ParallelGroups` with a
   tensor on the policy's device (the sum of ``rank_in_group + 1`` checked against ``n(n+1)/2``);
5. ``control plane``: one object broadcast on every group (the group's first rank is the source; checked);
6. ``forward/backward``: a model of the configured architecture with ``num_layers = 2·pp·(virtual_pp or 1)`` (two
   layers per pipeline chunk; hidden sizes, heads, MoE settings and precision as configured) built under the
   layout, then one π_old pass and one optimizer update on random tokens, the configured micro-batch size and
   ``pp`` micro-batches of the plan's sequence length (finite loss and gradient norm required);
7. ``checkpoint``: a save/load round trip of that model and its optimizer in a temporary subdirectory of the
   checkpoint directory (seen by every rank: a directory that is not shared across nodes fails here), the loaded
   weights compared exactly with the saved ones after being overwritten; the subdirectory is removed;
8. ``rollout servers``: with ``rollout.engine=sglang`` an HTTP GET of ``<url>/health`` for every
   ``rollout.server_urls`` entry with a timeout; "skipped: local engine" otherwise.

Rank 0 prints a table of the checks (check, result, seconds, detail). After every check the ranks agree on the
outcome, so they stop together at the first failure; every failing rank prints one line
``oar-train: preflight: <check> failed on rank R: <cause>`` and the exit code is 1.

Collectives: every group registered with :mod:`oar_megatron.collectives` at ``init_parallel`` (the world and
megatron's groups) gets one data-plane all-reduce on its device and one control-plane broadcast over its gloo twin.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from .. import collectives
from ..config.train import TrainConfig
from .plan import Plan

__all__ = ["GROUP_FIELDS", "PreflightFailure", "check_rollout_servers", "preflight_model", "run_preflight"]

# ParallelGroups fields checked, in this order on every rank
GROUP_FIELDS = ("tp_group", "pp_group", "cp_group", "dp_group", "dp_cp_group", "ep_group", "etp_group",
                "expert_dp_group", "mp_group", "embedding_group")


class PreflightFailure(RuntimeError):
    """A check failed on this rank (the message is the one-line cause)."""


# ------------------------------------------------------------------------------ collectives used by the checks


def _groups_to_check(groups) -> list[tuple[str, object, list[int]]]:
    """(name, device group, global ranks) of every group registered with the collectives module (the world first),
    falling back to the :data:`GROUP_FIELDS` of ``groups`` when nothing is registered (torch.distributed absent)."""
    import torch.distributed as dist

    reg = collectives.registered()
    items = [(n, g) for n, (g, _, _) in reg.items()] or [(f.removesuffix("_group"), getattr(groups, f))
                                                          for f in GROUP_FIELDS]
    out = []
    for name, group in items:
        if group is None and name != "world":
            continue
        ranks = list(range(collectives.size())) if group is None else _members(group)
        if ranks is None:
            continue
        if dist.is_initialized() and dist.get_rank() not in ranks:
            continue
        out.append((name, group, ranks))
    return out


def _agree(failed: bool) -> bool:
    """Whether any rank failed (every rank gets the same answer; also a barrier). Control plane."""
    return collectives.any_rank(failed)


def _members(group) -> list[int] | None:
    import torch.distributed as dist

    if group is None:
        return None
    try:
        return dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError):  # this rank is not in the group
        return None


# ----------------------------------------------------------------------------------------------- the checks


def preflight_model(cfg: TrainConfig):
    """The configured architecture with two layers per pipeline chunk."""
    p = cfg.parallel
    return dataclasses.replace(cfg.model, num_layers=2 * p.pp * (p.virtual_pp or 1))


def check_layer_spec(cfg: TrainConfig) -> str:
    from ..policy.model import check_model_environment, layer_spec

    check_model_environment(cfg.model)
    spec = layer_spec(cfg.model)
    fp8 = f", fp8 {cfg.model.fp8} ({cfg.model.fp8_recipe})" if cfg.model.fp8 else ""
    return f"{cfg.model.transformer_impl}{fp8}: {getattr(spec.module, '__name__', spec.module)}"


def check_data_plane(groups) -> str:
    """One all-reduce of a tensor on the policy's device over every device group (collectives' data plane)."""
    done = []
    for name, group, ranks in _groups_to_check(groups):
        n = len(ranks)
        me = collectives.rank(group)
        got = collectives.all_reduce(torch.full((1,), float(me + 1), device=groups.device), "sum", group)
        if got.device != groups.device or float(got.item()) != n * (n + 1) / 2:
            raise PreflightFailure(f"{name}: all-reduce gave {got.tolist()} on {got.device}, expected "
                                   f"{n * (n + 1) / 2} on {groups.device}")
        done.append(f"{name} {n}")
    return f"all-reduce on {groups.device} ({groups.backend}): " + ", ".join(done)


def check_control_plane(groups) -> str:
    """One object broadcast over every device group's gloo twin (collectives' control plane)."""
    done = []
    for name, group, ranks in _groups_to_check(groups):
        got = collectives.broadcast_object({"rank": collectives.rank(), "group": name}, group=group)
        if got != {"rank": ranks[0], "group": name}:
            raise PreflightFailure(f"{name}: object broadcast gave {got}, expected rank {ranks[0]}'s")
        done.append(f"{name} {len(ranks)}")
    return "object broadcast over gloo twins: " + ", ".join(done)


def build_actor(cfg: TrainConfig, groups):
    from ..policy.actor import PolicyActor

    return PolicyActor(model=preflight_model(cfg), parallel=cfg.parallel, optim=cfg.optim,
                       algorithm=dataclasses.replace(cfg.algorithm, updates_per_batch=1), groups=groups,
                       micro_batch_size=cfg.trainer.micro_batch_size, recompute=cfg.trainer.recompute,
                       routing_replay=cfg.trainer.routing_replay, temperature=cfg.rollout.temperature,
                       saliency_seed=cfg.trainer.seed)


def check_forward_backward(cfg: TrainConfig, plan: Plan, groups, actor) -> str:
    """One π_old pass and one update of ``actor`` on random rows (same rows on the ranks of a replica)."""
    model = actor.model_cfg
    multiple = plan.layout.token_multiple
    length = min(plan.batch.seq_len, model.max_position_embeddings)
    length = max(-(-length // multiple) * multiple, multiple)
    if length > model.max_position_embeddings:
        length = max(model.max_position_embeddings // multiple * multiple, 2)
    rows = cfg.trainer.micro_batch_size * groups.pp
    gen = torch.Generator().manual_seed(cfg.trainer.seed * 7919 + groups.dp_rank)
    ids = torch.randint(0, model.vocab_size, (rows, length), generator=gen).tolist()
    cut = max(length // 2, 1)
    batch = actor.pack([r[:cut] for r in ids], [r[cut:] for r in ids], torch.ones(rows))
    actor.compute_ref_logprobs(batch)
    actor.compute_old_logprobs(batch)
    batch.token_advantages = batch.response_mask.float()
    out = actor.update(batch)
    loss, gnorm = out["loss"][-1], out["grad_norm"][-1]
    if not (math.isfinite(loss) and math.isfinite(gnorm) and gnorm > 0):
        raise PreflightFailure(f"loss {loss}, grad norm {gnorm} (need finite, grad norm > 0)")
    return (f"{model.num_layers} layers of {model.name or 'the model'} ({model.hidden_size} wide), {rows} rows x "
            f"{length} tokens in {groups.pp} micro-batch(es): loss {loss:.4g}, grad norm {gnorm:.4g}")


def _params(actor) -> list[torch.Tensor]:
    return [p for m in actor.models for p in m.parameters()]


def check_checkpoint(cfg: TrainConfig, groups, actor, root: Path) -> str:
    """Save, overwrite the weights, load, compare; in ``root/.preflight-<id>`` (removed afterwards)."""
    from ..checkpoint import CheckpointManager

    name = collectives.broadcast_object(f".preflight-{uuid.uuid4().hex[:8]}")  # rank 0's name everywhere
    tmp = root / name
    error = None
    created = [d for d in (root, *root.parents) if not d.exists()]  # removed again when left empty
    if groups.rank == 0:
        try:
            tmp.mkdir(parents=True)
            (tmp / "marker").write_text("preflight\n")
        except OSError as exc:
            error = f"cannot write in {root}: {exc}"
    if _agree(error is not None):
        raise PreflightFailure(error or "rank 0 cannot write the checkpoint directory")
    if not (tmp / "marker").is_file():
        error = f"{tmp} (written by rank 0) is not visible on this rank: checkpoint.dir must be on a shared filesystem"
    if _agree(error is not None):
        raise PreflightFailure(error or "the checkpoint directory is not visible on every rank")
    try:
        mgr = CheckpointManager(tmp, keep_last=1, groups=groups)
        t0 = time.perf_counter()
        path = mgr.save(0, actor, common={"preflight": True})
        saved = [p.detach().clone() for p in _params(actor)]
        with torch.no_grad():
            for p in _params(actor):
                p.add_(1.0)
        mgr.load(actor, path)
        bad = [i for i, (p, s) in enumerate(zip(_params(actor), saved)) if not torch.equal(p.detach(), s)]
        if _agree(bool(bad)):
            raise PreflightFailure(f"{len(bad)} of {len(saved)} loaded tensors differ from the saved ones"
                                   if bad else "loaded tensors differ from the saved ones on another rank")
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        seconds = time.perf_counter() - t0
    finally:
        _agree(False)  # every rank is done with the files
        if groups.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in created:  # innermost first
                try:
                    d.rmdir()
                except OSError:
                    break
    return f"{len(saved)} tensors saved and loaded equal under {root} ({size / 2**20:.1f} MiB, {seconds:.1f} s)"


def check_rollout_servers(cfg: TrainConfig, timeout_s: float = 10.0) -> str:
    """HTTP GET ``<url>/health`` of every rollout server and the router (sglang engine); "skipped" for the local
    engine."""
    r = cfg.rollout
    if r.engine != "sglang":
        return f"skipped: {r.engine} engine"
    if not r.server_urls:
        return "skipped: the run starts its own servers (rollout.local_servers)"
    import httpx

    seen = []
    for url in r.server_urls + ([r.router_url] if r.router_url else []):
        t0 = time.perf_counter()
        try:
            resp = httpx.get(url.rstrip("/") + "/health", timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise PreflightFailure(f"{url}: unreachable ({type(exc).__name__}: {exc})") from None
        if resp.status_code >= 500:
            raise PreflightFailure(f"{url}/health: HTTP {resp.status_code}")
        seen.append(f"{url} HTTP {resp.status_code} in {1000 * (time.perf_counter() - t0):.0f} ms")
    return "; ".join(seen)


# ------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Row:
    check: str
    result: str
    seconds: float
    detail: str


def run_preflight(cfg: TrainConfig, plan: Plan, *, out=None) -> int:
    """Run the checks (module docstring); 0 when all pass, 1 at the first failure."""
    from ..metrics.progress import print_table
    from .plan import check_memory, needed_gib

    rows: list[Row] = []
    state: dict = {"groups": None, "actor": None}
    is_logger = _launcher_rank() == 0  # until the process groups exist

    def memory() -> str:
        if not cfg.trainer.memory_check:
            return "skipped: trainer.memory_check=false"
        device = check_memory(cfg, plan)
        return f"~{needed_gib(plan.memory, device):.2f} GiB per rank of {device.gib:.1f} GiB ({device.where})"

    def process_groups() -> str:
        from ..policy import init_parallel

        g = state["groups"] = init_parallel(cfg.parallel, preflight_model(cfg), seed=cfg.trainer.seed)
        lo = g.layout
        return (f"world {g.world_size} = tp {lo.tp} x pp {lo.pp} x cp {lo.cp} x dp {lo.dp}; ep {lo.ep}, etp "
                f"{lo.etp}; {g.backend} on {g.device}")

    def forward_backward() -> str:
        state["actor"] = build_actor(cfg, state["groups"])
        return check_forward_backward(cfg, plan, state["groups"], state["actor"])

    def checkpoint() -> str:
        run_dir = Path(collectives.broadcast_object(str(Path(cfg.logging.run_dir).resolve())))
        root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
        return check_checkpoint(cfg, state["groups"], state["actor"], root.resolve())

    checks: list[tuple[str, Callable[[], str]]] = [
        ("memory", memory),
        ("layer spec", lambda: check_layer_spec(cfg)),
        ("process groups", process_groups),
        ("data plane", lambda: check_data_plane(state["groups"])),
        ("control plane", lambda: check_control_plane(state["groups"])),
        ("forward/backward", forward_backward),
        ("checkpoint", checkpoint),
        ("rollout servers", lambda: check_rollout_servers(cfg) if state["groups"].rank == 0 else "rank 0 checks"),
    ]
    failed = cause = None
    try:
        for name, fn in checks:
            t0 = time.perf_counter()
            error = None
            try:
                detail = fn()
            except Exception as exc:  # noqa: BLE001 - every failure is reported as the check's cause
                detail = ""
                error = _one_line(exc)
            seconds = time.perf_counter() - t0
            grouped = state["groups"] is not None
            if grouped:
                is_logger = state["groups"].rank == 0
            any_failed = _agree(error is not None) if grouped else error is not None
            if error is not None:
                rank = state["groups"].rank if grouped else _launcher_rank()
                cause = f"oar-train: preflight: {name} failed on rank {rank}: {error}"
            if any_failed:
                rows.append(Row(name, "FAILED", seconds, error or "failed on another rank"))
                failed = name
                break
            rows.append(Row(name, "ok", seconds, detail))
    finally:
        if state["groups"] is not None:
            from ..policy import destroy_parallel

            state["actor"] = None
            destroy_parallel()
    if is_logger:
        print_table("preflight" + (f": {failed} FAILED" if failed else ": all checks passed"),
                    [dataclasses.asdict(r) | {"seconds": round(r.seconds, 2)} for r in rows],
                    columns=["check", "result", "seconds", "detail"], console=out)
    if cause is not None:  # after the table: the last line a user sees
        print(cause, file=sys.stderr, flush=True)
    return 1 if failed else 0


def _launcher_rank() -> int:
    from ..policy.parallel import rank_env

    try:
        return rank_env().rank
    except ValueError:
        return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (PreflightFailure, ValueError, OSError)) else f"{type(exc).__name__}: {text}"
