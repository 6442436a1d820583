#!/usr/bin/env bash
# Submit an oar-train run (a Hydra experiment config + overrides) as a Slurm job, after checking it:
#
#   bash launch/submit.sh --nodes 4 --gpus-per-node 8 --ntasks-per-node 8 -- \
#        +experiment=qwen3-8b-oar-g data.path=/data/dapo.parquet                               # GPU-only
#
# Arguments before `--` go to sbatch, those after it to oar-train (through launch/slurm.sh, which also reads the
# OAR_* settings documented at its top, e.g. OAR_SGLANG_NODES). Before anything is queued, the composed config is
# validated for the job's real world size (oar-train trainer.dry_run=true trainer.world_size=W, W = training nodes x
# tasks per node): a typo, a layout that does not divide W or a batch that does not split fails here, in one line,
# instead of after the job waited in the queue. The job name defaults to the experiment's name. Every submission is
# appended to runs/submitted.jsonl ($OAR_SUBMIT_LOG to change; time, sbatch arguments, overrides, OAR_* settings, job id); the job itself
# records its overrides and each (re)start in <run_dir>/slurm/job-<id>.json.
set -euo pipefail
die() { echo "launch/submit.sh: $*" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SB=()
while (($#)) && [ "$1" != -- ]; do SB+=("$1"); shift; done
(($#)) || die "usage: launch/submit.sh [sbatch options] -- [oar-train overrides]"
shift
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node"

# The training world size and a default job name, from the sbatch options (as launch/slurm.sh will see them).
mapfile -t INFO < <("$PY" - "${OAR_SGLANG_NODES:-0}" "${OAR_TASKS_PER_NODE:-}" "${SB[@]}" -- "$@" <<'PY'
import re, sys
k, tpn_env, *rest = sys.argv[1:]
sep = rest.index("--")
sb, overrides = rest[:sep], rest[sep + 1:]
opts = {}
i = 0
while i < len(sb):
    key, eq, val = sb[i].partition("=")
    key = {"-N": "--nodes", "-J": "--job-name"}.get(key, key)
    if not eq and i + 1 < len(sb) and not sb[i + 1].startswith("-"):
        val, i = sb[i + 1], i + 1
    opts[key] = val
    i += 1
def num(key, default):
    v = opts.get(key, default)
    m = re.search(r"(\d+)$", str(v).split("-")[0])
    if not m:
        sys.exit(f"launch/submit.sh: {key}={v}: expected a number")
    return int(m.group(1))
nodes = num("--nodes", 1)
tpn = int(tpn_env) if tpn_env else num("--ntasks-per-node", opts.get("--gpus-per-node", 1))
train_nodes = nodes - int(k)
if train_nodes < 1:
    sys.exit(f"launch/submit.sh: OAR_SGLANG_NODES={k} leaves no training node of --nodes={nodes}")
exp = [o.split("=", 1)[1] for o in overrides if o.startswith(("+experiment=", "experiment="))]
print(train_nodes * tpn)
print("" if "--job-name" in opts else (exp[-1] if exp else "oar-train"))
PY
) || true
[ "${#INFO[@]}" = 2 ] || die "could not read the job's size from the sbatch options (error above)"
WORLD=${INFO[0]}
NAME=()
[ -z "${INFO[1]}" ] || NAME=(--job-name "${INFO[1]}")

echo "launch/submit.sh: checking the config for $WORLD training ranks"
if ! CHECK=$("$PY" -m oar_megatron.trainer.app "$@" trainer.dry_run=true trainer.world_size="$WORLD" 2>&1); then
  echo "$CHECK" >&2
  die "the config does not validate for $WORLD ranks (above); nothing was submitted"
fi
echo "$CHECK" | grep -E '^(layout|rollout|memory)' || true

OUT=$(sbatch --parsable "${NAME[@]}" "${SB[@]}" launch/slurm.sh "$@") || die "sbatch failed: $OUT"
JOB=${OUT%%;*}
LOG=${OAR_SUBMIT_LOG:-runs/submitted.jsonl}
mkdir -p "$(dirname "$LOG")"
"$PY" - "$LOG" "$JOB" "${#SB[@]}" "${NAME[@]}" "${SB[@]}" "$@" <<'PY'
import json, os, sys, time
log, job, n_sb, *rest = sys.argv[1:]
n_sb = int(n_sb) + (2 if rest[:1] == ["--job-name"] else 0)
rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job_id": job, "sbatch": rest[:n_sb],
       "overrides": rest[n_sb:], "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("OAR_")}}
with open(log, "a") as f:
    f.write(json.dumps(rec) + "\n")
PY
echo "launch/submit.sh: submitted job $JOB (recorded in $LOG)"
