"""``oar-convert``: HF ↔ megatron conversion from the command line (docs/convert.md).

``oar-convert hf-to-mcore HF_DIR OUT_DIR [--tp N] [--pp N] [--ep N] [--dtype fp32|bf16]``: an HF directory → a
converted checkpoint (a trainer-format megatron dist-checkpoint root, weights only, + ``OUT_DIR/hf/``) that loads
under any layout; N local ranks convert it (``convert.checkpoint.hf_to_mcore_checkpoint``).

``oar-convert mcore-to-hf CKPT_DIR OUT_DIR [--config RUN/config.yaml] [--hf-config HF_DIR] [--max-shard-size 5GB]``:
a megatron checkpoint (converted, or a trainer run's; a ``step_*`` directory or a root whose latest step is taken;
saved under any TP/PP/EP) → sharded safetensors (+ index) + ``config.json`` (+ ``generation_config.json`` and
tokenizer files carried over), streamed from the dist checkpoint (``convert.checkpoint.mcore_to_hf_checkpoint``).

``oar-convert logprobs`` / ``verify``: ``convert/subcommands.py``.

Both conversions write into a temporary directory next to OUT_DIR, renamed at the end: bad input is one line on stderr, exit
code 2, nothing left behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# files carried over from the HF directory besides the weights (config.json is rewritten)
CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


def mcore_to_hf_dir(ckpt: str | Path, out: str | Path, *, config: str | Path | None = None,
                    hf_config: str | Path | None = None, **kwargs) -> Path:
    """``oar-convert mcore-to-hf``: ``convert.checkpoint.mcore_to_hf_checkpoint``."""
    from .checkpoint import mcore_to_hf_checkpoint

    return mcore_to_hf_checkpoint(ckpt, out, config=config, hf_config=hf_config, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oar-convert", description="HF <-> megatron conversion (docs/convert.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-mcore", help="an HF directory -> a megatron distributed checkpoint (converted "
                                           "checkpoint root, loads under any layout)")
    p.add_argument("hf_dir", help="the HF directory (config.json + safetensors, one file or sharded with its index)")
    p.add_argument("out_dir", help="the checkpoint root to write (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to convert with")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages to convert with")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks to convert with (MoE)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="stored dtype (default: the HF checkpoint's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("mcore-to-hf", help="a megatron checkpoint (converted or a trainer run's, any layout) -> an "
                                           "HF directory")
    p.add_argument("ckpt_dir", help="a step_* checkpoint directory or a checkpoint root (latest step)")
    p.add_argument("out_dir", help="the HF directory to write (must not exist)")
    p.add_argument("--config", help="the run's config.yaml (default: CKPT root's parent's config.yaml)")
    p.add_argument("--hf-config", help="the HF directory whose config.json describes the model (default: the run's "
                                       "model.pretrained; without one, config.json is generated)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .launch import RankError
    from .subcommands import add_logprobs, add_verify

    add_logprobs(sub)
    add_verify(sub)
    args = parser.parse_args(argv)

    try:
        if getattr(args, "run", None) is not None:  # subcommands.py's parsers carry their own runner
            return args.run(args)
        if args.command == "hf-to-mcore":
            from .checkpoint import hf_to_mcore_checkpoint

            out = hf_to_mcore_checkpoint(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, ep=args.ep,
                                         dtype=args.dtype, quiet=args.quiet)
        else:
            out = mcore_to_hf_dir(args.ckpt_dir, args.out_dir, config=args.config, hf_config=args.hf_config,
                                  max_shard_size=args.max_shard_size, quiet=args.quiet)
    except (ValueError, RankError) as exc:
        print(f"oar-convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
