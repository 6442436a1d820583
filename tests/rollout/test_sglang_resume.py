"""A run with ``rollout=sglang`` stopped at a checkpoint and resumed reproduces the uninterrupted run: the engine's
call counter comes back from the checkpoint, so with ``rollout.seeded_sampling`` the servers draw the same samples
(tests/sglang_fake.py honours ``sampling_seed``), and the resumed trainer pushes its loaded weights to the servers
before its first rollout (a new weight version: the servers were left with the interrupted run's last one). One
spawn."""

from __future__ import annotations

import pytest

from tests.dist_harness import run_ranks
from tests.sglang_fake import FakeSGLang

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=4", "rollout.max_new_tokens=7",
         "data.synthetic.format_warmup_steps=2", "eval.at_start=false", "eval.at_end=false", "checkpoint.every=2",
         "checkpoint.save_final=false", "trainer.progress=false", "logging.step_line=false",
         "logging.tensorboard=false", "rollout=sglang", "rollout.timeout_s=60", "rollout.seeded_sampling=true",
         "algorithm=oar_g"]
# wall-clock metrics and the weight version (the resumed run pushes one extra version) differ by design
VARYING = ("time/", "throughput/", "rollout/tokens_per_s", "reward/time_s", "sync/", "weight_version")


def _run(tmp, name, urls, steps):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(SMALL + [f"trainer.steps={steps}", f"logging.run_dir={tmp}/{name}",
                                  f"rollout.server_urls=[{','.join(urls)}]"])
    trainer = Trainer(cfg)
    try:
        return [{k: v for k, v in m.items() if isinstance(v, float)} for m in trainer.fit()]
    finally:
        trainer.close()


def _resume(rank, world, tmp, urls):
    full = _run(tmp, "full", urls["full"], 4)
    _run(tmp, "part", urls["part"], 2)
    resumed = _run(tmp, "part", urls["part"], 4)
    return {"full": full, "resumed": resumed}


def test_resume_with_sglang_reproduces_the_run(tmp_path):
    fakes = {k: FakeSGLang(vocab_size=24) for k in ("full", "part")}
    for f in fakes.values():
        f.start()
    try:
        (res,) = run_ranks(_resume, 1, str(tmp_path), {k: [f.url] for k, f in fakes.items()}, timeout=900)
    finally:
        for f in fakes.values():
            f.stop()
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(VARYING)} for r in rows]  # noqa: E731
    assert len(res["resumed"]) == 2
    assert strip(res["resumed"]) == strip(res["full"][2:])
    assert res["full"][2]["reward/mean"] == res["resumed"][0]["reward/mean"]  # not vacuous: the metrics are there
    # the resumed run pushed its loaded weights before sampling; the uninterrupted run's versions were 1..5
    assert [u["weight_version"] for u in fakes["full"].updates] == ["1", "2", "3", "4", "5"]
    assert [u["weight_version"] for u in fakes["part"].updates] == ["1", "2", "3", "4", "5", "6"]
    assert res["resumed"][-1]["weight_version"] == 6.0 and res["full"][-1]["weight_version"] == 5.0
