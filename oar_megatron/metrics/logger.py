"""Per-step metrics: one JSON line per ``log`` call, TensorBoard when installed, W&B when configured.

``run_dir/metrics.jsonl`` is the record of a run: every line is ``{"step", "time", "phase", **metrics}``, flat keys
such as ``reward/mean`` (nested dicts are flattened with "/"), and NaN/inf written as ``null`` so that every line is
strict JSON. Only rank 0 logs; other ranks build the logger with ``enabled=False`` and every call is a no-op.

Resume. A run killed after step s may have logged steps past its last checkpoint c ≤ s, and its last line may be cut
short. Build the logger with ``resume_step=c`` (or call ``truncate_after(c)``): lines with step > c and a cut-short
tail are dropped before anything is appended, and the TensorBoard writer is opened with ``purge_step=c+1`` so its
events past c are hidden too. The resumed file then equals an uninterrupted run's file apart from the time fields.

    with MetricsLogger(run_dir, enabled=rank == 0, resume_step=ckpt_step) as log:
        log.log(step, {"reward/mean": 0.53, "loss/total": -0.01})
        log.log(step, {"aime24/avg@64": 0.2}, phase="eval")
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = ["MetricsLogger", "read_metrics", "truncate_metrics", "flatten_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "time", "phase")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; keys that already contain "/" are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def _to_python(key: str, value: Any) -> Any:
    """A plain Python scalar: 0-d tensors / numpy scalars become floats or ints, anything else is a TypeError."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        # A 0-d torch tensor or numpy array. On a GPU this syncs: reduce metrics once per step, then log floats.
        return value.item()
    raise TypeError(f"metric {key!r}: expected a number, bool, str or None, got {type(value).__name__}")


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file. A cut-short last line (the process was killed mid-write) is skipped;
    a malformed line anywhere else raises ``ValueError`` naming it."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: a write interrupted by a kill
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({err})") from None
    return records


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the records of ``path`` with step > ``step`` (and a cut-short last line); returns how many were dropped.
    The file is rewritten atomically (temp file + rename), so a crash here leaves either the old or the new file."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    raw = path.read_bytes()
    if len(kept) == len(records) and (not raw or raw.endswith(b"\n")):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(records) - len(kept)


def _import_summary_writer():
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter


def _import_wandb():
    import wandb

    return wandb


class MetricsLogger:
    """Append metrics to ``run_dir/metrics.jsonl``; mirror scalars to TensorBoard and W&B.

    Args:
        run_dir: the run directory (created if missing). The JSONL file is ``run_dir/metrics.jsonl`` and TensorBoard
            events go to ``run_dir/tensorboard``.
        enabled: False on every rank but 0: nothing is created, written or imported.
        tensorboard: ``"auto"`` writes events when ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is
            installed); ``True`` requires it (ImportError naming the package otherwise); ``False`` never.
        wandb: keyword arguments for ``wandb.init`` (project, name, id, resume, config, ...), or None for no W&B.
            W&B is optional: a config without the package installed is an ImportError.
        flush_every: flush the JSONL file and TensorBoard every this many ``log`` calls (1: every call).
        resume_step: the step of the checkpoint this run resumes from; records after it are dropped first
            (see :meth:`truncate_after`). None for a fresh run (an existing file is appended to).

    TensorBoard tags are the metric keys for phase ``"train"`` and ``"{phase}/{key}"`` for other phases; W&B keys are
    the same. Strings and None values go to the JSONL file only.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool | Literal["auto"] = "auto",
        wandb: Mapping[str, Any] | None = None,
        flush_every: int = 1,
        resume_step: int | None = None,
    ):
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"MetricsLogger: tensorboard must be True, False or 'auto', got {tensorboard!r}")
        if flush_every < 1:
            raise ValueError(f"MetricsLogger: flush_every must be >= 1, got {flush_every}")
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.flush_every = flush_every
        self._tensorboard = tensorboard
        self._file = None
        self._tb = None
        self._wandb = None
        self._unflushed = 0
        self._closed = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        else:
            self._drop_cut_short_tail()
        self._file = open(self.path, "a", encoding="utf-8")
        self._open_tensorboard(purge_step=None if resume_step is None else resume_step + 1)
        if wandb is not None:
            try:
                wandb_mod = _import_wandb()
            except ImportError as err:
                raise ImportError(
                    "MetricsLogger: a wandb config was given but wandb is not installed "
                    "(pip install wandb, or oar_megatron[logging]); drop the wandb config to log without it"
                ) from err
            self._wandb = wandb_mod.init(**dict(wandb))

    # -- writing -----------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any], *, phase: str = "train") -> None:
        """Append one record ``{"step", "time", "phase", **metrics}``. Call with Python floats (reduce first)."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log after close()")
        flat = flatten_metrics(metrics)
        clash = [k for k in _RESERVED if k in flat]
        if clash:
            raise ValueError(f"MetricsLogger.log: metric names {clash} are reserved for the record header")
        values = {k: _to_python(k, v) for k, v in flat.items()}
        record = {"step": int(step), "time": round(time.time(), 3), "phase": str(phase)}
        record.update((k, _json_safe(v)) for k, v in values.items())
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        # TensorBoard / W&B get numbers only (NaN kept, so a diverged loss shows there too).
        scalars = {
            (k if phase == "train" else f"{phase}/{k}"): float(v)
            for k, v in values.items()
            if isinstance(v, (bool, int, float))
        }
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=int(step))
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=int(step))
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or self._closed:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        self._unflushed = 0

    def truncate_after(self, step: int) -> int:
        """Drop records with step > ``step`` (from the JSONL file, and from TensorBoard via ``purge_step``) before
        appending again; returns how many JSONL records were dropped. Call with the step of the checkpoint resumed
        from, before the first ``log`` of the resumed run."""
        if not self.enabled:
            return 0
        self._file.close()
        dropped = truncate_metrics(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._open_tensorboard(purge_step=step + 1)
        return dropped

    def close(self) -> None:
        if not self.enabled or self._closed:
            return
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._closed = True

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _open_tensorboard(self, purge_step: int | None) -> None:
        if self._tensorboard is False:
            return
        try:
            writer_cls = _import_summary_writer()
        except ImportError as err:
            if self._tensorboard == "auto":
                return
            raise ImportError(
                "MetricsLogger(tensorboard=True) needs the tensorboard package (pip install tensorboard, or "
                "oar_megatron[logging]); use tensorboard='auto' to log without it"
            ) from err
        self._tb = writer_cls(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def _drop_cut_short_tail(self) -> None:
        """Before appending to an existing file, cut a partial last line so the next record starts on its own line."""
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(raw.rfind(b"\n") + 1)

