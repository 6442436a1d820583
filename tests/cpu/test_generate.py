"""policy.generate / rollout.LocalEngine on real tiny megatron-core GPTModels (CPU, gloo, fp32, KV cache).

Two spawns (megatron's import costs ~6 s each):

* one rank: greedy = argmax of a cache-free full forward recomputed token by token (mixed prompt lengths, n > 1);
  sampled log-probs (T = 0.7, top-k, top-p) = log_softmax(full logits[:vocab] / T) on the final sequences, and
  = ``forward.response_logprobs`` (which masks the padded vocabulary columns too); stop tokens, max_new_tokens;
  top_k=1 and tiny top_p equal greedy; tokens stay below vocab_size; seeds, resume through state_dict, DDP-wrapped
  chunk, training flag restored; tiny-moe with routing replay attached (off: generates; an open pass: refused).
* two ranks: TP=2 gives the same samples on both ranks and the same as TP=1 (DP=2) with the same weights and seed;
  log-probs agree with the TP=2 full-logits recompute; PP=2 is refused with the clear error.
"""

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SEED = 1
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13], [3], [20, 21]]  # lengths 5, 2, 5, 1, 2: three buckets
TEMP = 0.7


def _preset(name="tiny"):
    from oar_megatron.config import model_preset

    # untied output layer: a random-init tied model greedily repeats its input token, a weak test of the cache
    return model_preset(name, untie_embeddings_and_output_weights=True)


def _flat(samples):
    return [(s.prompt_index, s.prompt_ids, s.response_ids, s.finish_reason) for s in samples], \
        [lp for s in samples for lp in s.logprobs]


def _full_logits(gpt, seq):
    """Cache-free logits [L, V_pad] of one sequence (all positions, vocabulary gathered)."""
    ids = torch.tensor([seq])
    pos = torch.arange(len(seq))[None]
    return gpt(ids, pos, None, runtime_gather_output=True)[0]


def _recompute_err(gpt, samples, vocab, temperature):
    """max |logprob - log_softmax(full logits[:vocab] / T)| over every response token (T = 0: greedy, T = 1)."""
    err = 0.0
    with torch.no_grad():
        for s in samples:
            seq = s.prompt_ids + s.response_ids
            logits = _full_logits(gpt, seq)[len(s.prompt_ids) - 1:-1, :vocab]  # rows predicting the response
            logp = torch.log_softmax(logits / (temperature or 1.0), -1)
            ref = logp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
            err = max(err, float((ref - torch.tensor(s.logprobs)).abs().max()))
    return err


def _greedy_reference(gpt, prompts, steps, vocab):
    """Greedy continuation of each prompt by repeated full forwards (no cache)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(steps):
                seq.append(int(_full_logits(gpt, seq)[-1, :vocab].argmax()))
            out.append(seq[len(p):])
    return out


def _response_logprobs_err(gpt, samples, temperature):
    """max |logprob - forward.response_logprobs| with right-padded batches (the trainer's path)."""
    from oar_megatron.policy.forward import response_logprobs

    length = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    for b, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        ids[b, :p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        mask[b, p:p + r] = True
    pos = torch.arange(length).expand(len(samples), length)
    with torch.no_grad():
        logp, _ = response_logprobs(gpt, ids, pos, mask, temperature=temperature)
    got = torch.zeros_like(logp)
    for b, s in enumerate(samples):
        p = len(s.prompt_ids)
        got[b, p:p + len(s.logprobs)] = torch.tensor(s.logprobs)
    return float((logp - got).abs().max())


# ------------------------------------------------------------------------------------------------ one rank


def _single(rank, world_size):
    from oar_megatron.config import ParallelConfig
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel
    from oar_megatron.policy.generate import generate
    from oar_megatron.policy.optim import wrap_ddp
    from oar_megatron.policy.routing_replay import RoutingReplay
    from oar_megatron.rollout import LocalEngine, SamplingParams

    out = {}
    model_cfg = _preset()
    vocab = model_cfg.vocab_size  # 250 < V_pad 256
    groups = init_parallel(ParallelConfig(), model_cfg, seed=SEED)
    gpt = build_model(model_cfg, groups)
    out["v_pad"] = gpt.vocab_size
    gen = lambda params, **kw: generate(gpt, PROMPTS, params, vocab_size=kw.pop("vocab", vocab),  # noqa: E731
                                        generator=torch.Generator().manual_seed(kw.pop("seed", 0)), **kw)

    # greedy = cache-free argmax, token by token; log-probs = T=1 log-softmax; prompt-major layout with n = 2
    gpt.train()
    greedy = gen(SamplingParams(temperature=0.0, max_new_tokens=6, n=2), max_batch_size=3)
    out["training_restored"] = gpt.training
    gpt.eval()
    ref = _greedy_reference(gpt, PROMPTS, 6, vocab)
    out["greedy"] = [s.response_ids for s in greedy]
    out["greedy_ref"] = [r for r in ref for _ in range(2)]
    out["greedy_layout"] = [(s.prompt_index, s.prompt_ids, s.finish_reason) for s in greedy]
    out["greedy_err"] = _recompute_err(gpt, greedy, vocab, 0.0)

    # sampled, T = 0.7 with top-k / top-p: reported log-probs are the unfiltered tempered ones
    params = SamplingParams(temperature=TEMP, top_k=40, top_p=0.9, max_new_tokens=8, n=3)
    sampled = gen(params, seed=7)
    out["sampled_err"] = _recompute_err(gpt, sampled, vocab, TEMP)
    out["sampled_lengths"] = [len(s.response_ids) for s in sampled]
    out["sampled_distinct"] = len({tuple(s.response_ids) for s in sampled})
    # the trainer's path (padded vocabulary columns masked there too) recomputes the same numbers
    out["trainer_err"] = _response_logprobs_err(gpt, sampled, TEMP)

    # stop token: the third greedy token of prompt 0; every row cut right after its first occurrence
    stop = greedy[0].response_ids[2]
    stopped = gen(SamplingParams(temperature=0.0, max_new_tokens=6, n=2, stop_token_ids=(stop, 9999)))
    out["stop"] = stop
    out["stopped"] = [(s.response_ids, s.logprobs, s.finish_reason) for s in stopped]
    out["greedy_full"] = [(s.response_ids, s.logprobs) for s in greedy]

    # top_k = 1 and a tiny top_p draw the argmax (T = 1: also the same log-probs)
    out["top_k1"] = _flat(gen(SamplingParams(top_k=1, max_new_tokens=6, n=2), seed=3))
    out["top_p_tiny"] = _flat(gen(SamplingParams(top_p=1e-6, max_new_tokens=6, n=2), seed=4))

    # hot sampling with a vocab_size well below V_pad: never a token >= vocab_size
    hot = gen(SamplingParams(temperature=5.0, max_new_tokens=24, n=4), vocab=150, seed=5)
    out["hot_tokens"] = [t for s in hot for t in s.response_ids]

    # engine: seeds, call counter, resume, weight version, stats, DDP-wrapped chunk
    p = SamplingParams(temperature=1.0, max_new_tokens=6, n=2)
    a, b = LocalEngine(gpt, vocab_size=vocab, seed=0), LocalEngine([gpt], vocab_size=vocab, seed=0)
    c = LocalEngine(wrap_ddp([gpt])[0], vocab_size=vocab, seed=1)
    a1, a2, b1, c1 = a.generate(PROMPTS, p), a.generate(PROMPTS, p), b.generate(PROMPTS, p), c.generate(PROMPTS, p)
    resumed = LocalEngine(gpt, vocab_size=vocab, seed=0)
    resumed.load_state_dict({"calls": 1, "weight_version": 0, "seed": 0})
    fixed = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=11)
    out["engine"] = dict(
        same_seed=_flat(a1) == _flat(b1), next_call_differs=_flat(a1)[0] != _flat(a2)[0],
        other_seed_differs=_flat(a1)[0] != _flat(c1)[0], resumed=_flat(resumed.generate(PROMPTS, p)) == _flat(a2),
        fixed_seed=_flat(a.generate(PROMPTS, fixed)) == _flat(c.generate(PROMPTS, fixed)),
        state=a.state_dict(), stats=dict(a.last_stats))
    a.sync_weights()
    a.sync_weights(None)
    out["engine"]["version"] = a.weight_version
    try:
        LocalEngine([gpt, gpt], vocab_size=vocab)
    except ValueError as e:
        out["two_chunks_error"] = str(e)

    # throughput: 64 prompts x 8 new tokens, batch 64
    prompts64 = torch.randint(1, vocab, (64, 16), generator=torch.Generator().manual_seed(0)).tolist()
    a.generate(prompts64, SamplingParams(max_new_tokens=8))
    out["throughput"] = dict(a.last_stats)
    destroy_parallel()

    # MoE: routing replay attached and off -> generates, records nothing; an open pass -> refused
    moe_cfg = _preset("tiny-moe")
    groups = init_parallel(ParallelConfig(), moe_cfg, seed=SEED)
    moe = build_model(moe_cfg, groups)
    replay = RoutingReplay(moe)
    moe_samples = generate(moe, PROMPTS, SamplingParams(temperature=TEMP, max_new_tokens=6, n=2),
                           vocab_size=moe_cfg.vocab_size, generator=torch.Generator().manual_seed(0))
    moe.eval()
    out["moe_err"] = _recompute_err(moe, moe_samples, moe_cfg.vocab_size, TEMP)
    out["moe_lengths"] = [len(s.response_ids) for s in moe_samples]
    out["moe_records"] = len(replay.micro_batch_ids())
    replay.begin_record()
    try:
        generate(moe, PROMPTS, SamplingParams(), vocab_size=moe_cfg.vocab_size, generator=torch.Generator())
    except RuntimeError as e:
        out["moe_open_pass_error"] = str(e)
    replay.end_pass()
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def single():
    (res,) = run_ranks(_single, 1)
    return res


def test_greedy_matches_cache_free_argmax(single):
    assert single["greedy"] == single["greedy_ref"]
    assert len({tuple(r) for r in single["greedy"]}) > 2  # the prompts lead to different continuations
    assert any(len(set(r)) > 1 for r in single["greedy"])  # not one token repeated: the cache is exercised
    assert single["greedy_err"] < 1e-5
    n = 2
    for k, (idx, prompt, reason) in enumerate(single["greedy_layout"]):
        assert idx == k // n and prompt == PROMPTS[k // n] and reason == "length"
    assert single["training_restored"] is True


def test_sampled_logprobs_match_full_forward_recompute(single):
    assert single["v_pad"] > 250  # vocab padding exists and is excluded from the softmax
    assert single["sampled_err"] < 1e-5
    assert single["trainer_err"] < 1e-5
    assert single["sampled_lengths"] == [8] * (len(PROMPTS) * 3)
    assert single["sampled_distinct"] > len(PROMPTS)  # n = 3 samples of a prompt differ


def test_stop_tokens_end_samples_and_are_kept(single):
    stop = single["stop"]
    saw_stop = 0
    for (ids, lps, reason), (full_ids, full_lps) in zip(single["stopped"], single["greedy_full"]):
        if stop in full_ids:
            cut = full_ids.index(stop) + 1
            assert (ids, reason) == (full_ids[:cut], "stop")
            assert lps == pytest.approx(full_lps[:cut], abs=1e-6)
            saw_stop += 1
        else:
            assert (ids, reason) == (full_ids, "length") and len(ids) == 6
    assert saw_stop >= 2  # both samples of prompt 0 at least


def test_top_k_1_and_tiny_top_p_are_greedy(single):
    greedy = [ids for ids, _ in single["greedy_full"]]
    for key in ("top_k1", "top_p_tiny"):
        rows, lps = single[key]
        assert [r[2] for r in rows] == greedy, key
        assert lps == pytest.approx([lp for _, ls in single["greedy_full"] for lp in ls], abs=1e-6), key


def test_padded_vocabulary_is_never_sampled(single):
    toks = single["hot_tokens"]
    assert max(toks) < 150 and max(toks) > 100  # hot sampling spreads over the allowed range, never past it


def test_engine_seeds_resume_and_stats(single):
    e = single["engine"]
    assert e["same_seed"] and e["next_call_differs"] and e["other_seed_differs"]
    assert e["resumed"] and e["fixed_seed"]
    assert e["state"] == {"calls": 3, "weight_version": 0, "seed": 0}
    assert e["version"] == 2
    assert e["stats"]["tokens"] == len(PROMPTS) * 2 * 6 and e["stats"]["tokens_per_s"] > 0
    assert "pipeline_model_parallel_size=1" in single["two_chunks_error"]
    t = single["throughput"]
    assert t["tokens"] == 64 * 8
    print(f"tiny, 64 prompts x 8 new tokens: {t['tokens_per_s']:.0f} tokens/s ({t['seconds']:.2f} s)")


def test_moe_generates_with_routing_replay_off(single):
    assert single["moe_err"] < 1e-5
    assert single["moe_lengths"] == [6] * (len(PROMPTS) * 2)
    assert single["moe_records"] == 0
    assert "'record' pass is open" in single["moe_open_pass_error"]


# ------------------------------------------------------------------------------------------------ two ranks


def _sp_model(sp):
    """A 2-layer GPTModel at TP=2 (SP on / off, same weights from the same seed) on the local spec with a plain
    torch RMSNorm, which (unlike the local spec's norm) accepts sequence parallel without TE/apex."""
    import copy

    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    class Norm(torch.nn.RMSNorm):
        def __init__(self, config, hidden_size, eps=1e-5, **kwargs):
            super().__init__(hidden_size, eps=eps)

    layer = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = Norm
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                            tensor_model_parallel_size=2, sequence_parallel=sp, use_cpu_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                            init_method_std=0.1, normalization="RMSNorm")
    spec = TransformerBlockSubmodules(layer_specs=[layer] * 2, layer_norm=Norm)
    gpt = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=96, max_sequence_length=64,
                   position_embedding_type="rope", share_embeddings_and_output_weights=False)
    return gpt, parallel_state.get_tensor_model_parallel_group()


def _sequence_parallel_case():
    from megatron.core import parallel_state

    from oar_megatron.policy.forward import final_hidden_states
    from oar_megatron.policy.generate import generate
    from oar_megatron.rollout import SamplingParams

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    out = {}
    for sp in (False, True):
        gpt, group = _sp_model(sp)
        run = lambda p: generate(gpt, PROMPTS, p, vocab_size=90, tp_group=group,  # noqa: E731
                                 generator=torch.Generator().manual_seed(2))
        out[sp] = [_flat(run(SamplingParams(temperature=0.0, max_new_tokens=5))),
                   _flat(run(SamplingParams(temperature=TEMP, max_new_tokens=5, n=2)))]
        if sp:  # flags restored: hidden states come back sequence-sharded [L/TP, B, H]
            ids = torch.tensor([[1, 2, 3, 4]])
            out["sp_hidden_shape"] = tuple(final_hidden_states(gpt, ids, torch.arange(4)[None]).shape)
            out["sp_flags"] = (gpt.config.sequence_parallel, gpt.output_layer.sequence_parallel)
    parallel_state.destroy_model_parallel()
    return out



def _two(rank, world_size):
    from oar_megatron.config import ParallelConfig
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel
    from oar_megatron.rollout import LocalEngine, SamplingParams

    model_cfg = _preset()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, n=2)
    sampled = SamplingParams(temperature=TEMP, top_p=0.95, max_new_tokens=8, n=2, seed=3)
    out = {}
    for name, cfg in (("tp2", ParallelConfig(tp=2)), ("tp1", ParallelConfig())):
        groups = init_parallel(cfg, model_cfg, seed=SEED)
        gpt = build_model(model_cfg, groups)
        engine = LocalEngine(gpt, vocab_size=model_cfg.vocab_size, tp_group=groups.tp_group, max_batch_size=4)
        g, s = engine.generate(PROMPTS, greedy), engine.generate(PROMPTS, sampled)
        gpt.eval()
        out[name] = dict(greedy=_flat(g), sampled=_flat(s),
                         err=max(_recompute_err(gpt, g, model_cfg.vocab_size, 0.0),
                                 _recompute_err(gpt, s, model_cfg.vocab_size, TEMP)))
        destroy_parallel()
    out["sp"] = _sequence_parallel_case()
    groups = init_parallel(ParallelConfig(pp=2), model_cfg, seed=SEED)
    stage = build_model(model_cfg, groups)
    try:
        LocalEngine(stage, vocab_size=model_cfg.vocab_size).generate(PROMPTS, greedy)
    except ValueError as e:
        out["pp_error"] = str(e)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def two():
    return run_ranks(_two, 2)


def test_tp2_ranks_agree_and_match_tp1(two):
    r0, r1 = two
    for key in ("greedy", "sampled"):
        assert r0["tp2"][key][0] == r1["tp2"][key][0], key  # identical samples on both TP ranks
        assert r0["tp2"][key][1] == r1["tp2"][key][1], key
        assert r0["tp2"][key][0] == r0["tp1"][key][0], key  # same weights and seed as TP=1: same tokens
        assert r0["tp2"][key][1] == pytest.approx(r0["tp1"][key][1], abs=1e-5), key
    assert r0["tp2"]["err"] < 1e-5 and r1["tp2"]["err"] < 1e-5 and r0["tp1"]["err"] < 1e-5


def test_sequence_parallel_is_switched_off_for_generation_and_restored(two):
    for r in two:
        sp = r["sp"]
        for (rows_sp, lps_sp), (rows, lps) in zip(sp[True], sp[False]):
            assert rows_sp == rows
            assert lps_sp == pytest.approx(lps, abs=1e-5)
        assert sp["sp_hidden_shape"] == (2, 1, 32) and sp["sp_flags"] == (True, True)
    assert two[0]["sp"][True] == two[1]["sp"][True]


def test_pipeline_parallel_is_refused(two):
    for r in two:
        assert r["pp_error"] == "the local engine needs pipeline_model_parallel_size=1; use rollout=sglang for PP"
