"""policy.pipeline on real gloo ranks: megatron's pipeline schedules at PP=2 reproduce the PP=1 passes.

One 2-rank spawn (megatron's import costs ~6 s per spawn), ``tiny`` preset (fp32, tied embeddings, CPU init):

(a) PP=1 (DP=2) reference: ``response_logprobs`` (+ entropy), ``oar_g_sharded`` and ``oar_p_sharded``; the
    pipeline functions at PP=1 (megatron's no-pipelining schedule) give the same numbers.
(b) PP=2 with the reference weights loaded: ``pipeline_logprobs`` over 2 micro-batches, ``pipeline_oar_g`` (every
    P_final mode; micro-batches of 2 rows, the last one padded) and ``pipeline_oar_p`` equal the PP=1 values on
    both stages (broadcast), and without broadcast they land on the last stage only.
(c) the same with virtual PP (2 stages x 2 chunks, interleaved schedule).
(d) tiny-moe (untied, one MoE layer per stage): PP=2 log-probs and OAR-G == PP=1.
(e) the saliency passes leave parameter ``.grad`` None and ``requires_grad`` True on every stage.
(f) ``PolicyActor`` with OAR-G / OAR-P shaping at PP=1 and PP=2: ``compute_old_logprobs`` +
    ``compute_token_advantages`` through the shared clean pass (``pipeline_clean_pass``) equal the separate passes
    (``share_clean_pass=False``), with one forward-only schedule fewer at PP=2 (``pipeline.SCHEDULE_RUNS``).
"""

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.megatron_helpers import load_renamed, stage_renamer

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

B, L = 4, 12
TEMP = 0.8
NOISE = 0.05
MODES = ("last", "answer_mean", "answer_joint")


def _rollout(vocab):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    prompt, total = torch.tensor([3, 5, 2, 4]), torch.tensor([12, 9, 7, 11])
    col = torch.arange(L)[None, :]
    mask = (col >= prompt[:, None]) & (col < total[:, None])
    ids = torch.where(col < total[:, None], ids, 0)
    return ids, torch.arange(L).expand(B, L), mask


def _scoring_batch(vocab):
    from oar_megatron.algorithms.segment import build_scoring_batch

    g = torch.Generator().manual_seed(9)
    tok = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    # Row 2 has no answer tokens (scores 0 in the answer modes); 3 rows in micro-batches of 2: the last is padded.
    prompts, reasonings, answers = [tok(3), tok(2), tok(4)], [tok(5), tok(6), tok(4)], [tok(4), tok(5), []]
    return build_scoring_batch(prompts, reasonings, tok(2), answers, pad_id=0)


def _grad_state(chunks):
    return all(p.grad is None and p.requires_grad for c in chunks for p in c.parameters())


def _passes(gpt, groups, ids, pos, mask, batch):
    """The pipeline functions on ``gpt`` (a chunk or a list): log-probs, OAR-G per mode, OAR-P per mode."""
    from oar_megatron.policy.pipeline import pipeline_logprobs, pipeline_oar_g, pipeline_oar_p

    res = {}
    mbs = [(ids[:2], pos[:2], mask[:2]), (ids[2:], pos[2:], mask[2:])]
    chunks = gpt if isinstance(gpt, list) else [gpt]
    lp = pipeline_logprobs(chunks, mbs, groups=groups, temperature=TEMP, compute_entropy=True, seq_length=L,
                           micro_batch_size=2)
    res["logp"] = torch.cat([p for p, _ in lp])
    res["ent"] = torch.cat([e for _, e in lp])
    for m in MODES:
        res[f"g_{m}"] = pipeline_oar_g(gpt, batch, groups=groups, mode=m, noise_std=NOISE, seed=3,
                                       micro_batch_size=2).scores
        res[f"p_{m}"] = pipeline_oar_p(gpt, batch, groups=groups, mode=m, chunk_size=4).scores
    res["grads_untouched"] = _grad_state(chunks)
    return res


def _two_ranks(rank, world_size):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel
    from oar_megatron.policy.forward import response_logprobs
    from oar_megatron.policy.pipeline import pipeline_logprobs, pipeline_oar_g, pipeline_oar_p
    from oar_megatron.policy.saliency_pass import clean_pass, oar_g_sharded, oar_p_sharded

    tiny = model_preset("tiny")
    ids, pos, mask = _rollout(tiny.vocab_size)
    batch = _scoring_batch(tiny.vocab_size)
    out = {}

    # PP=1 reference (every rank holds the whole model).
    groups = init_parallel(ParallelConfig(), tiny, seed=11)
    ref = build_model(tiny, groups)
    ref.eval()
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        logp, ent = response_logprobs(ref, ids, pos, mask, temperature=TEMP, compute_entropy=True)
    r = {"logp": logp, "ent": ent}
    for m in MODES:
        r[f"g_{m}"] = oar_g_sharded(ref, batch, mode=m, noise_std=NOISE, seed=3, chunk_size=2).scores
        r[f"p_{m}"] = oar_p_sharded(ref, batch, mode=m, chunk_size=4).scores
    out["ref"] = r
    clean = clean_pass(ref, batch, modes=("last",)).reference["last"]  # P_final at PP=1, reused below at PP=2
    out["pp1"] = _passes(ref, groups, ids, pos, mask, batch)
    destroy_parallel()

    # PP=2 with the reference weights.
    groups = init_parallel(ParallelConfig(pp=2), tiny, seed=11)
    gpt = build_model(tiny, groups)
    gpt.eval()
    load_renamed(gpt, params, stage_renamer(groups.pp_rank * tiny.num_layers // 2, tied_output=True))
    out["pp2"] = _passes(gpt, groups, ids, pos, mask, batch)
    # Without broadcast: results only on the last stage.
    lp = pipeline_logprobs(gpt, [(ids[:2], pos[:2], mask[:2])], groups=groups, temperature=TEMP, seq_length=L,
                           micro_batch_size=2, broadcast=False)
    g = pipeline_oar_g(gpt, batch, groups=groups, mode="last", noise_std=NOISE, seed=3, micro_batch_size=2,
                       broadcast=False)
    p = pipeline_oar_p(gpt, batch, groups=groups, mode="last", chunk_size=4, broadcast=False)
    # A precomputed clean P_final skips the extra forward-only schedule (read on the last stage only).
    out["with_ref"] = dict(
        g=pipeline_oar_g(gpt, batch, groups=groups, mode="last", noise_std=NOISE, seed=3, micro_batch_size=2,
                         reference=clean).scores,
        p=pipeline_oar_p(gpt, batch, groups=groups, mode="last", chunk_size=4, reference=clean).scores)
    errors = []
    for call in (
        lambda: pipeline_logprobs(gpt, [(ids, pos, mask)], groups=groups, seq_length=L, micro_batch_size=2),
        lambda: pipeline_logprobs(gpt, [(ids[:2], pos[:2], mask[:2])], groups=groups, seq_length=L - 1,
                                  micro_batch_size=2),
        lambda: pipeline_logprobs(gpt, [], groups=groups, seq_length=L, micro_batch_size=2),
    ):
        try:
            call()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc).split(":")[0])
    out["errors"] = errors
    out["no_bcast"] = dict(
        logp=None if lp is None else lp[0][0], g=None if g is None else g.scores, p=None if p is None else p.scores)
    destroy_parallel()

    # Virtual PP: pp=2 x 2 chunks of one layer (chunk v of stage p holds reference layer 2v + p); the interleaved
    # schedule needs the micro-batch count padded to a multiple of PP (the clean OAR-P pass has a single one).
    groups = init_parallel(ParallelConfig(pp=2, virtual_pp=2), tiny, seed=11)
    chunks = build_model(tiny, groups)
    with torch.no_grad():
        for v, chunk in enumerate(chunks):
            chunk.eval()
            load_renamed(chunk, params, stage_renamer(2 * v + groups.pp_rank, tied_output=True))
    out["vpp"] = _passes(chunks, groups, ids, pos, mask, batch)
    # All rows in one micro-batch: the interleaved schedule runs it with a dummy one and divides J by 2.
    out["vpp_one_mb"] = pipeline_oar_g(chunks, batch, groups=groups, mode="last", noise_std=NOISE, seed=3).scores
    destroy_parallel()

    # MoE (tiny-moe: one MoE layer per stage at PP=2, eval mode so no aux losses): log-probs and OAR-G.
    moe_cfg = model_preset("tiny-moe")
    moe = {}
    for pp in (1, 2):
        groups = init_parallel(ParallelConfig(pp=pp), moe_cfg, seed=11)
        gpt = build_model(moe_cfg, groups)
        gpt.eval()
        if pp == 1:
            moe_params = {n: p.detach().clone() for n, p in gpt.named_parameters()}
        else:
            load_renamed(gpt, moe_params, stage_renamer(groups.pp_rank))  # untied: output_layer as named
        lp = pipeline_logprobs(gpt, [(ids, pos, mask)], groups=groups, seq_length=L, micro_batch_size=B)
        g = pipeline_oar_g(gpt, batch, groups=groups, mode="answer_mean", noise_std=NOISE, seed=3)
        moe[pp] = dict(logp=lp[0][0], g=g.scores)
        destroy_parallel()
    out["moe"] = moe
    out["actor"] = _actor_sharing(tiny)
    return out


def _actor_sharing(model):
    """(f): {(pp, method, share): (old_logp, token_advantages, forward_only schedules, forward_backward ones,
    saliency scores)}."""
    from oar_megatron.config import ParallelConfig
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor
    from oar_megatron.policy.pipeline import SCHEDULE_RUNS

    ids, _, mask = _rollout(model.vocab_size)
    prompt_len = mask.int().argmax(1).tolist()
    total = mask.sum(1).tolist()
    prompts = [ids[b, : prompt_len[b]].tolist() for b in range(B)]
    responses = [ids[b, prompt_len[b]: prompt_len[b] + total[b]].tolist() for b in range(B)]
    g = torch.Generator().manual_seed(4)
    answers = [torch.randint(1, model.vocab_size, (2,), generator=g).tolist() for _ in range(B)]
    from oar_megatron.algorithms.segment import build_scoring_batch

    scoring = build_scoring_batch(prompts, [r[:4] for r in responses], [7, 8], answers, pad_id=0)
    out = {}
    for pp in (1, 2):
        for method in ("oar_g", "oar_p"):
            for share in (True, False):
                groups = init_parallel(ParallelConfig(pp=pp, distributed_optimizer=False), model, seed=11)
                actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=1e-3), groups=groups,
                                    algorithm=load_algorithm(method), micro_batch_size=2, share_clean_pass=share)
                batch = actor.pack(prompts, responses, torch.tensor([1.0, -1.0, 0.5, -0.5]), scoring=scoring)
                seen = {}
                saliency = actor.saliency
                actor.saliency = lambda b, m=None, f=saliency: seen.setdefault("s", f(b, m))  # noqa: B023
                before = dict(SCHEDULE_RUNS)
                actor.compute_old_logprobs(batch)
                actor.compute_token_advantages(batch)
                runs = {k: SCHEDULE_RUNS[k] - before.get(k, 0) for k in ("forward_only", "forward_backward")}
                out[(pp, method, share)] = (batch.old_logp, batch.token_advantages, runs["forward_only"],
                                            runs["forward_backward"], seen["s"].scores)
                destroy_parallel()
    return out


def test_pipeline_matches_single_stage():
    results = run_ranks(_two_ranks, 2)
    for rank, res in enumerate(results):
        ref = res["ref"]
        assert ref["logp"].abs().sum() > 0
        for layout in ("pp1", "pp2", "vpp"):
            got = res[layout]
            assert got["grads_untouched"], (rank, layout)
            for key, want in ref.items():
                torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-5, msg=f"rank {rank} {layout} {key}")
        for m in MODES:
            assert ref[f"g_{m}"].abs().sum() > 0 and ref[f"p_{m}"].abs().sum() > 0, m
    for res in results:
        for key in ("logp", "g"):
            assert res["moe"][1][key].abs().sum() > 0
            torch.testing.assert_close(res["moe"][2][key], res["moe"][1][key], rtol=1e-4, atol=1e-5)
    for res in results:
        torch.testing.assert_close(res["vpp_one_mb"], res["ref"]["g_last"], rtol=1e-4, atol=1e-5)
    for res in results:
        assert res["errors"] == ["micro_batches[0]", "micro_batches[0]", "micro_batches"], res["errors"]
        torch.testing.assert_close(res["with_ref"]["g"], res["ref"]["g_last"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["with_ref"]["p"], res["ref"]["p_last"], rtol=1e-4, atol=1e-5)
    _check_actor_sharing(results)
    ref = results[1]["ref"]
    first, last = results[0]["no_bcast"], results[1]["no_bcast"]
    assert first == dict(logp=None, g=None, p=None)
    torch.testing.assert_close(last["logp"], ref["logp"][:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last["g"], ref["g_last"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last["p"], ref["p_last"], rtol=1e-4, atol=1e-5)


def _check_actor_sharing(results):
    for rank, res in enumerate(results):
        got = res["actor"]
        for pp in (1, 2):
            last = pp == 1 or rank == 1
            for method in ("oar_g", "oar_p"):
                shared, separate = got[(pp, method, True)], got[(pp, method, False)]
                key = f"rank {rank} pp{pp} {method}"
                if pp == 2:  # one forward-only schedule fewer: π_old + clean P_final in one; OAR-G's noisy
                    # fwd-bwd schedule unchanged. (OAR-P: π_old, clean, counterfactuals -> shared, counterfactuals.)
                    assert shared[2] == separate[2] - 1 == (1 if method == "oar_g" else 2), (key, shared, separate)
                    assert shared[3] == separate[3] == (1 if method == "oar_g" else 0), key
                else:  # PP=1: saliency_pass runs outside megatron's schedules; its clean forward is the one saved
                    assert shared[2:4] == separate[2:4] == (1, 0), key
                if last:
                    assert separate[0].abs().sum() > 0, key
                    torch.testing.assert_close(shared[0], separate[0], rtol=1e-5, atol=1e-5, msg=key)
                else:
                    assert shared[0] is None and separate[0] is None, key
                assert separate[1].abs().sum() > 0 and separate[4].abs().sum() > 0, key
                if method == "oar_g":
                    torch.testing.assert_close(shared[4], separate[4], rtol=1e-3, atol=1e-7, msg=key)
                    torch.testing.assert_close(shared[1], separate[1], rtol=1e-4, atol=1e-5, msg=key)
                else:  # OAR-P scores: KLs of nearly equal P_final (~1e-4); fp32 leaves ~1e-6 absolute (as
                    # consistency.TOLERANCES), which the min-max reshaping of tiny scores magnifies in the advantages
                    torch.testing.assert_close(shared[4], separate[4], rtol=0, atol=5e-6, msg=key)
