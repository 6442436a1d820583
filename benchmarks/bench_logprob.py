"""Benchmark: fused vocab-parallel log-prob + entropy vs the naive ``log_softmax().gather`` + entropy, on CPU.

What it measures, per shape [T, V/TP] (one rank's vocab shard; TP is simulated by the shard width, TP=1 needs no
group), per variant (naive = ``reference_logprob_entropy``; fused; fused with ``chunk_size``), per loss
(``lp+H``: w1·logp + w2·H, the entropy bonus differentiated; ``lp``: w1·logp with H computed for logging only):

- time: median wall time of forward + backward over ``--repeats`` runs (after one warm-up run);
- memory: peak extra resident memory of forward + backward, measured in a fresh subprocess per (shape, variant):
  inputs (logits, target, weights) are allocated and touched first, the kernel's peak-RSS mark is reset
  (``/proc/self/clear_refs`` = 5; falls back to ``ru_maxrss`` where that is not writable), then one forward +
  backward runs and the peak (VmHWM) minus the resident size before it is the extra. Tensors this large are
  mmap-allocated by glibc and returned on free, so RSS tracks live tensors. The returned gradient (one [T, V/TP]
  tensor in the logits' dtype, which every variant must produce) is reported separately: "extra" excludes it.
  Figures are in units of one [T, V/TP] fp32 buffer ("buf").

Single-threaded (torch.set_num_threads(1)): the development machine has 2 shared cores.

Run:  python benchmarks/bench_logprob.py            (full set, a few minutes on 2 cores)
      python benchmarks/bench_logprob.py --quick    (small shapes, under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _memory import reset_peak_rss, rss_kb  # benchmarks/_memory.py (the script's own folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (T, V, TP, dtype, losses): Qwen-style V = 152064 at TP 8 and 4 (and a short sequence at TP 1), a 32k vocab at
# TP 1, and bf16 logits. One shard [T, V/TP] fp32 is ~600 MiB for the large ones; the naive baseline needs ~5.
FULL = [
    (8192, 152064, 8, "fp32", ("lp+H", "lp")),
    (4096, 152064, 4, "fp32", ("lp+H",)),
    (512, 152064, 1, "fp32", ("lp+H",)),
    (4096, 32000, 1, "fp32", ("lp+H",)),
    (8192, 152064, 8, "bf16", ("lp+H", "lp")),
]
QUICK = [(512, 32000, 4, "fp32", ("lp+H", "lp")), (256, 152064, 8, "bf16", ("lp+H",))]
VARIANTS = ("naive", "fused", "chunked")


def worker(t: int, vs: int, dtype: str, variant: str, loss: str, chunk: int, repeats: int, temperature: float) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    from oar_megatron.algorithms import reference_logprob_entropy, vocab_parallel_logprob_entropy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    logits = torch.empty(t, vs, dtype=dt).normal_(0.0, 3.0).requires_grad_(True)
    target = torch.randint(0, vs, (t,))
    w_lp, w_h = torch.randn(t), torch.randn(t) * 0.01

    def step():
        if variant == "naive":
            lp, h = reference_logprob_entropy(logits, target, temperature)
        else:
            lp, h = vocab_parallel_logprob_entropy(
                logits, target, temperature=temperature, chunk_size=chunk if variant == "chunked" else None
            )
        obj = (lp * w_lp).sum()
        if loss == "lp+H":
            obj = obj + (h * w_h).sum()
        else:
            h = h.detach()  # logged only
        obj.backward()
        out = float(h.detach().sum())  # consume the entropy as a metric would
        logits.grad = None
        return out

    # One-time costs (autograd engine, thread pools, allocator arenas) on a tiny problem first, outside the mark.
    tiny = torch.zeros(4, 64, dtype=dt, requires_grad=True)
    if variant == "naive":
        lp, h = reference_logprob_entropy(tiny, target[:4] % 64, temperature)
    else:
        lp, h = vocab_parallel_logprob_entropy(tiny, target[:4] % 64, temperature=temperature, chunk_size=2)
    (lp.sum() + h.sum()).backward()
    del tiny, lp, h

    # Memory: one forward + backward from a reset peak mark (the gradient is freed only after the peak is read).
    exact = reset_peak_rss()
    before = rss_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "naive":
        lp, h = reference_logprob_entropy(logits, target, temperature)
    else:
        lp, h = vocab_parallel_logprob_entropy(
            logits, target, temperature=temperature, chunk_size=chunk if variant == "chunked" else None
        )
    obj = (lp * w_lp).sum() + ((h * w_h).sum() if loss == "lp+H" else 0.0)
    obj.backward()
    peak = rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del lp, h, obj
    logits.grad = None

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    buf = t * vs * 4
    grad_bytes = t * vs * logits.element_size()
    extra_incl = (peak - before) * 1024
    return dict(
        median_s=statistics.median(times),
        times=times,
        extra_incl_grad_buf=extra_incl / buf,
        extra_buf=(extra_incl - grad_bytes) / buf,
        buf_mib=buf / 2**20,
        exact_peak=exact,
    )


def run_one(t, vs, dtype, variant, loss, chunk, repeats, temperature) -> dict:
    spec = json.dumps([t, vs, dtype, variant, loss, chunk, repeats, temperature])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=1024, help="rows per chunk for the chunked variant")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--loss", choices=["lp+H", "lp"], default=None, help="only this loss (default: per shape)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    shapes = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 3)
    chunk = min(args.chunk, 128) if args.quick else args.chunk
    import torch

    print(f"# torch {torch.__version__}, {os.cpu_count()} CPU cores, 1 thread per run, T={args.temperature}, "
          f"chunk={chunk} rows, median of {repeats} fwd+bwd")
    print("| T | V | TP | V/TP | dtype | loss | variant | median s | speed vs naive | extra mem (buf) | "
          "extra incl. grad (buf) | 1 buf MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t, v, tp, dtype, losses in shapes:
        vs = v // tp
        for loss in [args.loss] if args.loss else losses:
            res = {var: run_one(t, vs, dtype, var, loss, chunk, repeats, args.temperature) for var in VARIANTS}
            base = res["naive"]["median_s"]
            for var in VARIANTS:
                r = res[var]
                print(f"| {t} | {v} | {tp} | {vs} | {dtype} | {loss} | {var} | {r['median_s']:.3f} | "
                      f"{base / r['median_s']:.2f}x | {r['extra_buf']:.2f} | {r['extra_incl_grad_buf']:.2f} | "
                      f"{r['buf_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
