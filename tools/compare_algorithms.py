"""Compare algorithms on the built-in task over several seeds, in one command: a table and a plot.

    python tools/compare_algorithms.py                                  # grpo, dapo, gspo_token, oar_g x seeds 0 1 2
    python tools/compare_algorithms.py --algorithms grpo oar_g oar_p --seeds 0 1 --steps 150 --out runs/compare
    python tools/compare_algorithms.py --override rollout.n_samples=16   # any oar-train override, for every run

Each (algorithm, seed) is one ``oar-train`` run (a subprocess, so every run starts from a clean process) into
``OUT/<algorithm>-seed<seed>``; a run whose metrics file already reaches the last step is reused (``--fresh`` redoes
it). The table has, per algorithm, the mean ± std over seeds of: the reward over the first and the last ``--window``
steps, the first step whose ``--window``-step mean reward reaches ``--target`` (NaN if never), the final ESS ratio,
and the evaluation avg@K; written to ``OUT/table.md`` and printed. Reward curves (mean over seeds per algorithm)
go to ``OUT/reward_mean.png`` through ``tools/plot_metrics.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_metrics import plot_runs  # noqa: E402

from oar_megatron.metrics.logger import read_metrics  # noqa: E402
from oar_megatron.metrics.progress import print_table  # noqa: E402


def run_one(algorithm: str, seed: int, steps: int, out: Path, overrides: list[str], fresh: bool) -> Path:
    run_dir = out / f"{algorithm}-seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    if not fresh and metrics.exists():
        rows = [r for r in read_metrics(metrics) if r.get("phase") == "train"]
        if rows and rows[-1]["step"] >= steps:
            return metrics
    cmd = [sys.executable, "-m", "oar_megatron.trainer.app", f"algorithm={algorithm}", f"trainer.seed={seed}",
           f"trainer.steps={steps}", f"logging.run_dir={run_dir}", "checkpoint.every=0", "checkpoint.save_final=false",
           "checkpoint.resume=never", "trainer.progress=false", "logging.step_line=false", *overrides]
    print(f"[compare] {algorithm} seed {seed} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compare_algorithms: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return metrics


def first_reach(values: list[float], target: float, window: int) -> float:
    for i in range(len(values) - window + 1):
        if sum(values[i:i + window]) / window >= target:
            return float(i + window)
    return float("nan")


def summarize_run(path: Path, window: int, target: float) -> dict[str, float]:
    rows = read_metrics(path)
    train = [r for r in rows if r.get("phase") == "train"]
    rewards = [r["reward/mean"] for r in train if r.get("reward/mean") is not None]
    ess = [r["oar/ess_ratio"] for r in train if r.get("oar/ess_ratio") is not None]
    evals = [r for r in rows if r.get("phase") == "eval"]
    avg = next((v for k, v in (evals[-1].items() if evals else []) if "/avg@" in k), float("nan"))
    return {"reward_first": statistics.fmean(rewards[:window]), "reward_last": statistics.fmean(rewards[-window:]),
            "steps_to_target": first_reach(rewards, target, window),
            "ess_last": statistics.fmean(ess[-window:]) if ess else float("nan"), "eval_avg": avg}


def _mean_std(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3g}"
    return f"{statistics.fmean(vals):.3g} ± {statistics.stdev(vals):.2g}" + ("" if len(vals) == len(values) else f" ({len(vals)}/{len(values)})")


def mean_curve(paths: list[Path], out: Path) -> Path:
    """Per-step mean of reward/mean over seeds, as a metrics file plot_metrics can read."""
    per_step: dict[int, list[float]] = {}
    for p in paths:
        for r in read_metrics(p):
            if r.get("phase") == "train" and r.get("reward/mean") is not None:
                per_step.setdefault(r["step"], []).append(r["reward/mean"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for step in sorted(per_step):
            f.write(json.dumps({"step": step, "time": 0.0, "phase": "train",
                                "reward/mean": statistics.fmean(per_step[step])}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", nargs="+", default=["grpo", "dapo", "gspo_token", "oar_g"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--override", action="append", default=[], help="an oar-train override for every run")
    ap.add_argument("--fresh", action="store_true", help="rerun even when a finished run exists")
    args = ap.parse_args(argv)
    if args.window < 1 or args.window > args.steps:
        ap.error(f"--window must be in [1, --steps={args.steps}]")
    rows, curves = [], []
    for alg in args.algorithms:
        paths = [run_one(alg, s, args.steps, args.out, args.override, args.fresh) for s in args.seeds]
        stats = [summarize_run(p, args.window, args.target) for p in paths]
        rows.append({"algorithm": alg, "seeds": len(paths),
                     **{k: _mean_std([s[k] for s in stats]) for k in stats[0]}})
        curves.append(mean_curve(paths, args.out / "curves" / f"{alg}.jsonl"))
    table = print_table(f"algorithms on the built-in task ({args.steps} steps, window {args.window}, "
                        f"target reward {args.target})", rows)
    (args.out / "table.md").write_text(table + "\n")
    plot_runs(curves, ["reward/mean"], args.out, labels=args.algorithms)
    print(f"[compare] table: {args.out / 'table.md'}; plot: {args.out / 'reward_mean.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
