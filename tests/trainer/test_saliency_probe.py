"""The saliency probe in a run (``eval.saliency_probe_every``, trainer/saliency_probe.py): on the pivot task every
probe logs OAR-G (three P_final modes) and OAR-P precision@k / AUROC against the known pivots, with the uniform
reference exactly at chance; the probe is refused where pivots are unknown. One spawn (megatron imported once)."""

import json

import pytest

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

RUN = ["+experiment=pivot", "algorithm=grpo", "data.synthetic.filler_len=12", "data.synthetic.format_warmup_steps=3",
       "rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=8", "rollout.max_new_tokens=20",
       "trainer.steps=2", "eval.saliency_probe_every=2", "eval.saliency_probe_size=6", "eval.at_start=false",
       "eval.at_end=false", "checkpoint.every=0", "checkpoint.save_final=false", "trainer.progress=false",
       "logging.step_line=false", "logging.tensorboard=false"]


def _run(rank, world, run_dir):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    with pytest.raises(ValueError, match="eval.saliency_probe_every: the probe needs known pivotal tokens"):
        compose_config(["eval.saliency_probe_every=1"]).validate()
    trainer = Trainer(compose_config(RUN + [f"logging.run_dir={run_dir}"]))
    try:
        trainer.fit()
    finally:
        trainer.close()


def test_probe_metrics_on_the_pivot_task(tmp_path):
    run_ranks(_run, 1, str(tmp_path / "run"), timeout=600)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [m for m in lines if m["phase"] == "saliency"]
    assert [m["step"] for m in probes] == [0, 2]  # after the warm-up, then every 2 steps
    for m in probes:
        assert m["saliency/rows"] == 6.0
        for method in ("oar_g_last", "oar_g_answer_mean", "oar_g_answer_joint", "oar_p_last", "random"):
            for metric in ("precision_at_k", "auroc"):
                assert 0.0 <= m[f"saliency/{method}/{metric}"] <= 1.0, (method, metric, m)
        # one pivot among 13 scored tokens (the trace digit and 12 filler letters): chance is exactly 1/13
        assert m["saliency/uniform/precision_at_k"] == pytest.approx(1 / 13) and m["saliency/uniform/auroc"] == 0.5
