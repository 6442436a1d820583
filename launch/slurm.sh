#!/usr/bin/env bash
# Multi-node RL training under Slurm (no Ray). docs/slurm.md has the walk-through; in short:
#
#   sbatch --nodes 4 --gpus-per-node 8 --ntasks-per-node 8 launch/slurm.sh +experiment=qwen3-8b-oar-g \
#          data.path=/data/dapo.parquet data.tokenizer=/models/Qwen3-8B                        # GPU-only
#   OAR_SGLANG_NODES=1 OAR_SGLANG_MODEL=/models/Qwen3-8B sbatch --nodes 5 ... launch/slurm.sh ...  # GPU-only
#   bash launch/submit.sh --nodes 4 --gpus-per-node 8 -- +experiment=qwen3-8b-oar-g ...       # checks, then sbatch
#
# What it does, in order:
#  1. Nodes: `scontrol show hostnames $SLURM_JOB_NODELIST`. With OAR_SGLANG_NODES=k the first k nodes serve SGLang
#     and the others train; the rendezvous host (MASTER_ADDR) is the first training node, MASTER_PORT
#     20000 + job id % 10000 (both overridable).
#  2. Per-job directories: the run directory (logging.run_dir) is runs/<job name>-<job id> unless given (OAR_RUN_DIR
#     or a logging.run_dir override); checkpoints, metrics, weight-sync versions and the job's own records
#     (<run_dir>/slurm/: job-<id>.json with every override, the nodes and each (re)start; server logs) live there.
#     A requeued job keeps its id, hence its run directory, and checkpoint.resume=auto continues from the latest
#     checkpoint there: requeue-safe.
#  3. SGLang servers on dedicated nodes (OAR_SGLANG_NODES=k): one background `srun` step runs
#     `python -m oar_megatron.rollout.servers` on each server node (OAR_SGLANG_PER_NODE servers, bound to the node's
#     name), waits until every node reported its URLs healthy (OAR_SGLANG_TIMEOUT s; otherwise the job fails naming
#     the node and the tail of its log), passes them as rollout.server_urls, and stops the step when the job ends,
#     however it ends. Without OAR_SGLANG_NODES the servers are whatever the config says: external
#     rollout.server_urls, local servers started by the run, or the local engine.
#  4. Preflight (OAR_PREFLIGHT=1, the default): `trainer.preflight=true` on the real layout first (process groups,
#     a 2-layer forward/backward, a checkpoint round trip, the rollout servers); the job stops there on a failure.
#  5. Training: OAR_LAUNCH=srun (default; one task per GPU: --ntasks-per-node tasks, each reads its rank from the
#     SLURM_* variables) or OAR_LAUNCH=torchrun (one torchrun per node, --nproc-per-node = tasks per node, c10d
#     rendezvous on MASTER_ADDR:MASTER_PORT).
#
# Settings (environment): PYTHON (default .venv/bin/python), OAR_TASKS_PER_NODE (default $SLURM_NTASKS_PER_NODE,
# else $SLURM_GPUS_ON_NODE, else 1), OAR_LAUNCH, OAR_PREFLIGHT, OAR_RUN_DIR, OAR_SGLANG_NODES, OAR_SGLANG_MODEL (the
# HF checkpoint the servers load first; the trainer pushes its weights before the first rollout),
# OAR_SGLANG_PER_NODE (default 1), OAR_SGLANG_DEVICE (cuda), OAR_SGLANG_ROUTER=1 (a router on the single server
# node), OAR_SGLANG_ARGS (extra sglang.launch_server arguments, e.g. "--tp-size 8"), OAR_SGLANG_SRUN_ARGS (extra
# srun arguments for the server step, e.g. "--gres=gpu:8"), OAR_SGLANG_PYTHON (the SGLang environment's
# interpreter on the server nodes), OAR_SGLANG_API_KEY (servers' --api-key; sent by the trainer).
# NCCL / InfiniBand: set NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX... for your fabric before sbatch (they are
# passed through; docs/slurm.md lists the usual ones). Defaults set here only when unset: CUDA_DEVICE_MAX_CONNECTIONS=1
# (megatron's TP/SP communication overlap needs it), TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (a hung collective fails the
# job, which a requeue then resumes, instead of hanging until the time limit).
#SBATCH --job-name=oar-train
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
die() { echo "launch/slurm.sh: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || die "runs inside a Slurm job: submit it with sbatch (or launch/submit.sh)"
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null || die "PYTHON=$PY is not an executable (make .venv or set PYTHON)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# ---- 1. nodes and rendezvous -----------------------------------------------------------------------------------
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
K=${OAR_SGLANG_NODES:-0}
[[ "$K" =~ ^[0-9]+$ ]] || die "OAR_SGLANG_NODES=$K: expected a number of nodes"
(( K < ${#NODES[@]} )) || die "OAR_SGLANG_NODES=$K leaves no training node (the job has ${#NODES[@]} nodes)"
SERVER_NODES=("${NODES[@]:0:K}")
TRAIN_NODES=("${NODES[@]:K}")
NT=${#TRAIN_NODES[@]}
TPN=${OAR_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}}
TPN=${TPN%%(*}  # "8(x4)" -> 8
[[ "$TPN" =~ ^[1-9][0-9]*$ ]] || die "tasks per node $TPN: expected a positive integer (OAR_TASKS_PER_NODE)"
join() { local IFS=,; echo "$*"; }
export MASTER_ADDR=${MASTER_ADDR:-${TRAIN_NODES[0]}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

# ---- 2. per-job directories and the job record ------------------------------------------------------------------
RUN_DIR=
OVR=()
for a in "$@"; do if [[ "$a" == logging.run_dir=* ]]; then RUN_DIR=${a#logging.run_dir=}; fi; done
if [ -z "$RUN_DIR" ]; then  # the override wins, then OAR_RUN_DIR, then one directory per job
  RUN_DIR=${OAR_RUN_DIR:-runs/${SLURM_JOB_NAME:-oar-train}-${SLURM_JOB_ID}}
  OVR+=("logging.run_dir=$RUN_DIR")
fi
JOB_DIR=$RUN_DIR/slurm
mkdir -p "$JOB_DIR"
ATTEMPT=${SLURM_RESTART_COUNT:-0}
"$PY" - "$JOB_DIR/job-$SLURM_JOB_ID.json" "$ATTEMPT" "$(join "${NODES[@]}")" "$K" "$TPN" "${OVR[@]}" "$@" <<'PY'
import json, os, sys, time
path, attempt, nodes, k, tpn, *overrides = sys.argv[1:]
rec = json.load(open(path)) if os.path.exists(path) else {
    "job_id": os.environ["SLURM_JOB_ID"], "job_name": os.environ.get("SLURM_JOB_NAME"), "overrides": overrides,
    "nodes": nodes.split(","), "sglang_nodes": int(k), "tasks_per_node": int(tpn),
    "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OAR_", "NCCL_", "MASTER_"))},
    "attempts": []}
rec["attempts"].append({"restart_count": int(attempt), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
tmp = path + ".tmp"
open(tmp, "w").write(json.dumps(rec, indent=1) + "\n")
os.replace(tmp, path)
PY
echo "launch/slurm.sh: job $SLURM_JOB_ID attempt $ATTEMPT: train on ${TRAIN_NODES[*]} ($TPN tasks each," \
     "master $MASTER_ADDR:$MASTER_PORT), sglang on ${SERVER_NODES[*]:-no node}; run dir $RUN_DIR"

# ---- 3. SGLang servers on dedicated nodes ------------------------------------------------------------------------
SERVERS_PID=
stop_servers() {
  if [ -n "$SERVERS_PID" ] && kill -0 "$SERVERS_PID" 2>/dev/null; then
    kill -TERM "$SERVERS_PID" 2>/dev/null || true  # srun forwards it to every server node's task
    wait "$SERVERS_PID" 2>/dev/null || true
  fi
}
trap stop_servers EXIT
trap 'exit 143' TERM  # preemption / scancel: stop the servers (EXIT trap), then end
if (( K > 0 )); then
  [ -n "${OAR_SGLANG_MODEL:-}" ] || die "OAR_SGLANG_NODES=$K needs OAR_SGLANG_MODEL (the HF checkpoint the servers load)"
  ROUTER=()
  if [ "${OAR_SGLANG_ROUTER:-0}" = 1 ]; then
    (( K == 1 )) || die "OAR_SGLANG_ROUTER=1 with $K server nodes: the trainer takes one router; use one node or" \
                        "none (the client balances over every worker)"
    ROUTER=(--router)
  fi
  KEY=()
  if [ -n "${OAR_SGLANG_API_KEY:-}" ]; then KEY=(--api-key-env OAR_SGLANG_API_KEY); OVR+=("rollout.api_key=$OAR_SGLANG_API_KEY"); fi
  URL_DIR=$JOB_DIR/sglang-urls
  rm -rf "$URL_DIR"  # a requeued job's servers report afresh
  # shellcheck disable=SC2086  # OAR_SGLANG_SRUN_ARGS / OAR_SGLANG_ARGS are word lists
  srun --nodes="$K" --ntasks="$K" --ntasks-per-node=1 --nodelist="$(join "${SERVER_NODES[@]}")" \
       ${OAR_SGLANG_SRUN_ARGS:-} "$PY" -m oar_megatron.rollout.servers "$OAR_SGLANG_MODEL" --host auto \
       --n "${OAR_SGLANG_PER_NODE:-1}" --device "${OAR_SGLANG_DEVICE:-cuda}" --run-dir "$JOB_DIR/sglang/{host}" \
       --url-file "$URL_DIR/{host}.json" --startup-timeout "${OAR_SGLANG_TIMEOUT:-1800}" "${ROUTER[@]}" "${KEY[@]}" \
       ${OAR_SGLANG_ARGS:-} &
  SERVERS_PID=$!
  # each node's CLI reports its own timeout (with its log); the wait here is the backstop for a node that never ran
  mapfile -t SERVER_OVR < <("$PY" -m oar_megatron.rollout.server_nodes --dir "$URL_DIR" --hosts "${SERVER_NODES[@]}" \
                            --logs "$JOB_DIR/sglang" --timeout "$(( ${OAR_SGLANG_TIMEOUT:-1800} + 60 ))" --watch-pid "$SERVERS_PID" \
                            || echo FAILED)
  [[ " ${SERVER_OVR[*]} " != *" FAILED "* ]] || die "the SGLang server nodes did not come up (error above)"
  OVR+=("${SERVER_OVR[@]}")
  echo "launch/slurm.sh: sglang servers ready: ${SERVER_OVR[*]}"
fi

# ---- 4 and 5. preflight, then training on the training nodes -----------------------------------------------------
train() {
  case "${OAR_LAUNCH:-srun}" in
    srun)
      srun --nodes="$NT" --ntasks-per-node="$TPN" --ntasks="$((NT * TPN))" --nodelist="$(join "${TRAIN_NODES[@]}")" \
           --kill-on-bad-exit=1 "$PY" -m oar_megatron.trainer.app "$@" ;;
    torchrun)
      srun --nodes="$NT" --ntasks-per-node=1 --ntasks="$NT" --nodelist="$(join "${TRAIN_NODES[@]}")" \
           --kill-on-bad-exit=1 "$PY" -m torch.distributed.run --nnodes="$NT" --nproc-per-node="$TPN" \
           --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
           -m oar_megatron.trainer.app "$@" ;;
    *) die "OAR_LAUNCH=${OAR_LAUNCH}: expected srun (one task per GPU) or torchrun (one per node)" ;;
  esac
}
if [ "${OAR_PREFLIGHT:-1}" = 1 ]; then
  echo "launch/slurm.sh: preflight"
  train "${OVR[@]}" "$@" trainer.preflight=true || die "preflight failed (the first failed check is named above)"
fi
set +e
train "${OVR[@]}" "$@" &
TRAIN_PID=$!
wait "$TRAIN_PID"
CODE=$?
set -e
echo "launch/slurm.sh: training exited with code $CODE"
exit "$CODE"
