"""Benchmark: the RL step of OAR-G vs GRPO with SGLang-style servers, with and without the overlapped passes.

With servers on their own devices the trainer's ranks idle while rollouts run; ``rollout.overlap`` computes π_old,
the reference and OAR's saliency for groups that have finished while the rest generate (``trainer/overlap.py``).
The question: how much of OAR's extra cost (the saliency pass) does that hide? Goal: OAR-G step ≤ 1.05× GRPO's.

Setup, all in one run on this machine:

1. Calibration: the embedded default (tiny model, built-in task, 16 prompts × 8 samples, 8 new tokens) with the
   in-process local engine under GRPO; the median ``time/rollout_s`` is what generation costs here.
2. Two fake SGLang servers (tests/sglang_fake.py), each in its own process, that take the weight updates
   (export, /update_weights_from_disk, versions checked) but sample from their instant table model, sleeping
   ``delay`` seconds per generated token: a server on its own GPU costs the trainer's CPU nothing, which real
   servers sharing this machine's two cores cannot show. Each server runs ``--server-batch`` requests at a time
   (the client's ``rollout.max_concurrency`` = servers × that), so the step's 128 samples generate in waves and
   groups finish spread over the rollout, as on a cluster whose rollout batch exceeds the servers' running batch.
   ``delay`` is set so a step's generation lasts ``scale`` times the local engine's here (``8 × waves × delay``):
   1× (this tiny model, where generation is as cheap as a forward pass) and 4× (closer to RL on real models, where
   generation dominates the step).
3. GRPO and OAR-G, each with ``rollout.overlap`` false and true, ``--steps`` steps after the format warm-up;
   reported: median step time (first step dropped), median rollout / after-rollout / log-prob / advantage times,
   and the ratios OAR-G / GRPO without and with overlap. On this machine the fake servers' request handling and the
   client's thread share the two cores with the trainer, so passes run during the rollout stretch it; the last
   column projects the ratio for servers on hardware of their own (GRPO's plain rollout time + each run's trainer
   time after its rollout): a projection, labelled as one.

Run:  python benchmarks/bench_overlap.py [--steps 8] [--server-batch 16] [--scales 1,4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COMMON = ["eval.at_start=false", "eval.at_end=false", "checkpoint.every=0", "checkpoint.save_final=false",
          "trainer.progress=false", "logging.step_line=false", "logging.tensorboard=false"]
# the embedded default's rollout shape, also for the sglang runs (configs/rollout/sglang.yaml is sized for GPUs)
SHAPE = ["rollout.prompts_per_step=16", "rollout.n_samples=8", "rollout.max_new_tokens=8"]


def run(overrides: list[str], steps: int, run_dir: str) -> list[dict]:
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(COMMON + SHAPE + [f"trainer.steps={steps}", f"logging.run_dir={run_dir}"] + overrides)
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def start_fakes(n: int, delay: float, tmp: Path) -> tuple[list[subprocess.Popen], list[str]]:
    procs, urls = [], []
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        url_file = tmp / f"fake{i}.url"
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.sglang_fake", "--url-file", str(url_file),
                                       "--delay-per-token", str(delay), "--table-only"], cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}))
    for i in range(n):
        url_file = tmp / f"fake{i}.url"
        t0 = time.time()
        while not url_file.exists():
            if time.time() - t0 > 120 or procs[i].poll() is not None:
                raise RuntimeError("bench: a fake server did not start")
            time.sleep(0.1)
        urls.append(url_file.read_text().strip())
    return procs, urls


def med(hist: list[dict], key: str) -> float:
    return statistics.median(m[key] for m in hist[1:]) if len(hist) > 1 else hist[0][key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--server-batch", type=int, default=16, help="requests each fake server runs at once")
    ap.add_argument("--scales", default="1,4", help="generation time per step as multiples of the local engine's")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    scales = [float(x) for x in args.scales.split(",")]
    in_flight = 2 * args.server_batch
    waves = -(-16 * 8 // in_flight)
    summary = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        local = run(["algorithm=grpo"], args.steps, str(tmp / "local"))
        rollout_s = med(local, "time/rollout_s")
        print(f"calibration: local engine GRPO step {med(local, 'time/step_s'):.3f} s, rollout {rollout_s:.3f} s; "
              f"fake servers: {in_flight} requests in flight ({waves} waves of up to 8 tokens)")
        for scale in scales:
            delay = scale * rollout_s / (8 * waves)
            procs, urls = start_fakes(2, delay, tmp / f"x{scale}")
            try:
                sglang = ["rollout=sglang", f"rollout.server_urls=[{','.join(urls)}]", "rollout.seeded_sampling=true",
                          "rollout.timeout_s=120", f"rollout.max_concurrency={in_flight}"]
                res = {}
                for alg in ("grpo", "oar_g"):
                    for overlap in (False, True):
                        res[alg, overlap] = run(sglang + [f"algorithm={alg}", f"rollout.overlap={str(overlap).lower()}"],
                                                args.steps, str(tmp / f"{scale}-{alg}-{overlap}"))
            finally:
                for p in procs:
                    p.kill()
            print(f"\ngeneration {scale:g}x the local engine's ({delay * 1e3:.1f} ms per token per request)")
            print(f"{'run':<16}{'step s':>9}{'rollout s':>11}{'after s':>9}{'logprob s':>11}{'advantage s':>13}"
                  f"{'update s':>10}{'overlap s':>11}{'overlap frac':>14}")
            for (alg, overlap), hist in res.items():
                print(f"{alg + (' +overlap' if overlap else ''):<16}{med(hist, 'time/step_s'):>9.3f}"
                      f"{med(hist, 'time/rollout_s'):>11.3f}{after(hist):>9.3f}{med(hist, 'time/logprob_s'):>11.3f}"
                      f"{med(hist, 'time/advantage_s'):>13.3f}{med(hist, 'time/update_s'):>10.3f}"
                      f"{med(hist, 'time/overlap_s') if overlap else 0.0:>11.3f}"
                      f"{med(hist, 'rollout/overlap_frac') if overlap else 0.0:>14.2f}")
            step = {k: med(h, "time/step_s") for k, h in res.items()}
            # rollouts on hardware of their own would not stretch when the passes run beside them: GRPO's plain
            # rollout plus each run's trainer time after its rollout
            gen = med(res["grpo", False], "time/rollout_s")
            projected = (gen + after(res["oar_g", True])) / (gen + after(res["grpo", False]))
            summary.append((scale, step["oar_g", False] / step["grpo", False], step["oar_g", True] / step["grpo", True],
                            step["oar_g", True] / step["grpo", False], projected))
    print("\nOAR-G / GRPO step time (medians; goal <= 1.05x)")
    print(f"{'generation':>12}{'no overlap':>12}{'overlap':>10}{'OAR-G overlap / GRPO plain':>29}"
          f"{'projected, servers apart':>27}")
    for scale, plain, lapped, both, projected in summary:
        print(f"{scale:>11g}x{plain:>11.2f}x{lapped:>9.2f}x{both:>28.2f}x{projected:>26.2f}x")


def after(hist: list[dict]) -> float:
    """Median trainer time after the rollout (step minus rollout): what the overlap can shrink."""
    return statistics.median(m["time/step_s"] - m["time/rollout_s"] for m in hist[1:])


if __name__ == "__main__":
    main()
