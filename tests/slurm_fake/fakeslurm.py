"""Fake ``sbatch`` / ``srun`` / ``scontrol`` for tests: a Slurm "cluster" of local processes.

Test tooling only (the scripts under ``launch/`` are the ones users run on real Slurm). The fakes set the environment
a real cluster sets, so ``launch/slurm.sh`` and the trainer's ``rank_env`` cannot tell the difference:

* The cluster's nodes are ``$FAKE_SLURM_NODES`` (comma separated). Use loopback addresses (``127.0.0.1,127.0.0.2``):
  every "node" is this machine, yet each has its own name and address, so a server bound to one node's name is
  reached at that name and a rendezvous on the first training node's name really goes over TCP.
* ``sbatch [options] SCRIPT [args]``: options from the command line and the script's ``#SBATCH`` lines (command
  line wins); allocates the first ``--nodes`` nodes; runs the script on the first node **synchronously** (as
  ``sbatch --wait``: prints ``Submitted batch job N`` (``N`` with ``--parsable``), exits with the job's code), output to ``--output``
  (``%j`` job id, ``%x`` job name; default ``slurm-%j.out``). SIGTERM/SIGINT to sbatch is a preemption: the whole
  job gets SIGTERM. Jobs are recorded under ``$FAKE_SLURM_DIR`` for ``scontrol requeue``.
* ``srun [options] CMD...`` inside a job: the step's nodes (``--nodelist`` or the first ``--nodes`` of the job),
  ``--ntasks`` / ``--ntasks-per-node`` (default: the job's tasks per node), one local process per task with
  ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURMD_NODENAME``, ``SLURM_NTASKS``, ``SLURM_STEP_*``,
  ``SLURM_NODELIST`` (the step's); ``--kill-on-bad-exit=1`` ends the step when a task fails; SIGTERM/SIGINT are
  forwarded to the tasks; exit code: the first failing task's. A node outside the allocation is refused, as Slurm
  does.
* ``scontrol show hostnames [LIST]`` expands a hostlist (``$SLURM_JOB_NODELIST`` by default);
  ``scontrol requeue JOBID`` runs job JOBID again (synchronously) with the same id, script, arguments and
  environment and ``SLURM_RESTART_COUNT`` + 1, as a real requeue does after preemption.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

NO_VALUE = {"--exclusive", "--requeue", "--no-requeue", "--wait", "--parsable", "--overlap", "--unbuffered", "-u",
            "--label", "-l", "--kill-on-bad-exit", "-K", "--no-kill", "--overcommit", "-O"}
SHORT = {"-N": "--nodes", "-n": "--ntasks", "-w": "--nodelist", "-J": "--job-name", "-o": "--output",
         "-e": "--error", "-t": "--time", "-p": "--partition", "-c": "--cpus-per-task", "-G": "--gpus",
         "-K": "--kill-on-bad-exit", "-l": "--label", "-u": "--unbuffered", "-O": "--overcommit"}


def fail(msg: str, code: int = 1) -> int:
    print(msg, file=sys.stderr, flush=True)
    return code


# ---------------------------------------------------------------------------------------------------- hostlists
def expand(hostlist: str) -> list[str]:
    """``"gpu[003-005,9],cpu1"`` → gpu003 gpu004 gpu005 gpu9 cpu1; ``"r[1-2]-n[7-8]"`` → r1-n7 r1-n8 r2-n7 r2-n8."""
    out, depth, cur = [], 0, ""
    for ch in hostlist + ",":
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            if cur.strip():
                out += _expand_one(cur.strip())
            cur = ""
        else:
            cur += ch
    return out


def _expand_one(name: str) -> list[str]:
    parts = re.split(r"(\[[^\]]*\])", name)
    choices = []
    for part in parts:
        if part.startswith("["):
            vals = []
            for r in part[1:-1].split(","):
                lo, _, hi = r.partition("-")
                if hi:
                    vals += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
                else:
                    vals.append(lo)
            choices.append(vals)
        else:
            choices.append([part])
    return ["".join(c) for c in itertools.product(*choices)]


def compress(hosts: list[str]) -> str:
    """The inverse for names sharing a prefix and ending in numbers: 127.0.0.1 127.0.0.2 → ``127.0.0.[1-2]``."""
    m = [re.fullmatch(r"(.*?)(\d+)", h) for h in hosts]
    if len(hosts) > 1 and all(m) and len({x.group(1) for x in m}) == 1:
        nums = [x.group(2) for x in m]
        ints = [int(n) for n in nums]
        if ints == list(range(ints[0], ints[0] + len(ints))) and len({len(n) for n in nums}) == 1:
            return f"{m[0].group(1)}[{nums[0]}-{nums[-1]}]"
        return f"{m[0].group(1)}[{','.join(nums)}]"
    return ",".join(hosts)


# ---------------------------------------------------------------------------------------------------- options
def parse_options(argv: list[str], stop_at_positional: bool = True) -> tuple[dict[str, str], list[str]]:
    """``--opt=v``, ``--opt v``, ``-N 2``, flags; stops at the first positional (the script / the command)."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-") or a == "--":
            return opts, argv[i + (a == "--"):]
        key, eq, val = a.partition("=")
        key = SHORT.get(key, key)
        if eq:
            opts[key] = val
        elif key in NO_VALUE:
            opts[key] = "1"
        else:
            if i + 1 >= len(argv):
                raise SystemExit(fail(f"fake slurm: option {a} needs a value"))
            opts[key] = argv[i + 1]
            i += 1
        i += 1
    return opts, []


def _state_dir() -> Path:
    d = Path(os.environ.get("FAKE_SLURM_DIR") or Path.cwd() / ".fake-slurm")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cluster() -> list[str]:
    nodes = [h.strip() for h in os.environ.get("FAKE_SLURM_NODES", "127.0.0.1").split(",") if h.strip()]
    if not nodes:
        raise SystemExit(fail("fake slurm: FAKE_SLURM_NODES is empty"))
    return nodes


def _first_int(v: str) -> int:
    return int(re.match(r"\d+", v).group(0))


# ---------------------------------------------------------------------------------------------------- sbatch
def sbatch(argv: list[str]) -> int:
    opts, rest = parse_options(argv)
    if not rest:
        return fail("sbatch: error: no batch script given")
    script, args = Path(rest[0]), rest[1:]
    if not script.is_file():
        return fail(f"sbatch: error: Unable to open file {script}")
    file_opts: dict[str, str] = {}
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            o, _ = parse_options(line[len("#SBATCH"):].split())
            file_opts.update(o)
        elif line.strip() and not line.startswith("#"):
            break  # sbatch reads #SBATCH lines up to the first command
    opts = {**file_opts, **opts}
    state = _state_dir()
    counter = state / "next_job_id"
    job_id = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job_id + 1))
    nodes = _cluster()
    n_nodes = int(opts.get("--nodes", "1").split("-")[0])
    if n_nodes > len(nodes):
        return fail(f"sbatch: error: Requested node configuration is not available ({n_nodes} nodes, "
                    f"cluster has {len(nodes)})")
    alloc = nodes[:n_nodes]
    tpn = int(opts.get("--ntasks-per-node", "1"))
    env = dict(os.environ)
    env.update({
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id),
        "SLURM_JOB_NAME": opts.get("--job-name", script.name), "SLURM_JOB_NODELIST": compress(alloc),
        "SLURM_NODELIST": compress(alloc), "SLURM_JOB_NUM_NODES": str(n_nodes), "SLURM_NNODES": str(n_nodes),
        "SLURM_NTASKS": str(n_nodes * tpn), "SLURM_NPROCS": str(n_nodes * tpn),
        "SLURM_SUBMIT_DIR": os.getcwd(), "SLURM_SUBMIT_HOST": nodes[0], "SLURMD_NODENAME": alloc[0],
        "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_CPUS_ON_NODE": str(os.cpu_count()),
        "SLURM_CLUSTER_NAME": "fake",
    })
    if "--ntasks-per-node" in opts:
        env["SLURM_NTASKS_PER_NODE"] = str(tpn)
    if "--gpus-per-node" in opts:
        env["SLURM_GPUS_ON_NODE"] = str(_first_int(opts["--gpus-per-node"].split(":")[-1]))
    record = {"id": job_id, "script": str(script.resolve()), "args": args, "env": env, "opts": opts,
              "cwd": os.getcwd(), "restarts": 0}
    (state / f"job-{job_id}.json").write_text(json.dumps(record))
    print(job_id if "--parsable" in opts else f"Submitted batch job {job_id}", flush=True)
    return _run_job(record)


def _run_job(record: dict) -> int:
    env = dict(record["env"])
    env["SLURM_RESTART_COUNT"] = str(record["restarts"])
    name = env["SLURM_JOB_NAME"]
    out = record["opts"].get("--output", "slurm-%j.out").replace("%j", str(record["id"])).replace("%x", name)
    out_path = Path(record["cwd"]) / out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "ab") as log:
        proc = subprocess.Popen(["bash", record["script"], *record["args"]], cwd=record["cwd"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

        def preempt(signum, frame):  # Slurm preemption / scancel: SIGTERM to every process of the job
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGTERM, preempt)
        signal.signal(signal.SIGINT, preempt)
        code = proc.wait()
    # a job's leftover processes die with it (slurmstepd kills the job's cgroup)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    state = _state_dir()
    (state / f"job-{record['id']}.exit").write_text(str(code))
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------------------------------------------- srun
def srun(argv: list[str]) -> int:
    if "SLURM_JOB_ID" not in os.environ:
        return fail("srun: error: fake srun runs inside a job (sbatch) only")
    opts, cmd = parse_options(argv)
    if not cmd:
        return fail("srun: error: no command given")
    job_nodes = expand(os.environ["SLURM_JOB_NODELIST"])
    if "--nodelist" in opts:
        nodes = expand(opts["--nodelist"])
        outside = [n for n in nodes if n not in job_nodes]
        if outside:
            return fail(f"srun: error: Requested node configuration is not available (nodes {outside} are not in "
                        f"the allocation {job_nodes})")
        if "--nodes" in opts and int(opts["--nodes"]) != len(nodes):
            return fail(f"srun: error: --nodes={opts['--nodes']} but --nodelist names {len(nodes)} nodes")
    else:
        n = int(opts.get("--nodes", len(job_nodes)))
        if n > len(job_nodes):
            return fail(f"srun: error: only {len(job_nodes)} nodes in the allocation, {n} requested")
        nodes = job_nodes[:n]
    if "--ntasks-per-node" in opts:
        tpn = int(opts["--ntasks-per-node"])
    elif "--ntasks" in opts:
        ntasks = int(opts["--ntasks"])
        if ntasks % len(nodes):
            return fail("srun: error: fake srun spreads tasks evenly: --ntasks must divide by the node count")
        tpn = ntasks // len(nodes)
    else:
        tpn = _first_int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    ntasks = tpn * len(nodes)
    if "--ntasks" in opts and int(opts["--ntasks"]) != ntasks:
        return fail(f"srun: error: --ntasks={opts['--ntasks']} does not match {len(nodes)} nodes x {tpn} per node")
    state = _state_dir()
    step_file = state / f"job-{os.environ['SLURM_JOB_ID']}.steps"
    step = int(step_file.read_text()) if step_file.exists() else 0
    step_file.write_text(str(step + 1))
    procs = []
    for node_id, node in enumerate(nodes):
        for local in range(tpn):
            env = dict(os.environ)
            env.update({
                "SLURM_PROCID": str(node_id * tpn + local), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node_id),
                "SLURMD_NODENAME": node, "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
                "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step), "SLURM_STEP_NODELIST": compress(nodes),
                "SLURM_NODELIST": compress(nodes), "SLURM_STEP_NUM_NODES": str(len(nodes)),
                "SLURM_NNODES": str(len(nodes)), "SLURM_STEP_NUM_TASKS": str(ntasks),
                "SLURM_STEP_TASKS_PER_NODE": f"{tpn}(x{len(nodes)})" if len(nodes) > 1 else str(tpn),
                "SLURM_TASKS_PER_NODE": f"{tpn}(x{len(nodes)})" if len(nodes) > 1 else str(tpn),
            })
            procs.append(subprocess.Popen(cmd, env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    kill_on_bad = opts.get("--kill-on-bad-exit", "0") not in ("0", "")
    first_bad = 0
    while any(p.poll() is None for p in procs):
        for p in procs:
            rc = p.poll()
            if rc not in (None, 0) and not first_bad:
                first_bad = rc if rc > 0 else 128 - rc
                if kill_on_bad:
                    print(f"srun: error: task exited with exit code {first_bad}; terminating the step", file=sys.stderr,
                          flush=True)
                    forward(signal.SIGTERM, None)
        time.sleep(0.1)
    for p in procs:
        rc = p.returncode
        if rc != 0 and not first_bad:
            first_bad = rc if rc > 0 else 128 - rc
    return first_bad


# ---------------------------------------------------------------------------------------------------- scontrol
def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        hostlist = argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        if not hostlist:
            return fail("scontrol: error: no hostlist given and SLURM_JOB_NODELIST is not set")
        print("\n".join(expand(hostlist)), flush=True)
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2:
        path = _state_dir() / f"job-{argv[1]}.json"
        if not path.is_file():
            return fail(f"scontrol: error: Invalid job id specified ({argv[1]})")
        record = json.loads(path.read_text())
        record["restarts"] += 1
        path.write_text(json.dumps(record))
        return _run_job(record)
    return fail(f"scontrol: fake supports 'show hostnames [LIST]' and 'requeue JOBID', not {' '.join(argv)!r}")
