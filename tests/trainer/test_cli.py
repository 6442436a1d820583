"""oar-train / oar-eval as users run them (subprocesses): a run killed with SIGKILL and restarted finishes with the
same metrics as an uninterrupted run; a crash in the middle of writing a checkpoint leaves the previous one loadable;
a 2-rank tensor-parallel run under torchrun samples what the 1-rank run samples; oar-eval evaluates a checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=4", "rollout.max_new_tokens=7",
         "data.synthetic.format_warmup_steps=2", "eval.at_start=false", "eval.at_end=false", "trainer.progress=false",
         "logging.tensorboard=false", "checkpoint.every=2"]
TRAIN = [sys.executable, "-m", "oar_megatron.trainer.app"]
EVAL = [sys.executable, "-c", "from oar_megatron.trainer.app import eval_main; eval_main()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _train(run_dir, *extra, env=None, check=True):
    """Run oar-train to the end. Output goes to files and the run gets its own session, killed as a group at the
    end: megatron dist-checkpointing's helper processes outlive a crashed parent and would hold pipes open."""
    log = Path(str(run_dir) + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out, open(str(log) + ".err", "w") as err:
        proc = subprocess.Popen(TRAIN + SMALL + [f"logging.run_dir={run_dir}", *extra], stdout=out, stderr=err,
                                env=env or ENV, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            _kill_group(proc)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), Path(str(log) + ".err").read_text())
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _metrics(run_dir, phase="train"):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time", "throughput/", "rollout/tokens_per_s"))}
            for r in rows if r["phase"] == phase]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step run every recovery is compared with."""
    d = tmp_path_factory.mktemp("ref") / "run"
    _train(d, "trainer.steps=8")
    return d


def test_killed_run_resumes_to_the_same_metrics(reference, tmp_path):
    d = tmp_path / "run"
    proc = subprocess.Popen(TRAIN + SMALL + [f"logging.run_dir={d}", "trainer.steps=8"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = d / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip():
            break
        time.sleep(0.02)
    _kill_group(proc)  # SIGKILL to the run and anything it started
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = latest.read_text().strip()
    assert killed_at.startswith("step_") and int(killed_at[5:]) < 8
    out = _train(d, "trainer.steps=8")
    assert f"resumed from {d / 'checkpoints' / killed_at}" in out.stdout
    assert _metrics(d) == _metrics(reference)


def test_crash_while_saving_keeps_the_previous_checkpoint(reference, tmp_path):
    d = tmp_path / "run"
    _train(d, "trainer.steps=2")
    crashed = _train(d, "trainer.steps=4", env={**ENV, "OAR_CKPT_FAULT": "before_rename"}, check=False)
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    ckpt = d / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert any(p.name.startswith(".tmp-") for p in ckpt.iterdir())  # the half-written save is still there
    out = _train(d, "trainer.steps=4")
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
    assert not any(p.name.startswith(".tmp-") for p in ckpt.iterdir())
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert _metrics(d) == _metrics(reference)[:4]


def test_tensor_parallel_run_under_torchrun(tmp_path):
    # the same padded vocabulary (32 rows) at TP 1 and 2, so CPU initialisation draws the same weights
    same = ["model.make_vocab_size_divisible_by=16", "trainer.steps=2"]
    _train(tmp_path / "tp1", *same)
    d = tmp_path / "tp2"
    launcher = Path(__file__).resolve().parents[2] / "launch" / "torchrun.sh"
    cmd = ["bash", str(launcher), "2", *SMALL, *same, "parallel=tp2", f"logging.run_dir={d}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**ENV, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    tp2, tp1 = _metrics(d), _metrics(tmp_path / "tp1")
    assert [m["step"] for m in tp2] == [1, 2]
    # same initial weights (CPU init from one seed), same sampling seeds: the same samples and rewards as TP=1
    for a, b in zip(tp2, tp1):
        assert a["reward/mean"] == b["reward/mean"] and a["response/length_mean"] == b["response/length_mean"]
        assert a["loss/total"] == pytest.approx(b["loss/total"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_oar_eval_scores_a_checkpoint(reference):
    p = subprocess.run(EVAL + SMALL + [f"logging.run_dir={reference}", "eval.k=2", "eval.ks=[1,2]"],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "pass@2" in p.stdout
    evals = _metrics(reference, phase="eval")
    assert evals and evals[-1]["step"] == 8 and 0.0 <= evals[-1]["modsum/avg@2"] <= 1.0
    assert _metrics(reference)[-1]["step"] == 8  # the training lines are untouched


def test_data_parallel_dapo_run_under_torchrun(tmp_path):
    """Two data-parallel replicas (distributed optimizer) with DAPO's dynamic sampling: prompts split per rank,
    generation rounds agreed across ranks, counts logged as totals over replicas."""
    d = tmp_path / "dp2"
    launcher = Path(__file__).resolve().parents[2] / "launch" / "torchrun.sh"
    cmd = ["bash", str(launcher), "2", *SMALL, "parallel=dp", "algorithm=dapo", "trainer.steps=2",
           f"logging.run_dir={d}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**ENV, "PYTHONWARNINGS": "ignore",
                                                                                "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = _metrics(d)
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        # 4 prompts per step over 2 replicas: each group's verdict counted once
        assert m["rollout/groups_uninformative"] == int(m["rollout/groups_uninformative"]) <= 4
        assert m["rollout/groups_all_wrong"] == int(m["rollout/groups_all_wrong"]) <= m["rollout/groups_uninformative"]
        assert m["rollout/gen_rounds"] in (1.0, 2.0, 3.0)  # rollout.max_gen_batches = 3
        assert math.isfinite(m["loss/total"])
