"""The update protocol around every weight sync, against fake workers that hold requests in flight: ``/pause_generation``
→ (``/begin_weight_update`` ≥ 0.5.21, distributed only) → the update with ``flush_cache: false`` → (``/end_weight_update``)
→ ``/flush_cache`` retried while requests drain → ``/continue_generation``, on every worker, each call with a timeout;
a refused flush that never drains and a failed update are one-line errors naming the server, the servers are
never left paused, and generation is refused until a later sync succeeds."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.sglang import RolloutError, SGLangEngine, needs_for_version
from tests.rollout.test_sglang_sync import _actor, _model
from tests.sglang_fake import FakeSGLang

PROTOCOL = ["/pause_generation", "/update_weights_from_disk", "/flush_cache", "/continue_generation"]


def _update_calls(fake: FakeSGLang) -> list[str]:
    keep = {"/pause_generation", "/begin_weight_update", "/update_weights_from_disk", "/end_weight_update",
            "/flush_cache", "/continue_generation"}
    return [c for c in fake.calls if c in keep]


def _engine(workers, tmp_path, cfg, **kw) -> SGLangEngine:
    kw = {"backoff_s": 0.01, "update_timeout_s": 30.0, **kw}
    return SGLangEngine([w.url for w in workers], vocab_size=cfg.vocab_size, sync_dir=tmp_path / "sync", model=cfg,
                        arch="qwen3", **kw)


def _post_generate(url: str, out: list, max_new: int = 30) -> threading.Thread:
    def run():
        r = httpx.post(url + "/generate", json={"input_ids": [1, 2, 3], "return_logprob": True,
                                                "sampling_params": {"max_new_tokens": max_new, "temperature": 1.0}},
                       timeout=60)
        out.append(r.json())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_protocol_order_and_flush_retried(tmp_path):
    cfg = _model()
    actor, _ = _actor(cfg, seed=1)
    workers = [FakeSGLang(vocab_size=cfg.vocab_size, seed=i) for i in range(2)]
    for w in workers:
        w.start()
    try:
        workers[1].flush_refusals = 3  # requests still draining: refused three times, then accepted
        eng = _engine(workers, tmp_path, cfg, flush_interval_s=0.05)
        eng.sync_weights(actor)
        assert _update_calls(workers[0]) == PROTOCOL
        assert _update_calls(workers[1]) == PROTOCOL[:2] + ["/flush_cache"] * 4 + PROTOCOL[3:]
        for w in workers:
            assert w.updates[-1]["flush_cache"] is False and not w.paused and w.weight_version == "1"
        # the disk update needs no session, on either side of 0.5.21
        assert needs_for_version("0.5.20").weight_update_session is False
        assert needs_for_version("0.5.23").distributed_fields == ("names", "dtypes", "shapes", "group_name",
                                                                   "flush_cache", "weight_version", "load_format")
        assert needs_for_version("0.5.20").init_group_fields == needs_for_version("0.5.23").init_group_fields == (
            "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")

        # a flush that never drains: one line naming the worker, the workers continued, generation refused
        workers[0].flush_refusals = 10**6
        eng.flush_timeout_s = 0.3
        t0 = time.perf_counter()
        with pytest.raises(RolloutError) as err:
            eng.sync_weights(actor)
        msg = str(err.value)
        assert workers[0].url in msg and "/flush_cache still refused" in msg and "\n" not in msg
        assert time.perf_counter() - t0 < 10
        assert not workers[0].paused and not workers[1].paused
        assert _update_calls(workers[0])[-1] == "/continue_generation"
        with pytest.raises(RolloutError, match="last weight sync failed"):
            eng.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        workers[0].flush_refusals = 0
        eng.sync_weights(actor)  # healed
        assert eng.broken is None and eng.weight_version == 2

        # a refused update: the failing worker named, nobody left paused
        workers[1].update_fault = "fail"
        with pytest.raises(RolloutError) as err:
            eng.sync_weights(actor)
        assert workers[1].url in str(err.value) and "/update_weights_from_disk" in str(err.value)
        assert not any(w.paused for w in workers) and eng.broken is not None
    finally:
        for w in workers:
            w.stop()


def test_sync_while_requests_in_flight(tmp_path):
    """abort (default): the requests in flight end with finish abort, the client retries them (counted) after the
    continue; retract: parked, they go on after the update, their later tokens under the new version; in_place:
    the flush is refused while they are parked, so the sync fails after flush_timeout_s naming the server, and the
    parked request still completes (the worker was continued)."""
    cfg = _model()
    actor, _ = _actor(cfg, seed=2)
    fake = FakeSGLang(vocab_size=cfg.vocab_size, delay_per_token_s=0.03)
    fake.start()
    try:
        # abort, through the engine: a rollout in flight while the trainer syncs
        eng = _engine([fake], tmp_path, cfg)
        got: list = []
        params = SamplingParams(max_new_tokens=20, n=2, temperature=1.0)
        gen = threading.Thread(target=lambda: got.append(eng.generate([[1, 2, 3], [4, 5]], params)), daemon=True)
        gen.start()
        _wait(lambda: fake.active >= 4)
        eng.sync_weights(actor)  # pauses (aborting the 4 requests), updates, flushes once they drained, continues
        gen.join(60)
        assert not gen.is_alive() and len(got[0]) == 4
        assert eng.last_stats["rollout/invalid_abort"] >= 4 and eng.last_stats["rollout/retries"] >= 4
        assert _update_calls(fake)[-4:] == PROTOCOL and fake.weight_version == "1"

        # retract: parked requests resume after the update; weight_versions spans show both versions
        out: list = []
        eng2 = _engine([fake], tmp_path / "b", cfg, pause_mode="retract")
        eng2.weight_version = 1
        t = _post_generate(fake.url, out, max_new=30)
        _wait(lambda: fake.active >= 1 and len(fake.requests) >= 1)
        time.sleep(0.1)
        eng2.sync_weights(actor)
        t.join(30)
        spans = out[0]["meta_info"]["weight_versions"]
        assert [s["version"] for s in spans] == ["1", "2"] and spans[-1]["end"] == 30
        assert out[0]["meta_info"]["finish_reason"]["type"] == "length"

        # in_place: the flush never drains → one line naming the worker; the worker continued, the request finishes
        eng3 = _engine([fake], tmp_path / "c", cfg, pause_mode="in_place", flush_timeout_s=0.5,
                       flush_interval_s=0.05)
        eng3.weight_version = 2
        out = []
        # 200 tokens at 0.03 s each: still running when the pause comes, however long the export before it takes
        # (30 tokens finished first on a loaded CI machine, and the flush then drained)
        t = _post_generate(fake.url, out, max_new=200)
        _wait(lambda: fake.active >= 1)
        time.sleep(0.1)
        with pytest.raises(RolloutError) as err:
            eng3.sync_weights(actor)
        assert fake.url in str(err.value) and "still refused" in str(err.value) and "\n" not in str(err.value)
        t.join(30)
        assert not fake.paused and out[0]["meta_info"]["finish_reason"]["type"] == "length"
    finally:
        fake.stop()
