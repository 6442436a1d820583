"""Assert an image's versions at build time: ``python docker/check_image.py gpu MCORE_VERSION TE_MIN`` (GPU image:
megatron-core exactly, Transformer Engine at least TE_MIN, apex importable, a CUDA torch) or ``... cpu MCORE_VERSION``
(CPU image: megatron-core exactly, a CPU-only torch). One line on stderr and exit 1 naming what is wrong."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check(kind: str, mcore: str, te_min: str | None = None) -> list[str]:
    errors = []
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        return [f"torch is not importable: {e}"]
    try:
        got = md.version("megatron-core")
        if got != mcore:
            errors.append(f"megatron-core {got}, the lock pins {mcore}")
    except md.PackageNotFoundError:
        errors.append("megatron-core is not installed")
    if kind == "cpu":
        if torch.version.cuda:
            errors.append(f"torch {torch.__version__} is a CUDA build; the CPU image pins the CPU wheel")
    elif kind == "gpu":
        if not torch.version.cuda:
            errors.append(f"torch {torch.__version__} is not a CUDA build (use the NGC PyTorch base)")
        for module, pkg in (("transformer_engine", "transformer_engine"), ("apex", None)):
            try:
                importlib.import_module(module)
            except ImportError as e:
                errors.append(f"{module} is not importable ({e}): the base image must provide it")
                continue
            if pkg:
                te = md.version(pkg)
                if _version_tuple(te) < _version_tuple(te_min or "0"):
                    errors.append(f"transformer_engine {te} < {te_min} (docker/versions.lock TRANSFORMER_ENGINE_MIN)")
    else:
        errors.append(f"kind: expected cpu or gpu, got {kind!r}")
    return errors


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python docker/check_image.py {cpu|gpu} MCORE_VERSION [TE_MIN]", file=sys.stderr)
        return 2
    errors = check(*argv)
    for e in errors:
        print(f"docker/check_image.py: {e}", file=sys.stderr)
    if not errors:
        import torch

        print(f"image ok: torch {torch.__version__} (cuda {torch.version.cuda}), "
              f"megatron-core {md.version('megatron-core')}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
