#!/usr/bin/env bash
# Set up a CPU development environment in .venv: CPU torch first (pinned, so pip never resolves a multi-GB CUDA
# wheel), then this project with its test extras. Idempotent; safe to re-run. On GPU machines install your CUDA
# torch build instead and `pip install -e ".[gpu]"` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null 2>&1 || true
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[test]"
.venv/bin/python - <<'PY'
import torch, megatron.core
print(f"oar_megatron env ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}")
PY
