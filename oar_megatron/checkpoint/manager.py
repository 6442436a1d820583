"""Training checkpoints of a :class:`~oar_megatron.policy.actor.PolicyActor`: megatron dist-checkpointing for the
model and optimizer, plain ``torch.save`` files for everything else, written atomically, keep-last-k.

On-disk layout (``root`` is shared by every rank, as megatron's dist-checkpointing requires)::

    root/
      latest                    text: the directory name of the newest complete checkpoint, e.g. "step_00000040"
      step_00000040/
        dist/                   megatron dist_checkpointing (torch_dist): model chunks ("model", or "model0",
                                "model1", ... under virtual PP, as Megatron-LM names them), "optimizer", and the
                                KL reference policy ("reference": the chunks' parameters, keys "reference.*")
        state.pt                rank 0: format, step, common (trainer state), scheduler state_dict, layout,
                                whether the reference was saved
        rank_00000.pt ...       one per rank: RNG states, per_rank (the trainer's per-rank state)
      .tmp-step_00000050/       a save in progress (or one that crashed); never read, removed by the next save

Atomicity. Every rank writes into ``root/.tmp-step_{step:08d}/``; after a barrier (every rank's files complete), rank 0
checks the files, renames the directory to ``root/step_{step:08d}/`` and replaces ``root/latest`` with
``os.replace`` of a freshly written temporary file. A crash at any moment leaves the previous checkpoint and ``latest``
untouched (a crash between the rename and the ``latest`` update leaves a complete ``step_*`` that ``latest`` does not
name yet: it is listed by :meth:`CheckpointManager.list` and replaced when that step is saved again). Leftover
``.tmp-*`` directories are removed by rank 0 when a manager is created and at every save.

Resharding. Model weights load into any layout (dist-checkpointing reshards TP/PP/EP). The optimizer state is saved
in megatron's ``dp_reshardable`` format (distributed optimizer: fully parallel, no gather; plain optimizer: model
space), so it loads only under the same TP/PP/virtual-PP/CP/EP/expert-TP layout and the same optimizer kind (the data
parallel size may differ for the distributed optimizer); anything else is a ``ValueError`` that names the difference
and suggests ``load_optimizer=False``. RNG and ``per_rank`` load only when the world size and layout match. The KL
reference policy is saved like the weights (the model's own sharded tensors, holding the reference values, keys
prefixed ``reference.``), so it reshards to any layout; ``load`` restores it when the actor needs one
(``kl.coef > 0``) and refuses a checkpoint without it.

Weights-only checkpoints (:meth:`CheckpointManager.save_weights`, written by ``oar-convert hf-to-mcore``): the
same layout with only the model chunks in ``dist/``; ``state.pt`` has ``weights_only: True`` and no scheduler. They
load with ``load(..., load_optimizer=False)`` or :func:`load_model_weights` (read only, any layout).

Files outside ``dist/`` are read with ``torch.load(..., weights_only=True)``: ``common`` and ``per_rank`` must hold
tensors, numbers, strings, None and lists/tuples/dicts of them.

Fault injection (tests only): when ``OAR_CKPT_FAULT`` (or the module attribute ``_FAULT_POINT``) is ``after_model``
(dist-checkpointing files written, nothing else) or ``before_rename`` (every file written, not yet renamed), ``save``
ends the process with ``os._exit(17)`` at that point, as a crash (kill -9, node loss) would.

Listing (``latest``, ``list``) needs no megatron and no process group; ``save``/``load`` import megatron lazily.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import collectives

__all__ = ["FAULT_EXIT_CODE", "CheckpointError", "CheckpointManager", "list_checkpoints", "load_model_weights",
           "read_latest", "resolve_checkpoint"]

FORMAT = 2  # 2: the reference policy lives in dist/ ("reference." keys), no longer in the rank files
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"
DIST_DIR = "dist"
STATE_FILE = "state.pt"
REFERENCE_PREFIX = "reference."  # dist-checkpointing key prefix of the KL reference policy
OPTIM_SHARDING = "dp_reshardable"  # megatron's distributed-optimizer format (module docstring)
LAYOUT_KEYS = ("tp", "pp", "virtual_pp", "cp", "ep", "etp")

FAULT_POINTS = ("after_model", "before_rename")
FAULT_EXIT_CODE = 17
_FAULT_POINT: str | None = None  # test-only: see the module docstring


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt ``latest``, or an incompatible layout."""


# ------------------------------------------------------------------------------------ pure helpers (no megatron)


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rank_filename(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete-looking ``step_*`` directories under ``root``, oldest first (``.tmp-*`` are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names; None when there is no ``latest`` file. A ``latest`` that is not a
    ``step_*`` name or names a missing directory raises :class:`CheckpointError`."""
    root = Path(root)
    f = root / LATEST
    if not f.exists():
        return None
    name = f.read_text().strip()
    if not STEP_RE.match(name):
        raise CheckpointError(f"{f}: corrupt (expected a step_XXXXXXXX directory name, got {name[:80]!r})")
    path = root / name
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{f}: names {name}, which is missing or incomplete under {root}")
    return path


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path`` (readers see the old or the new file, never a part)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fault(point: str) -> None:
    chosen = _FAULT_POINT or os.environ.get("OAR_CKPT_FAULT")
    if chosen is not None and chosen not in FAULT_POINTS:
        raise ValueError(f"OAR_CKPT_FAULT: unknown {chosen!r}; known: {', '.join(FAULT_POINTS)}")
    if chosen == point:
        os._exit(FAULT_EXIT_CODE)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    collectives.barrier()  # control plane: over the world's gloo twin


def _layout_of(groups) -> dict[str, Any]:
    lay = groups.layout
    return {"world_size": lay.world_size, "dp": lay.dp, **{k: getattr(lay, k) for k in LAYOUT_KEYS}}


# ------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy, torch CPU, CUDA (when available) and megatron's tensor-parallel tracker states,
    as tensors/tuples that load with ``weights_only=True``."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "random": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": None,
    }
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except ImportError:  # pragma: no cover - megatron is a dependency of the actor
        return out
    out["tracker"] = {k: (v.get_state() if isinstance(v, torch.Generator) else v.clone())
                      for k, v in get_cuda_rng_tracker().get_states().items()}
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    import numpy as np

    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker") is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        current = tracker.get_states()
        restored = {}
        for k, v in state["tracker"].items():
            cur = current.get(k)
            if isinstance(cur, torch.Generator):
                cur.set_state(v)
                restored[k] = cur
            else:
                restored[k] = v.clone()
        tracker.set_states(restored)


# ------------------------------------------------------------------------------------ megatron state dicts


def _chunk_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _model_keys(actor) -> list[str]:
    return _chunk_keys(len(actor.models))


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _init_distributed_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer's torch Adam its (zero) state before a load: without Apex/TE,
    megatron's ``DistributedOptimizer.state_dict`` (called while building the loading state dict) asserts that every
    parameter state holds one common ``step``; the load then overwrites all of it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))


def _saved_adam_steps(optimizer, loaded: Any) -> list[float | None]:
    """The Adam step each distributed optimizer (one per chained optimizer) saved in its param groups."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    out = []
    for i, opt in enumerate(chain):
        sd = loaded if len(chain) == 1 else loaded[i]
        steps = {g.get("step") for g in sd.get("optimizer", {}).get("param_groups", [])} - {None}
        out.append(float(steps.pop()) if isinstance(opt, DistributedOptimizer) and len(steps) == 1 else None)
    return out


def _restore_adam_steps(optimizer, steps: list[float | None]) -> None:
    """Without Apex/TE, ``DistributedOptimizer.load_state_dict`` leaves torch Adam's per-parameter ``step`` wrong
    (it gives every parameter one *shared* tensor, which torch's Adam then increments once per parameter per update,
    and the dp_reshardable parameter-state copy can overwrite it): the resumed run diverged at its second update. Give
    every parameter its own step tensor with the saved value."""
    for opt, step in zip(getattr(optimizer, "chained_optimizers", [optimizer]), steps):
        if step is None:
            continue
        for st in opt.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


def _sharded_state_dict(actor, *, with_optimizer: bool, is_loading: bool) -> dict:
    """Megatron-LM's shape: {"model" | "model0", "model1", ...: chunk sharded_state_dict, "optimizer": ...}."""
    sd: dict[str, Any] = {}
    for key, model in zip(_model_keys(actor), actor.models):
        sd[key] = model.sharded_state_dict()
    if with_optimizer:
        model_sd = {k: sd[k] for k in _model_keys(actor)}
        if is_loading:
            _init_distributed_optimizer_state(actor.optimizer)
        metadata = {"distrib_optim_sharding_type": OPTIM_SHARDING, "chained_optim_avoid_prefix": True}
        sd["optimizer"] = actor.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return sd


def _reference_sharded_state_dict(actor, *, is_loading: bool) -> dict:
    """The KL reference policy as megatron sharded tensors: the model chunks' own ``sharded_state_dict`` (so it
    reshards like the weights: any TP/PP/EP/DP on load), restricted to the parameters, every key prefixed with
    ``reference.``, the data a copy (never the live parameters) on the parameters' own device: dist-checkpointing
    exchanges shards over the model's process groups, which are NCCL on GPUs and refuse host tensors. Cost: one transient
    device copy of this rank's parameters during save/load (between steps the actor keeps the reference on the
    host).
    Saving: built while the reference is swapped into the model, so each entry (and any view megatron takes of a
    parameter) holds the reference values. Loading: the same entries with fresh tensors for dist-checkpointing to
    fill."""
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    def build() -> dict:
        out = {}
        for key, model in zip(_model_keys(actor), actor.models):
            names = {n for n, _ in model.named_parameters()}
            sd = {k: v for k, v in model.sharded_state_dict().items() if k in names}
            if len(sd) != len(names):  # never a partial reference
                raise CheckpointError(f"reference: parameters missing from {key}'s sharded state dict: "
                                      f"{sorted(names - sd.keys())[:3]}")
            for v in sd.values():
                v.data = v.data.detach().clone()  # same device as the parameter
            add_prefix_for_sharding(sd, REFERENCE_PREFIX)
            out[key] = sd
        return out

    if is_loading:
        return build()
    with actor.reference_swapped_in():
        return build()


def _reference_weights(actor, loaded: dict) -> list[dict[str, torch.Tensor]]:
    """Loaded reference entries → ``set_reference_weights``' per-chunk dicts keyed by parameter name."""
    out = []
    for key, model in zip(_model_keys(actor), actor.models):
        out.append({name: loaded[key][name].detach().cpu() for name, _ in model.named_parameters()})
    return out


def _optimizer_mismatch(saved: dict, actor) -> str | None:
    """Why the saved optimizer state cannot load into ``actor`` (None when it can)."""
    now = _layout_of(actor.groups)
    diffs = [f"{k}: saved {saved['layout'][k]}, now {now[k]}" for k in LAYOUT_KEYS if saved["layout"][k] != now[k]]
    dist_now = _is_distributed_optimizer(actor.optimizer)
    if saved["distributed_optimizer"] != dist_now:
        diffs.append(f"distributed_optimizer: saved {saved['distributed_optimizer']}, now {dist_now}")
    # DP size is free: plain optimizer state is model-space (replicated over DP), dp_reshardable reshards over DP
    return "; ".join(diffs) or None


def _read_state(path: Path) -> dict:
    """``path/state.pt`` (format checked); an unreadable file is a :class:`CheckpointError` naming it."""
    try:
        state = torch.load(path / STATE_FILE, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"{path / STATE_FILE}: cannot read ({str(exc).splitlines()[0] if str(exc) else exc!r})"
                              ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format {got!r}, this code reads {FORMAT}")
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A ``step_*`` directory, or a checkpoint root (its ``latest``) → the complete step directory; one-line
    :class:`CheckpointError` otherwise. No process group needed."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not (path / STATE_FILE).exists():
        found = read_latest(path)
        if found is None:
            raise CheckpointError(f"{path}: neither a checkpoint (no {STATE_FILE}) nor a checkpoint root (no {LATEST})")
        path = found
    if not (path / DIST_DIR / "metadata.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {DIST_DIR}/metadata.json)")
    return path


def load_model_weights(models: list, path: str | os.PathLike) -> dict:
    """Load the model weights of checkpoint ``path`` (a step directory or a root: its latest) into ``models``
    (this rank's bare model chunks) under the current layout, whatever the saved one (dist-checkpointing reshards
    TP/PP/EP; the embedding/output rows' vocabulary padding may differ); collective. Reads only (no cleanup of the
    checkpoint's root, unlike :class:`CheckpointManager`). Returns the checkpoint's ``state.pt`` dict."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint(path)
    state = _read_state(path)
    keys = _chunk_keys(len(models))
    sd = {key: model.sharded_state_dict() for key, model in zip(keys, models)}
    loaded = dist_checkpointing.load(sd, str(path / DIST_DIR))
    for key, model in zip(keys, models):
        model.load_state_dict(loaded[key], strict=True)
    _barrier()
    return state


# ------------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Atomic, keep-last-k checkpoints of a ``PolicyActor`` under ``root`` (module docstring for the layout).

    Call ``save``/``load`` on every rank (they are collective). ``keep_last <= 0`` keeps every checkpoint.
    ``readonly``: a reader of another process's checkpoints (``oar-convert``): the root is neither created nor
    cleaned of ``.tmp-*`` directories (a run may be saving into it right now), and ``save`` is refused."""

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 2, groups, readonly: bool = False) -> None:
        self.root = Path(root)
        self.keep_last = int(keep_last)
        self.groups = groups
        self.readonly = bool(readonly)
        if readonly:
            return
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_tmp()
        _barrier()

    # ---------------------------------------------------------------------------------------- listing

    def latest(self) -> Path | None:
        """The checkpoint ``root/latest`` names (None when there is none yet)."""
        return read_latest(self.root)

    def list(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every ``step_*`` directory, oldest first."""
        return list_checkpoints(self.root)

    def _clean_tmp(self) -> None:
        for p in self.root.glob(f"{TMP_PREFIX}*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- save

    def save(self, step: int, actor, *, common: dict, per_rank: dict | None = None) -> Path:
        """Write checkpoint ``step`` (collective; returns ``root/step_{step:08d}`` on every rank).

        ``common``: trainer state, identical on every rank, written once by rank 0 (step, the global data-iterator
        position, shared counters; tensors and plain Python). ``per_rank``: this rank's own state (e.g. its engine's
        seed), returned by ``load`` to the same rank when the layout matches. The actor's KL reference policy, when
        it has one, goes to ``dist/`` with the weights."""
        if self.readonly:
            raise CheckpointError(f"{self.root}: opened read-only; cannot save")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be a non-negative int, got {step!r}")

        def build() -> tuple[dict, dict]:
            sd = _sharded_state_dict(actor, with_optimizer=True, is_loading=False)
            with_reference = bool(getattr(actor, "has_reference", False))
            if with_reference:
                sd["reference"] = _reference_sharded_state_dict(actor, is_loading=False)
            state = {"format": FORMAT, "step": step, "common": common, "scheduler": actor.scheduler.state_dict(),
                     "layout": _layout_of(self.groups),
                     "distributed_optimizer": _is_distributed_optimizer(actor.optimizer),
                     "model_keys": _model_keys(actor), "reference": with_reference}
            return sd, state

        return self._write(step, build, per_rank)

    def save_weights(self, step: int, models: list, *, common: dict) -> Path:
        """Write checkpoint ``step`` holding the model weights only (collective): ``models`` are this rank's model
        chunks (bare ``GPTModel`` s, one per virtual stage), saved under the same dist-checkpointing keys as
        :meth:`save` (so the weights load into any layout with :meth:`load` ``(load_optimizer=False)`` or
        :func:`load_model_weights`); no optimizer, scheduler or reference; ``state.pt`` has ``weights_only: True``.
        Same atomic publication as :meth:`save`. Used by ``oar-convert hf-to-mcore`` (``convert.checkpoint``)."""
        if self.readonly:
            raise CheckpointError(f"{self.root}: opened read-only; cannot save")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be a non-negative int, got {step!r}")

        def build() -> tuple[dict, dict]:
            keys = _chunk_keys(len(models))
            sd = {key: model.sharded_state_dict() for key, model in zip(keys, models)}
            state = {"format": FORMAT, "step": step, "common": common, "scheduler": None,
                     "layout": _layout_of(self.groups), "distributed_optimizer": None, "model_keys": keys,
                     "reference": False, "weights_only": True}
            return sd, state

        return self._write(step, build, None)

    def _write(self, step: int, build, per_rank: dict | None) -> Path:
        """The atomic save: ``build()`` → (sharded state dict, ``state.pt`` dict) into ``.tmp-step_*``, published
        by rank 0 after every rank's files are complete."""
        from megatron.core import dist_checkpointing

        rank = _rank()
        name = step_dirname(step)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        final = self.root / name
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_tmp()
            (tmp / DIST_DIR).mkdir(parents=True)
        _barrier()

        sd, state = build()
        dist_checkpointing.save(sd, str(tmp / DIST_DIR))
        _fault("after_model")

        mine: dict[str, Any] = {"rng": rng_state(), "per_rank": per_rank}
        _write_atomic(tmp / rank_filename(rank), lambda p: torch.save(mine, p))
        if rank == 0:
            _write_atomic(tmp / STATE_FILE, lambda p: torch.save(state, p))
        _barrier()  # every rank's files are complete
        _fault("before_rename")

        if rank == 0:
            missing = [n for n in [STATE_FILE, f"{DIST_DIR}/metadata.json", *map(rank_filename, range(_world()))]
                       if not (tmp / n).is_file()]
            if missing:
                raise CheckpointError(f"{tmp}: incomplete after the barrier, missing {missing}")
            self._publish(tmp, final)
            self._prune(keep=final)
        _barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final`` and point ``latest`` at it (rank 0)."""
        _fsync_dir(tmp)
        old = None
        if final.exists():  # the same step saved again (e.g. after a resume from an earlier checkpoint)
            old = self.root / f"{TMP_PREFIX}replaced-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _write_atomic(self.root / LATEST, lambda p: p.write_text(final.name + "\n"))
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self, *, keep: Path) -> None:
        if self.keep_last <= 0:
            return
        ckpts = self.list()
        for _, path in ckpts[: max(len(ckpts) - self.keep_last, 0)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- load

    def resolve(self, path: str | os.PathLike | None = None) -> Path:
        """The checkpoint directory to load: ``path`` (a ``step_*`` directory, or a root with ``latest``) or
        ``root/latest``; raises :class:`CheckpointError` / ``FileNotFoundError`` with the reason."""
        if path is None:
            found = self.latest()
            if found is None:
                raise FileNotFoundError(f"{self.root}: no checkpoint (no 'latest' file"
                                        f"{'' if self.root.is_dir() else '; the directory does not exist'})")
            return found
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
        if (path / LATEST).exists() and not (path / STATE_FILE).exists():
            return read_latest(path)
        if not (path / STATE_FILE).is_file() or not (path / DIST_DIR / "metadata.json").is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (needs {STATE_FILE} and "
                                  f"{DIST_DIR}/metadata.json)")
        return path

    def saved_layout(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """The layout a checkpoint was saved with (``world_size``, ``dp``, ``tp``, ``pp``, ...); no process group."""
        path = self.resolve(path)
        return torch.load(path / STATE_FILE, weights_only=True)["layout"]

    def same_layout(self, path: str | os.PathLike | None = None) -> bool:
        """True when the checkpoint's ranks are this run's ranks (world size and every parallel size equal): then
        rank r's per-rank state (RNG, ``per_rank``) is rank r's again."""
        saved, now = self.saved_layout(path), _layout_of(self.groups)
        return all(saved[k] == now[k] for k in ("world_size", "dp", *LAYOUT_KEYS))

    def load(self, actor, path: str | os.PathLike | None = None, *, load_optimizer: bool = True,
             load_rng: bool = True, load_reference: bool | None = None) -> dict:
        """Restore model, optimizer (and scheduler), RNG and the KL reference policy in place from ``path``
        (default: ``latest``); collective.

        ``load_reference`` (default: ``actor.needs_reference``, i.e. ``kl.coef > 0``): load the reference policy
        (resharded to this layout like the weights); a checkpoint without one is a :class:`CheckpointError`.
        Returns ``{"step", "common", "per_rank"}`` (``per_rank`` None when the layout differs)."""
        from megatron.core import dist_checkpointing

        path = self.resolve(path)
        state = _read_state(path)
        if load_optimizer and state.get("weights_only"):
            raise CheckpointError(f"{path}: holds model weights only (no optimizer state; e.g. a converted "
                                  f"checkpoint); load with load_optimizer=False")
        # the weights' dist-checkpointing keys are global (any chunking loads them); the optimizer's are not
        if load_optimizer and state["model_keys"] != _model_keys(actor):
            raise CheckpointError(f"{path}: saved with model chunks {state['model_keys']}, the actor has "
                                  f"{_model_keys(actor)} (virtual pipeline size differs); build the actor with the "
                                  f"saved virtual_pp")
        if load_reference is None:
            load_reference = bool(getattr(actor, "needs_reference", False))
        if load_reference and not state.get("reference"):
            raise CheckpointError(f"{path}: no KL reference policy in this checkpoint (dist/ keys "
                                  f"'{REFERENCE_PREFIX}*'); algorithm.kl.coef > 0 needs it")
        now = _layout_of(self.groups)
        same_ranks = all(state["layout"][k] == now[k] for k in ("world_size", "dp", *LAYOUT_KEYS))
        if load_optimizer:
            why = _optimizer_mismatch(state, actor)
            if why:
                raise CheckpointError(f"{path}: the optimizer state cannot be resharded to this layout ({why}); "
                                      f"load with load_optimizer=False to restore the model weights only")
        if load_rng and not same_ranks:
            raise CheckpointError(f"{path}: RNG states were saved for layout {state['layout']}, this run is {now}; "
                                  f"load with load_rng=False")

        sd = _sharded_state_dict(actor, with_optimizer=load_optimizer, is_loading=True)
        if load_reference:
            sd["reference"] = _reference_sharded_state_dict(actor, is_loading=True)
        loaded = dist_checkpointing.load(sd, str(path / DIST_DIR))
        for key, model in zip(_model_keys(actor), actor.models):
            model.load_state_dict(loaded[key], strict=True)
        if load_reference:
            actor.set_reference_weights(_reference_weights(actor, loaded["reference"]))
        # no_grad: the distributed optimizer copies into fp32 main params that are views of the (grad-requiring)
        # model parameters when params are fp32
        with torch.no_grad():
            if load_optimizer:
                steps = _saved_adam_steps(actor.optimizer, loaded["optimizer"])
                actor.optimizer.load_state_dict(loaded["optimizer"])
                _restore_adam_steps(actor.optimizer, steps)
            else:
                actor.optimizer.reload_model_params()  # main (fp32) params from the loaded model params
        if state.get("scheduler") is not None:  # None: a weights-only checkpoint (save_weights)
            actor.scheduler.num_steps = 0  # megatron's load_state_dict adds the saved steps to the current count
            actor.scheduler.load_state_dict(state["scheduler"])

        per_rank = None
        if same_ranks:
            mine = torch.load(path / rank_filename(_rank()), weights_only=True)
            per_rank = mine["per_rank"]
            if load_rng:
                set_rng_state(mine["rng"])
        _barrier()
        return {"step": state["step"], "common": state["common"], "per_rank": per_rank}
