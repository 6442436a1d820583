"""``oar-train rollout=sglang rollout.weight_sync=distributed`` with PP 2, then TP 2 (2 gloo ranks) against fake SGLang
workers in their own processes (tests/sglang_fake.py ``--hf-config``: after the last bucket of an update they generate
with ``transformers`` from the tensors they received), two per run. Each pipeline stage sends its own tensors over its
own group (TP 2: the stage's sender gathers its TP peer's shards tensor by tensor);
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


def _train(rank, world, tmp, urls_by_layout):
    from oar_megatron.rollout.weight_sync import gather_hf_state
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    out = {}
    for layout, urls in urls_by_layout.items():
        cfg = compose_config(SMALL + [
            "trainer.steps=3", "algorithm=grpo", f"logging.run_dir={tmp}/{layout}", "rollout=sglang",
            f"rollout.server_urls=[{','.join(urls)}]", "rollout.max_new_tokens=7", "rollout.prompts_per_step=4",
            "rollout.n_samples=4", "rollout.timeout_s=60", f"parallel.{layout}=2", "rollout.weight_sync=distributed",
            "rollout.sync_bucket_mb=0.04", "rollout.verify_sync=true", "rollout.update_timeout_s=60"])
        trainer = Trainer(cfg)
        try:
            history = trainer.fit()
            final = gather_hf_state(trainer.actor, trainer.groups, cfg.model, "qwen3")  # collective; rank 0 has it
        finally:
            trainer.close()
        out[layout] = {"hist": [{k: v for k, v in m.items() if isinstance(v, float)} for m in history],
                       "final": final}
    return out


def test_train_pp2_and_tp2_distributed_sync(tmp_path):
    """PP 2: each stage's rank sends its own tensors over its own group. TP 2: one stage, its sender (TP rank 0)
    receives TP rank 1's shards one tensor at a time (gate/up halves rejoined) while streaming the buckets."""
    from safetensors.torch import load_file

    from oar_megatron.rollout.weight_sync import hf_config_for
    from tests.rollout.test_sglang_sync import _model

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config_for(_model(), "qwen3")))
    procs = {layout: [_spawn(tmp_path, f"{layout}{i}", "--hf-config", str(tmp_path / "hf")) for i in range(2)]
             for layout in ("pp", "tp")}
    try:
        urls = {layout: [u for _, u in ps] for layout, ps in procs.items()}
        res = run_ranks(_train, 2, str(tmp_path), urls, timeout=900)
        dumps = {}
        for layout, us in urls.items():
            for i, u in enumerate(us):
                r = httpx.post(u + "/fake_dump", json={"path": str(tmp_path / f"{layout}{i}.safetensors")},
                               timeout=30)
                r.raise_for_status()
                dumps[(layout, i)] = r.json()
    finally:
        for ps in procs.values():
            for p, _ in ps:
                p.kill()
                p.wait()
    for layout, stages in (("pp", 2), ("tp", 1)):
        hist, final = res[0][layout]["hist"], res[0][layout]["final"]
        assert len(hist) == 3
        for m in hist:  # the servers sampled from the weights the stage(s) pushed
            assert m["rollout/logp_diff_abs_max"] <= 1e-3 and m["rollout/logp_diff_abs_mean"] < 1e-4, (layout, m)
            assert m["rollout/weight_version_lag"] == 0.0 and m["rollout/samples"] == 16
            assert m["sync/stages"] == stages and m["sync/buckets"] >= 4 and m["sync/bytes"] > 0
            assert m["sync/peak_staged_bytes"] <= 2 * 0.04 * 2**20
        assert [m["weight_version"] for m in hist] == [2.0, 3.0, 4.0]  # a sync before the first step, one per step
        for i in range(2):
            info = dumps[(layout, i)]
            assert info["weight_version"] == "4"
            assert [g["group_name"].rsplit("-", 1)[1] for g in info["joined"]] == [f"pp{s}" for s in range(stages)]
            assert info["calls"].count("/weights_checker") == 4  # every sync verified
            got = load_file(str(tmp_path / f"{layout}{i}.safetensors"))
            assert sorted(got) == sorted(final)
            for n, t in final.items():  # the trainer's final weights, bit for bit
                assert torch.equal(got[n], t), (layout, n)
