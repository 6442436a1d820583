"""``oar-convert``: HF ↔ megatron conversion from the command line (docs/convert.md).

``oar-convert mcore-to-hf CKPT_DIR OUT_DIR [--config RUN/config.yaml] [--hf-config HF_DIR]``: a trainer checkpoint
(a ``step_*`` directory, or a checkpoint root whose latest step is taken) saved under TP=1 / PP=1 (any DP) → HF
``model.safetensors`` + ``config.json`` (+ ``generation_config.json`` and tokenizer files carried over from the HF
directory the run started from). The run's ``config.yaml`` (default: the checkpoint root's parent's) gives the
model; the HF ``config.json`` comes from ``--hf-config`` or the run's ``model.pretrained``. Written into a temporary
directory next to OUT_DIR, renamed at the end: no partial output on error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

# files carried over from the HF directory besides the weights (config.json is rewritten)
CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


def _checkpoint_dir(path: Path) -> tuple[Path, Path]:
    """(step directory, checkpoint root) for a step directory or a root (its latest step)."""
    from ..checkpoint.manager import STATE_FILE, read_latest

    if (path / STATE_FILE).is_file():
        return path, path.parent
    latest = read_latest(path)
    if latest is None:
        raise ValueError(f"CKPT_DIR: {path} is neither a checkpoint (no {STATE_FILE}) nor a directory of checkpoints")
    return latest, path


def mcore_to_hf_dir(ckpt: str | Path, out: str | Path, *, config: str | Path | None = None,
                    hf_config: str | Path | None = None) -> Path:
    """Export a trainer checkpoint to an HF directory (module docstring); single process. Returns ``out``."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ..checkpoint import CheckpointManager
    from ..checkpoint.manager import STATE_FILE
    from ..config import ParallelConfig
    from ..config.train import train_config_from
    from ..policy import destroy_parallel, init_parallel
    from ..policy.actor import PolicyActor
    from .config import architecture, check_pretrained, read_hf_config
    from .mapping import mcore_to_hf

    step_dir, root = _checkpoint_dir(Path(ckpt))
    out = Path(out)
    if out.exists():
        raise ValueError(f"OUT_DIR: {out} exists")
    config = Path(config) if config else root.parent / "config.yaml"
    if not config.is_file():
        raise ValueError(f"--config: no run config at {config} (the run directory's config.yaml)")
    cfg = train_config_from(OmegaConf.load(config))
    hf_dir = Path(hf_config) if hf_config else (Path(cfg.model.pretrained) if cfg.model.pretrained else None)
    if hf_dir is None:
        raise ValueError("--hf-config: the run has no model.pretrained; name the HF directory whose config.json "
                         "describes the model")
    cfg.model.pretrained = str(hf_dir)
    arch = check_pretrained(cfg.model)  # the checkpoint's model is the HF config's architecture
    layout = torch.load(step_dir / STATE_FILE, weights_only=True)["layout"]
    if layout.get("tp", 1) != 1 or layout.get("pp", 1) != 1 or layout.get("vpp") not in (None, 1):
        raise ValueError(f"CKPT_DIR: {step_dir} was saved with layout {layout}; mcore-to-hf reads tp=1, pp=1 "
                         f"checkpoints only")
    cfg.algorithm.kl.coef = 0.0  # no KL reference needed for the export
    groups = init_parallel(ParallelConfig(), cfg.model, seed=0)
    try:
        actor = PolicyActor(model=cfg.model, parallel=ParallelConfig(), optim=cfg.optim, algorithm=cfg.algorithm,
                            groups=groups, reference=None)
        manager = CheckpointManager(root, keep_last=0, groups=groups, readonly=True)  # a live run may be saving
        manager.load(actor, step_dir, load_optimizer=False, load_rng=False, load_reference=False)
        state = {n: p.detach().float() for n, p in actor.models[0].named_parameters()}
        tensors = dict(mcore_to_hf(state, cfg.model, arch))
    finally:
        destroy_parallel()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = dict(read_hf_config(hf_dir))
        hf["torch_dtype"] = "float32"
        hf.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in CARRIED:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oar-convert", description="HF <-> megatron conversion (docs/convert.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("mcore-to-hf", help="a trainer checkpoint (TP=1, PP=1) -> an HF directory")
    p.add_argument("ckpt_dir", help="a step_* checkpoint directory or a checkpoint root (latest step)")
    p.add_argument("out_dir", help="the HF directory to write (must not exist)")
    p.add_argument("--config", help="the run's config.yaml (default: CKPT root's parent's config.yaml)")
    p.add_argument("--hf-config", help="the HF directory whose config.json describes the model (default: the run's "
                                       "model.pretrained)")
    from .launch import RankError
    from .subcommands import add_logprobs, add_verify

    add_logprobs(sub)
    add_verify(sub)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "run", None) is not None:  # subcommands.py's parsers carry their own runner
            return args.run(args)
        out = mcore_to_hf_dir(args.ckpt_dir, args.out_dir, config=args.config, hf_config=args.hf_config)
    except (ValueError, RankError) as exc:
        print(f"oar-convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
