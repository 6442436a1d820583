"""The SGLang client against the protocol-exact fake server (tests/sglang_fake.py): request shape, the engine's
log-prob convention, every fault retried / rejected / counted, failover, no sample lost, the loud failure below the
minimum, the API key, the concurrency bound, streaming of finished groups, and the version table. No megatron."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.sglang import (SGLANG_VERSIONS, InvalidResponse, RolloutError, SGLangEngine, check_response,
                                         needs_for_version, parse_version)
from tests.sglang_fake import FakeSGLang, TableModel

V = 24
PROMPTS = [[1, 3, 13, 4, 14], [1, 5, 13, 6, 14], [1, 7, 13, 3, 14]]
PARAMS = SamplingParams(temperature=0.7, top_k=8, max_new_tokens=6, stop_token_ids=(2,), n=3)


@pytest.fixture
def servers():
    fakes = [FakeSGLang(TableModel(V, seed=5), seed=i) for i in range(2)]
    for f in fakes:
        f.start()
    yield fakes
    for f in fakes:
        f.stop()


def _engine(urls, **kw):
    kw = {"vocab_size": V, "backoff_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 5.0, **kw}
    return SGLangEngine(urls, **kw)


def _check_samples(samples, prompts=PROMPTS, params=PARAMS, table=None):
    assert len(samples) == len(prompts) * params.n
    for k, s in enumerate(samples):
        assert s.prompt_index == k // params.n and s.prompt_ids == prompts[k // params.n]
        if s.finish_reason == "stop":
            assert s.response_ids[-1] in params.stop_token_ids  # the stop token is kept, as the local engine does
            assert not any(t in params.stop_token_ids for t in s.response_ids[:-1])
        else:
            assert s.finish_reason == "length" and len(s.response_ids) == params.max_new_tokens
        if table is not None:  # log softmax(logits / T) of the drawn token, before top-k
            seq = list(s.prompt_ids)
            for tok, lp in zip(s.response_ids, s.logprobs, strict=True):
                want = torch.log_softmax(table.logits(seq) / params.temperature, -1)[tok]
                assert abs(lp - float(want)) < 1e-12
                seq.append(tok)


def test_request_shape_and_logprob_convention(servers):
    eng = _engine([f.url for f in servers])
    samples = eng.generate(PROMPTS, PARAMS)
    _check_samples(samples, table=servers[0].model)
    assert eng.last_stats["rollout/invalid_responses"] == 0 and eng.last_stats["samples"] == 9
    assert {s.weight_version for s in samples} == {0}
    req = servers[0].requests[0]
    assert req["return_logprob"] is True and req["logprob_start_len"] == -1 and req["input_ids"] in PROMPTS
    sp = req["sampling_params"]
    assert sp == {"temperature": 0.7, "top_p": 1.0, "top_k": 8, "max_new_tokens": 6, "n": 1, "stop_token_ids": [2],
                  "no_stop_trim": True, "skip_special_tokens": False}
    # one request per sample, balanced over both servers
    assert len(servers[0].requests) + len(servers[1].requests) == 9
    assert min(len(servers[0].requests), len(servers[1].requests)) >= 3


FAULTS = [("http_500", "http_500"), ("json", "json"), ("short_logprobs", "logprob_len"), ("oov", "vocab"),
          ("nan", "logprob_value"), ("wrong_version", "weight_version"), ("abort", "abort"), ("empty", "empty"),
          ("die", "transport"), (("delay", 1.5), "timeout")]


@pytest.mark.parametrize("fault,reason", FAULTS, ids=[str(f[1]) for f in FAULTS])
def test_each_fault_is_retried_and_counted(fault, reason):
    with FakeSGLang(TableModel(V, seed=5), weight_version="3") as fake:
        eng = _engine([fake.url], timeout_s=0.5, max_concurrency=1)
        eng.weight_version, eng.pushed = 3, True  # as after the third sync
        fake.faults = [fault, fault]
        samples = eng.generate(PROMPTS[:2], PARAMS)
        _check_samples(samples, PROMPTS[:2], table=fake.model)  # nothing lost, every sample valid
        st = eng.last_stats
        assert st[f"rollout/invalid_{reason}"] == 2 and st["rollout/invalid_responses"] == 2, st
        assert st["rollout/retries"] == 2 and st["rollout/invalid_groups"] == 0
        assert len(fake.requests) == 6 + 2


def test_check_response_rules():
    ok = {"output_ids": [5, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2}, "weight_version": "1",
                                              "output_token_logprobs": [[-0.5, 5, None], [-0.1, 2, None]]}}
    c = check_response(ok, vocab_size=V, max_new_tokens=4, weight_version="1")
    assert c.response_ids == [5, 2] and c.logprobs == [-0.5, -0.1] and c.finish_reason == "stop"
    trimmed = {**ok, "output_ids": [5]}  # a server that trimmed the matched stop token: restored
    assert check_response(trimmed, vocab_size=V, max_new_tokens=4, weight_version="1").response_ids == [5, 2]
    spans = {**ok, "meta_info": {**ok["meta_info"], "weight_versions": [{"version": "0", "start": 0, "end": 1},
                                                                        {"version": "1", "start": 1, "end": 2}]}}
    for bad, reason in ((spans, "weight_version"), ({**ok, "meta_info": {**ok["meta_info"], "finish_reason": None}},
                                                    "finish"),
                        ({"output_ids": [5]}, "shape"), ([ok, ok], "shape")):
        with pytest.raises(InvalidResponse) as err:
            check_response(bad, vocab_size=V, max_new_tokens=4, weight_version="1")
        assert err.value.reason == reason
    length = {"output_ids": [5, 6], "meta_info": {"finish_reason": {"type": "length", "length": 4},
                                                  "output_token_logprobs": [[-0.5, 5, None], [-0.1, 6, None]]}}
    with pytest.raises(InvalidResponse, match="length"):  # 'length' before max_new_tokens
        check_response(length, vocab_size=V, max_new_tokens=4, weight_version=None)
    with pytest.raises(InvalidResponse, match="more than max_new_tokens"):
        check_response(length, vocab_size=V, max_new_tokens=1, weight_version=None)


def test_failover_when_a_server_is_down(servers):
    servers[0].stop()
    eng = _engine([f.url for f in servers])
    samples = eng.generate(PROMPTS, PARAMS)
    _check_samples(samples)
    assert eng.last_stats["rollout/invalid_connect"] >= 1 and eng.last_stats["rollout/invalid_groups"] == 0
    assert len(servers[1].requests) == 9  # every sample came from the live server
    assert eng.last_stats["rollout/failovers"] >= 1


def test_server_killed_mid_rollout_loses_no_sample(servers):
    servers[0].delay_per_token_s = servers[1].delay_per_token_s = 0.02
    eng = _engine([f.url for f in servers], max_concurrency=4)
    killer = threading.Timer(0.1, servers[0].kill)
    killer.start()
    prompts = PROMPTS * 2
    samples = eng.generate(prompts, PARAMS)
    killer.join()
    _check_samples(samples, prompts)
    st = eng.last_stats
    assert st["rollout/invalid_groups"] == 0 and st["rollout/invalid_responses"] >= 1, st


def test_loud_failure_below_minimum_and_partial_groups():
    with FakeSGLang(TableModel(V, seed=5)) as fake:
        fake.faults = ["http_500"] * 100
        eng = _engine([fake.url], max_retries=2, max_concurrency=1)
        with pytest.raises(RolloutError) as err:
            eng.generate(PROMPTS, PARAMS)
        msg = str(err.value)
        assert "\n" not in msg and fake.url in msg and "http_500" in msg and "0 of 3 groups" in msg
        # one group's first sample fails for good; the other groups are kept whole (min_valid_frac 0.5)
        fake.faults = ["http_500"]
        eng = _engine([fake.url], max_retries=0, max_concurrency=1, min_valid_frac=0.5)
        samples = eng.generate(PROMPTS, PARAMS)
        assert [s.prompt_index for s in samples] == [1, 1, 1, 2, 2, 2]
        assert eng.last_stats["rollout/invalid_groups"] == 1 and eng.last_stats["samples"] == 6


def test_api_key():
    with FakeSGLang(TableModel(V), api_key="s3cret") as fake:
        with pytest.raises(RolloutError) as err:
            _engine([fake.url]).generate(PROMPTS[:1], PARAMS)
        assert "401" in str(err.value) and fake.url in str(err.value) and "\n" not in str(err.value)
        eng = _engine([fake.url], api_key="s3cret")
        _check_samples(eng.generate(PROMPTS[:1], PARAMS), PROMPTS[:1])
        assert sum(h.get("authorization") == "Bearer s3cret" for h in fake.headers) == 3
        eng.health()  # /health needs no key on sglang, but the client sends it anyway


def test_concurrency_bound(servers):
    for f in servers:
        f.delay_per_token_s = 0.01
    eng = _engine([f.url for f in servers], max_concurrency=3)
    eng.generate(PROMPTS * 2, PARAMS)
    assert eng.last_pool_stats["peak_in_flight"] == 3
    assert max(f.peak_in_flight for f in servers) <= 3
    eng = _engine([servers[0].url], max_concurrency=2)  # what one server sees at most
    servers[0].peak_in_flight = 0
    eng.generate(PROMPTS * 2, PARAMS)
    assert servers[0].peak_in_flight == 2


def test_generate_groups_streams_finished_groups(servers):
    eng = _engine([f.url for f in servers], max_concurrency=8)
    servers[0].faults = [("delay", 2.0)]  # the first request each server receives is slow
    servers[1].faults = [("delay", 2.0)]
    t0 = time.perf_counter()
    seen, times = [], []
    for i, samples in eng.generate_groups(PROMPTS, PARAMS):
        seen.append(i)
        times.append(time.perf_counter() - t0)
        assert len(samples) == PARAMS.n and all(s.prompt_index == i for s in samples)
    # the first request each server receives is slow; which groups they belong to depends on the dispatch order, but
    # at most two of the three groups wait for one: a finished group arrives while a slow one still generates
    assert sorted(seen) == [0, 1, 2]
    assert times[0] < 1.5 and times[-1] >= 2.0


def test_versions_table(servers):
    assert parse_version("0.5.23") == (0, 5, 23) and parse_version("v0.5.21.post1") == (0, 5, 21)
    assert needs_for_version("0.5.20").weight_update_session is False
    assert needs_for_version("0.5.21").weight_update_session is True
    assert needs_for_version("0.5.23").weight_update_session is True
    assert needs_for_version("0.5.23").disk_update_fields == ("model_path", "load_format", "weight_version",
                                                              "flush_cache")
    assert [v for v, _ in SGLANG_VERSIONS] == sorted(v for v, _ in SGLANG_VERSIONS)
    with pytest.raises(ValueError, match="older than 0.5.20"):
        needs_for_version("0.4.9")
    with pytest.raises(ValueError, match="cannot read"):
        parse_version("dev")
    eng = _engine([f.url for f in servers])
    assert eng.read_server_version() == "0.5.23"
    calls = sum(f.calls.count("/server_info") for f in servers)
    eng.read_server_version()  # read once
    assert sum(f.calls.count("/server_info") for f in servers) == calls == 2
    servers[1].version = "0.5.22"
    with pytest.raises(RolloutError, match="different versions"):
        _engine([f.url for f in servers]).read_server_version()


def test_model_info_and_health(servers):
    eng = _engine([f.url for f in servers])
    eng.health()
    assert eng.model_info()["is_generation"] is True
    servers[1].stop()
    with pytest.raises(RolloutError, match=servers[1].url.replace(".", r"\.")):
        eng.health(timeout_s=1.0)


def test_check_servers(servers, tmp_path):
    eng = _engine([f.url for f in servers])
    assert eng.check_servers().startswith("sglang 0.5.23: 2 worker(s)")
    (tmp_path / "config.json").write_text('{"vocab_size": 32}')  # a worker serving another vocabulary
    servers[1].model_path = str(tmp_path)
    with pytest.raises(RolloutError) as err:
        _engine([f.url for f in servers]).check_servers()
    assert servers[1].url in str(err.value) and "vocab_size 32" in str(err.value)


def test_seeded_sampling_reproduces_samples_in_any_order():
    """rollout.seeded_sampling: each sample's sampling_seed depends on (engine seed, call, prompt, sample) only, so
    two engines with the same seed get the same samples however the requests are ordered, delayed or spread over
    servers; another call or seed gives other seeds."""
    prompts = [[1, 3, 4], [1, 5], [2, 6, 7, 8]]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=3)
    model = TableModel(24, seed=3)  # one model; the servers' own request-counter streams differ (seed)
    with FakeSGLang(vocab_size=24, model=model, seed=1) as a, FakeSGLang(vocab_size=24, model=model, seed=2) as b:
        a.faults = [("delay", 0.3)]  # the first request arrives last: another completion order
        one = SGLangEngine([a.url, b.url], vocab_size=24, seed=7, seeded=True).generate(prompts, params)
        two = SGLangEngine([b.url], vocab_size=24, seed=7, seeded=True).generate(prompts, params)
        assert [s.response_ids for s in one] == [s.response_ids for s in two]
        assert [s.logprobs for s in one] == [s.logprobs for s in two]
        eng = SGLangEngine([a.url], vocab_size=24, seed=7, seeded=True)
        seeds = {r["sampling_params"]["sampling_seed"] for r in a.requests + b.requests}
        assert len(seeds) == 9  # 3 prompts x 3 samples, the same 9 in both calls
        assert eng.sample_seed(1, 0, 0) != eng.sample_seed(2, 0, 0) != eng.sample_seed(1, 0, 1)
        assert SGLangEngine([a.url], vocab_size=24, seed=8).sample_seed(1, 0, 0) != eng.sample_seed(1, 0, 0)
        unseeded = SGLangEngine([a.url], vocab_size=24, seed=7)
        unseeded.generate(prompts[:1], SamplingParams(max_new_tokens=2, n=1))
        assert "sampling_seed" not in a.requests[-1]["sampling_params"]
