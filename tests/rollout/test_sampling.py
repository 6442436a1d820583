"""SamplingParams validation, the RolloutEngine contract and the sampler's filtering rules (pure torch, no megatron)."""

import math

import pytest
import torch

from oar_megatron.policy.generate import sample_tokens
from oar_megatron.rollout import LocalEngine, RolloutEngine, Sample, SamplingParams


def test_defaults_validate():
    p = SamplingParams()
    assert p.validate() is p
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.stop_token_ids, p.n, p.seed) == \
        (1.0, 1.0, -1, 256, (), 1, None)
    SamplingParams(temperature=0, top_k=0, top_p=0.5, stop_token_ids=(2, 3), n=8, seed=0).validate()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(n=0), "n"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=[2]), "stop_token_ids"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_token_ids=("a",)), "stop_token_ids"),
])
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=rf"^sampling\.{field}: ") as e:
        SamplingParams(**kwargs).validate()
    assert "\n" not in str(e.value)


def test_params_are_frozen_and_samples_plain():
    with pytest.raises(AttributeError):
        SamplingParams().n = 2  # type: ignore[misc]
    s = Sample(prompt_index=0, prompt_ids=[1], response_ids=[2, 3], logprobs=[-0.1, -0.2], finish_reason="stop")
    assert s.response_ids == [2, 3]


def test_engine_interface_is_abstract():
    with pytest.raises(TypeError):
        RolloutEngine()  # type: ignore[abstract]
    assert issubclass(LocalEngine, RolloutEngine)


def test_local_engine_arguments_and_state_without_megatron():
    model = torch.nn.Linear(2, 2)
    e = LocalEngine(model, vocab_size=10, seed=3)
    assert e.state_dict() == {"calls": 0, "weight_version": 0, "seed": 3}
    e.sync_weights()
    e.load_state_dict({"calls": 5, "weight_version": 7})
    assert (e.calls, e.weight_version) == (5, 7)
    with pytest.raises(ValueError, match="^state.seed: "):
        e.load_state_dict({"calls": 1, "weight_version": 1, "seed": 4})
    with pytest.raises(ValueError, match="^state: missing key 'calls'"):
        e.load_state_dict({"weight_version": 1})
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=1"):
        LocalEngine([model, model], vocab_size=10)
    with pytest.raises(ValueError, match="^seed: "):
        LocalEngine(model, vocab_size=10, seed=-1)
    e.close()
    with pytest.raises(RuntimeError, match="after close"):
        e.generate([[1]], SamplingParams())


# --------------------------------------------------------------------------------------------------- sampler


def _logits(b=4, v=12, pad=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v + pad, generator=g)
    x[:, v:] = 1e4  # padded columns that would win every draw if they were not cut off
    return x


def test_padded_columns_are_never_drawn_nor_in_the_softmax():
    x = _logits()
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=3.0)):
        tok, lp = sample_tokens(x, params, vocab_size=12, generator=torch.Generator().manual_seed(1))
        assert int(tok.max()) < 12
        t = params.temperature or 1.0
        ref = torch.log_softmax(x[:, :12] / t, -1).gather(-1, tok[:, None]).squeeze(-1)
        torch.testing.assert_close(lp, ref)


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax():
    x = _logits(b=16)
    best = x[:, :12].argmax(-1)
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
                   SamplingParams(temperature=0.5, top_k=1, top_p=0.3)):
        tok, _ = sample_tokens(x, params, vocab_size=12, generator=torch.Generator().manual_seed(2))
        assert torch.equal(tok, best), params


def test_filters_shape_the_draw_but_not_the_reported_logprob():
    x = _logits(b=1, v=6, pad=0).expand(4000, 6).contiguous()
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True)
    g = torch.Generator().manual_seed(3)
    tok, lp = sample_tokens(x, SamplingParams(top_k=3), vocab_size=6, generator=g)
    assert set(tok.tolist()) == set(order[:3].tolist())
    torch.testing.assert_close(lp, torch.log(probs)[tok])  # unrenormalised
    # nucleus: the smallest prefix reaching top_p (here exactly the two most likely tokens)
    top_p = float(probs[order[:2]].sum()) - 1e-4
    tok, _ = sample_tokens(x, SamplingParams(top_p=top_p), vocab_size=6, generator=g)
    assert set(tok.tolist()) == set(order[:2].tolist())
    # frequencies follow the renormalised filtered distribution
    tok, _ = sample_tokens(x, SamplingParams(top_k=3), vocab_size=6, generator=g)
    kept = probs[order[:3]] / probs[order[:3]].sum()
    freq = torch.stack([(tok == i).float().mean() for i in order[:3]])
    assert torch.allclose(freq, kept, atol=0.03)


def test_same_generator_seed_same_draws():
    x = _logits(b=64)
    draw = lambda s: sample_tokens(x, SamplingParams(temperature=2.0), vocab_size=12,  # noqa: E731
                                   generator=torch.Generator().manual_seed(s))[0]
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


class _Devices(torch.overrides.TorchFunctionMode):
    """Records the device of every tensor a torch function or tensor method returns."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((getattr(func, "__name__", str(func)), t.device.type))
        return out


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.7),
                                    SamplingParams(temperature=1.3, top_k=5, top_p=0.8)], ids=["greedy", "T", "filt"])
def test_sampling_stays_on_the_logits_device(params):
    """No host copy of the [B, V] logits: with fake CUDA logits every op of the draw runs on CUDA and the tokens and
    log-probs come back there (before, the logits went to the CPU at every decode step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = torch.randn(4, 40, device="cuda", dtype=torch.bfloat16)  # [B, V_pad]
        with _Devices() as seen:
            tok, lp = sample_tokens(logits, params, vocab_size=33)
    assert (tok.device.type, tok.dtype, tuple(tok.shape)) == ("cuda", torch.long, (4,))
    assert (lp.device.type, lp.dtype, tuple(lp.shape)) == ("cuda", torch.float32, (4,))
    assert seen.outputs and [op for op, dev in seen.outputs if dev != "cuda"] == []


def test_a_generator_on_another_device_than_the_logits_is_refused():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = torch.randn(2, 8, device="cuda")
        with pytest.raises(ValueError, match=r"^generator: on cpu, the logits are on cuda"):
            sample_tokens(logits, SamplingParams(), vocab_size=8, generator=torch.Generator())


class _HostCalls(torch.overrides.TorchFunctionMode):
    """Counts the tensor calls that move data to the host (or sync on it)."""

    NAMES = ("tolist", "item", "__bool__", "cpu", "to", "nonzero", "numpy")

    def __init__(self):
        super().__init__()
        self.calls = {n: 0 for n in self.NAMES}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.calls:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def test_decode_loop_copies_to_the_host_once_per_batch():
    """The decode loop keeps tokens and log-probs on the device: per step only the boolean "every row finished"
    reaches the host, then one copy per batch (before: the [B, V] logits and the draws went to the host each step)."""
    from oar_megatron.policy.generate import _decode

    class Ctx:
        sequence_len_offset = 0

        def enable_decode_mode(self):
            pass

    v, steps = 11, 9
    weights = torch.Generator().manual_seed(0)

    def model(ids, pos, mask, inference_context=None, runtime_gather_output=None):  # [B, 1, V] random logits
        return torch.randn(ids.shape[0], 1, v, generator=weights)

    params = SamplingParams(temperature=1.0, max_new_tokens=steps, stop_token_ids=(3,))
    with _HostCalls() as seen:
        out = _decode(model, Ctx(), torch.ones(8, 2, dtype=torch.long), params, v, torch.Generator().manual_seed(1),
                      None, 0, 6)  # rows 6, 7: FP8 padding rows, decoded alongside, never returned
    assert len(out) == 6
    assert seen.calls["__bool__"] <= steps - 1  # done.all() once per step except the last
    assert seen.calls["tolist"] == 4 and sum(seen.calls.values()) == seen.calls["__bool__"] + 4
    for resp, lps, reason in out:
        assert len(resp) == len(lps) and all(lp <= 0 for lp in lps)
        assert (reason == "stop") == (3 in resp) and (reason == "stop" or len(resp) == steps)
        assert 3 not in resp[:-1]  # a row ends at its first stop token
