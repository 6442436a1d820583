"""Benchmark: rollout tokens/s of a real SGLang CPU server vs the in-process local engine, on the same model.

One command, one run: a tiny random-weight HF Qwen3 (``tests/convert/hf_tiny.py``; ``--size small`` a wider one) is
saved once; then

1. the local engine (``rollout.local.LocalEngine``: megatron ``GPTModel`` built from the HF config, weights loaded
   through the conversion mapping, ``policy.generate``: batched decode with a KV cache, fp32 — the CPU policy runs
   fp32 only) generates ``--prompts`` prompts × ``--n`` samples of ``--max-new-tokens`` tokens;
2. one real SGLang server per dtype (``rollout.servers.SGLangServers``: the CPU venv, ``--skip-tokenizer-init``,
   ``--dtype`` float32 and bfloat16) started on the same weights and asked for the same prompts and sampling settings
   through the project's client (``rollout.sglang.SGLangEngine``: one ``/generate`` per sample, the server batches
   them continuously).

Each engine gets one warm-up call, then ``--repeats`` timed calls; reported: generated tokens per call, median
seconds per call, median tokens/s, the ratio of each server's tokens/s to the local engine's (measured in this
run), and the 1-minute load average before and after each engine's timed calls (on a shared machine other work skews
every figure; compare only rows measured at similar load). Servers are started one at a time and stopped before the
next measurement; the local engine runs while no server is up. Both get ``--threads`` CPU threads (torch threads in
process; the server's ``OMP_NUM_THREADS``). Start-up time of each server is printed too (not part of tokens/s).

Run:  python benchmarks/bench_rollout.py [--prompts 16] [--n 4] [--max-new-tokens 32] [--repeats 3] [--size tiny]
      [--dtypes float32,bfloat16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # make_hf_model overrides of tests/convert/hf_tiny.py's qwen3 (tiny: as the tests use it)
    "tiny": {},
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32),
}


def _prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(11)
    return torch.randint(1, vocab, (count, length), generator=g).tolist()


def _time(engine, prompts, params, repeats: int) -> dict:
    engine.generate(prompts[: max(1, len(prompts) // 4)], params)  # warm-up
    load = os.getloadavg()[0]  # other work on the machine skews every figure: reported with it
    secs, toks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        samples = engine.generate(prompts, params)
        secs.append(time.perf_counter() - t0)
        toks.append(sum(len(s.response_ids) for s in samples))
    rates = [t / s for t, s in zip(toks, secs, strict=True)]
    return {"tokens_per_call": statistics.median(toks), "s_per_call": round(statistics.median(secs), 3),
            "tokens_per_s": round(statistics.median(rates), 1), "samples": len(samples),
            "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1)}


def bench_local(hf_dir: str, prompts, params, repeats: int, threads: int) -> dict:
    import torch
    import torch.distributed as dist

    from oar_megatron.config.parallel import ParallelConfig
    from oar_megatron.convert import SafetensorsReader, hf_model_config
    from oar_megatron.convert.config import architecture, read_hf_config
    from oar_megatron.convert.mapping import load_hf_chunks
    from oar_megatron.policy import build_model, init_parallel
    from oar_megatron.rollout.local import LocalEngine

    torch.set_num_threads(threads)
    cfg = hf_model_config(hf_dir)
    store = tempfile.NamedTemporaryFile(prefix="bench_rollout_store_", delete=False).name
    os.unlink(store)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    groups = init_parallel(ParallelConfig(distributed_optimizer=False), cfg, seed=0)
    gpt = build_model(cfg, groups)
    with SafetensorsReader(hf_dir) as src:
        load_hf_chunks(src, cfg, architecture(read_hf_config(hf_dir)), [gpt], groups)
    gpt.eval()
    engine = LocalEngine(gpt, vocab_size=read_hf_config(hf_dir)["vocab_size"], max_batch_size=len(prompts) * params.n,
                         pad_id=0, seed=0)
    return _time(engine, prompts, params, repeats)


def bench_server(hf_dir: str, dtype: str, prompts, params, repeats: int, run_dir: str, threads: int) -> dict:
    from oar_megatron.convert.config import read_hf_config
    from oar_megatron.rollout.servers import SGLangServers
    from oar_megatron.rollout.sglang import SGLangEngine

    t0 = time.perf_counter()
    with SGLangServers(hf_dir, 1, dtype=dtype, skip_tokenizer_init=True, run_dir=os.path.join(run_dir, dtype),
                       env={"OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}) as servers:
        start = time.perf_counter() - t0
        engine = SGLangEngine(servers.urls, vocab_size=read_hf_config(hf_dir)["vocab_size"], timeout_s=600,
                              max_concurrency=len(prompts) * params.n)
        out = _time(engine, prompts, params, repeats)
    out["startup_s"] = round(start, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="server dtypes, comma-separated")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the local engine and OMP_NUM_THREADS of the server")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("bench_rollout: --repeats must be >= 1")

    from oar_megatron.rollout.base import SamplingParams
    from tests.convert.hf_tiny import make_hf_model

    with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
        hf_dir = os.path.join(tmp, "qwen3")
        model = make_hf_model("qwen3", hf_dir, **SIZES[args.size])
        vocab = model.config.vocab_size
        del model
        prompts = _prompts(vocab, args.prompts, args.prompt_len)
        params = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=args.max_new_tokens, n=args.n)
        setup = {"size": args.size, "prompts": args.prompts, "n": args.n, "prompt_len": args.prompt_len,
                 "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "cpus": os.cpu_count(),
                 "local_threads": args.threads}
        print(json.dumps({"setup": setup}), flush=True)
        results = {"local/float32": bench_local(hf_dir, prompts, params, args.repeats, args.threads)}
        print(json.dumps({"local/float32": results["local/float32"]}), flush=True)
        for dtype in [d for d in args.dtypes.split(",") if d]:
            try:
                results[f"sglang/{dtype}"] = bench_server(hf_dir, dtype, prompts, params, args.repeats, tmp,
                                                             args.threads)
            except Exception as exc:  # noqa: BLE001 - a dtype the CPU server cannot serve is reported, not fatal
                results[f"sglang/{dtype}"] = {"error": str(exc).splitlines()[0][:300]}
            print(json.dumps({f"sglang/{dtype}": results[f"sglang/{dtype}"]}), flush=True)
    base = results["local/float32"]["tokens_per_s"]
    print(f"\n{'engine':<18}{'tokens/call':>12}{'s/call':>9}{'tokens/s':>10}{'vs local':>10}{'load 1m':>12}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18}  failed: {r['error']}")
            continue
        print(f"{name:<18}{r['tokens_per_call']:>12}{r['s_per_call']:>9}{r['tokens_per_s']:>10}"
              f"{r['tokens_per_s'] / base:>9.2f}x{r['load_before']:>6}/{r['load_after']:<5}")
    print(json.dumps({"results": results,
                      "ratios_vs_local": {k: round(r["tokens_per_s"] / base, 2) for k, r in results.items()
                                          if "error" not in r}}))


if __name__ == "__main__":
    main()
