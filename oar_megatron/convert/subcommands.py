"""The ``logprobs`` and ``verify`` subcommands of ``oar-convert`` (argparse wiring; the work is in
``convert/logprobs.py`` and ``convert/verify.py``). Each parser sets ``run(args) -> exit code``."""

from __future__ import annotations

import sys


def _layout_args(p) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size, MoE only (default 1)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype (default fp32)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the ranks are killed")


def add_logprobs(sub) -> None:
    p = sub.add_parser("logprobs", help="per-token log-probs of token sequences under the megatron policy")
    p.add_argument("model_dir", help="an HF directory or a megatron checkpoint (root: latest step, or a step_* dir)")
    p.add_argument("--tokens", required=True, help='IN.json: {"sequences": [[token ids], ...]}')
    p.add_argument("--out", required=True, help='OUT.json: {"logprobs": [[L-1 values], ...]} (written atomically)')
    _layout_args(p)
    p.set_defaults(run=_run_logprobs)


def _run_logprobs(args) -> int:
    from .logprobs import compute_logprobs, read_sequences, write_json_atomic
    from .source import resolve_model_source

    source = resolve_model_source(args.model_dir)
    seqs = read_sequences(args.tokens, source.model)
    logprobs = compute_logprobs(source, seqs, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                                timeout=args.timeout)
    write_json_atomic(args.out, {"logprobs": logprobs})
    n = sum(len(r) for r in logprobs)
    print(f"wrote {args.out} ({len(logprobs)} sequences, {n} log-probs; tp={args.tp} pp={args.pp} ep={args.ep}, "
          f"{args.dtype})")
    return 0


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="convert an HF directory and compare the megatron policy with transformers")
    p.add_argument("hf_dir", help="the HF model directory (config.json + safetensors)")
    _layout_args(p)
    p.add_argument("--tol", type=float, default=None, help="max |Δlogit| and |Δlogprob| allowed (default 1e-4 in "
                                                           "fp32, 0.25 in bf16)")
    p.add_argument("--num", type=int, default=4, help="number of random sequences (default 4)")
    p.add_argument("--length", type=int, default=16, help="longest sequence length (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sequences")
    p.add_argument("--mcore", default=None, help="check this existing megatron checkpoint against HF_DIR instead of "
                                                 "converting (e.g. a run's checkpoint against its mcore-to-hf export)")
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    from .verify import verify

    res = verify(args.hf_dir, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype, tol=args.tol, num=args.num,
                 length=args.length, seed=args.seed, mcore=args.mcore, timeout=args.timeout,
                 echo=lambda s: print(s, flush=True))
    sys.stdout.flush()
    return 0 if res.passed else 1
