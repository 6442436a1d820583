"""Host data never reaches a device (NCCL-like) group: short TP2 and DP2 trainer runs (one step, whitening on, DAPO's
dynamic sampling under TP2, an evaluation under DP2) on a world whose default group and data-parallel group refuse
CPU tensors and Python objects exactly as NCCL does (``tests/fake_cuda.py``; docs/architecture.md, "Communication").
Megatron's compute groups stay gloo (on this machine they carry the model's CPU tensors), so control-plane traffic
must travel over the gloo twins ``collectives.register`` creates. The fake groups move no data: these runs check
placement (and finite losses); values are checked by the gloo tests.

Before ``oar_megatron.collectives`` both runs failed at ``Trainer.__init__`` (the run directory broadcast with
``broadcast_object_list`` on the default group: ``No backend type associated with device type cpu``); with only
the whitening reverted to ``whiten(adv, group=g.dp_group)`` the DP2 run fails in ``whiten``'s all-reduce.
"""

import json
import math

import pytest

from tests.fake_cuda import run_strict

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=4", "rollout.max_new_tokens=5",
         "data.synthetic.format_warmup_steps=0", "eval.at_start=false", "checkpoint.every=0",
         "checkpoint.save_final=false", "trainer.progress=false", "logging.step_line=false",
         "logging.tensorboard=false", "trainer.steps=1", "algorithm.advantage.whiten=true"]


def _train(rank, world, overrides):
    import torch.distributed as dist

    from oar_megatron import collectives
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(SMALL + list(overrides))
    trainer = Trainer(cfg)
    try:
        # the groups the code uses directly are device groups; their twins are gloo
        g = trainer.groups
        twins = {name: str(dist.get_backend(collectives.control_group(grp)))
                 for name, grp in (("world", None), ("dp", g.dp_group), ("tp", g.tp_group))}
        backends = {"world": str(dist.get_backend()), "dp": str(dist.get_backend(g.dp_group))}
        history = trainer.fit()
    finally:
        trainer.close()
    evals = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    return {"history": [{k: v for k, v in m.items() if isinstance(v, float)} for m in history], "twins": twins,
            "backends": backends, "eval": {k: v for x in evals if x["phase"] == "eval" for k, v in x.items()}}


TIMES = ("time/", "throughput/", "rollout/tokens_per_s")
TP2 = ["parallel=tp2", "algorithm=dapo", "eval.at_end=false"]  # dynamic sampling: rounds agreed over the world
DP2 = ["parallel=dp", "algorithm=grpo", "eval=synthetic", "eval.at_start=false", "eval.k=2", "eval.ks=[1,2]",
       "eval.datasets=[{name: modsum, path: synthetic, limit: 2}]"]  # whitening and the evaluation gather over DP


def _both(rank, world, tmp):
    return {"tp2": _train(rank, world, [*TP2, f"logging.run_dir={tmp}/tp2"]),
            "dp2": _train(rank, world, [*DP2, f"logging.run_dir={tmp}/dp2"])}


def test_tp2_and_dp2_trainer_steps_keep_host_data_off_device_groups(tmp_path):
    res = run_strict(_both, 2, str(tmp_path))  # one spawn for both layouts (megatron is imported once)
    for layout, big in (("tp2", "tp"), ("dp2", "dp")):
        for r in (res[0][layout], res[1][layout]):
            assert r["backends"] == {"world": "fakecuda", "dp": "fakecuda"}, layout  # NCCL-like: CPU refused
            assert r["twins"]["world"] == r["twins"][big] == "gloo", layout  # big: the size-2 group
            (m,) = r["history"]
            assert math.isfinite(m["loss/total"]) and 0.0 <= m["reward/pass_rate"] <= 1.0, layout
        # metrics are control-plane means: the same on both ranks (timings aside)
        same = [{k: v for k, v in r[layout]["history"][0].items() if not k.startswith(TIMES)} for r in res]
        assert same[0] == same[1], layout
    assert "modsum/avg@2" in res[0]["dp2"]["eval"]
