"""Checkpoints of a ``PolicyActor`` (``oar_megatron.checkpoint``) on real megatron-core under gloo.

Resume is exact: 2 updates, the KL reference set from the current policy, 2 updates, save, 2 more updates (losses,
parameters, ``torch.rand`` right after the save recorded); a fresh actor built with another seed loads the
checkpoint and repeats the same 2 updates with identical losses and parameters (optimizer moments, LR schedule, RNG
and the KL reference restored: its log-probs are bitwise the saved run's, not the new actor's initial reference).
On 1 rank (plain optimizer), DP2 (distributed optimizer) and TP2. A DP2 checkpoint loads its model weights and its
reference into TP2 (dist-checkpointing resharding: same log-probs) while its optimizer state is refused with a
clear error; a checkpoint without the reference is refused when kl.coef > 0. A crash during save
(``OAR_CKPT_FAULT``, in a child process) leaves the previous checkpoint loadable and ``latest`` on it; keep-last-k;
bad inputs. One spawn per world size (megatron's import costs ~6 s)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oar_megatron.checkpoint import FAULT_EXIT_CODE, CheckpointError, CheckpointManager, list_checkpoints, read_latest
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

N, PROMPT, RESP = 4, 4, 6
REPO = Path(__file__).resolve().parents[2]


def _data(vocab):
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, vocab, (N, PROMPT), generator=g).tolist()
    responses = torch.randint(1, vocab, (N, RESP), generator=g).tolist()
    return prompts, responses, torch.tensor([1.0, -1.0, 0.5, -0.5])


def _actor(parallel_kw: dict, seed: int, reference: str | None = None):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import init_parallel
    from oar_megatron.policy.actor import PolicyActor

    model = model_preset("tiny")
    groups = init_parallel(ParallelConfig(**parallel_kw), model, seed=seed)
    # warm-up so the LR differs per update (the scheduler state matters); 2 updates per rollout batch
    optim = OptimConfig(lr=3e-3, lr_warmup_steps=6, weight_decay=0.01)
    # KL on: the reference policy is part of the checkpoint (none until set_reference_from_current)
    actor = PolicyActor(model=model, parallel=groups.cfg, optim=optim, groups=groups, micro_batch_size=1,
                        algorithm=load_algorithm("grpo", updates_per_batch=2, kl={"coef": 0.1}),
                        reference=reference)
    return actor, groups


def _batch(actor, groups, *, all_rows: bool = False):
    prompts, responses, adv = _data(actor.model_cfg.vocab_size)
    full = actor.pack(prompts, responses, adv)
    return full if all_rows else full.rows(torch.arange(N).chunk(groups.dp)[groups.dp_rank])


def _round(actor, batch):
    """One rollout batch: π_ref (once a reference is set), π_old, advantages, 2 updates; the losses and the local
    parameters after it."""
    actor.compute_ref_logprobs(batch)
    actor.compute_old_logprobs(batch)
    actor.compute_token_advantages(batch)
    m = actor.update(batch)
    params = torch.cat([p.detach().reshape(-1).clone() for mdl in actor.models for p in mdl.parameters()])
    return m["loss"] + m["lr"], params


def _ref_logp(actor, batch):
    """Reference log-probs of ``batch`` (a fresh copy of it, so the caller's batch keeps its own)."""
    return actor.compute_ref_logprobs(batch.rows(torch.arange(batch.size)))


def _resume_case(root: str, parallel_kw: dict, *, keep_root: str | None = None, noref_root: str | None = None,
                 full_logp: bool = False) -> dict:
    from oar_megatron.policy import destroy_parallel

    actor, groups = _actor(parallel_kw, seed=5)
    batch = _batch(actor, groups)
    _round(actor, batch)  # no reference yet: no KL term
    out = {}
    if noref_root is not None:  # a checkpoint that lacks the reference although kl.coef > 0
        CheckpointManager(noref_root, groups=groups).save(1, actor, common={"step": 1})
    actor.set_reference_from_current()  # the reference: neither the initialisation nor the saved weights
    _round(actor, batch)
    out["ref_logp"] = _ref_logp(actor, batch)
    if full_logp:  # the full-batch log-probs of the saved weights and reference, for the resharding check
        full = _batch(actor, groups, all_rows=True)
        out["full_logp"] = actor.compute_old_logprobs(full)
        out["full_ref_logp"] = _ref_logp(actor, full)
    mgr = CheckpointManager(root, keep_last=2, groups=groups)
    common = {"step": 1, "data": {"epoch": 0, "offset": torch.tensor(7)}, "name": "run"}
    saved = mgr.save(1, actor, common=common, per_rank={"rank": torch.tensor([groups.rank]), "n": 3})
    r_after = torch.rand(3)
    want_losses, want_params = _round(actor, batch)
    out.update(latest=str(mgr.latest()), saved=str(saved))
    if keep_root is not None:
        # keep-last-k on the side: 4 saves keep the last 2
        kmgr = CheckpointManager(keep_root, keep_last=2, groups=groups)
        for s in range(1, 5):
            kmgr.save(s, actor, common={"step": s})
        out["kept"] = [s for s, _ in kmgr.list()]
        out["kept_latest"] = str(kmgr.latest())
    destroy_parallel()

    actor, groups = _actor(parallel_kw, seed=99, reference="initial")  # different init, RNG and reference
    if noref_root is not None:
        try:
            CheckpointManager(noref_root, groups=groups).load(actor)
            out["noref"] = ""
        except CheckpointError as e:
            out["noref"] = str(e)
    res = CheckpointManager(root, keep_last=2, groups=groups).load(actor)
    r_load = torch.rand(3)
    batch = _batch(actor, groups)
    out["got_ref_logp"] = _ref_logp(actor, batch)
    got_losses, got_params = _round(actor, batch)
    destroy_parallel()
    out.update(res=res, r_after=r_after, r_load=r_load, want_losses=want_losses, got_losses=got_losses,
               want_params=want_params, got_params=got_params)
    return out


def _check_resume(r: dict, rank: int) -> None:
    assert r["latest"] == r["saved"] and r["saved"].endswith("step_00000001")
    res = r["res"]
    assert res["step"] == 1 and res["common"]["name"] == "run" and int(res["common"]["data"]["offset"]) == 7
    assert int(res["per_rank"]["rank"]) == rank and res["per_rank"]["n"] == 3
    assert torch.equal(r["r_after"], r["r_load"])
    assert torch.equal(r["got_ref_logp"], r["ref_logp"])  # the saved reference, not the new actor's initial one
    assert r["got_losses"] == pytest.approx(r["want_losses"], abs=1e-7, rel=0)
    torch.testing.assert_close(r["got_params"], r["want_params"], atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------------ one rank


def _one_rank(rank, world_size, root):
    return _resume_case(os.path.join(root, "a"), {"distributed_optimizer": False},
                        keep_root=os.path.join(root, "keep"), noref_root=os.path.join(root, "noref"))


def test_resume_is_exact_on_one_rank_and_keep_last(tmp_path):
    (r,) = run_ranks(_one_rank, 1, str(tmp_path))
    _check_resume(r, 0)
    assert r["kept"] == [3, 4] and r["kept_latest"].endswith("step_00000004")
    # kl.coef > 0 and no reference in the checkpoint: one line naming the checkpoint and the missing item
    noref = str(tmp_path / "noref" / "step_00000001")
    assert r["noref"] == (f"{noref}: no KL reference policy in this checkpoint (dist/ keys 'reference.*'); "
                          f"algorithm.kl.coef > 0 needs it")
    assert [s for s, _ in list_checkpoints(tmp_path / "keep")] == [3, 4]


# ----------------------------------------------------------------------------------------------- two ranks


def _two_ranks(rank, world_size, root):
    from oar_megatron.policy import destroy_parallel

    out = {"dp2": _resume_case(os.path.join(root, "dp2"), {"distributed_optimizer": True},
                               full_logp=True),
           "tp2": _resume_case(os.path.join(root, "tp2"), {"tp": 2, "distributed_optimizer": False})}
    # the DP2 checkpoint (TP1, distributed optimizer) into TP2: optimizer refused, model weights resharded
    actor, groups = _actor({"tp": 2, "distributed_optimizer": False}, seed=42)
    mgr = CheckpointManager(os.path.join(root, "dp2"), groups=groups)
    try:
        mgr.load(actor)
        out["refused"] = ""
    except CheckpointError as e:
        out["refused"] = str(e)
    res = mgr.load(actor, load_optimizer=False, load_rng=False)
    out["reshard_step"] = res["step"]
    out["reshard_per_rank"] = res["per_rank"]
    full = _batch(actor, groups, all_rows=True)
    out["tp2_full_logp"] = actor.compute_old_logprobs(full)
    out["tp2_full_ref_logp"] = _ref_logp(actor, full)  # the reference resharded to TP2 like the weights
    destroy_parallel()
    return out


def test_resume_is_exact_under_dp2_and_tp2_and_weights_reshard(tmp_path):
    res = run_ranks(_two_ranks, 2, str(tmp_path))
    for rank, r in enumerate(res):
        _check_resume(r["dp2"], rank)
        _check_resume(r["tp2"], rank)
        assert "optimizer state cannot be resharded" in r["refused"] and "tp: saved 1, now 2" in r["refused"]
        assert r["reshard_step"] == 1 and r["reshard_per_rank"] is None
        # TP2 with the DP2 weights gives the DP2 log-probs (fp32, vocab-parallel reduction order)
        torch.testing.assert_close(r["tp2_full_logp"], r["dp2"]["full_logp"], atol=2e-6, rtol=0)
        torch.testing.assert_close(r["tp2_full_ref_logp"], r["dp2"]["full_ref_logp"], atol=2e-6, rtol=0)
        assert (r["dp2"]["full_ref_logp"] - r["dp2"]["full_logp"]).abs().max() > 1e-3  # the reference is not π


# ------------------------------------------------------------------------------------------ crash in save


def _crash_child(root: str, point: str) -> None:
    """Child process (``python -m tests.cpu.test_checkpoint``): save step 1, record its parameters, then die in
    the save of step 2 at ``point``."""
    actor, groups = _actor({"distributed_optimizer": False}, seed=5, reference="initial")
    batch = _batch(actor, groups)
    _round(actor, batch)
    mgr = CheckpointManager(root, groups=groups)
    mgr.save(1, actor, common={"step": 1})
    _, params = _round(actor, batch)  # what the resumed run must reproduce
    torch.save(params, os.path.join(root, "..", f"expected-{point}.pt"))
    os.environ["OAR_CKPT_FAULT"] = point
    mgr.save(2, actor, common={"step": 2})
    raise SystemExit("unreachable: the fault point did not fire")


def _after_crash(rank, world_size, roots):
    from oar_megatron.policy import destroy_parallel

    out = {}
    for point, root in roots.items():
        actor, groups = _actor({"distributed_optimizer": False}, seed=99, reference="initial")
        mgr = CheckpointManager(root, groups=groups)
        tmp_left = sorted(p.name for p in Path(root).glob(".tmp-*"))  # manager start cleans them
        res = mgr.load(actor)
        _, params = _round(actor, _batch(actor, groups))
        mgr.save(2, actor, common={"step": 2})
        out[point] = dict(step=res["step"], params=params, tmp_left=tmp_left, latest=mgr.latest().name,
                          listed=[s for s, _ in mgr.list()])
        destroy_parallel()
    return out


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path):
    roots = {p: str(tmp_path / p / "ckpt") for p in ("after_model", "before_rename")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OAR_CKPT_FAULT", None)
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    # Own session per child: dist-checkpointing leaves helper processes (a multiprocessing Manager) that outlive the
    # os._exit; they are killed with the child's process group. Output goes to a file (a pipe would stay open).
    procs = {}
    for p, root in roots.items():
        log = open(tmp_path / f"{p}.log", "wb")  # noqa: SIM115 - closed below
        procs[p] = (subprocess.Popen([sys.executable, "-m", "tests.cpu.test_checkpoint", root, p], cwd=REPO, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
    for p, (proc, log) in procs.items():
        try:
            code = proc.wait(timeout=240)
        finally:
            log.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert code == FAULT_EXIT_CODE, (p, code, (tmp_path / f"{p}.log").read_text(errors="replace")[-3000:])
    for p, root in roots.items():
        assert read_latest(root).name == "step_00000001", p
        assert [s for s, _ in list_checkpoints(root)] == [1], p
        assert (Path(root) / ".tmp-step_00000002").is_dir(), p  # the crashed save's leftovers
    res = run_ranks(_after_crash, 1, roots)[0]
    for p in roots:
        r = res[p]
        assert r["step"] == 1 and r["latest"] == "step_00000002" and r["listed"] == [1, 2]
        assert r["tmp_left"] == []
        assert not any(Path(roots[p]).glob(".tmp-*"))
        torch.testing.assert_close(r["params"], torch.load(tmp_path / p / f"expected-{p}.pt"), atol=1e-7, rtol=0)


# -------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(tmp_path):
    mgr = CheckpointManager(tmp_path / "empty", groups=None)
    assert mgr.latest() is None and mgr.list() == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        mgr.resolve()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mgr.resolve(tmp_path / "nowhere")
    (tmp_path / "empty" / "latest").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        mgr.latest()
    (tmp_path / "empty" / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        mgr.resolve()
    (tmp_path / "empty" / "step_00000003").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        mgr.resolve(tmp_path / "empty" / "step_00000003")
    (tmp_path / "empty" / ".tmp-step_00000004").mkdir()
    CheckpointManager(tmp_path / "empty", groups=None)  # start-up cleans leftover saves
    assert not (tmp_path / "empty" / ".tmp-step_00000004").exists()


if __name__ == "__main__":
    _crash_child(sys.argv[1], sys.argv[2])
