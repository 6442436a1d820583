#!/usr/bin/env bash
# Multi-node training under Slurm (one task per GPU; no Ray):
#   sbatch --nodes 8 --gpus-per-node 8 --ntasks-per-node 8 launch/slurm.sh +experiment=qwen3-8b-oar-g \
#          data.path=... data.tokenizer=... rollout.server_urls=[http://node1:30000,http://node2:30000] \
#          rollout.router_url=http://router:30000
# (server_urls are the SGLang WORKERS: weights are pushed to each, a router answers 404 for weight endpoints;
#  router_url, optional, takes the generation traffic.)
# Each task reads its rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the rendezvous host from
# SLURM_JOB_NODELIST (oar_megatron/policy/parallel.py: rank_env), so srun starts the ranks directly.
# Requeue-safe: checkpoint.resume=auto continues from <logging.run_dir>/checkpoints/latest.
#SBATCH --job-name=oar-train
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --kill-on-bad-exit=1 "$PY" -m oar_megatron.trainer.app "$@"
