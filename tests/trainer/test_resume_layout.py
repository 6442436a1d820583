"""Resume of a data-parallel run (2 gloo ranks, distributed optimizer, KL on): a run killed right after a checkpoint
and restarted reproduces the uninterrupted run's metrics exactly (per-rank engine state restored on its own rank);
the KL reference is the post-warm-up policy (the KL at step 1 is exactly 0) and comes back from the checkpoint.
Resharding: the DP2 checkpoint resumes as DP1 (model, reference and optimizer resharded, rollout streams
re-derived for the new layout: docs/architecture.md, "Checkpoints"); resumed as TP2 it is refused with one line
(the optimizer state does not reshard over TP). One 2-rank spawn and one 1-rank spawn."""

import json
import os

import pytest

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=2", "trainer.micro_batch_size=4", "rollout.max_new_tokens=6",
         "data.synthetic.format_warmup_steps=2", "eval.at_start=false", "eval.at_end=false", "checkpoint.every=1",
         "checkpoint.keep_last=0", "trainer.progress=false", "logging.step_line=false", "logging.tensorboard=false",
         "parallel=dp", "algorithm.kl.coef=0.05", "optim.lr_warmup_steps=4"]
STEPS = 3
TIME_KEYS = ("time/", "throughput/", "rollout/tokens_per_s")


class Killed(Exception):
    """Stands for the process dying right after a checkpoint: nothing of the trainer object is reused."""


def _trainer(overrides):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    return Trainer(compose_config(SMALL + [f"trainer.steps={STEPS}", *overrides]))


def _fit(overrides, *, kill_after: int | None = None):
    from oar_megatron.trainer.loop import Trainer

    t = _trainer(overrides)
    if kill_after is not None:
        save = t.save

        def save_then_die():
            path = save()
            if t.step == kill_after:
                raise Killed
            return path

        t.save = save_then_die
    try:
        return _floats(t.fit())
    except Killed:
        return None
    finally:
        Trainer.close(t)


def _floats(hist):
    return [{k: v for k, v in m.items() if isinstance(v, float) and not k.startswith(TIME_KEYS)} for m in hist]


def _dp2(rank, world, tmp):
    from oar_megatron.checkpoint import CheckpointError

    full = _fit([f"logging.run_dir={tmp}/full"])
    assert _fit([f"logging.run_dir={tmp}/part"], kill_after=1) is None
    resumed = _fit([f"logging.run_dir={tmp}/part"])
    try:  # the same checkpoint under TP2: refused before anything is trained
        _fit(["parallel=tp2", f"logging.run_dir={tmp}/tp2",
              f"checkpoint.resume={tmp}/part/checkpoints/step_00000001"])
        refused = ""
    except CheckpointError as e:
        refused = str(e)
    return {"full": full, "resumed": resumed, "refused": refused}


def _dp1(rank, world, tmp):
    from oar_megatron.trainer.loop import Trainer

    t = _trainer([f"logging.run_dir={tmp}/dp1", f"checkpoint.resume={tmp}/part/checkpoints/step_00000001"])
    try:
        state = {"step": t.step, "engine": t.engine.state_dict(), "iterator": t.iterator.state_dict(),
                 "ref_set": t.actor.has_reference}
        hist = _floats(t.fit())
    finally:
        Trainer.close(t)
    return {"state": state, "hist": hist}


def test_dp2_resume_is_exact_and_reshards_to_dp1(tmp_path, capfd):
    res = run_ranks(_dp2, 2, str(tmp_path), timeout=900)
    full, resumed = res[0]["full"], res[0]["resumed"]
    assert len(full) == STEPS and len(resumed) == STEPS - 1  # steps 2 and 3 only
    assert resumed == full[1:]
    # the reference is the policy RL starts from (after the format warm-up): π_old == π_ref at step 1
    assert full[0]["kl/mean"] == 0.0 and full[0]["loss/kl"] == 0.0
    assert full[1]["kl/mean"] > 0.0
    def lines(d):  # the metrics files: the killed run's lines after its checkpoint were replaced on resume
        rows = map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if not k.startswith(("time",) + TIME_KEYS)} for r in rows]

    assert lines("part") == lines("full")
    for r in res:
        assert r["refused"].count("\n") == 0 and "tp: saved 1, now 2" in r["refused"], r["refused"]
        assert "step_00000001" in r["refused"]
    capfd.readouterr()

    (dp1,) = run_ranks(_dp1, 1, str(tmp_path), timeout=900)
    out = capfd.readouterr().out
    assert "resumed from" in out and "data-parallel layout changed (dp 2 -> 1)" in out
    st = dp1["state"]
    assert st["step"] == 1 and st["ref_set"]
    # rollout state re-derived: the shared counters come from the checkpoint, the sampling stream from the new rank
    assert st["engine"]["calls"] == 1 and st["engine"]["weight_version"] == 1 and st["engine"]["seed"] == 0
    assert st["iterator"]["position"] == 4  # one global batch of 4 prompts drawn, whatever the layout
    hist = dp1["hist"]
    assert len(hist) == STEPS - 1
    assert [h["lr"] for h in hist] == [h["lr"] for h in full[1:]]  # scheduler resharded with the optimizer
    assert [h["weight_version"] for h in hist] == [h["weight_version"] for h in full[1:]]
    assert all(h["kl/mean"] > 0.0 for h in hist)  # the loaded reference (not the resumed policy) is used
    assert os.path.isdir(tmp_path / "dp1" / "checkpoints" / "step_00000003")
