"""policy.forward / policy.saliency_pass on a real tiny megatron-core GPTModel (CPU, gloo, fp32, RoPE, local spec).

One 2-rank spawn computes everything (megatron's import costs ~6 s per spawn): for each of two model variants
(untied embeddings, tied embeddings) a TP=1 model and its TP=2 twin (without / with sequence parallel), built
from the same seed so that the TP=2 weights are slices of the TP=1 ones. Checked:

(a) TP=1: ``response_logprobs`` = log_softmax(full logits / T) at the targets, entropy likewise, T honoured;
    the output layer only sees the N response rows; ``full_logits_logprobs`` agrees.
(b) TP=2 (SP off / on) = TP=1: log-probs, entropy, and every parameter's gradient of Σ logp (its TP shard).
(c) ``oar_g_sharded`` / ``oar_p_sharded`` at TP=1 and TP=2 = ``algorithms.oar_g_saliency`` / ``oar_p_saliency``
    run on the TP=1 model through generic embed/forward callables, every P_final mode; ``clean_pass`` shares one
    forward between π_old log-probs and the P_final reference without changing either.
(d) OAR-G leaves parameter ``.grad`` and ``requires_grad`` as they were.
(e) padded vocabulary: with ``oar_vocab_size`` = 90 < the model's 96 output rows (TP=2: the padding sits in rank
    1's slice), log-probs and entropy equal log_softmax over logits[..., :90] at TP=1 and TP=2, entropy finite, and
    OAR-P / OAR-G equal the single-process algorithms on logits sliced to the real vocabulary.
"""

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.megatron_helpers import tp_shard

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SEED = 1234
B, L, V, H = 3, 15, 96, 32  # L odd: sequence parallel must pad it to a multiple of TP
TEMP = 0.7
NOISE = 0.05  # OAR-G noise σ of the comparison (σ = 1e-3 makes ∂J/∂e ~ σ·Hessian, near fp32 rounding)
MODES = ("last", "answer_mean", "answer_joint")
VR = 90  # (e): the real vocabulary; rows [VR, V) of the output layer are padding


# ----------------------------------------------------------------------------------------------- model and data


class _RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm usable under sequence parallel (the local spec's torch norm refuses SP without TE/apex).
    Under SP its weight gradient is partial per rank: megatron's finalize_model_grads all-reduces parameters marked
    ``sequence_parallel`` over TP, and so does ``_compare``."""

    def __init__(self, config, hidden_size, eps=1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _spec():
    """The local layer spec with ``_RMSNorm`` for every norm (input, pre-MLP, final)."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    layer.submodules.input_layernorm = _RMSNorm
    layer.submodules.pre_mlp_layernorm = _RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * 2, layer_norm=_RMSNorm)


def _build(tp, sp, tied):
    """Tiny GPTModel at TP=``tp`` from a fixed seed (eval mode, no dropout). Returns (model, tp_group)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(SEED)
    cfg = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=2 * H,
                            tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                            init_method_std=0.1, normalization="RMSNorm")
    gpt = GPTModel(config=cfg, transformer_layer_spec=_spec(),
                   vocab_size=V, max_sequence_length=64, position_embedding_type="rope",
                   share_embeddings_and_output_weights=tied)
    gpt.eval()
    return gpt, parallel_state.get_tensor_model_parallel_group()


def _rollout(vocab=V):
    """Right-padded prompt | response rows: ids [B, L], positions [B, L], response_mask [B, L]."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    prompt, total = [3, 5, 2], [15, 11, 9]
    col = torch.arange(L)[None, :]
    mask = (col >= torch.tensor(prompt)[:, None]) & (col < torch.tensor(total)[:, None])
    ids = torch.where(col < torch.tensor(total)[:, None], ids, 0)
    return ids, torch.arange(L).expand(B, L), mask


def _scoring_batch(vocab=V):
    from oar_megatron.algorithms.segment import build_scoring_batch

    g = torch.Generator().manual_seed(9)
    tok = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    # Row 2 has no answer tokens: it scores 0 in the answer modes. Lengths 14, 15, 10 (odd max: SP pads).
    prompts, reasonings, answers = [tok(3), tok(2), tok(4)], [tok(5), tok(6), tok(4)], [tok(4), tok(5), []]
    return build_scoring_batch(prompts, reasonings, tok(2), answers, pad_id=0)


# ----------------------------------------------------------------------------------------------- one layout


def _layout(tp, sp, tied):
    """Everything computed on one model layout: (results dict, {name: parameter})."""
    from oar_megatron.policy.forward import full_logits_logprobs, response_logprobs
    from oar_megatron.policy.saliency_pass import clean_pass, oar_g_sharded, oar_p_sharded

    gpt, group = _build(tp, sp, tied)
    ids, pos, mask = _rollout()
    batch = _scoring_batch()
    res = {}

    seen = []  # rows the output layer receives
    hook = gpt.output_layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    logp, ent = response_logprobs(gpt, ids, pos, mask, tp_group=group, temperature=TEMP, compute_entropy=True)
    hook.remove()
    res["rows_seen"] = seen
    logp.sum().backward()
    for p in gpt.parameters():  # as megatron's finalize_model_grads: SP norm weights saw only their sequence slice
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=group)
    res["logp"], res["ent"] = logp.detach(), ent.detach()
    res["grads"] = {n: p.grad.clone() for n, p in gpt.named_parameters()}
    gpt.zero_grad(set_to_none=True)
    with torch.no_grad():
        res["logp_t1"], res["ent_t1"] = response_logprobs(gpt, ids, pos, mask, tp_group=group, compute_entropy=True)
        res["full_logp"], res["full_ent"] = full_logits_logprobs(gpt, ids, pos, mask, temperature=TEMP)
        if tp == 1:
            res["full_logits"] = gpt(ids, pos, None)  # [B, L, V]

    # OAR-G with parameter .grad sentinels in place (d), then OAR-P; both with and without the shared clean pass.
    sentinels = {n: torch.full_like(p, 0.5) for n, p in gpt.named_parameters()}
    for n, p in gpt.named_parameters():
        p.grad = sentinels[n].clone()
    shared = clean_pass(gpt, batch, modes=MODES, rollout=(ids, pos, mask), tp_group=group, temperature=TEMP)
    res["clean_logp"] = shared.old_logp
    for m in MODES:
        res[f"g_{m}"] = oar_g_sharded(gpt, batch, tp_group=group, mode=m, noise_std=NOISE, seed=3, width=8)
        res[f"g_{m}_chunked"] = oar_g_sharded(gpt, batch, tp_group=group, mode=m, noise_std=NOISE, seed=3, width=8,
                                              chunk_size=2, reference=shared.reference[m])
        res[f"p_{m}"] = oar_p_sharded(gpt, batch, tp_group=group, mode=m, chunk_size=4, width=8)
        res[f"p_{m}_shared"] = oar_p_sharded(gpt, batch, tp_group=group, mode=m, chunk_size=5, width=8,
                                             reference=shared.reference[m])
    res["grad_untouched"] = all(torch.equal(p.grad, sentinels[n]) for n, p in gpt.named_parameters())
    res["requires_grad_kept"] = all(p.requires_grad for p in gpt.parameters())
    if tp == 1:
        res.update(_single_process_saliency(gpt, batch))
    else:
        res["errors"] = _argument_errors(gpt, group, ids, pos, mask, batch)
    res.update(_padded_vocab(gpt, group, tp))
    return res, dict(gpt.named_parameters())


def _padded_vocab(gpt, group, tp):
    """(e): the passes with ``oar_vocab_size = VR`` set on the model (as ``build_model`` does)."""
    from oar_megatron.policy.forward import full_logits_logprobs, response_logprobs
    from oar_megatron.policy.saliency_pass import oar_g_sharded, oar_p_sharded

    ids, pos, mask = _rollout(VR)
    batch = _scoring_batch(VR)
    out = {}
    gpt.oar_vocab_size = VR
    gpt.zero_grad(set_to_none=True)  # (d) left sentinel .grad values
    try:
        logp, ent = response_logprobs(gpt, ids, pos, mask, tp_group=group, temperature=TEMP, compute_entropy=True)
        (logp.sum() + ent.sum()).backward()
        for p in gpt.parameters():
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=group)
        out["v.grads"] = {n: p.grad.clone() for n, p in gpt.named_parameters()}
        gpt.zero_grad(set_to_none=True)
        out["v.logp"], out["v.ent"] = logp.detach(), ent.detach()
        with torch.no_grad():
            out["v.full_logp"], out["v.full_ent"] = full_logits_logprobs(gpt, ids, pos, mask, temperature=TEMP)
        out["v.p_last"] = oar_p_sharded(gpt, batch, tp_group=group, mode="last", chunk_size=4, width=8)
        out["v.g_answer_mean"] = oar_g_sharded(gpt, batch, tp_group=group, mode="answer_mean", noise_std=NOISE,
                                               seed=3, width=8)
        try:
            response_logprobs(gpt, torch.where(mask, VR + 1, ids), pos, mask, tp_group=group)
            out["v.error"] = None
        except ValueError as err:
            out["v.error"] = str(err)
    finally:
        del gpt.oar_vocab_size
    if tp == 1:
        from oar_megatron.algorithms.saliency import oar_g_saliency, oar_p_saliency

        with torch.no_grad():
            out["v.full_logits"] = gpt(ids, pos, None)[..., :VR]  # [B, L, VR]: the reference's vocabulary

        def embed(x):
            return gpt.embedding(input_ids=x, position_ids=torch.arange(x.shape[1]).expand_as(x)).transpose(0, 1)

        def forward(e, att):
            return gpt(None, None, None, decoder_input=e.transpose(0, 1).contiguous())[..., :VR]

        out["v.ref_p_last"] = oar_p_saliency(embed, forward, batch, mode="last", chunk_size=4, width=8)
        out["v.ref_g_answer_mean"] = oar_g_saliency(embed, forward, batch, mode="answer_mean", noise_std=NOISE,
                                                    seed=3, width=8)
    return out


def _argument_errors(gpt, group, ids, pos, mask, batch):
    """The ValueError message of each bad call (None where no error was raised)."""
    import dataclasses

    from oar_megatron.policy.forward import response_logprobs
    from oar_megatron.policy.saliency_pass import oar_g_sharded

    left_padded = dataclasses.replace(batch, attention_mask=batch.attention_mask.flip(1))
    calls = {
        "tp_group": lambda: response_logprobs(gpt, ids, pos, mask, tp_group=None),
        "response_mask": lambda: response_logprobs(gpt, ids, pos, mask | (torch.arange(L) == 0), tp_group=group),
        "batch": lambda: oar_g_sharded(gpt, left_padded, tp_group=group),
        "noise_std": lambda: oar_g_sharded(gpt, batch, tp_group=group, noise_std=0.0),
        "packed": lambda: response_logprobs(gpt, ids, pos, mask, tp_group=group, packed_seq_params=object()),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


def _single_process_saliency(gpt, batch):
    """algorithms.saliency on the TP=1 model through generic callables (the reference of (c))."""
    from oar_megatron.algorithms.saliency import oar_g_saliency, oar_p_saliency

    def embed(ids):  # [N, L] -> [N, L, H]
        return gpt.embedding(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).transpose(0, 1)

    def forward(e, att):  # right padding + megatron's causal mask: ``att`` adds nothing
        return gpt(None, None, None, decoder_input=e.transpose(0, 1).contiguous())  # [N, L, V]

    out = {}
    for m in MODES:
        out[f"ref_g_{m}"] = oar_g_saliency(embed, forward, batch, mode=m, noise_std=NOISE, seed=3, width=8)
        out[f"ref_p_{m}"] = oar_p_saliency(embed, forward, batch, mode=m, chunk_size=4, width=8)
    return out


# ----------------------------------------------------------------------------------------------- comparisons


def _rel(a, b):
    """max |a − b| / max |b| (0 when both are 0)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def _all_layouts(rank, world_size):
    from oar_megatron.compat.megatron_cpu import apply_cpu_shims

    assert apply_cpu_shims()
    out = {}
    for tied, sp in ((False, False), (True, True)):
        ref, _ = _layout(1, False, tied)
        got, params = _layout(2, sp, tied)
        key = f"tied={tied},sp={sp}"
        out[key] = _compare(ref, got, params, rank, world_size)
    return out


def _compare(ref, got, params, rank, tp):
    import torch.nn.functional as F

    ids, _, mask = _rollout()
    errs, facts = {}, {}
    # (a) TP=1 against log_softmax of the model's own full logits, at T and at 1.
    logits = ref["full_logits"][:, :L]
    for t, lp, en in ((TEMP, ref["logp"], ref["ent"]), (1.0, ref["logp_t1"], ref["ent_t1"])):
        logsm = F.log_softmax(logits[:, :-1] / t, dim=-1)
        want = F.pad(logsm.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
        want_ent = F.pad(-(logsm.exp() * logsm).sum(-1), (1, 0))
        errs[f"a.logp_T{t}"] = (torch.where(mask, want, 0.0) - lp).abs().max().item()
        errs[f"a.ent_T{t}"] = (torch.where(mask, want_ent, 0.0) - en).abs().max().item()
    errs["a.full_logits_path"] = max((ref["full_logp"] - ref["logp"]).abs().max().item(),
                                     (ref["full_ent"] - ref["ent"]).abs().max().item())
    facts["a.temperature_matters"] = (ref["logp"] - ref["logp_t1"]).abs().max().item()
    facts["rows_seen_tp1"], facts["rows_seen_tp2"], facts["n_response"] = (
        ref["rows_seen"], got["rows_seen"], int(mask.sum()))
    # (b) TP=2 against TP=1.
    for k in ("logp", "ent", "logp_t1", "ent_t1", "full_logp"):
        errs[f"b.{k}"] = (got[k] - ref[k]).abs().max().item()
    for name, p in params.items():
        errs[f"b.grad.{name}"] = _rel(got["grads"][name], tp_shard(ref["grads"][name], p, rank, tp))
    # (c) saliency: sharded at TP=1 and TP=2 against the single-process algorithms on TP=1.
    for m in MODES:
        for kind in ("g", "p"):
            want = ref[f"ref_{kind}_{m}"]
            for src, res in (("tp1", ref), ("tp2", got)):
                for suffix in ("", "_chunked" if kind == "g" else "_shared"):
                    s = res[f"{kind}_{m}{suffix}"]
                    assert torch.equal(s.mask, want.mask)
                    errs[f"c.{kind}.{m}.{src}{suffix}"] = _rel(s.scores, want.scores)
            facts[f"c.{kind}.{m}.max"] = want.scores.abs().max().item()
    for src, res in (("tp1", ref), ("tp2", got)):
        errs[f"c.clean_pass_logp.{src}"] = (res["clean_logp"] - res["logp"]).abs().max().item()
        facts[f"d.{src}"] = (res["grad_untouched"], res["requires_grad_kept"])
    facts["errors"] = got["errors"]
    # (e) padded vocabulary: TP=1 and TP=2 against log_softmax over the real vocabulary only.
    ids_v, _, mask_v = _rollout(VR)
    logsm = F.log_softmax(ref["v.full_logits"][:, :-1] / TEMP, dim=-1)  # [B, L-1, VR]
    want = torch.where(mask_v, F.pad(logsm.gather(-1, ids_v[:, 1:, None]).squeeze(-1), (1, 0)), 0.0)
    want_ent = torch.where(mask_v, F.pad(-(logsm.exp() * logsm).sum(-1), (1, 0)), 0.0)
    for name, p in params.items():
        errs[f"e.grad.{name}"] = _rel(got["v.grads"][name], tp_shard(ref["v.grads"][name], p, rank, tp))
    for src, res in (("tp1", ref), ("tp2", got)):
        errs[f"e.logp.{src}"] = (res["v.logp"] - want).abs().max().item()
        errs[f"e.ent.{src}"] = (res["v.ent"] - want_ent).abs().max().item()
        errs[f"e.full_path.{src}"] = max((res["v.full_logp"] - want).abs().max().item(),
                                         (res["v.full_ent"] - want_ent).abs().max().item())
        for k in ("p_last", "g_answer_mean"):
            errs[f"e.{k}.{src}"] = _rel(res[f"v.{k}"].scores, ref[f"v.ref_{k}"].scores)
        facts[f"e.finite.{src}"] = bool(torch.isfinite(res["v.ent"]).all() and torch.isfinite(res["v.logp"]).all())
        facts[f"e.error.{src}"] = res["v.error"]
    return errs, facts


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_layouts, 2)


def _errors(results, prefix):
    return {f"rank{r}/{k}/{name}": v for r, res in enumerate(results) for k, (errs, _) in res.items()
            for name, v in errs.items() if name.startswith(prefix)}


def test_response_logprobs_match_full_logits_single_rank(results):
    errs = _errors(results, "a.")
    assert len(errs) == 2 * 2 * 5
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad
    for res in results:
        for _, facts in res.values():
            assert facts["a.temperature_matters"] > 1e-2
            # Only the rows predicting response tokens reach the output layer (not B·L), under SP as n_max per rank.
            assert facts["rows_seen_tp1"] == [facts["n_response"]]
            assert len(facts["rows_seen_tp2"]) == 1 and facts["rows_seen_tp2"][0] <= facts["n_response"]


def test_tp2_logprobs_and_parameter_grads_match_tp1(results):
    errs = _errors(results, "b.")
    assert sum(".grad." in k for k in errs) > 2 * 2 * 20  # every parameter of both models on both ranks
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


def test_sharded_saliency_matches_single_process_algorithms(results):
    errs = _errors(results, "c.")
    assert len(errs) == 2 * 2 * (len(MODES) * 2 * 4 + 2)
    for res in results:
        for _, facts in res.values():
            assert all(facts[f"c.{k}.{m}.max"] > 0 for k in ("g", "p") for m in MODES)  # non-trivial scores
    # Relative to the largest score. OAR-P scores are KLs of nearly equal distributions (~1e-2) and fp32 KL
    # formulas carry ~1e-6 absolute rounding (local_kl and vocab_parallel_kl round differently): a 2e-4 floor.
    bad = {k: v for k, v in errs.items() if v > (2e-4 if ".p." in k else 1e-5)}
    assert not bad, bad


def test_bad_arguments_are_named(results):
    for res in results:
        for _, facts in res.values():
            got = facts["errors"]
            assert got["tp_group"].startswith("tp_group: has 1 ranks, the model was built for TP=2")
            assert got["response_mask"].startswith("response_mask: position 0")
            assert got["batch"].startswith("batch: attention_mask must be right padding")
            assert got["noise_std"].startswith("noise_std: must be > 0")
            assert got["packed"].startswith("packed_seq_params: packed THD batches need Transformer Engine")


def test_padded_vocabulary_rows_are_masked(results):
    errs = _errors(results, "e.")
    assert sum(".grad." not in k for k in errs) == 2 * 2 * 2 * 5
    assert sum(".grad." in k for k in errs) > 2 * 2 * 20
    bad = {k: v for k, v in errs.items() if v > (2e-4 if ".p_last" in k else 1e-5)}
    assert not bad, bad
    for res in results:
        for _, facts in res.values():
            assert facts["e.finite.tp1"] and facts["e.finite.tp2"]
            for src in ("tp1", "tp2"):
                assert facts[f"e.error.{src}"].startswith("input_ids: response token id 91 is a padded"), facts


def test_oar_g_leaves_parameter_grads_untouched(results):
    for res in results:
        for _, facts in res.values():
            assert facts["d.tp1"] == (True, True) and facts["d.tp2"] == (True, True)
