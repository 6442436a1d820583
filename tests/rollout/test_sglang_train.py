"""``oar-train rollout=sglang`` end to end against two fake SGLang workers (tests/sglang_fake.py) that generate with
``transformers`` from the weights the trainer pushes (export → ``/update_weights_from_disk``): the servers' log-probs
of the sampled tokens equal the trainer's π_old (fp32), every sync reaches both workers with the next version,
injected faults are retried and counted in the step metrics, no group is lost, and the final evaluation runs through
the same servers. One spawn (megatron imported
once)."""

from __future__ import annotations

import json

import pytest

from tests.dist_harness import run_ranks
from tests.sglang_fake import FakeSGLang

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=4", "rollout.max_new_tokens=7",
         "data.synthetic.format_warmup_steps=2", "eval.at_start=false", "eval.at_end=false", "checkpoint.every=0",
         "checkpoint.save_final=false", "trainer.progress=false", "logging.step_line=false",
         "logging.tensorboard=false"]


def _train(rank, world, tmp, urls):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    small = [o for o in SMALL if o != "eval.at_end=false"] + ["eval.at_end=true", "eval.k=2", "eval.ks=[1,2]"]
    cfg = compose_config(small + ["trainer.steps=3", "algorithm=grpo", f"logging.run_dir={tmp}/run", "rollout=sglang",
                                  f"rollout.server_urls=[{','.join(urls)}]", "rollout.max_new_tokens=7",
                                  "rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.timeout_s=60"])
    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    return [{k: v for k, v in m.items() if isinstance(v, float)} for m in history]


def test_train_against_two_fake_workers(tmp_path):
    fakes = [FakeSGLang(vocab_size=24, seed=i) for i in range(2)]
    for f in fakes:
        f.start()
    try:
        fakes[0].faults = ["http_500", "nan"]  # the first two generate requests fail; retried on the other worker
        (hist,) = run_ranks(_train, 1, str(tmp_path), [f.url for f in fakes], timeout=900)
    finally:
        for f in fakes:
            f.stop()
    assert len(hist) == 3
    for m in hist:
        # the servers sampled from the trainer's exported weights: their log-probs are π_old's
        assert m["rollout/logp_diff_abs_max"] <= 1e-3 and m["rollout/logp_diff_abs_mean"] < 1e-4, m
        assert m["rollout/weight_version_lag"] == 0.0 and m["rollout/invalid_groups"] == 0.0
        assert m["rollout/samples"] == 16 and m["sync/bytes"] > 0 and m["time/sync_s"] > 0
    assert hist[0]["rollout/invalid_http"] == 1 and hist[0]["rollout/invalid_logprob_value"] == 1
    assert hist[0]["rollout/retries"] == 2 and sum(m["rollout/invalid_responses"] for m in hist) == 2
    assert [m["weight_version"] for m in hist] == [2.0, 3.0, 4.0]  # one sync before the first step, one per step
    for f in fakes:  # every worker got every version, in order, from the run's sync directory
        assert [u["weight_version"] for u in f.updates] == ["1", "2", "3", "4"]
        assert all(u["model_path"].startswith(str(tmp_path / "run" / "weight_sync")) for u in f.updates)
    assert sorted(p.name for p in (tmp_path / "run" / "weight_sync").iterdir()) == ["v3", "v4"]
    assert sum(len(f.requests) for f in fakes) == 3 * 16 + 2 + 9 * 2  # + the final evaluation: 9 problems x k=2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if x["phase"] == "train"]
    assert [x["step"] for x in logged] == [1, 2, 3]
    evals = [x for x in lines if x["phase"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["modsum/avg@2"] <= 1.0


def _train_layouts(rank, world, tmp, urls_by_layout):
    out = {}
    for layout, urls in urls_by_layout.items():
        from oar_megatron.trainer import compose_config
        from oar_megatron.trainer.loop import Trainer

        cfg = compose_config(SMALL + ["trainer.steps=2", "algorithm=grpo", f"logging.run_dir={tmp}/{layout}",
                                      "rollout=sglang", f"rollout.server_urls=[{','.join(urls)}]",
                                      "rollout.max_new_tokens=7", "rollout.prompts_per_step=4",
                                      "rollout.n_samples=4", "rollout.timeout_s=60"]
                             + (["parallel.tp=2"] if layout == "tp" else []))  # else: dp = world / tp = 2
        trainer = Trainer(cfg)
        try:
            hist = trainer.fit()
        finally:
            trainer.close()
        out[layout] = [{k: v for k, v in m.items() if isinstance(v, float)} for m in hist]
    return out


def test_two_ranks_tp2_and_dp2(tmp_path):
    """TP 2: the weights are gathered from both TP shards and one rank per replica generates (the other gets the
    samples by broadcast); DP 2: each replica asks for its own prompts and counts are summed over replicas."""
    fakes = {layout: [FakeSGLang(vocab_size=24, seed=i) for i in range(2)] for layout in ("tp", "dp")}
    for pair in fakes.values():
        for f in pair:
            f.start()
    try:
        fakes["dp"][1].faults = ["http_500"]
        res = run_ranks(_train_layouts, 2, str(tmp_path), {k: [f.url for f in v] for k, v in fakes.items()},
                        timeout=900)
    finally:
        for pair in fakes.values():
            for f in pair:
                f.stop()
    hist = res[0]
    for layout in ("tp", "dp"):
        for m in hist[layout]:
            assert m["rollout/logp_diff_abs_max"] <= 1e-3 and m["rollout/samples"] == 16, (layout, m)
        for f in fakes[layout]:
            assert [u["weight_version"] for u in f.updates] == ["1", "2", "3"], layout
    # TP 2: one request stream per replica (16 samples per step, not 32)
    assert sum(len(f.requests) for f in fakes["tp"]) == 2 * 16
    assert sum(len(f.requests) for f in fakes["dp"]) == 2 * 16 + 1
    assert hist["dp"][0]["rollout/invalid_http"] == 1 and hist["dp"][0]["rollout/retries"] == 1


def _train_sharded(rank, world, tmp, urls_by_layout, moe_dir):
    """PP 2 (dense, from scratch) and EP 2 (a pretrained Qwen3-MoE): every sync gathers the stage / expert shards
    into one HF state the fake workers load with transformers."""
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    layouts = {"pp2": ["parallel.pp=2", "algorithm=oar_g"],
               "ep2": ["parallel.ep=2", "model=tiny-moe", "model.moe_shared_expert_intermediate_size=null",
                       "model.qk_layernorm=true", f"model.pretrained={moe_dir}", "algorithm=grpo"]}
    out = {}
    for layout, extra in layouts.items():
        cfg = compose_config(SMALL + ["trainer.steps=2", f"logging.run_dir={tmp}/{layout}", "rollout=sglang",
                                      f"rollout.server_urls=[{','.join(urls_by_layout[layout])}]",
                                      "rollout.max_new_tokens=7", "rollout.prompts_per_step=4",
                                      "rollout.n_samples=4", "rollout.timeout_s=60"] + extra)
        trainer = Trainer(cfg)
        try:
            hist = trainer.fit()
            out[layout] = {"overlap": trainer.overlap,
                           "hist": [{k: v for k, v in m.items() if isinstance(v, float)} for m in hist]}
        finally:
            trainer.close()
    return out


def test_sync_under_pp2_and_ep2(tmp_path):
    """After every sync the workers' log-probs of the sampled tokens equal the trainer's π_old: the pipeline stages'
    layers (PP 2) and the expert-parallel experts (EP 2, MoE) all reached the exported model, in the right places."""
    from tests.convert.test_pretrained_start import _hf_qwen3_moe

    _hf_qwen3_moe(tmp_path / "moe")
    fakes = {layout: [FakeSGLang(vocab_size=24, seed=i) for i in range(2)] for layout in ("pp2", "ep2")}
    for pair in fakes.values():
        for f in pair:
            f.start()
    try:
        res = run_ranks(_train_sharded, 2, str(tmp_path), {k: [f.url for f in v] for k, v in fakes.items()},
                        str(tmp_path / "moe"), timeout=900)
    finally:
        for pair in fakes.values():
            for f in pair:
                f.stop()
    out = res[0]
    assert out["pp2"]["overlap"] and not out["ep2"]["overlap"]  # EP > 1: the overlap is off by default
    for layout in ("pp2", "ep2"):
        for m in out[layout]["hist"]:
            assert m["rollout/logp_diff_abs_max"] <= 1e-3 and m["rollout/logp_diff_abs_mean"] < 1e-4, (layout, m)
            assert m["rollout/samples"] == 16 and m["rollout/invalid_groups"] == 0
        for f in fakes[layout]:
            assert [u["weight_version"] for u in f.updates] == ["1", "2", "3"], layout
