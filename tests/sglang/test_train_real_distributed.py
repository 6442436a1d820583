"""``oar-train rollout=sglang rollout.weight_sync=distributed parallel.pp=2`` against a real SGLang 0.5.23 CPU server
that the run starts itself (fp32, ``--skip-tokenizer-init``): each of the 2 gloo trainer ranks (one pipeline stage
each) sends its own stage's tensors in 40 kB buckets over its own group with the server; after every sync the
server's ``/weights_checker`` checksums equal those of the tensors sent (``rollout.verify_sync``) and its log-probs
of the sampled tokens equal the trainer's π_old (fp32: max |Δ| ≤ 1e-3 every step). Needs the SGLang CPU venv
(conftest: skipped without it on a dev machine, a failure under CI)."""

import time

import pytest

from tests.dist_harness import run_ranks
from tests.rollout.test_sglang_train import SMALL

pytestmark = [pytest.mark.sglang, pytest.mark.dist, pytest.mark.megatron]


def _train(rank, world, run_dir, python):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(SMALL + [
        "trainer.steps=3", "algorithm=grpo", f"logging.run_dir={run_dir}", "rollout=sglang",
        f"rollout.server_python={python}", "rollout.server_dtype=float32", "rollout.prompts_per_step=4",
        "rollout.n_samples=4", "rollout.max_new_tokens=7", "rollout.timeout_s=120", "parallel.pp=2",
        "rollout.weight_sync=distributed", "rollout.sync_bucket_mb=0.04", "rollout.verify_sync=true",
        "rollout.update_timeout_s=120"])
    t0 = time.monotonic()
    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    keys = ("rollout/logp_diff_abs_mean", "rollout/logp_diff_abs_max", "rollout/weight_version_lag",
            "rollout/invalid_responses", "weight_version", "sync/stages", "sync/buckets", "sync/update_s")
    return [{k: m.get(k) for k in keys} for m in history], time.monotonic() - t0


def test_pp2_distributed_sync_to_a_real_server(sglang_python, tmp_path):
    t0 = time.monotonic()
    (hist, fit_s), _ = run_ranks(_train, 2, str(tmp_path / "run"), sglang_python, timeout=900)
    print(f"\n[sglang-dist] trainer {fit_s:.1f} s, test {time.monotonic() - t0:.1f} s; "
          f"sync/update_s {[round(m['sync/update_s'], 2) for m in hist]}; "
          f"logp diff max {max(m['rollout/logp_diff_abs_max'] for m in hist):.2e}", flush=True)
    assert len(hist) == 3
    for m in hist:
        assert m["rollout/logp_diff_abs_max"] <= 1e-3 and m["rollout/logp_diff_abs_mean"] <= 1e-4, m
        assert m["rollout/weight_version_lag"] == 0 and m["rollout/invalid_responses"] == 0, m
        assert m["sync/stages"] == 2 and m["sync/buckets"] >= 4, m
    assert [m["weight_version"] for m in hist] == [2.0, 3.0, 4.0]
