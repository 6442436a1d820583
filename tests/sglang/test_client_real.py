"""The client against a real SGLang 0.5.23 CPU server: version read from ``/server_info``, weight sync from disk
(``/update_weights_from_disk`` with ``weight_version``), then sampling with temperature, top-k, top-p and stop tokens
whose log-probs equal ``transformers``' fp32 log softmax(logits / T) of the synced weights (the engine convention:
before top-k / top-p), the stop token kept, every response carrying the pushed version; and the distributed sync
over a gloo group while requests are in flight. Every sync is verified with the server's ``/weights_checker``
(``verify_sync``), and a server holding other weights fails verification.

The server is started by ``oar_megatron.rollout.servers.SGLangServers`` (the project's one launcher). Needs the SGLang
CPU venv (conftest: skipped without it on a dev machine, a failure under CI)."""

from __future__ import annotations

import time

import pytest
import torch

from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.servers import SGLangServers
from oar_megatron.rollout.sglang import RolloutError, SGLangEngine
from oar_megatron.rollout.weight_sync import SyncDir, hf_config_for
from tests.rollout.test_sglang_sync import _actor, _model
from tests.sglang_fake import HFModel

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def server(sglang_python, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang")
    cfg = _model()
    _, hf = _actor(cfg, seed=0)
    start, _ = SyncDir(tmp / "start").write(0, hf, hf_config_for(cfg, "qwen3"))
    with SGLangServers(start, 1, python=sglang_python, dtype="float32", skip_tokenizer_init=True,
                       run_dir=tmp / "logs", startup_timeout=300, stop_grace=3,
                       env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ""}) as s:  # the server's own environment
        yield s.urls[0], tmp, cfg


def test_sync_from_disk_then_logprobs_equal_transformers(server):
    url, tmp, cfg = server
    eng = SGLangEngine([url], vocab_size=cfg.vocab_size, sync_dir=tmp / "sync", model=cfg, arch="qwen3",
                       timeout_s=120, verify_sync=True)  # /weights_checker: the server's checksums = the sent ones
    assert eng.read_server_version() == "0.5.23"
    for version, seed in ((1, 3), (2, 4)):
        actor, _ = _actor(cfg, seed=seed)
        eng.sync_weights(actor)
        assert eng.weight_version == version
        params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=8, stop_token_ids=(2, 5, 7), n=4)
        samples = eng.generate([[1, 3, 13, 4, 14], [1, 5, 13, 6, 14]], params)
        assert len(samples) == 8 and eng.last_stats["rollout/invalid_responses"] == 0  # version "N" validated
        ref = HFModel(tmp / "sync" / f"v{version}")
        worst = 0.0
        for s in samples:
            assert s.weight_version == version
            if s.finish_reason == "stop":
                assert s.response_ids[-1] in (2, 5, 7)
            seq = list(s.prompt_ids)
            for tok, lp in zip(s.response_ids, s.logprobs, strict=True):
                want = float(torch.log_softmax(ref.logits(seq) / 0.8, -1)[tok])
                worst = max(worst, abs(want - lp))
                seq.append(tok)
        assert worst <= 1e-4, worst
    assert SyncDir(tmp / "sync").versions() == [1, 2]


def test_distributed_sync_over_gloo_with_requests_in_flight(server):
    """``weight_sync: distributed`` to a real server over a gloo group (the ``backend`` field of
    ``/init_weights_update_group``), small buckets, while a rollout is in flight (paused with abort: the aborted
    requests are retried after the continue); the server's log-probs then equal ``transformers`` on the pushed
    weights."""
    import threading

    url, tmp, cfg = server
    actor, hf = _actor(cfg, seed=5)
    eng = SGLangEngine([url], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", timeout_s=120,
                       weight_sync="distributed", sync_backend="gloo", sync_bucket_mb=0.05, update_timeout_s=120,
                       verify_sync=True)
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=48, n=4)
    got: list = []
    gen = threading.Thread(target=lambda: got.append(eng.generate([[1, 3, 13, 4, 14]] * 16, params)), daemon=True)
    gen.start()
    time.sleep(0.3)
    eng.sync_weights(actor)
    gen.join(120)
    assert not gen.is_alive() and len(got) == 1
    stats = {k: v for k, v in eng.last_stats.items() if k.startswith("rollout/")}
    assert stats["rollout/invalid_abort"] >= 1 and stats["rollout/invalid_groups"] == 0, stats  # aborted, retried
    assert eng.weight_version == 1 and eng.last_sync_stats["sync/buckets"] > 1
    ref_dir, _ = SyncDir(tmp / "ref").write(1, hf, hf_config_for(cfg, "qwen3"))
    ref = HFModel(ref_dir)
    params = SamplingParams(temperature=0.8, max_new_tokens=8, n=4)
    samples = eng.generate([[1, 3, 13, 4, 14]], params)
    assert len(samples) == 4 and eng.last_stats["rollout/invalid_responses"] == 0  # version "1" validated
    worst = 0.0
    for s in samples:
        seq = list(s.prompt_ids)
        for tok, lp in zip(s.response_ids, s.logprobs, strict=True):
            worst = max(worst, abs(float(torch.log_softmax(ref.logits(seq) / 0.8, -1)[tok]) - lp))
            seq.append(tok)
    assert worst <= 1e-4, worst
    eng.close()


def test_verification_catches_a_server_that_differs(server):
    """``rollout.verify_sync`` against the real ``/weights_checker``: the trainer's checksums (computed from the HF
    tensors it sends, in SGLang's fused / padded layout) equal the server's after a sync (the tests above), and a
    server holding other weights than those sent is one line naming it and the tensor."""
    from oar_megatron.rollout.weight_sync import SGLangChecksums, verify_checksums

    url, tmp, cfg = server
    _, hf = _actor(cfg, seed=9)  # weights the server was never sent
    eng = SGLangEngine([url], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", timeout_s=120)
    sums = SGLangChecksums("float32")
    for name, t in hf.items():
        sums.add(name, t)
    with pytest.raises(RolloutError, match=rf"^sglang: {url} verification failed: tensor '[^']+' has checksum"):
        verify_checksums(eng, sums.result())
