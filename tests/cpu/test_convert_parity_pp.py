"""Logits parity of converted HF checkpoints under pipeline parallelism: the tiny random-weight models of
``tests/convert/hf_tiny.py`` with 4 layers (Llama-3 untied, Llama-3.2-style tied with llama3 RoPE scaling, Qwen2,
Qwen3) are converted per model chunk (``hf_to_mcore(..., pp=2, pp_rank=r[, vpp=2, vp_stage=v])``) on 2 gloo ranks,
loaded into the project's ``GPTModel`` chunks (``build_model``; ``copy_into_module`` needs the names to match
megatron's own exactly), and run:

- logits: a plain chunk-by-chunk forward (chunk c = v·pp + p runs on stage p, its hidden states sent to the next
  chunk's stage with ``collectives.send/recv``): the last chunk's logits equal HF's within 1e-4 (max abs);
- response log-probs: the project's pipeline pass (``policy.pipeline.pipeline_logprobs``, megatron's forward-only
  schedule, interleaved for virtual PP) equal HF's within 1e-4;
- export: every chunk's parameters gathered back (``mcore_to_hf(pipeline_states({(pp_rank, vp_stage): state}))``) equal the HF
  checkpoint bit for bit; with tied embeddings the last stage's ``output_layer.weight`` is the HF embedding.

Layouts: pp=2 for all four and pp=2 × virtual_pp=2 (4 chunks of one layer) for the tied Llama-3.2 and Qwen3 (one
2-rank spawn, ~20 s); TP2 × PP2 for the tied Llama-3.2 and Qwen2 (QKV bias) (one 4-rank spawn, ~45 s on 2 busy
cores).
"""

import pytest
import torch

from tests.convert.hf_tiny import CASES, hf_references
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.dist]

B, S, PROMPT = 2, 16, 4
TOL = 1e-4
LAYOUTS = {"pp2": (1, 2, None, list(CASES)), "pp2-vpp2": (1, 2, 2, ["llama3.2", "qwen3"])}  # tp, pp, vpp, cases
TP2_PP2 = {"tp2-pp2": (2, 2, None, ["llama3.2", "qwen2"])}


def _forward_logits(chunks, groups, ids, pos):
    """Logits [B, S, V_pad] on the last stage (None elsewhere): the chunks in global order, hidden states passed
    stage to stage by point-to-point send/recv over the PP group."""
    from oar_megatron import collectives

    pp, p = groups.pp, groups.pp_rank
    n = pp * len(chunks)
    hidden = None
    for c in range(n):
        if c % pp != p:
            continue
        gpt = chunks[c // pp]
        if c > 0:
            hidden = collectives.recv(torch.empty(S, B, gpt.config.hidden_size), (p - 1) % pp, groups.pp_group)
            gpt.set_input_tensor(hidden)
        out = gpt(ids, pos, attention_mask=None)
        if c < n - 1:
            collectives.send(out, (p + 1) % pp, groups.pp_group)
        else:
            return out
    return None


def _ranks(rank, world_size, dirs, ids, layouts):
    from oar_megatron.config import ParallelConfig
    from oar_megatron.convert import SafetensorsReader, hf_model_config
    from oar_megatron.convert.config import architecture, read_hf_config
    from oar_megatron.convert.mapping import copy_into_module, hf_to_mcore
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel
    from oar_megatron.policy.pipeline import pipeline_logprobs
    from tests.megatron_helpers import gather_last_dim

    out = {}
    pos = torch.arange(S).expand(B, S)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, PROMPT:] = True
    for layout, (tp, pp, vpp, cases) in layouts.items():
        groups = None
        for case in cases:
            d = dirs[case]
            cfg, arch = hf_model_config(d), architecture(read_hf_config(d))
            if groups is None:
                groups = init_parallel(ParallelConfig(tp=tp, pp=pp, virtual_pp=vpp), cfg, seed=1)
            tp_group = groups.tp_group if tp > 1 else None
            built = build_model(cfg, groups)
            chunks = built if isinstance(built, list) else [built]
            if vpp is not None:  # gloo and the interleaved schedule's batched p2p: as PolicyActor sets it
                chunks[0].config.batch_p2p_comm = False
            states = {}
            with SafetensorsReader(d) as src:
                for v, gpt in enumerate(chunks):
                    key = (groups.pp_rank, None if vpp is None else v)
                    copy_into_module(gpt.eval(), hf_to_mcore(src, cfg, arch, tp=tp, tp_rank=groups.tp_rank, pp=pp,
                                                             pp_rank=groups.pp_rank, vpp=vpp, vp_stage=key[1]))
                    states[key] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
            with torch.no_grad():
                logits = _forward_logits(chunks, groups, ids, pos)
                if logits is not None and tp > 1:
                    logits = gather_last_dim(logits, tp_group)
            res = pipeline_logprobs(chunks, [(ids, pos, mask)], groups=groups, seq_length=S, micro_batch_size=B)
            out[f"{layout}/{case}/logits"] = None if logits is None else logits[..., : cfg.vocab_size].clone()
            out[f"{layout}/{case}/logp"] = res[0][0]
            out[f"{layout}/{case}/states"] = states
            out["tp_rank"], out["pp_rank"] = groups.tp_rank, groups.pp_rank
            del built, chunks
        destroy_parallel(process_group=False)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return hf_references(tmp_path_factory, CASES, B, S, prompt=PROMPT, suffix="_4l", num_hidden_layers=4)


def _check(results, layouts, dirs, refs):
    from safetensors.torch import load_file

    from oar_megatron.convert import hf_model_config, mcore_to_hf
    from oar_megatron.convert.mapping import pipeline_states
    from oar_megatron.convert.config import architecture, read_hf_config

    for layout, (tp, _, vpp, cases) in layouts.items():
        for case in cases:
            key = f"{layout}/{case}"
            logits, logp = refs[case]
            for out in results:
                if out["pp_rank"] == 0:
                    assert out[f"{key}/logits"] is None
                else:
                    err = (out[f"{key}/logits"] - logits).abs().max().item()
                    assert err < TOL, f"{key}: max |Δlogit| {err}"
                lerr = (out[f"{key}/logp"] - logp).abs().max().item()  # broadcast over PP by the pipeline pass
                assert lerr < TOL, f"{key} rank {out['tp_rank'], out['pp_rank']}: max |Δlogp| {lerr}"
            d = dirs[case]
            cfg, arch = hf_model_config(d), architecture(read_hf_config(d))
            states: dict = {}  # {(pp_rank, vp_stage): [TP rank states]}
            for out in sorted(results, key=lambda o: o["tp_rank"]):
                for k, st in out[f"{key}/states"].items():
                    states.setdefault(k, []).append(st)
            assert len(states) == 2 * (vpp or 1) and all(len(v) == tp for v in states.values())
            ref = load_file(f"{d}/model.safetensors")
            back = dict(mcore_to_hf(pipeline_states(states), cfg, arch))
            assert set(back) == set(ref) and all(torch.equal(back[n], ref[n]) for n in ref), key
            head = torch.cat([st["output_layer.weight"] for st in states[(1, None if vpp is None else vpp - 1)]])
            want = ref["model.embed_tokens.weight" if case == "llama3.2" else "lm_head.weight"]
            assert torch.equal(head[: cfg.vocab_size], want), key


def test_converted_pipeline_chunks_match_hf(hf_models):
    dirs, refs, ids = hf_models
    _check(run_ranks(_ranks, 2, dirs, ids, LAYOUTS, timeout=900), LAYOUTS, dirs, refs)


def test_converted_tp2_pp2_chunks_match_hf(hf_models):
    """TP2 × PP2 on 4 ranks: each rank converts its TP shard of its stage's chunk (vocab-padded, TP-sharded tied
    copy on the last stage)."""
    dirs, refs, ids = hf_models
    _check(run_ranks(_ranks, 4, dirs, ids, TP2_PP2, timeout=900), TP2_PP2, dirs, refs)
