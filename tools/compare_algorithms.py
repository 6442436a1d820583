"""The algorithm study in one command: methods × built-in tasks × seeds, with confidence intervals and a paired test
against GRPO, tables and plots.

    python tools/compare_algorithms.py                                   # every method, both tasks, seeds 0-4
    python tools/compare_algorithms.py --tasks pivot --algorithms grpo oar_g oar_p --seeds 0 1 2 --steps 150
    python tools/compare_algorithms.py --override rollout.n_samples=16    # any oar-train override, for every run
    python tools/compare_algorithms.py --report-only                      # tables and plots from what has run

Tasks: ``modsum`` (the embedded default: a+b mod 3, ~7 response tokens, all relevant) and ``pivot`` (``+experiment=
pivot``, data/pivot.py: 64 free filler letters around the one trace digit that decides the reward; the saliency
probe runs every ``--probe-every`` steps). Each (task, algorithm, seed) is one ``oar-train`` subprocess into
``OUT/<task>/<algorithm>-seed<seed>``, ``--jobs`` at a time (default: the cores available, one thread each).
Interrupted studies resume: a finished run (its metrics reach the last step) is reused, an unfinished one continues
from its latest checkpoint (``checkpoint.every=--ckpt-every``, ``resume=auto``); ``--fresh`` redoes everything.

Per run: ``steps_to_target`` (the first step whose ``--window``-step mean training reward reaches ``--target``; a run
that never does counts as ``--steps``, and the table says how many reached it), ``reward_last`` (mean of the last
window), ``eval`` (avg@K after training), ``ess`` (the OAR diagnostic ESS ratio, last window), ``precision`` and
``auroc`` (pivot: the last probe's OAR-G answer_mean saliency against the known pivots; ``precision_oar_p`` for
OAR-P), ``s_per_step`` (median wall-clock). Per algorithm: the mean over seeds with a 95% percentile bootstrap
interval (10,000 resamples of the seeds; Efron & Tibshirani 1993, §13.3) and, against GRPO on the same seeds, the
mean paired difference with the two-sided exact sign-flip permutation p-value (all 2^n sign patterns; Good 2005,
§3.4). Written to ``OUT/<task>/table.md`` and ``OUT/results.json``; plots ``OUT/<task>/reward.png`` (mean reward per
step, band: min-max over seeds) and ``OUT/pivot/saliency_precision.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oar_megatron.metrics.logger import read_metrics  # noqa: E402
from oar_megatron.metrics.progress import print_table  # noqa: E402

ALGORITHMS = ["grpo", "dapo", "dr_grpo", "gspo_token", "aspo", "oar_g", "oar_p", "gspo_token_oar_g"]
TASKS = {"modsum": [], "pivot": ["+experiment=pivot"]}
METRICS = ("steps_to_target", "reward_last", "eval", "ess", "precision", "auroc", "precision_oar_p", "s_per_step")


# ------------------------------------------------------------------------------------------------------- runs

def run_dir(out: Path, task: str, algorithm: str, seed: int) -> Path:
    return out / task / f"{algorithm}-seed{seed}"


def finished(path: Path, steps: int) -> bool:
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        return False
    train = [r for r in read_metrics(metrics) if r.get("phase") == "train"]
    return bool(train) and train[-1]["step"] >= steps


def command(task: str, algorithm: str, seed: int, args) -> list[str]:
    d = run_dir(args.out, task, algorithm, seed)
    probe = [f"eval.saliency_probe_every={args.probe_every}"] if task == "pivot" and args.probe_every else []
    return [sys.executable, "-m", "oar_megatron.trainer.app", *TASKS[task], f"algorithm={algorithm}",
            f"trainer.seed={seed}", f"trainer.steps={args.steps}", f"logging.run_dir={d}",
            f"checkpoint.every={args.ckpt_every}", "checkpoint.keep_last=1", "checkpoint.save_final=false",
            "checkpoint.resume=auto", "trainer.progress=false", "logging.step_line=false", "logging.tensorboard=false",
            *probe, *args.override]


def run_one(task: str, algorithm: str, seed: int, args) -> str:
    d = run_dir(args.out, task, algorithm, seed)
    if finished(d, args.steps) and not args.fresh:
        return f"{task}/{algorithm}/seed{seed}: done before"
    if args.fresh and d.exists():
        import shutil

        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    cmd = command(task, algorithm, seed, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    with open(d / "run.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (d / "run.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{task}/{algorithm}/seed{seed} failed (exit {proc.returncode}, log {d / 'run.log'}):\n"
                           + "\n".join(tail))
    return f"{task}/{algorithm}/seed{seed}: {time.monotonic() - t0:.0f} s"


# ------------------------------------------------------------------------------------------------ statistics

def first_reach(values: list[float], target: float, window: int) -> float | None:
    for i in range(len(values) - window + 1):
        if sum(values[i:i + window]) / window >= target:
            return float(i + window)
    return None


def summarize_run(path: Path, args) -> dict[str, float]:
    rows = read_metrics(path / "metrics.jsonl")
    train = [r for r in rows if r.get("phase") == "train" and r.get("reward/mean") is not None]
    rewards = [r["reward/mean"] for r in train]
    reach = first_reach(rewards, args.target, args.window)
    ess = [r["oar/ess_ratio"] for r in train if r.get("oar/ess_ratio") is not None]
    evals = [r for r in rows if r.get("phase") == "eval"]
    avg = next((v for k, v in (evals[-1].items() if evals else []) if "/avg@" in k), math.nan)
    probes = [r for r in rows if r.get("phase") == "saliency"]
    last = probes[-1] if probes else {}
    times = [r["time/step_s"] for r in train if r.get("time/step_s") is not None]
    return {"steps_to_target": reach if reach is not None else float(args.steps), "reached": reach is not None,
            "reward_last": statistics.fmean(rewards[-args.window:]) if rewards else math.nan, "eval": avg,
            "ess": statistics.fmean(ess[-args.window:]) if ess else math.nan,
            "precision": last.get("saliency/oar_g_answer_mean/precision_at_k", math.nan),
            "auroc": last.get("saliency/oar_g_answer_mean/auroc", math.nan),
            "precision_oar_p": last.get("saliency/oar_p_last/precision_at_k", math.nan),
            "s_per_step": statistics.median(times) if times else math.nan}


def bootstrap_ci(values: list[float], n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (resampling the seeds)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact paired permutation p-value: the share of the 2^n sign patterns whose |mean| is at least the
    observed |mean| (1.0 when every difference is 0)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return math.nan
    obs = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float((np.abs((signs * d).mean(axis=1)) >= obs - 1e-12).mean())


def aggregate(per_seed: dict[str, dict[int, dict]], baseline: str = "grpo") -> dict[str, dict]:
    """{algorithm: {metric: {mean, ci, n, diff, p}}} from {algorithm: {seed: summary}}."""
    out = {}
    for alg, runs in per_seed.items():
        entry = {"seeds": sorted(runs), "reached": sum(r["reached"] for r in runs.values())}
        for m in METRICS:
            vals = [runs[s][m] for s in sorted(runs) if not math.isnan(runs[s][m])]
            if not vals:
                continue
            e = {"mean": statistics.fmean(vals), "ci": bootstrap_ci(vals), "n": len(vals)}
            if alg != baseline and baseline in per_seed:
                common = [s for s in sorted(runs) if s in per_seed[baseline]
                          and not math.isnan(runs[s][m]) and not math.isnan(per_seed[baseline][s][m])]
                if common:
                    diffs = [runs[s][m] - per_seed[baseline][s][m] for s in common]
                    e["diff"], e["p"] = statistics.fmean(diffs), sign_flip_p(diffs)
            entry[m] = e
        out[alg] = entry
    return out


def _cell(e: dict | None, digits: int = 3) -> str:
    if not e:
        return "n/a"
    lo, hi = e["ci"]
    s = f"{e['mean']:.{digits}g}" + ("" if math.isnan(lo) else f" [{lo:.{digits}g}, {hi:.{digits}g}]")
    if "p" in e:
        s += f" (Δ {e['diff']:+.{digits}g}, p={e['p']:.2g})"
    return s


# ------------------------------------------------------------------------------------------------------ plots

def plot_task(task: str, algorithms: list[str], seeds: list[int], args) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    panels = [("reward/mean", "train", "mean training reward", "reward.png")]
    if task == "pivot":
        panels.append(("saliency/oar_g_answer_mean/precision_at_k", "saliency",
                       "OAR-G saliency precision@k on the pivots", "saliency_precision.png"))
    for key, phase, title, name in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        for alg in algorithms:
            curves = []
            for s in seeds:
                p = run_dir(args.out, task, alg, s) / "metrics.jsonl"
                if p.exists():
                    pts = {r["step"]: r[key] for r in read_metrics(p) if r.get("phase") == phase and key in r}
                    curves.append(pts)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            y = np.array([[c[t] for t in steps] for c in curves])
            ax.plot(steps, y.mean(axis=0), label=f"{alg} ({len(curves)})")
            ax.fill_between(steps, y.min(axis=0), y.max(axis=0), alpha=0.12)
        if key.startswith("saliency"):
            ax.axhline(1.0 / (args.filler_len + 1), color="grey", ls=":", label="chance")
        ax.set_xlabel("step")
        ax.set_title(f"{task}: {title}")
        ax.legend(fontsize=7)
        path = args.out / task / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append(path)
    return figures


# ------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.8, help="the training reward steps_to_target asks for")
    ap.add_argument("--probe-every", type=int, default=20, help="pivot: saliency probe period (0: off)")
    ap.add_argument("--filler-len", type=int, default=64, help="pivot: the filler length (for the chance line)")
    ap.add_argument("--ckpt-every", type=int, default=25, help="checkpoint period, for resuming a killed run")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--override", action="append", default=[], help="an oar-train override for every run")
    ap.add_argument("--fresh", action="store_true", help="rerun even finished runs")
    ap.add_argument("--report-only", action="store_true", help="no runs: tables and plots from what exists")
    args = ap.parse_args(argv)
    if not 1 <= args.window <= args.steps:
        ap.error(f"--window must be in [1, --steps={args.steps}]")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    known = {p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "algorithm").glob("*.yaml")}
    bad = [a for a in args.algorithms if a not in known]
    if bad:
        ap.error(f"--algorithms: unknown {bad}; known: {sorted(known)}")

    jobs = [(t, a, s) for t in args.tasks for s in args.seeds for a in args.algorithms]
    if not args.report_only:
        failures = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, t, a, s, args): (t, a, s) for t, a, s in jobs}
            for fut, key in futures.items():
                try:
                    print(f"[study] {fut.result()}", flush=True)
                except RuntimeError as e:
                    failures.append(str(e))
                    print(f"[study] {e}", file=sys.stderr, flush=True)
        if failures:
            print(f"[study] {len(failures)} run(s) failed; rerun the same command to resume", file=sys.stderr)
            return 1

    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "steps": args.steps, "window": args.window, "target": args.target, "tasks": {}}
    for task in args.tasks:
        per_seed = {a: {s: summarize_run(run_dir(args.out, task, a, s), args) for s in args.seeds
                        if finished(run_dir(args.out, task, a, s), args.steps)} for a in args.algorithms}
        per_seed = {a: r for a, r in per_seed.items() if r}
        agg = aggregate(per_seed)
        results["tasks"][task] = {"per_seed": per_seed, "aggregate": agg}
        cols = ["steps_to_target", "reward_last", "eval", "ess", "s_per_step"]
        cols += ["precision", "auroc", "precision_oar_p"] if task == "pivot" else []
        rows = [{"algorithm": a, "seeds": len(e["seeds"]), "reached": f"{e['reached']}/{len(e['seeds'])}",
                 **{c: _cell(e.get(c)) for c in cols}} for a, e in agg.items()]
        title = (f"{task}: {args.steps} steps, mean [95% bootstrap CI] over seeds, (Δ vs GRPO, paired sign-flip p); "
                 f"steps_to_target: window {args.window}, reward {args.target}")
        table = print_table(title, rows)
        (args.out / task).mkdir(parents=True, exist_ok=True)
        (args.out / task / "table.md").write_text(table + "\n")
        plot_task(task, list(per_seed), args.seeds, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"[study] tables: {args.out}/<task>/table.md; results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
