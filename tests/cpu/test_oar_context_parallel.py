"""OAR-G and OAR-P shaping under context parallelism (cp = 2 on 2 gloo ranks) against the cp = 1 actor.

The core attention is swapped, in the test only, for the exact CP-correct attention of
``test_actor_context_parallel`` (TE's ring attention does not run on CPU); the rest is the project's code: the
scoring rows and OAR-P's perturbed copies split zigzag with per-chunk positions, P_final from the answer positions
each CP rank holds (summed over CP), OAR-G's input-embedding gradient on each rank's own chunks, the per-token
scores gathered back with ``gather_zigzag``. Compared with cp = 1 (megatron's local attention, same weights): the
shared clean pass's π_old log-probs, OAR-G token advantages (answer_mean, with the shared clean reference), and
OAR-G / OAR-P scores in every P_final mode (own clean forward); the cp = 2 run also pads every row to a forced FP8
token multiple of 3 (each rank's share of a row then a multiple of 3).
"""

import pytest
import torch

from tests.cpu.test_actor_context_parallel import _swap_attention
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

N = 4
MODES = ("last", "answer_mean", "answer_joint")


def _data(vocab):
    from oar_megatron.algorithms.segment import build_scoring_batch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 5, 5, 4)]
    responses = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (9, 6, 14, 7)]
    answers = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (2, 1, 3, 2)]
    reasoning = [r[: len(r) - 3] for r in responses]  # at cp = 2 (width 24) row 2's answer span 18..20 has its
    # predicting positions 17 | 18, 19 on CP ranks 1 | 0: P_final is a sum over both
    scoring = build_scoring_batch(prompts, reasoning, [7, 8], answers, pad_id=0)
    return prompts, responses, scoring


def _run(cp: int):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor
    from oar_megatron.policy.padding import set_fp8_multiple

    model = model_preset("tiny")
    groups = init_parallel(ParallelConfig(distributed_optimizer=False, cp=cp), model, seed=7)
    try:
        alg = load_algorithm("oar_g")
        alg.shaper.noise_std = 0.05  # a KL gradient well above float noise
        actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=1e-3), algorithm=alg,
                            groups=groups, micro_batch_size=2)
        if cp > 1:
            set_fp8_multiple(actor.models, 3)
        prompts, responses, scoring = _data(model.vocab_size)
        batch = actor.pack(prompts, responses, torch.tensor([1.0, -0.5, 0.75, -1.25]), scoring=scoring)
        out = {"width": batch.input_ids.shape[1]}
        out["old"] = actor.compute_old_logprobs(batch)  # the shared clean pass (π_old + clean P_final)
        assert actor._clean is not None
        out["adv"] = actor.compute_token_advantages(batch)  # OAR-G, answer_mean, shared clean reference
        for mode in MODES:
            actor.algorithm.shaper.pfinal_mode = mode
            for method in ("oar_g", "oar_p"):
                sal = actor.saliency(batch, method)
                out[f"{method}/{mode}"] = (sal.scores.cpu(), sal.mask.cpu())
        return out
    finally:
        destroy_parallel()


def _cp1(rank, world_size):
    return _run(1)


def _cp2(rank, world_size):
    _swap_attention()
    return _run(2)


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_cp1, 1)[0], run_ranks(_cp2, 2)


def test_oar_under_context_parallel_equals_cp1(runs):
    ref, per_rank = runs
    assert ref["width"] % 6 and all(r["width"] % 12 == 0 for r in per_rank)  # cp 2: padded to 2·cp × 3
    assert float(ref["oar_g/answer_mean"][0].max()) > 1e-6 and float(ref["oar_p/last"][0].max()) > 1e-6
    width = ref["width"]
    for res in per_rank:  # both CP ranks hold the full rows' results
        torch.testing.assert_close(res["old"][:, :width], ref["old"], atol=2e-5, rtol=0)
        assert not res["old"][:, width:].any()
        torch.testing.assert_close(res["adv"][:, :width], ref["adv"], atol=1e-5, rtol=1e-4)
        assert not res["adv"][:, width:].any()
        for key in (f"{m}/{mode}" for mode in MODES for m in ("oar_g", "oar_p")):
            scores, mask = res[key]
            torch.testing.assert_close(mask, ref[key][1], msg=key)
            # OAR-P's KL is a difference of fp32 log-probs of size ~5 (ulp 4.8e-7): a few ulps absolute
            atol = 1e-4 * float(ref[key][0].abs().max()) + (1e-6 if key.startswith("oar_p") else 1e-8)
            torch.testing.assert_close(scores, ref[key][0], atol=atol, rtol=1e-4, msg=key)
