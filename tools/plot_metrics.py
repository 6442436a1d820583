"""Plot metrics.jsonl files of one or more runs: one PNG per metric key, every run on the same axes.

    python tools/plot_metrics.py runs/grpo/metrics.jsonl runs/oar_g/metrics.jsonl --out plots \
        [--keys reward/mean,response/length_mean,oar/ess_ratio,policy/clip_frac] [--labels grpo,oar_g] \
        [--smooth 10] [--phase train]

Each PNG is named after its key with "/" replaced by "_" (``reward_mean.png``). Only records of ``--phase`` are
plotted (default ``train``; ``all`` for every record); null values (NaN/inf when logged) are gaps. A key missing from
a run is skipped with a note; when no key can be plotted for any run the tool exits with code 2. ``--smooth N`` is a
trailing moving average over N logged points. Import ``plot_runs`` to use it from Python (the algorithm comparison).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from oar_megatron.metrics.logger import read_metrics  # noqa: E402

DEFAULT_KEYS = ("reward/mean", "response/length_mean", "oar/ess_ratio", "policy/clip_frac")
# Every per-step key the trainer logs, for --keys all.
TRAINER_KEYS = (
    "reward/mean",
    "reward/pass_rate",
    "response/length_mean",
    "loss/total",
    "policy/clip_frac",
    "policy/clip_frac_low",
    "policy/clip_frac_high",
    "kl/mean",
    "entropy/mean",
    "grad_norm",
    "oar/ess_ratio",
    "oar/top10_mass",
    "rollout/logp_diff_abs_mean",
    "time/step_s",
    "throughput/response_tokens_per_s",
    "throughput/total_tokens_per_s",
)


class NoPlottableKeys(ValueError):
    """None of the requested keys has a value in any of the runs."""


def smooth_series(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over the last ``window`` finite points (NaN points stay NaN)."""
    if window <= 1:
        return list(values)
    out, buf = [], []
    for v in values:
        if math.isnan(v):
            out.append(v)
            continue
        buf.append(v)
        if len(buf) > window:
            buf.pop(0)
        out.append(sum(buf) / len(buf))
    return out


def series(records: Sequence[dict], key: str, phase: str | None = "train") -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records of ``phase`` (None: all); null values become NaN (gaps)."""
    steps, values = [], []
    for r in records:
        if key not in r or (phase is not None and r.get("phase", "train") != phase):
            continue
        v = r[key]
        if isinstance(v, bool) or not isinstance(v, (int, float, type(None))):
            continue
        steps.append(int(r["step"]))
        values.append(math.nan if v is None else float(v))
    return steps, values


def _default_labels(paths: Sequence[Path]) -> list[str]:
    labels = [p.parent.name or p.stem for p in paths]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in paths]


def plot_runs(
    paths: Sequence[str | Path],
    keys: Sequence[str] = DEFAULT_KEYS,
    out_dir: str | Path = "plots",
    labels: Sequence[str] | None = None,
    smooth: int = 1,
    *,
    phase: str | None = "train",
    log=print,
) -> list[Path]:
    """Write one PNG per key into ``out_dir``; returns the files written.

    Raises ``NoPlottableKeys`` when no key has a value in any run, ``ValueError`` for mismatched labels."""
    paths = [Path(p) for p in paths]
    if labels is None:
        labels = _default_labels(paths)
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    runs = [read_metrics(p) for p in paths]
    out_dir = Path(out_dir)
    written = []
    for key in keys:
        curves = []
        for label, records in zip(labels, runs):
            steps, values = series(records, key, phase)
            if not steps or all(math.isnan(v) for v in values):
                log(f"note: {label}: no values for {key!r}, skipped")
                continue
            curves.append((label, steps, smooth_series(values, smooth)))
        if not curves:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, steps, values in curves:
            ax.plot(steps, values, label=label, linewidth=1.4)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key + (f" (moving average {smooth})" if smooth > 1 else ""))
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
        fig.tight_layout()
        path = out_dir / (key.replace("/", "_").replace("@", "_at_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if not written:
        raise NoPlottableKeys(f"none of the keys {list(keys)} has values in {[str(p) for p in paths]}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files (one per run)")
    parser.add_argument("--out", required=True, help="output directory for the PNG files")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS),
                        help="comma-separated metric keys, or 'all' for every trainer key (default: %(default)s)")
    parser.add_argument("--labels", default=None, help="comma-separated run labels (default: run directory names)")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving-average window (default: 1, none)")
    parser.add_argument("--phase", default="train", help="records of this phase only; 'all' for every record")
    args = parser.parse_args(argv)

    keys = list(TRAINER_KEYS) if args.keys == "all" else [k for k in args.keys.split(",") if k]
    labels = args.labels.split(",") if args.labels else None
    missing = [p for p in args.metrics if not Path(p).is_file()]
    if missing:
        print(f"plot_metrics: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        written = plot_runs(args.metrics, keys, args.out, labels, args.smooth,
                            phase=None if args.phase == "all" else args.phase,
                            log=lambda msg: print(msg, file=sys.stderr))
    except NoPlottableKeys as err:
        print(f"plot_metrics: nothing to plot: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"plot_metrics: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
