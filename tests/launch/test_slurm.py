"""``launch/slurm.sh`` (and ``launch/submit.sh``) run as Slurm runs them, against the fake ``sbatch`` / ``srun`` /
``scontrol`` of tests/slurm_fake (a "cluster" whose nodes are loopback addresses 127.0.0.1-3, each task a local
process with the SLURM_* environment of a real step). The scripts are the ones users submit; only the Slurm binaries
are fakes.

* a 2-node x 1-task job runs the preflight, rendezvouses over gloo (world 2 from two "nodes") and trains;
* the same with one torchrun per node (c10d rendezvous);
* a job preempted after its first checkpoint and requeued resumes there, in the same run directory;
* SGLang servers on a dedicated node of the job (the fake SGLang interpreter of tests/slurm_fake/sglang_server.py
  serving tests/sglang_fake.py's protocol on the node's address): started, health-waited, passed to the trainer as
  rollout.server_urls, trained against, and torn down with the job; torn down too when training fails; a server
  node that never gets healthy or dies fails the job at once, naming the node and its log;
* bad settings are refused in one line before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_BIN = ROOT / "tests" / "slurm_fake" / "bin"

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

TINY = ["rollout.prompts_per_step=8", "rollout.n_samples=4", "trainer.micro_batch_size=8", "data.synthetic.base=2",
        "data.synthetic.reasoning_len=1", "data.synthetic.format_warmup_steps=10", "eval.at_start=false",
        "eval.at_end=false", "trainer.progress=false", "logging.tensorboard=false"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PATH": f"{FAKE_BIN}:{env['PATH']}", "FAKE_SLURM_NODES": "127.0.0.1,127.0.0.2,127.0.0.3",
                "FAKE_SLURM_DIR": str(tmp / "slurm-state"), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1", "OAR_PREFLIGHT": "0"})
    env.update(extra)
    return env


def _sbatch(tmp: Path, sbatch_args: list[str], overrides: list[str], timeout: float = 600,
            **env: str) -> tuple[int, str]:
    out = tmp / "job.out"
    r = subprocess.run(["sbatch", *sbatch_args, "--output", str(out), "launch/slurm.sh", *overrides], cwd=ROOT,
                       env=_env(tmp, **env), capture_output=True, text=True, timeout=timeout)
    log = out.read_text() if out.exists() else ""
    return r.returncode, r.stdout + r.stderr + log


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train_steps(run: Path) -> list[int]:
    return [m["step"] for m in _metrics(run) if m["phase"] == "train"]


def test_two_node_job_preflight_rendezvous_and_training(tmp_path):
    run = tmp_path / "run"
    rc, log = _sbatch(tmp_path, ["--nodes", "2", "--ntasks-per-node", "1", "--job-name", "tiny"],
                      TINY + ["trainer.steps=4", "checkpoint.every=0"], OAR_PREFLIGHT="1", OAR_RUN_DIR=str(run))
    assert rc == 0, log
    assert "train on 127.0.0.1 127.0.0.2 (1 tasks each, master 127.0.0.1:" in log
    # the preflight ran first, on the real 2-rank layout: the ranks on the two "nodes" met over TCP (gloo)
    assert "preflight: all checks passed" in log and "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in log, log
    assert log.index("preflight: all checks passed") < log.index("step 1 |")
    metrics = [m for m in _metrics(run) if m["phase"] == "train"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert any(m["grad_norm"] > 0 for m in metrics)  # the policy was updated
    assert (run / "checkpoints" / "step_00000004").is_dir()  # save_final, in the per-job run directory
    rec = json.loads((run / "slurm" / "job-1000.json").read_text())
    assert rec["nodes"] == ["127.0.0.1", "127.0.0.2"] and rec["tasks_per_node"] == 1 and rec["sglang_nodes"] == 0
    assert rec["overrides"][:2] == [f"logging.run_dir={run}", TINY[0]] and "trainer.steps=4" in rec["overrides"]
    assert [a["restart_count"] for a in rec["attempts"]] == [0]


def test_torchrun_per_node(tmp_path):
    rc, log = _sbatch(tmp_path, ["--nodes", "2", "--ntasks-per-node", "1"],
                      TINY + ["trainer.steps=2", "checkpoint.every=0", "checkpoint.save_final=false",
                              f"logging.run_dir={tmp_path}/run", "trainer.preflight=false"], OAR_LAUNCH="torchrun")
    assert rc == 0, log
    assert _train_steps(tmp_path / "run") == [1, 2]
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "run_dir: " + str(tmp_path / "run") in cfg


def test_requeued_job_resumes_from_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = _env(tmp_path, OAR_RUN_DIR=str(run))
    out = tmp_path / "job.out"
    cmd = ["sbatch", "--nodes", "2", "--ntasks-per-node", "1", "--output", str(out), "launch/slurm.sh",
           *TINY, "trainer.steps=12", "checkpoint.every=2"]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step_00000002").is_dir():
            assert job.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)  # preemption: Slurm sends SIGTERM to every process of the job
        code = job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert code != 0
    done = _train_steps(run)
    assert 2 <= len(done) < 12, done
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    last = int(ckpts[-1].split("_")[1])
    # the requeue: the same job id, script, arguments and environment, hence the same run directory
    r = subprocess.run(["scontrol", "requeue", "1000"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    log = out.read_text()
    assert r.returncode == 0, log
    assert re.search(rf"resumed from {run}/checkpoints/\S*step_0*{last} at step {last}\n", log), log
    steps = _train_steps(run)
    assert steps == list(range(1, 13)), steps  # nothing lost, nothing twice: what ran past the checkpoint was redone
    rec = json.loads((run / "slurm" / "job-1000.json").read_text())
    assert [a["restart_count"] for a in rec["attempts"]] == [0, 1]


def _fake_sglang_python(tmp: Path, mode: str = "serve") -> str:
    py = tmp / "sglang-python"
    py.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        os.environ["FAKE_SGLANG_MODE"] = {mode!r}
        from tests.slurm_fake.sglang_server import main
        sys.exit(main(sys.argv[1:]))
    """))
    py.chmod(0o755)
    return str(py)


SGLANG = ["rollout=sglang", "rollout.max_new_tokens=7", "rollout.timeout_s=60", "algorithm=grpo"]


def _servers_gone(tmp: Path) -> bool:
    """No process of this test still serves: the servers' (and their CLI's) command lines name the test's model."""
    r = subprocess.run(["pgrep", "-f", str(tmp / "model")], capture_output=True, text=True)
    return r.stdout.strip() == ""


def test_sglang_servers_on_a_dedicated_node(tmp_path):
    run = tmp_path / "run"
    rc, log = _sbatch(tmp_path, ["--nodes", "2", "--ntasks-per-node", "1"],
                      TINY + SGLANG + ["trainer.steps=2", "checkpoint.every=0", "checkpoint.save_final=false"],
                      OAR_RUN_DIR=str(run), OAR_SGLANG_NODES="1", OAR_SGLANG_MODEL=str(tmp_path / "model"),
                      OAR_SGLANG_PYTHON=_fake_sglang_python(tmp_path), OAR_SGLANG_DEVICE="cpu",
                      OAR_SGLANG_TIMEOUT="120")
    assert rc == 0, log
    assert "train on 127.0.0.2 (1 tasks each, master 127.0.0.2:" in log and "sglang on 127.0.0.1;" in log
    urls = json.loads((run / "slurm" / "sglang-urls" / "127.0.0.1.json").read_text())
    assert urls["host"] == "127.0.0.1" and len(urls["urls"]) == 1 and urls["urls"][0].startswith("http://127.0.0.1:")
    assert f"sglang servers ready: rollout.server_urls=[{urls['urls'][0]}]" in log
    server_log = (run / "slurm" / "sglang" / "127.0.0.1" / "sglang-server-0.log").read_text()
    assert f"--model-path {tmp_path}/model --host 127.0.0.1" in server_log and "--device cpu" in server_log
    # trained against the node's server: its log-probs are the trainer's π_old (weights pushed every step)
    metrics = [m for m in _metrics(run) if m["phase"] == "train"]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["rollout/logp_diff_abs_max"] <= 1e-3 and m["sync/bytes"] > 0 for m in metrics), metrics
    rec = json.loads((run / "slurm" / "job-1000.json").read_text())
    assert rec["sglang_nodes"] == 1 and rec["env"]["OAR_SGLANG_NODES"] == "1"
    assert "SIGTERM received, stopping" in log and _servers_gone(tmp_path)  # torn down with the job


def test_failing_training_still_tears_the_servers_down(tmp_path):
    run = tmp_path / "run"
    rc, log = _sbatch(tmp_path, ["--nodes", "2"], TINY + SGLANG + ["rollout.n_samples=0"],
                      OAR_RUN_DIR=str(run), OAR_SGLANG_NODES="1", OAR_SGLANG_MODEL=str(tmp_path / "model"),
                      OAR_SGLANG_PYTHON=_fake_sglang_python(tmp_path), OAR_SGLANG_DEVICE="cpu")
    assert rc != 0 and "rollout.n_samples: must be >= 1, got 0" in log, log
    assert "sglang servers ready" in log and "SIGTERM received, stopping" in log and _servers_gone(tmp_path)


@pytest.mark.parametrize("mode,expect", [
    ("hang", "sglang servers on node 127.0.0.1 failed to start: sglang server 0 at http://127.0.0.1:"),
    ("die", "sglang servers on node 127.0.0.1 failed to start: sglang server 0 exited with code 3 before it was healthy"),
])
def test_server_node_never_healthy_fails_the_job_naming_it(tmp_path, mode, expect):
    run = tmp_path / "run"
    t0 = time.monotonic()
    rc, log = _sbatch(tmp_path, ["--nodes", "2"], TINY + SGLANG, OAR_RUN_DIR=str(run), OAR_SGLANG_NODES="1",
                      OAR_SGLANG_MODEL=str(tmp_path / "model"), OAR_SGLANG_PYTHON=_fake_sglang_python(tmp_path, mode),
                      OAR_SGLANG_DEVICE="cpu", OAR_SGLANG_TIMEOUT="4")
    assert rc == 2 and expect in log, log
    assert "the SGLang server nodes did not come up" in log and "step 1 |" not in log
    assert "fake sglang -m sglang.launch_server" in log  # the tail of the node's server log is shown
    assert time.monotonic() - t0 < 60 and _servers_gone(tmp_path)


@pytest.mark.parametrize("env,expect", [
    ({"OAR_SGLANG_NODES": "2"}, "OAR_SGLANG_NODES=2 leaves no training node (the job has 2 nodes)"),
    ({"OAR_SGLANG_NODES": "x"}, "OAR_SGLANG_NODES=x: expected a number of nodes"),
    ({"OAR_SGLANG_NODES": "1"}, "OAR_SGLANG_NODES=1 needs OAR_SGLANG_MODEL"),
    ({"OAR_LAUNCH": "mpirun"}, "OAR_LAUNCH=mpirun: expected srun (one task per GPU) or torchrun (one per node)"),
    ({"OAR_TASKS_PER_NODE": "0"}, "tasks per node 0: expected a positive integer"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, env, expect):
    rc, log = _sbatch(tmp_path, ["--nodes", "2"], ["trainer.steps=1"], timeout=60, OAR_RUN_DIR=str(tmp_path / "r"),
                      **env)
    assert rc == 2 and f"launch/slurm.sh: {expect}" in log, log
    assert "step 1 |" not in log


def test_outside_a_job_the_script_says_how_to_submit_it(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", "launch/slurm.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "runs inside a Slurm job: submit it with sbatch" in r.stderr


def test_submit_checks_the_config_for_the_job_size_then_submits_and_records(tmp_path):
    run, record = tmp_path / "run", tmp_path / "submitted.jsonl"
    env = _env(tmp_path, OAR_RUN_DIR=str(run), OAR_SUBMIT_LOG=str(record))
    overrides = TINY + ["trainer.steps=2", "checkpoint.every=0", "checkpoint.save_final=false"]
    r = subprocess.run(["bash", "launch/submit.sh", "--nodes", "2", "--ntasks-per-node", "1", "--output",
                        str(tmp_path / "job.out"), "--", *overrides], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checking the config for 2 training ranks" in r.stdout and "layout     world 2 = tp 1" in r.stdout
    assert "submitted job 1000" in r.stdout and _train_steps(run) == [1, 2]
    (rec,) = [json.loads(x) for x in record.read_text().splitlines()]
    assert rec["job_id"] == "1000" and rec["overrides"] == overrides and rec["env"]["OAR_RUN_DIR"] == str(run)
    assert rec["sbatch"][:2] == ["--job-name", "oar-train"] and rec["sbatch"][2:6] == ["--nodes", "2",
                                                                                      "--ntasks-per-node", "1"]
    assert json.loads((run / "slurm" / "job-1000.json").read_text())["job_name"] == "oar-train"


@pytest.mark.parametrize("sbatch,overrides,expect", [
    (["--nodes", "1", "--ntasks-per-node", "3"], ["+experiment=qwen3-8b-oar-g"], "for 3 ranks"),
    (["--nodes", "2", "--ntasks-per-node", "1"], ["rollout.prompts_per_step=3"], "for 2 ranks"),
    (["--nodes", "2", "--ntasks-per-node", "1"], ["rollout.no_such_key=1"], "no_such_key"),
])
def test_submit_refuses_a_config_that_cannot_run_and_queues_nothing(tmp_path, sbatch, overrides, expect):
    record = tmp_path / "submitted.jsonl"
    r = subprocess.run(["bash", "launch/submit.sh", *sbatch, "--", *overrides], cwd=ROOT,
                       env=_env(tmp_path, OAR_SUBMIT_LOG=str(record)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and expect in r.stderr, r.stdout + r.stderr
    assert "nothing was submitted" in r.stderr
    assert not record.exists() and not list((tmp_path / "slurm-state").glob("job-*"))


def test_fake_hostlists_follow_slurm_syntax_and_agree_with_rank_env():
    sys.path.insert(0, str(ROOT / "tests" / "slurm_fake"))
    from fakeslurm import compress, expand

    from oar_megatron.policy.parallel import first_slurm_host

    assert expand("gpu[003-005,9],cpu1") == ["gpu003", "gpu004", "gpu005", "gpu9", "cpu1"]
    assert expand("r[1-2]-n[07-08]") == ["r1-n07", "r1-n08", "r2-n07", "r2-n08"]
    for hosts in (["127.0.0.1", "127.0.0.2"], ["n07", "n08", "n10"], ["a", "b"], ["x1"]):
        assert expand(compress(hosts)) == hosts and first_slurm_host(compress(hosts)) == hosts[0]
    assert compress(["127.0.0.1", "127.0.0.2"]) == "127.0.0.[1-2]"


TRY_IT = "sbatch --nodes 2 --ntasks-per-node 1 --output /tmp/slurm-demo.out launch/slurm.sh trainer.steps=5 eval.at_end=false"


def test_the_documented_try_it_command_runs(tmp_path):
    """docs/slurm.md's "Try it without a cluster" command, as written there (its /tmp paths moved into tmp_path)."""
    text = (ROOT / "docs" / "slurm.md").read_text()
    block = text.split("## Try it without a cluster", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    # the command as docs/slurm.md shows it (tests/test_doc_commands.py maps it to this file by this very text)
    assert " ".join(block.replace("\\\n", " ").split()).endswith(TRY_IT)
    cmd = block.replace("/tmp/", f"{tmp_path}/")
    env = {k: v for k, v in _env(tmp_path).items() if k not in ("OAR_PREFLIGHT", "FAKE_SLURM_NODES")}
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "slurm-demo.out").read_text()
    assert r.returncode == 0, r.stdout + r.stderr + log
    assert "preflight: all checks passed" in log and "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in log
    assert _train_steps(tmp_path / "slurm-demo") == [1, 2, 3, 4, 5]
