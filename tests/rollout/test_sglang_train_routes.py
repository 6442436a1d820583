"""``oar-train rollout=sglang rollout.return_routed_experts=true`` end to end against a fake SGLang worker
(tests/sglang_fake.py) serving a tiny Qwen3-MoE with ``transformers`` from the weights the trainer pushes and
returning the experts its routers chose: every request asks for the routes, π_old and the updates replay them
(the actor's replay holds external records, not a record pass), and the server's log-probs equal π_old (fp32).
One spawn."""

from __future__ import annotations

import pytest

from tests.dist_harness import run_ranks
from tests.sglang_fake import FakeSGLang, HFModel

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

MOE = ["model=tiny-moe", "model.moe_shared_expert_intermediate_size=null", "model.qk_layernorm=true",
       "model.vocab_size=24", "model.make_vocab_size_divisible_by=8"]
RUN = ["rollout.prompts_per_step=2", "rollout.n_samples=2", "trainer.micro_batch_size=2", "rollout.max_new_tokens=5",
       "eval.at_start=false", "eval.at_end=false", "checkpoint.every=0", "checkpoint.save_final=false",
       "trainer.progress=false", "logging.step_line=false", "logging.tensorboard=false", "trainer.steps=2",
       "algorithm=grpo", "rollout=sglang", "rollout.max_new_tokens=5", "rollout.prompts_per_step=2",
       "rollout.n_samples=2", "rollout.timeout_s=60", "rollout.return_routed_experts=true"]


def _hf_moe(directory):
    """The tiny Qwen3-MoE of the pretrained-start tests with the synthetic task's 24-token vocabulary."""
    from tests.convert.test_pretrained_start import _hf_qwen3_moe

    _hf_qwen3_moe(directory, vocab_size=24)


def _train(rank, world, tmp, hf_dir, url):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(RUN + MOE + [f"model.pretrained={hf_dir}", f"logging.run_dir={tmp}/run",
                                      f"rollout.server_urls=[{url}]"])
    trainer = Trainer(cfg)
    try:
        hist = trainer.fit()
        replay = trainer.actor.replays[0]
        return dict(hist=[{k: v for k, v in m.items() if isinstance(v, float)} for m in hist],
                    source=replay._source, old=dict(trainer.actor.old_routing_metrics))
    finally:
        trainer.close()


def test_train_replays_the_servers_routes(tmp_path):
    hf_dir = tmp_path / "hf"
    _hf_moe(hf_dir)
    with FakeSGLang(HFModel(hf_dir), routed_experts=(2, 2, 4)) as fake:
        (res,) = run_ranks(_train, 1, str(tmp_path), str(hf_dir), fake.url, timeout=900)
        requests = list(fake.requests)
    assert res["source"] == "external"  # π_old and the updates replayed the rollout's routes
    assert requests and all(r.get("return_routed_experts") is True for r in requests)
    assert res["old"]["routing_old/0/routing_replay/drift"] == 0.0  # the server routed as π_old would
    for m in res["hist"]:
        assert m["rollout/logp_diff_abs_max"] <= 1e-3 and m["rollout/invalid_groups"] == 0.0, m
        assert m["routing/0/routing_replay/drift"] == 0.0, m  # the single update pass runs before its step
