"""Benchmark: HF <-> megatron conversion throughput and peak memory, against copying the same bytes.

A random-weight Llama-style HF checkpoint (fp32, sharded safetensors with an index, ``--quick`` picks a smaller
shape) is written once; then each phase runs as a fresh command (single-threaded), timed, with its peak resident
memory read from ``getrusage(RUSAGE_CHILDREN)`` by a small wrapper process (the largest process of the phase: the
rank process for ``hf-to-mcore``, which ``run_local`` spawns):

- ``copy``: ``cp`` of every safetensors file (the baseline: the same bytes read and written);
- ``imports`` / ``imports+megatron``: a Python process that only imports (torch + ``oar_megatron.convert``; + the
  megatron-core modules the commands use) and exits: the time and memory baselines subtracted below;
- ``read``: ``SafetensorsReader`` + ``iter_hf_to_mcore`` at TP=1, every megatron tensor produced and dropped (the
  streaming import the trainer's ``model.pretrained`` does, without a model to copy into);
- ``hf-to-mcore``: ``oar-convert hf-to-mcore`` at TP=1 (build the model, stream into it, write the megatron
  distributed checkpoint);
- ``mcore-to-hf``: ``oar-convert mcore-to-hf`` of that checkpoint (streamed from the dist checkpoint into sharded
  safetensors + index; no model built).

Reported per phase: median seconds over ``--repeats`` runs; "net" seconds, minus the median of a process that
only starts and imports what the phase imports (``imports``: torch + ``oar_megatron.convert``; ``imports+megatron``:
+ megatron-core, for the two commands); GB/s of checkpoint bytes over the net time, the ratio of the copy's time to
the net time (1.0 = as fast as copying the bytes); the peak memory above that import baseline as a fraction of the
checkpoint's size (1.0 = the whole model held at once).

Run:  python benchmarks/bench_convert.py            (~0.62 GB model, a few minutes on 2 cores)
      python benchmarks/bench_convert.py --quick    (~44 MB model, about a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # hidden, layers, ffn, vocab, heads, kv heads
    "full": (1024, 8, 2816, 32000, 16, 4),
    "quick": (256, 4, 704, 16000, 4, 2),
}
PHASES = ("copy", "imports", "imports+megatron", "read", "hf-to-mcore", "mcore-to-hf")
BASELINE = {"read": "imports", "hf-to-mcore": "imports+megatron", "mcore-to-hf": "imports+megatron"}


def make_checkpoint(directory: Path, size: str, shard_bytes: int) -> int:
    """Random fp32 Llama-style weights saved as HF sharded safetensors; returns (total, largest tensor) bytes."""
    import torch
    from safetensors.torch import save_file

    h, layers, ffn, vocab, heads, kv = SIZES[size]
    d = h // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "num_hidden_layers": layers, "intermediate_size": ffn, "vocab_size": vocab,
              "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": "float32"}
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                       p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                       p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                       p + "mlp.down_proj.weight": (h, ffn)})
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size_now, total = 0, 0
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * 0.02
        nbytes = t.numel() * 4
        if size_now and size_now + nbytes > shard_bytes:
            shards.append({})
            size_now = 0
        shards[-1][name] = t
        size_now += nbytes
        total += nbytes
    weight_map = {}
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return total, max(math.prod(s) for s in shapes.values()) * 4


def read_phase(src: str) -> None:
    """The ``read`` phase, in its own process."""
    import torch

    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    from oar_megatron.convert import SafetensorsReader, hf_model_config
    from oar_megatron.convert.mapping import iter_hf_to_mcore
    from oar_megatron.convert.config import architecture, read_hf_config

    cfg, arch = hf_model_config(src), architecture(read_hf_config(src))
    with SafetensorsReader(src) as reader:
        for _, tensor in iter_hf_to_mcore(reader, cfg, arch):
            del tensor


def command(phase: str, src: Path, out: Path) -> list[str]:
    py = [sys.executable]
    if phase == "copy":
        return ["sh", "-c", f'mkdir -p "{out}" && cp "{src}"/*.safetensors "{out}"/']
    if phase == "imports":
        return py + ["-c", "import torch, oar_megatron.convert.mapping"]
    if phase == "imports+megatron":
        return py + ["-c", "import torch, megatron.core, oar_megatron.convert.checkpoint, oar_megatron.policy.model"]
    if phase == "read":
        return py + [__file__, "--read", str(src)]
    return py + ["-m", "oar_megatron.convert.cli", phase, str(src), str(out), "--quiet"]


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` (in this wrapper process): seconds and the peak RSS (KiB) of its largest process."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def run_phase(phase: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, __file__, "--measure", json.dumps(command(phase, src, out))]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~44 MB model instead of ~0.62 GB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="scratch directory (default: a temporary one)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--read", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.read:
        read_phase(args.read)
        return
    size = "quick" if args.quick else "full"
    scratch = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.dir))
    try:
        hf = scratch / "hf"
        hf.mkdir()
        nbytes, largest = make_checkpoint(hf, size, shard_bytes=(64 if args.quick else 256) << 20)
        print(f"model: {size} {SIZES[size]} (hidden, layers, ffn, vocab, heads, kv), {nbytes / 1e9:.3f} GB fp32, "
              f"{len(list(hf.glob('*.safetensors')))} safetensors shards; {args.repeats} runs per phase, "
              f"1 thread, fresh process per run; largest tensor {largest / nbytes:.2f} of the model")
        results: dict[str, list[dict]] = {p: [] for p in PHASES}
        for _ in range(args.repeats):
            for phase in PHASES:
                src = scratch / "mcore" if phase == "mcore-to-hf" else hf
                out = scratch / ("mcore" if phase == "hf-to-mcore" else f"out-{phase}")
                shutil.rmtree(out, ignore_errors=True)
                if phase == "hf-to-mcore":
                    shutil.rmtree(scratch / "mcore", ignore_errors=True)
                results[phase].append(run_phase(phase, src, out))
                if phase != "hf-to-mcore":
                    shutil.rmtree(out, ignore_errors=True)
        med = {p: (statistics.median(r["seconds"] for r in results[p]),
                   statistics.median(r["peak_kb"] for r in results[p])) for p in PHASES}
        copy_s = med["copy"][0]
        print(f"{'phase':<18}{'median s':>10}{'net s':>8}{'net GB/s':>10}{'copy s / net s':>16}{'peak RSS GiB':>14}"
              f"{'(peak - base) / model':>24}")
        for phase in PHASES:
            sec, peak_kb = med[phase]
            row = f"{phase:<18}{sec:>10.2f}"
            if phase in BASELINE:
                base_s, base_kb = med[BASELINE[phase]]
                net = max(sec - base_s, 1e-9)
                row += (f"{net:>8.2f}{nbytes / net / 1e9:>10.2f}{copy_s / net:>16.2f}{peak_kb / 2**20:>14.2f}"
                        f"{(peak_kb - base_kb) * 1024 / nbytes:>24.2f}")
            elif phase == "copy":
                row += f"{sec:>8.2f}{nbytes / sec / 1e9:>10.2f}{1.0:>16.2f}{peak_kb / 2**20:>14.2f}{'':>24}"
            else:
                row += f"{'':>8}{'':>10}{'':>16}{peak_kb / 2**20:>14.2f}{'':>24}"
            print(row)
        print("net s = the phase's time minus its import baseline's (process start + imports); base = the import "
              "baseline's peak RSS (read: torch + oar_megatron.convert; the commands: + megatron-core)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
