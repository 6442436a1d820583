"""Benchmark: the SGLang client's overhead per request, and disk weight-sync throughput.

1. Client overhead: ``--requests`` one-token ``/generate`` requests to the fake server (tests/sglang_fake.py, table
   model: the server's own work is near zero) at concurrency ``--concurrency``, through ``SGLangEngine.generate``
   (pool, balancing, retries armed, response validation, Sample objects, the helper thread) vs a bare ``httpx``
   async loop posting the same JSON bodies with the same concurrency. Reported: µs per request for each and the
   difference (the client's own cost). Both share the same HTTP stack and server, so the difference is the
   engine's bookkeeping.
2. Disk sync: ``SyncDir.write`` of ``--mb`` MB of fp32 tensors (safetensors + config.json, tmp dir + rename) vs a
   plain file copy (``shutil.copyfile``) of the resulting safetensors file; GB/s for each. Page-cache speeds on
   this machine; a shared filesystem is slower for both.

Run:  python benchmarks/bench_sglang_client.py [--requests 400] [--concurrency 16] [--mb 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def bench_client(requests: int, concurrency: int, repeats: int) -> dict:
    import httpx

    from oar_megatron.rollout.base import SamplingParams
    from oar_megatron.rollout.sglang import SGLangEngine
    from tests.sglang_fake import FakeSGLang, TableModel

    fake = FakeSGLang(TableModel(24))
    fake.start()
    try:
        eng = SGLangEngine([fake.url], vocab_size=24, max_concurrency=concurrency)
        params = SamplingParams(max_new_tokens=1, n=1)
        prompts = [[1, 3, 13, 4, 14]] * requests
        body = eng._payload(prompts[0], params)

        async def bare() -> None:
            sem = asyncio.Semaphore(concurrency)
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
                async def one() -> None:
                    async with sem:
                        r = await client.post(fake.url + "/generate", json=body)
                        json.loads(r.content)
                await asyncio.gather(*(one() for _ in range(requests)))

        engine_t, bare_t = [], []
        eng.generate(prompts[:8], params)  # warm-up
        asyncio.run(bare())
        for _ in range(repeats):
            t0 = time.perf_counter()
            eng.generate(prompts, params)
            engine_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            asyncio.run(bare())
            bare_t.append(time.perf_counter() - t0)
    finally:
        fake.stop()
    e_us = statistics.median(engine_t) / requests * 1e6
    b_us = statistics.median(bare_t) / requests * 1e6
    return {"requests": requests, "concurrency": concurrency, "engine_us_per_request": round(e_us, 1),
            "bare_httpx_us_per_request": round(b_us, 1), "client_overhead_us": round(e_us - b_us, 1)}


def bench_sync(mb: int) -> dict:
    import torch

    from oar_megatron.rollout.weight_sync import SyncDir

    n = mb * 1024 * 1024 // 4 // 16
    tensors = {f"layer.{i}.weight": torch.randn(n) for i in range(16)}
    with tempfile.TemporaryDirectory() as tmp:
        d = SyncDir(Path(tmp) / "sync")
        t0 = time.perf_counter()
        path, nbytes = d.write(1, tensors, {"architectures": ["Qwen3ForCausalLM"]})
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        shutil.copyfile(path / "model.safetensors", Path(tmp) / "copy.safetensors")
        copy_s = time.perf_counter() - t0
    return {"bytes": nbytes, "sync_write_gb_per_s": round(nbytes / 1e9 / write_s, 3),
            "file_copy_gb_per_s": round(nbytes / 1e9 / copy_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mb", type=int, default=256)
    args = ap.parse_args()
    print(json.dumps(bench_client(args.requests, args.concurrency, args.repeats)))
    print(json.dumps(bench_sync(args.mb)))


if __name__ == "__main__":
    main()
