"""``oar-train rollout=sglang rollout.weight_sync=distributed`` with PP 2 (2 gloo ranks) against two fake SGLang
workers in their own processes (tests/sglang_fake.py ``--hf-config``: after the last bucket of an update they generate
with ``transformers`` from the tensors they received). Each pipeline stage sends its own tensors over its own group;
after every sync the workers hold the trainer's weights: ``/weights_checker`` verification passes every step
(``rollout.verify_sync``), the servers' log-probs of the sampled tokens equal the trainer's π_old (fp32: max |Δ| ≤
1e-3), and at the end the received tensors equal the trainer's export bit for bit. One spawn (megatron imported
once)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.dist_harness import run_ranks
from tests.rollout.test_sglang_distributed import _spawn
from tests.rollout.test_sglang_train import SMALL

pytestmark = [pytest.mark.dist, pytest.mark.megatron]


def _train(rank, world, tmp, urls):
    from oar_megatron.rollout.weight_sync import gather_hf_state
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(SMALL + ["trainer.steps=3", "algorithm=grpo", f"logging.run_dir={tmp}/run", "rollout=sglang",
                                  f"rollout.server_urls=[{','.join(urls)}]", "rollout.max_new_tokens=7",
                                  "rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.timeout_s=60",
                                  "parallel.pp=2", "rollout.weight_sync=distributed", "rollout.sync_bucket_mb=0.04",
                                  "rollout.verify_sync=true", "rollout.update_timeout_s=60"])
    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
        final = gather_hf_state(trainer.actor, trainer.groups, cfg.model, "qwen3")  # collective; rank 0 gets it
    finally:
        trainer.close()
    return {"hist": [{k: v for k, v in m.items() if isinstance(v, float)} for m in history], "final": final}


def test_train_pp2_distributed_sync(tmp_path):
    from oar_megatron.rollout.weight_sync import hf_config_for
    from tests.rollout.test_sglang_sync import _model

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config_for(_model(), "qwen3")))
    procs = [_spawn(tmp_path, f"w{i}", "--hf-config", str(tmp_path / "hf")) for i in range(2)]
    try:
        urls = [u for _, u in procs]
        res = run_ranks(_train, 2, str(tmp_path), urls, timeout=900)
        dumps = []
        for i, u in enumerate(urls):
            r = httpx.post(u + "/fake_dump", json={"path": str(tmp_path / f"w{i}.safetensors")}, timeout=30)
            r.raise_for_status()
            dumps.append(r.json())
    finally:
        for p, _ in procs:
            p.kill()
            p.wait()
    hist, final = res[0]["hist"], res[0]["final"]
    assert len(hist) == 3
    for m in hist:  # the servers sampled from the weights both stages pushed
        assert m["rollout/logp_diff_abs_max"] <= 1e-3 and m["rollout/logp_diff_abs_mean"] < 1e-4, m
        assert m["rollout/weight_version_lag"] == 0.0 and m["rollout/samples"] == 16
        assert m["sync/stages"] == 2 and m["sync/buckets"] >= 4 and m["sync/bytes"] > 0
        assert m["sync/peak_staged_bytes"] <= 2 * 0.04 * 2**20
    assert [m["weight_version"] for m in hist] == [2.0, 3.0, 4.0]  # one sync before the first step, one per step
    from safetensors.torch import load_file

    for i, info in enumerate(dumps):
        assert info["weight_version"] == "4"
        assert [g["group_name"].rsplit("-", 1)[1] for g in info["joined"]] == ["pp0", "pp1"]  # joined once
        assert [c for c in info["calls"] if c == "/weights_checker"] == ["/weights_checker"] * 4  # every sync
        got = load_file(str(tmp_path / f"w{i}.safetensors"))
        assert sorted(got) == sorted(final)
        for n, t in final.items():  # the trainer's final weights, bit for bit
            assert torch.equal(got[n], t), n
