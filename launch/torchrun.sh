#!/usr/bin/env bash
# One node, N processes: bash launch/torchrun.sh NPROC [hydra overrides...]
#   bash launch/torchrun.sh 2 parallel=tp2                       # CPU/gloo: 2-way tensor parallel
#   bash launch/torchrun.sh 8 +experiment=qwen3-8b-oar-g ...     # one 8-GPU node (NCCL)
# Every rank runs the same SPMD program (oar_megatron/trainer/app.py); no Ray, no driver process.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC [overrides...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m oar_megatron.trainer.app "$@"
