"""Routed experts with every ``/generate`` (MoE routing replay from the rollout, R3) against the protocol-exact fake:
the request asks for them, the answer's base64 int32 ``[prompt + response − 1, layers, top_k]`` lands in
``Sample.routed_experts`` exactly as the server chose them, and wrong routes (missing, one token short, an expert id
out of range, an expert twice) are retried and counted like every other invalid answer. No megatron."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.sglang import InvalidResponse, RolloutError, RouteSpec, SGLangEngine, decode_routes
from tests.sglang_fake import FakeSGLang, _table_routes

SPEC = RouteSpec(num_layers=3, topk=2, num_experts=5)
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=(2,), n=2)
PROMPTS = [[1, 3, 13, 4], [5, 6, 7]]


def _engine(fake, **kw):
    return SGLangEngine([fake.url], vocab_size=24, routed_experts=SPEC, backoff_s=0.0, backoff_max_s=0.0, **kw)


def test_routes_requested_decoded_and_carried():
    with FakeSGLang(vocab_size=24, routed_experts=(3, 2, 5), seed=3) as fake:
        samples = _engine(fake).generate(PROMPTS, PARAMS)
        assert all(r.get("return_routed_experts") is True for r in fake.requests)
        plain = SGLangEngine([fake.url], vocab_size=24).generate(PROMPTS, PARAMS)  # not asked: no routes
        assert "return_routed_experts" not in fake.requests[-1] and all(s.routed_experts is None for s in plain)
    assert len(samples) == 4
    for s in samples:
        seq = s.prompt_ids + s.response_ids
        routes = s.routed_experts
        assert routes.dtype == torch.int16 and tuple(routes.shape) == (len(seq) - 1, 3, 2)
        # exactly the server's routes for every position it ran a forward on (all but the last sampled token)
        assert torch.equal(routes.int(), _table_routes(seq[:-1], 3, 2, 5, 3))


@pytest.mark.parametrize("fault,reason", [("routes_short", "routes_shape"), ("routes_oov", "routes_value"),
                                          ("routes_missing", "routes_missing")])
def test_invalid_routes_are_retried_and_counted(fault, reason):
    with FakeSGLang(vocab_size=24, routed_experts=(3, 2, 5)) as fake:
        fake.faults = [fault]
        eng = _engine(fake)
        samples = eng.generate(PROMPTS, PARAMS)
    assert len(samples) == 4 and all(s.routed_experts is not None for s in samples)
    assert eng.last_stats[f"rollout/invalid_{reason}"] == 1 and eng.last_stats["rollout/retries"] == 1
    assert eng.last_stats["rollout/invalid_groups"] == 0


def test_server_without_the_flag_is_refused_up_front():
    with FakeSGLang(vocab_size=24) as fake:  # no --enable-return-routed-experts
        with pytest.raises(RolloutError, match="--enable-return-routed-experts"):
            _engine(fake).check_servers()
        eng = _engine(fake, max_retries=1)
        with pytest.raises(RolloutError, match="routes_missing"):  # and, unchecked, every answer is rejected
            eng.generate(PROMPTS, PARAMS)


def _b64(a):
    return base64.b64encode(np.asarray(a, dtype="<i4").tobytes()).decode()


def test_decode_routes_checks():
    good = np.array([[[0, 1], [2, 4], [3, 0]], [[1, 2], [0, 3], [4, 1]]])
    assert torch.equal(decode_routes(_b64(good), rows=2, spec=SPEC).int(), torch.from_numpy(good).int())
    cases = [(None, 2, "routes_missing"), ([[0, 1]], 2, "routes_shape"), ("%%%", 2, "routes_shape"),
             (_b64(good), 3, "routes_shape"), (_b64(np.where(good == 4, -1, good)), 2, "routes_value"),
             (_b64(np.where(good == 4, 5, good)), 2, "routes_value"),
             (_b64(np.where(good == 1, 0, good)), 2, "routes_value")]  # token 0 layer 0: expert 0 twice
    for value, rows, reason in cases:
        with pytest.raises(InvalidResponse) as err:
            decode_routes(value, rows=rows, spec=SPEC)
        assert err.value.reason == reason, (value, rows, str(err.value))
    with pytest.raises(ValueError):
        RouteSpec(2, 3, 2)  # top-3 of 2 experts


def test_config_key_is_checked():
    """``rollout.return_routed_experts``: MoE + sglang only, one line otherwise; read into a RouteSpec."""
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import _route_spec

    base = ["rollout=sglang", "rollout.server_urls=[http://127.0.0.1:1]", "rollout.return_routed_experts=true"]
    cfg = compose_config(base + ["model=tiny-moe", "data.path=synthetic", "reward=synthetic"])
    cfg.validate(1)
    assert _route_spec(cfg) == RouteSpec(num_layers=2, topk=2, num_experts=4)
    for extra, match in ([[], "dense"], [["model=tiny-moe", "trainer.routing_replay=false"], "routing_replay"]):
        with pytest.raises(ValueError, match=match):
            compose_config(base + extra).validate(1)
    with pytest.raises(ValueError, match="only rollout.engine=sglang"):
        compose_config(["model=tiny-moe", "rollout.return_routed_experts=true"]).validate(1)


def test_experience_carries_routes():
    import torch as t

    from oar_megatron.trainer.experience import Experience, Group

    def group(routes):
        return Group([1, 2], [[3], [4, 5]], [[-0.1], [-0.2, -0.3]], ["stop", "length"], [1.0, 0.0], [True, False], 0,
                     "a", routes=routes)

    r = [t.zeros(1, 2, 2, dtype=t.int16), t.ones(2, 2, 2, dtype=t.int16)]
    exp = Experience([group(r), group(r[::-1])], t.zeros(4))
    assert [x.shape[0] for x in exp.routed_experts] == [1, 2, 2, 1]
    assert Experience([group(r), group(None)], t.zeros(4)).routed_experts is None  # all or nothing
