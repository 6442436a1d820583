"""Benchmark: the megatron-core policy passes of one RL step, on a small-but-realistic GPT (single process).

Three figures (issue 4, "Benchmark"):

1. **log-prob pass** — tokens/s and peak memory of ``policy.forward.response_logprobs`` (output layer on the
   response rows only, fused vocab-parallel log-prob) vs ``full_logits_logprobs`` (logits at every position, then
   ``log_softmax().gather``), no-grad (the π_old / reference pass) and forward + backward (the training pass), on
   right-padded ``prompt | response`` rows.
2. **OAR-G overhead** — a rollout batch cycle of GRPO, π_old forward (``response_logprobs``, no grad) + k updates
   (``train_step``: megatron DDP + Adam, GRPO policy loss on response log-probs), vs the OAR-G cycle, π_old
   forward shared with the clean P_final (``clean_pass`` over the rollout rows + the scoring rows) + the noisy
   gradient pass (``oar_g_sharded``, mode ``answer_mean``) + the same k updates; k = 1 and 4. Both cycles run
   interleaved in one process (ratios immune to slow drift of the shared machine's load).
3. **OAR-P cost per scored token** — ``oar_p_sharded`` (mode ``last``, reference from a clean pass computed
   outside the timing) at ``chunk_size`` 8 and 32, divided by the number of scored tokens, relative to one no-grad
   forward of the same scoring rows (``clean_pass``).

4. **GRPO train step** — one update on the same rows: megatron (``train_step``: DDP, Adam, response-only fused
   log-probs) vs a Hugging Face ``transformers`` model of the same shape with ``log_softmax`` over full logits and
   ``torch.optim.AdamW``, as a speed and memory ratio; on CUDA with bf16 also the MFU (FLOPs per token
   6N + 12·layers·hidden·seq over the device's dense bf16 peak).

Every time is the median of ``--repeats`` (≥ 3) runs after one warm-up. Memory: each variant runs in a fresh
subprocess; on CPU the peak resident memory of one run of the variant minus the resident memory before it (peak
mark reset through ``/proc/self/clear_refs``, else ``ru_maxrss``); on CUDA ``max_memory_allocated`` minus the
allocation before it. Model weights, optimizer state and inputs exist before the mark and are not counted.

Setup: world size 1, a ``torch.distributed`` group on a file store (gloo on CPU, nccl on CUDA), megatron's parallel
state from ``policy.parallel.init_parallel`` (which applies the CPU shims), the model from ``policy.build_model``.
CPU default model: the ``qwen2.5-0.5b`` preset shrunk to 4 layers, hidden 256, 4 heads (2 KV groups), FFN 1024,
keeping its 151,936-token vocabulary (tied embeddings), so the output layer dominates as it does at 0.5B; fp32,
one thread per process (the development machine has 2 shared cores).

Run:  python benchmarks/bench_policy.py             (CPU, full sizes, under ~8 minutes on 2 cores)
      python benchmarks/bench_policy.py --quick     (CPU, small sizes, under ~2 minutes)
      python benchmarks/bench_policy.py --device cuda --dtype bf16 --model qwen2.5-0.5b    (on a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _memory import reset_peak_rss, rss_kb  # benchmarks/_memory.py (the script's own folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CPU model: the qwen2.5-0.5b preset shrunk (its vocabulary kept); --model NAME uses a preset unchanged.
SMALL = dict(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=1024)
# sizes: B rows, P prompt tokens, R response tokens per row (figure 1); og_*: the rollout batch of figure 2;
# op_*: the scoring rows of figure 3, with op_scored scored tokens per row (the last ones of the reasoning span,
# so that the prefixes stay long).
SIZES = {
    "quick": dict(B=2, P=128, R=128, og_B=2, og_P=128, og_R=128, op_B=2, op_P=128, op_R=128, op_scored=12,
                  vocab=32000),
    "full": dict(B=1, P=512, R=512, og_B=2, og_P=192, og_R=192, op_B=2, op_P=512, op_R=512, op_scored=24,
                 vocab=None),
    "gpu": dict(B=8, P=512, R=512, og_B=8, og_P=512, og_R=512, op_B=8, op_P=512, op_R=512, op_scored=64,
                vocab=None),
}
CONCLUDE, ANSWER = 4, 8  # scoring rows: prompt | reasoning | conclude (4) | answer (8)


# ------------------------------------------------------------------------------------------------ measurement


class PeakMem:
    """Extra peak memory (MiB) of the code inside the ``with`` block (module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.mib = float("nan")
        self.exact = True

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        if reset_peak_rss():
            self.before = rss_kb("VmRSS") * 1024
        else:
            self.exact = False
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.exact:
            peak = rss_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mib = (peak - self.before) / 2**20
        return False


def _timed(fn, cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- model and data


def _setup(opts: dict):
    """Process group (file store), megatron parallel state, model, and a seeded generator. Returns (gpt, dev)."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, ROOT)
    from oar_megatron.config.model import model_preset
    from oar_megatron.config.parallel import ParallelConfig
    from oar_megatron.policy import build_model, init_parallel

    cuda = opts["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = "bfloat16" if opts["dtype"] == "bf16" else "float32"
    overrides = dict(params_dtype=dtype, max_position_embeddings=4096)
    if opts["model"] == "small":
        overrides.update(SMALL)
        if opts["vocab"]:
            overrides["vocab_size"] = opts["vocab"]
    cfg = model_preset("qwen2.5-0.5b" if opts["model"] == "small" else opts["model"], **overrides)
    store = tempfile.NamedTemporaryFile(prefix="bench_policy_store_", delete=False).name
    os.unlink(store)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    groups = init_parallel(ParallelConfig(tp=1, distributed_optimizer=False), cfg)
    gpt = build_model(cfg, groups)
    gpt.eval()  # zero dropout anyway; the saliency passes assume a deterministic forward
    return gpt, cfg, groups.device


def _rollout(cfg, b: int, p: int, r: int, dev):
    """ids, positions, response mask [B, P+R] (all rows full length; ids avoid the pad id 0), advantages [B]."""
    import torch

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, cfg.vocab_size, (b, p + r), generator=g).to(dev)
    pos = torch.arange(p + r, device=dev).expand(b, -1).contiguous()
    mask = torch.zeros(b, p + r, dtype=torch.bool, device=dev)
    mask[:, p:] = True
    adv = torch.randn(b, generator=g).to(dev)
    return ids, pos, mask, adv


def _scoring(ids, p: int, r: int, scored: int | None = None):
    """The rollout rows as scoring rows: prompt | reasoning | conclude | answer, the answer being the last ANSWER
    tokens of the response. ``scored``: only the last ``scored`` reasoning tokens are scored (OAR-P cost)."""
    import torch

    sys.path.insert(0, ROOT)
    from oar_megatron.algorithms.segment import ScoringBatch

    b, length = ids.shape
    rlen = r - CONCLUDE - ANSWER
    start = p
    if scored is not None:
        start, rlen = p + rlen - scored, scored
    full = lambda v: torch.full((b,), v, dtype=torch.long, device=ids.device)  # noqa: E731
    return ScoringBatch(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                        reasoning_start=full(start), reasoning_len=full(rlen), answer_pos=full(length - ANSWER),
                        answer_len=full(ANSWER), pad_id=0)


# ---------------------------------------------------------------------------------------------------- workers


def worker_logprob(opts: dict, variant: str) -> dict:
    """Figure 1 for one variant ("response" | "full"): memory then times of no-grad and forward + backward."""
    import torch

    from oar_megatron.policy.forward import full_logits_logprobs, response_logprobs

    gpt, cfg, dev = _setup(opts)
    cuda = dev.type == "cuda"
    ids, pos, mask, _ = _rollout(cfg, opts["B"], opts["P"], opts["R"], dev)
    fn = response_logprobs if variant == "response" else full_logits_logprobs

    def fwd():
        with torch.no_grad():
            lp, _ = fn(gpt, ids, pos, mask)
        return float(lp.sum())

    def fwd_bwd():
        lp, _ = fn(gpt, ids, pos, mask)
        (lp * mask).sum().backward()
        gpt.zero_grad(set_to_none=True)

    # Warm-up (one-time costs, lazily created gradient buffers) before the memory marks.
    fwd_bwd()
    fwd()
    res = {}
    for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        with PeakMem(cuda) as m:
            f()
        times = [_timed(f, cuda) for _ in range(opts["repeats"])]
        res[name] = dict(median_s=statistics.median(times), times=times, mem_mib=m.mib)
    res["tokens"] = ids.numel()
    res["response_tokens"] = int(mask.sum())
    return res


def _trainer(gpt, cfg, dev, ids, pos, mask, adv):
    """(DDP chunks, optimizer, scheduler, micro-batches, forward_fn) for GRPO updates on the response log-probs."""
    from oar_megatron.algorithms import policy_loss
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy.forward import response_logprobs
    from oar_megatron.policy.optim import build_optimizer, wrap_ddp

    ocfg = OptimConfig(lr=1e-6)  # precision follows the model's params_dtype (policy.optim.chunk_precision)
    chunks = wrap_ddp([gpt])
    optimizer, scheduler = build_optimizer(chunks, ocfg)
    g_tok = float(mask.sum())

    def forward_fn(chunk, mb):
        m_ids, m_pos, m_mask, m_adv, m_old = mb
        logp, _ = response_logprobs(chunk, m_ids, m_pos, m_mask)

        def loss_fn(out):
            loss, _ = policy_loss("grpo", out, m_old, m_adv, m_mask, global_tokens=g_tok, return_tensor_metrics=True)
            return loss, {}

        return logp, loss_fn

    return chunks, optimizer, scheduler, forward_fn


def worker_cycle(opts: dict, variants: list[str]) -> dict:
    """Figure 2: rollout-batch cycles (π_old forward [+ OAR-G] + k updates), memory of one k=1 cycle if a single
    variant is asked (fresh process), else interleaved timings of every (variant, k) and of the components."""
    import torch

    from oar_megatron.policy.forward import response_logprobs
    from oar_megatron.policy.saliency_pass import clean_pass, oar_g_sharded
    from oar_megatron.policy.train_step import train_step

    gpt, cfg, dev = _setup(opts)
    cuda = dev.type == "cuda"
    b, p, r = opts["og_B"], opts["og_P"], opts["og_R"]
    ids, pos, mask, adv = _rollout(cfg, b, p, r, dev)
    sbatch = _scoring(ids, p, r)
    chunks, optimizer, scheduler, forward_fn = _trainer(gpt, cfg, dev, ids, pos, mask, adv)
    comp: dict[str, list[float]] = {}

    def note(name, t0):
        comp.setdefault(name, []).append(time.perf_counter() - t0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def cycle(variant: str, k: int):
        t0 = time.perf_counter()
        if variant == "grpo":
            with torch.no_grad():
                old, _ = response_logprobs(gpt, ids, pos, mask)
            sync(), note("grpo: pi_old forward", t0)
        else:
            cp = clean_pass(gpt, sbatch, modes=("answer_mean",), rollout=(ids, pos, mask))
            old = cp.old_logp
            sync(), note("oar-g: clean_pass (pi_old + clean P_final)", t0)
            t0 = time.perf_counter()
            sal = oar_g_sharded(gpt, sbatch, mode="answer_mean", reference=cp.reference["answer_mean"])
            float(sal.scores.sum())
            sync(), note("oar-g: noisy gradient pass", t0)
        micro = [(ids[i:i + 1], pos[i:i + 1], mask[i:i + 1], adv[i:i + 1], old[i:i + 1]) for i in range(b)]
        for _ in range(k):
            t0 = time.perf_counter()
            train_step(chunks, optimizer, scheduler, micro, forward_fn, dp_size=1, seq_length=p + r,
                       micro_batch_size=1)
            sync(), note("update (train_step)", t0)

    cycle(variants[0], 1)  # warm-up: optimizer state, gradient buffers
    if len(variants) == 1:
        with PeakMem(cuda) as m:
            cycle(variants[0], 1)
        return dict(mem_mib=m.mib)
    for v in variants[1:]:
        cycle(v, 1)
    comp.clear()
    times: dict[str, list[float]] = {}
    for _ in range(opts["repeats"]):
        for k in (1, 4):
            for v in variants:
                times.setdefault(f"{v} k={k}", []).append(_timed(lambda: cycle(v, k), cuda))
    return dict(median_s={n: statistics.median(t) for n, t in times.items()}, times=times,
                components={n: statistics.median(t) for n, t in comp.items()}, tokens=ids.numel())


def worker_oarp(opts: dict, chunk: int) -> dict:
    """Figure 3 for one chunk size: memory of one OAR-P pass, its time per scored token, and one clean forward."""
    from oar_megatron.policy.saliency_pass import clean_pass, oar_p_sharded

    gpt, cfg, dev = _setup(opts)
    cuda = dev.type == "cuda"
    ids, _, _, _ = _rollout(cfg, opts["op_B"], opts["op_P"], opts["op_R"], dev)
    sbatch = _scoring(ids, opts["op_P"], opts["op_R"], scored=opts["op_scored"])
    ref = clean_pass(gpt, sbatch, modes=("last",)).reference["last"]

    def oarp():
        s = oar_p_sharded(gpt, sbatch, mode="last", chunk_size=chunk, reference=ref)
        return float(s.scores.sum())

    def forward():
        return float(clean_pass(gpt, sbatch, modes=("last",)).reference["last"].sum())

    oarp(), forward()  # warm-up
    with PeakMem(cuda) as m_fwd:
        forward()
    with PeakMem(cuda) as m_p:
        oarp()
    t_p, t_f = [], []
    for _ in range(opts["repeats"]):
        t_p.append(_timed(oarp, cuda))
        t_f.append(_timed(forward, cuda))
    n = int(sbatch.reasoning_len.sum())
    return dict(oarp_s=statistics.median(t_p), fwd_s=statistics.median(t_f), scored=n, rows=ids.shape[0],
                length=ids.shape[1], prefix=int(sbatch.answer_pos.max()), mem_mib=m_p.mib, fwd_mem_mib=m_fwd.mib,
                times=t_p, fwd_times=t_f)


def hf_model(cfg, dev, dtype):
    """The same architecture as a Hugging Face ``transformers`` model (Qwen2: RMSNorm, SwiGLU, GQA, RoPE, QKV bias
    as the preset says), randomly initialised: the baseline of figure 4."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(vocab_size=cfg.padded_vocab_size(1), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.query_groups,
                         max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rotary_base,
                         rms_norm_eps=cfg.norm_epsilon, tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
                         attention_dropout=0.0)
    model = Qwen2ForCausalLM(hf_cfg).to(device=dev, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.train()
    return model


def flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token: 6·N (forward + backward of every weight) + 12·layers·hidden·seq (attention scores
    and values), PaLM (Chowdhery et al. 2022) appendix B; N counts the output layer once."""
    return 6 * cfg.num_params(1) + 12 * cfg.num_layers * cfg.hidden_size * seq


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (vendor sheets)


def worker_trainstep(opts: dict, variant: str) -> dict:
    """Figure 4 for one variant: one GRPO update (π_old given) on B rows. ``megatron``: ``train_step`` (DDP, Adam,
    response-only fused log-probs); ``hf``: the Hugging Face model, ``log_softmax`` over full logits, ``gather``,
    the same loss, ``torch.optim.AdamW``. Memory of one step, then the median time."""
    import torch

    from oar_megatron.algorithms import policy_loss
    from oar_megatron.policy.train_step import train_step

    gpt, cfg, dev = _setup(opts)
    cuda = dev.type == "cuda"
    b, p, r = opts["B"], opts["P"], opts["R"]
    ids, pos, mask, adv = _rollout(cfg, b, p, r, dev)
    old = torch.zeros(b, p + r, device=dev)
    g_tok = float(mask.sum())
    if variant == "megatron":
        chunks, optimizer, scheduler, forward_fn = _trainer(gpt, cfg, dev, ids, pos, mask, adv)
        micro = [(ids[i:i + 1], pos[i:i + 1], mask[i:i + 1], adv[i:i + 1], old[i:i + 1]) for i in range(b)]

        def step():
            train_step(chunks, optimizer, scheduler, micro, forward_fn, dp_size=1, seq_length=p + r,
                       micro_batch_size=1)
    else:
        del gpt
        model = hf_model(cfg, dev, opts["dtype"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step():
            for i in range(b):  # one row per micro-batch, as the megatron step
                logits = model(input_ids=ids[i:i + 1]).logits[:, :-1].float()
                logp = torch.zeros(1, p + r, device=dev)
                logp[:, 1:] = torch.log_softmax(logits, -1).gather(-1, ids[i:i + 1, 1:, None]).squeeze(-1)
                loss, _ = policy_loss("grpo", logp, old[i:i + 1], adv[i:i + 1], mask[i:i + 1], global_tokens=g_tok)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, gradient buffers
    with PeakMem(cuda) as m:
        step()
    times = [_timed(step, cuda) for _ in range(opts["repeats"])]
    return dict(median_s=statistics.median(times), times=times, mem_mib=m.mib, tokens=ids.numel(),
                flops_per_token=flops_per_token(cfg, p + r))


WORKERS = {"logprob": worker_logprob, "cycle": worker_cycle, "oarp": worker_oarp, "trainstep": worker_trainstep}


def run_worker(kind: str, opts: dict, arg) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([kind, opts, arg])]
    env = dict(os.environ)
    if opts["device"] == "cpu":
        # One thread; and a fixed glibc mmap threshold, so that every freed tensor above 128 KiB goes back to the
        # OS (glibc otherwise raises the threshold after the first large free and keeps later ones resident,
        # which hides them from the resident-memory peak).
        env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"bench_policy: worker {kind} {arg} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (32k vocabulary, 256-token rows)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--model", default="small",
                    help="'small' (the CPU model of the docstring) or a preset name, e.g. qwen2.5-0.5b")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure after one warm-up (>= 3)")
    ap.add_argument("--chunks", default="8,32", help="OAR-P chunk sizes")
    ap.add_argument("--only", choices=["logprob", "cycle", "oarp", "trainstep"], default=None, help="only this figure")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, opts, arg = json.loads(args.worker)
        print(json.dumps(WORKERS[kind](opts, arg)))
        return

    import torch

    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_policy: --device cuda requested but CUDA is not available "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); run on a GPU machine "
                         "or use --device cpu")
    if args.device == "cpu" and dtype == "bf16":
        raise SystemExit("bench_policy: --dtype bf16 needs --device cuda (CPU builds of the policy run fp32)")
    if args.repeats < 3:
        raise SystemExit("bench_policy: --repeats must be >= 3")
    sizes = SIZES["quick" if args.quick else ("gpu" if args.device == "cuda" else "full")]
    opts = dict(sizes, device=args.device, dtype=dtype, model=args.model, repeats=args.repeats)
    if args.model != "small":
        opts["vocab"] = None
    chunks = [int(c) for c in args.chunks.split(",")]
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"{os.cpu_count()} CPU cores, 1 thread per process")
    print(f"# bench_policy: torch {torch.__version__}, {machine}, model={args.model}, dtype={dtype}, "
          f"median of {args.repeats} after 1 warm-up; sizes {json.dumps(sizes)}", flush=True)

    if args.only in (None, "logprob"):
        res = {v: run_worker("logprob", opts, v) for v in ("full", "response")}
        ntok = res["full"]["tokens"]
        print(f"\n## 1. log-prob pass: B={opts['B']}, prompt {opts['P']} + response {opts['R']} "
              f"({ntok} tokens, {res['full']['response_tokens']} response)")
        print("| pass | variant | median s | tokens/s | speed vs full | extra peak MiB | memory vs full |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("fwd", "fwd_bwd"):
            base = res["full"][mode]
            for v in ("full", "response"):
                r = res[v][mode]
                print(f"| {mode} | {v} | {r['median_s']:.3f} | {ntok / r['median_s']:.0f} | "
                      f"{base['median_s'] / r['median_s']:.2f}x | {r['mem_mib']:.0f} | "
                      f"{r['mem_mib'] / base['mem_mib']:.2f} |", flush=True)

    if args.only in (None, "cycle"):
        t = run_worker("cycle", opts, ["grpo", "oarg"])
        mem = {v: run_worker("cycle", opts, [v])["mem_mib"] for v in ("grpo", "oarg")}
        print(f"\n## 2. OAR-G overhead: B={opts['og_B']}, prompt {opts['og_P']} + response {opts['og_R']} "
              f"({t['tokens']} tokens), 1 micro-batch per row")
        print("| updates per rollout batch | GRPO cycle s | OAR-G cycle s | OAR-G / GRPO |")
        print("|---|---|---|---|")
        for k in (1, 4):
            g, o = t["median_s"][f"grpo k={k}"], t["median_s"][f"oarg k={k}"]
            print(f"| {k} | {g:.2f} | {o:.2f} | {o / g:.2f}x |")
        print("components (median s): " + ", ".join(f"{n} {s:.2f}" for n, s in t["components"].items()))
        print(f"extra peak memory of one k=1 cycle (fresh process): GRPO {mem['grpo']:.0f} MiB, "
              f"OAR-G {mem['oarg']:.0f} MiB", flush=True)

    if args.only in (None, "oarp"):
        res = {c: run_worker("oarp", opts, c) for c in chunks}
        r0 = res[chunks[0]]
        print(f"\n## 3. OAR-P (mode last): {r0['rows']} rows of {r0['length']} tokens (prefix {r0['prefix']}), "
              f"{r0['scored']} scored tokens")
        print("| chunk_size | OAR-P s | s per scored token | per token / one forward of the batch | "
              "forward s | extra peak MiB (OAR-P / forward) |")
        print("|---|---|---|---|---|---|")
        for c in chunks:
            r = res[c]
            per = r["oarp_s"] / r["scored"]
            print(f"| {c} | {r['oarp_s']:.2f} | {per:.3f} | {per / r['fwd_s']:.3f} | {r['fwd_s']:.3f} | "
                  f"{r['mem_mib']:.0f} / {r['fwd_mem_mib']:.0f} |", flush=True)

    if args.only in (None, "trainstep"):
        res = {v: run_worker("trainstep", opts, v) for v in ("hf", "megatron")}
        ntok = res["hf"]["tokens"]
        peak = next((f for k, f in PEAK_BF16_FLOPS.items() if k in machine), None) if dtype == "bf16" else None
        print(f"\n## 4. GRPO train step: B={opts['B']} rows of prompt {opts['P']} + response {opts['R']} "
              f"({ntok} tokens), one row per micro-batch, one optimizer step")
        print("| implementation | median s | tokens/s | speed vs HF | MFU | extra peak MiB | memory vs HF |")
        print("|---|---|---|---|---|---|---|")
        base = res["hf"]
        for v, label in (("hf", "HF transformers + log_softmax"), ("megatron", "megatron-core (this repo)")):
            x = res[v]
            tps = ntok / x["median_s"]
            mfu = f"{tps * x['flops_per_token'] / peak:.1%}" if peak else "n/a"
            print(f"| {label} | {x['median_s']:.3f} | {tps:.0f} | {base['median_s'] / x['median_s']:.2f}x | {mfu} | "
                  f"{x['mem_mib']:.0f} | {x['mem_mib'] / max(base['mem_mib'], 1e-9):.2f} |", flush=True)


if __name__ == "__main__":
    main()
