"""What one RL step logs, through the Trainer on the tiny Megatron policy (one spawn, single rank):

- under DAPO dynamic sampling every per-round reward statistic is a rate over all the samples of all rounds
  (never a sum of per-round rates that exceeds 1); counts stay counts;
- throughput counts real tokens (response tokens and prompt + response tokens, separately), not the padded batch;
- the format warm-up runs the supervised ``sft_update`` (not the RL ``update``);
- MoE routing-replay drift reaches the metrics stream (tiny-moe, routing replay on).
"""

import json

import pytest

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=4", "rollout.max_new_tokens=7",
         "data.synthetic.format_warmup_steps=2", "eval.at_start=false", "eval.at_end=false", "checkpoint.every=0",
         "checkpoint.save_final=false", "trainer.progress=false", "logging.step_line=false",
         "logging.tensorboard=false", "trainer.steps=1"]
ROWS = 16


def _run(overrides):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    trainer = Trainer(compose_config(SMALL + list(overrides)))
    calls = {"sft_update": 0, "update": 0, "packed": []}
    actor = trainer.actor
    sft, upd, pack = actor.sft_update, actor.update, actor.pack

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    def packed(prompts, responses, *a, **k):
        batch = pack(prompts, responses, *a, **k)
        calls["packed"].append(dict(prompt=[len(p) for p in prompts], response=[len(r) for r in responses],
                                    numel=batch.input_ids.numel()))
        return batch

    actor.sft_update, actor.update, actor.pack = count("sft_update", sft), count("update", upd), packed
    try:
        trainer.format_warmup()
        warm = {k: calls[k] for k in ("sft_update", "update")}
        history = trainer.fit()
    finally:
        trainer.close()
    return {"warm": warm, "step_pack": calls["packed"][-1],
            "metrics": [{k: v for k, v in m.items() if isinstance(v, float)} for m in history]}


def _cases(rank, world, tmp):
    return {
        # every verdict fails (the verifier raises): no group is informative, so all 3 rounds run; every response
        # longer than 1 token is penalised by the overlong shaping (max_len 2, cache 1)
        "dapo": _run(["algorithm=dapo", "reward.fn=tests.trainer.slow_reward:fails", "rollout.max_gen_batches=3",
                      "reward.overlong.enabled=true", "reward.overlong.max_len=2", "reward.overlong.cache_len=1",
                      f"logging.run_dir={tmp}/dapo"]),
        "moe": _run(["model=tiny-moe", "trainer.routing_replay=true", "algorithm=grpo", f"logging.run_dir={tmp}/moe"]),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop_metrics")
    (res,) = run_ranks(_cases, 1, str(tmp), timeout=900)
    return res, tmp


def test_dynamic_sampling_statistics_are_rates_over_all_samples(results):
    res, _ = results
    (m,) = res["dapo"]["metrics"]
    assert m["rollout/gen_rounds"] == 3.0
    assert m["rollout/samples"] == 3 * ROWS
    assert m["reward/errors"] == 3 * ROWS  # a count over all rounds
    assert m["reward/error_frac"] == 1.0 and m["reward/timeout_frac"] == 0.0
    assert 0.5 < m["reward/overlong_frac"] <= 1.0  # almost every response has >= 2 tokens
    assert -1.0 <= m["reward/overlong_penalty_mean"] < 0.0
    assert m["rollout/groups_all_wrong"] == 4.0 and m["rollout/groups_uninformative"] == 4.0


def test_throughput_counts_real_response_and_total_tokens(results):
    res, _ = results
    for case in ("dapo", "moe"):
        (m,) = res[case]["metrics"]
        packed = res[case]["step_pack"]
        response = sum(packed["response"])
        total = response + sum(packed["prompt"])
        assert m["throughput/response_tokens"] == response
        assert m["throughput/total_tokens"] == total
        assert m["throughput/response_tokens"] == pytest.approx(m["response/length_mean"] * ROWS)
        assert m["throughput/response_tokens_per_s"] == pytest.approx(response / m["time/step_s"])
        assert m["throughput/total_tokens_per_s"] == pytest.approx(total / m["time/step_s"])
        assert total <= packed["numel"]


def test_format_warmup_is_the_supervised_step(results):
    res, _ = results
    for case in ("dapo", "moe"):
        assert res[case]["warm"] == {"sft_update": 2, "update": 0}, case


def test_routing_replay_drift_reaches_the_metrics_stream(results):
    res, tmp = results
    (m,) = res["moe"]["metrics"]
    routing = {k: v for k, v in m.items() if k.startswith("routing/")}
    assert "routing/0/routing_replay/drift" in routing, sorted(m)
    assert 0.0 <= routing["routing/0/routing_replay/drift"] <= 1.0
    assert routing["routing/0/routing_replay/tokens"] > 0
    lines = [json.loads(x) for x in (tmp / "moe" / "metrics.jsonl").read_text().splitlines()]
    (train,) = [x for x in lines if x["phase"] == "train"]
    assert "routing/0/routing_replay/drift" in train
    assert not any(k.startswith("routing/") for k in res["dapo"]["metrics"][0])  # dense: no routing metrics
