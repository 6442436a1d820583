"""FP8 token padding on the real CPU megatron paths (no Transformer Engine here: the padding is what is tested).

The per-rank token multiple FP8 needs (16/32, ``ModelConfig.fp8_pad_multiple``) is forced to 24 on an fp32 tiny
model (``policy.padding.set_fp8_multiple``) and one rollout batch goes through every pass of ``PolicyActor`` —
``pack`` and its micro-batches, the KL reference pass, the shared clean pass (π_old + OAR reference), OAR-G rows,
OAR-P perturbed copies, two optimizer updates — and the local engine's prefill and decode steps. A forward pre-hook
on the transformer block (where every Transformer Engine GEMM lives) records the tokens of each call. Checks:
(a) every call carries a multiple of 24 tokens (the unpadded run does not: the check can fail);
(b) log-probs, reference log-probs, OAR-G / OAR-P saliency, token advantages, update metrics, the updated weights
and the sampled tokens equal the unpadded run's (multiple 1), the padded positions holding zeros.
"""

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.megatron_helpers import random_rollout

pytestmark = [pytest.mark.dist, pytest.mark.megatron]
N, PROMPT, RESP, MULTIPLE = 4, 4, 8, 24


def _run(rank, world_size, multiple, token_adv=None):
    """One rollout batch through every pass at PP = ``world_size`` (1: PP = 1 plus the local engine)."""
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor
    from oar_megatron.policy.generate import generate
    from oar_megatron.policy.padding import set_fp8_multiple
    from oar_megatron.rollout.base import SamplingParams

    model = model_preset("tiny", num_layers=2)
    prompts, responses, adv, scoring = random_rollout(model.vocab_size, N, PROMPT, RESP)
    groups = init_parallel(ParallelConfig(pp=world_size, distributed_optimizer=False), model, seed=5)
    alg = load_algorithm("oar_g", updates_per_batch=2, kl={"coef": 0.05})
    actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=3e-3, weight_decay=0.0),
                        algorithm=alg, groups=groups, micro_batch_size=2)
    set_fp8_multiple(actor.models, multiple)
    tokens: dict[str, list[int]] = {}
    phase = ["pack"]

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # [S, b, H]
        if hidden is None:  # a later pipeline stage: the block reads the received activations instead
            hidden = module.input_tensor
        if not torch.is_tensor(hidden):  # inference passes megatron's WrappedTensor: peek without unwrapping
            hidden = hidden._wrapper[0]
        tokens.setdefault(phase[0], []).append(hidden.shape[0] * hidden.shape[1])

    actor.models[0].decoder.register_forward_pre_hook(record, with_kwargs=True)
    out = {}
    if multiple is not None:  # a batch built by hand at the unpadded width is refused, not silently run
        from oar_megatron.policy.actor import RolloutBatch

        ids = torch.tensor([p + r for p, r in zip(prompts, responses)])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, PROMPT:] = True
        try:
            actor.micro_batches(RolloutBatch(ids, mask, adv))
        except ValueError as exc:
            out["refused"] = str(exc)
    batch = actor.pack(prompts, responses, adv, scoring=scoring)
    out["width"] = batch.input_ids.shape[1]
    out["mask"] = batch.response_mask.clone()
    phase[0] = "reference"
    last = groups.is_last_stage  # log-probs live on the last pipeline stage
    out["ref_logp"] = actor.compute_ref_logprobs(batch)
    phase[0] = "clean pass (pi_old + OAR reference)"
    out["old_logp"] = actor.compute_old_logprobs(batch)
    phase[0] = "OAR-G"
    out["token_adv"] = actor.compute_token_advantages(batch).clone()  # saliency reaches every PP rank
    out["oar_g"] = actor.saliency(batch, "oar_g").scores.clone()
    phase[0] = "OAR-P copies"
    out["oar_p"] = actor.saliency(batch, "oar_p").scores.clone()
    phase[0] = "update"
    if token_adv is not None:  # the unpadded run's advantages, so the update compares the padding alone (see test)
        batch.token_advantages = torch.nn.functional.pad(token_adv, (0, out["width"] - token_adv.shape[1]))
    out["metrics"] = actor.update(batch)
    out["params"] = {n: p.detach().clone() for n, p in actor.models[0].named_parameters()}
    phase[0] = "pi_old after the update"
    out["new_logp"] = actor.compute_old_logprobs(batch)
    out["last"] = last
    if world_size == 1:  # the local engine needs PP = 1
        phase[0] = "decode"
        samples = generate(actor.chunks[0], prompts, SamplingParams(n=3, max_new_tokens=5, temperature=1.0),
                           vocab_size=model.vocab_size, generator=torch.Generator().manual_seed(0))
        out["samples"] = [(s.response_ids, s.logprobs) for s in samples]
    out["tokens"] = tokens
    destroy_parallel()
    return out


PASSES = {"reference", "clean pass (pi_old + OAR reference)", "OAR-G", "OAR-P copies", "update",
          "pi_old after the update"}


def _check_tokens(plain, fp8, passes):
    """(a) every pass ran, and every call into the transformer block carried a multiple of 24 tokens."""
    assert set(fp8["tokens"]) == passes
    for phase, counts in fp8["tokens"].items():
        assert counts and all(c % MULTIPLE == 0 for c in counts), (phase, counts)
    assert any(c % MULTIPLE for counts in plain["tokens"].values() for c in counts)  # unpadded: not multiples
    assert sum(len(c) for c in fp8["tokens"].values()) == sum(len(c) for c in plain["tokens"].values())
    assert fp8["refused"].startswith("batch: width 12 is not a multiple of 24")


def _check_values(plain, fp8):
    """(b) the padding is masked out of everything: same values on the real positions, zeros on the padding."""
    w = plain["width"]
    assert (w, fp8["width"]) == (PROMPT + RESP, MULTIPLE)
    assert torch.equal(fp8["mask"][:, :w], plain["mask"]) and not fp8["mask"][:, w:].any()
    if fp8["last"]:
        for key in ("ref_logp", "old_logp", "new_logp"):
            torch.testing.assert_close(fp8[key][:, :w], plain[key], atol=2e-6, rtol=1e-5)
            assert not fp8[key][:, w:].any(), key
    # Padding changes the GEMM shapes, hence fp32 summation order: ~1e-5 of the largest score. OAR-G scores are
    # gradients of ~1e-7 whose smallest entries are ~1e-9, and the OAR weights normalise by a score quantile, which
    # turns that noise into ~5e-4 on the token advantages (measured); the update below is therefore fed the unpadded
    # run's advantages, so it compares the padding alone, tightly.
    torch.testing.assert_close(fp8["oar_g"], plain["oar_g"], atol=1e-4 * float(plain["oar_g"].abs().max()), rtol=0)
    # OAR-P scores are differences of O(1) log-probs / KLs: a few fp32 ulps there (measured 4.8e-7 = 1 ulp at 4..8)
    torch.testing.assert_close(fp8["oar_p"], plain["oar_p"], atol=2e-6, rtol=0)
    torch.testing.assert_close(fp8["token_adv"][:, :w], plain["token_adv"], atol=2e-3, rtol=0)
    assert not fp8["token_adv"][:, w:].any()
    assert fp8["metrics"].keys() == plain["metrics"].keys()
    for key, values in plain["metrics"].items():
        assert fp8["metrics"][key] == pytest.approx(values, rel=1e-5, abs=5e-7), key  # losses are O(1e-2) sums
    # Adam's first steps are ~lr·g/(|g| + eps): where |g| is near eps (1e-8) fp32 noise moves a weight by up to
    # ~1e-2·lr (measured 2.8e-5 on 15 of 16384 embedding entries); the log-probs after the update (new_logp, above)
    # show the weights act the same.
    for name, p in plain["params"].items():
        torch.testing.assert_close(fp8["params"][name], p, atol=1e-4, rtol=0)


def test_every_gemm_token_count_is_padded_and_nothing_changes():
    (plain,) = run_ranks(_run, 1, None)
    (fp8,) = run_ranks(_run, 1, MULTIPLE, plain["token_adv"])
    _check_tokens(plain, fp8, PASSES | {"decode"})
    _check_values(plain, fp8)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(fp8["samples"], plain["samples"]):
        assert ids_a == ids_b
        assert lp_a == pytest.approx(lp_b, rel=1e-5)


def test_pipeline_parallel_passes_are_padded():
    """PP = 2: the clean pass, OAR-G / OAR-P and the updates through megatron's schedules (policy/pipeline.py),
    each stage's transformer block checked."""
    plain = run_ranks(_run, 2, None)
    fp8 = run_ranks(_run, 2, MULTIPLE, plain[1]["token_adv"])
    for p, f in zip(plain, fp8):
        _check_tokens(p, f, PASSES)
        _check_values(p, f)
    assert [f["last"] for f in fp8] == [False, True]
