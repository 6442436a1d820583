"""Logits parity of converted MoE checkpoints: tiny random-weight Qwen3-MoE (QK-norm, head_dim 24, renormalised
top-k: ``norm_topk_prob``; at EP1 also with ``norm_topk_prob: false``) and Mixtral (softmax, top-k, renormalised)
built with ``transformers`` (fp32; 4 experts, top-2, routers scaled so routing differs per token), converted with
``oar_megatron.convert`` from their safetensors and loaded into the project's megatron ``GPTModel`` (``build_model``,
local spec, ``SequentialMLP`` experts, alltoall dispatcher, dropless) under EP=1 (one rank), EP=2 and expert-TP 2
with TP 1 (two gloo ranks): logits and the policy's response log-probs equal HF's within 1e-4 (max abs); the
EP-local expert numbering is megatron's own (``local_expert_indices``); the expert-TP shards are megatron's
partition of the full tensors; the model's parameters export back to HF bit-identically (``mcore_to_hf`` with
``{(tp_rank, ep_rank): state}``). The routing choice is tested too: the same weights with
``moe_router_pre_softmax`` flipped (for Mixtral: mbridge's pre-softmax setting) give a max |Δlogit| far above the
tolerance (measured 0.15-0.40 against 2e-6). Two spawns (one rank, two ranks), each paying the megatron import once.
"""

import dataclasses

import pytest
import torch

from tests.convert.hf_tiny import MOE_CASES, hf_references
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.dist]

B, S = 2, 16
TOL = 1e-4


def _forward(gpt, ids):
    from oar_megatron.policy.forward import response_logprobs

    pos = torch.arange(S).expand(B, S)
    with torch.no_grad():
        logits = gpt(ids, pos, attention_mask=None)
        mask = torch.zeros(B, S, dtype=torch.bool)
        mask[:, 4:] = True  # response = tokens 4.. (prompt of 4)
        logp, _ = response_logprobs(gpt, ids, pos, mask, tp_group=None)
    return logits, logp


def _ranks(rank, world_size, dirs, ids, layouts):
    from oar_megatron.config import ParallelConfig
    from oar_megatron.convert import SafetensorsReader, hf_model_config, hf_to_mcore
    from oar_megatron.convert.config import architecture, read_hf_config
    from oar_megatron.convert.mapping import copy_into_module
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel
    from tests.megatron_helpers import tp_shard

    out = {}
    for layout in layouts:  # "ep2" | "etp2" (on two ranks) | "ep1"
        ep = 2 if layout == "ep2" else 1
        etp = 2 if layout == "etp2" else None
        for case, d in dirs.items():
            cfg, arch = hf_model_config(d), architecture(read_hf_config(d))
            groups = init_parallel(ParallelConfig(ep=ep, etp=etp), cfg, seed=1)
            key = f"{layout}/{case}"
            try:
                state = hf_to_mcore(SafetensorsReader(d), cfg, arch, ep=ep, ep_rank=groups.ep_rank,
                                    etp=groups.etp, etp_rank=groups.etp_rank)
                for wrong in (False, True):  # the HF routing, then pre_softmax flipped
                    model = dataclasses.replace(cfg, moe_router_pre_softmax=cfg.moe_router_pre_softmax != wrong)
                    gpt = build_model(model, groups).eval()
                    copy_into_module(gpt, state)
                    logits, logp = _forward(gpt, ids)
                    out[f"{key}/logits" + ("_wrong" if wrong else "")] = logits[..., : cfg.vocab_size].clone()
                    if not wrong:
                        out[f"{key}/logp"] = logp
                        out[f"{key}/state"] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
                        out[f"{key}/experts"] = list(gpt.decoder.layers[0].mlp.local_expert_indices)
                        out[f"{key}/ranks"] = (groups.tp_rank, groups.ep_rank, groups.etp_rank)
                        if etp:  # our expert shards == megatron's partition (partition_dim/stride) of the full tensor
                            full = hf_to_mcore(SafetensorsReader(d), cfg, arch, etp=1)
                            out[f"{key}/shards_differ"] = [
                                n for n, p in gpt.named_parameters() if ".local_experts." in n
                                and not torch.equal(p, tp_shard(full[n], p, groups.etp_rank, groups.etp))]
                            out[f"{key}/shards_differ"] += [  # the rest is replicated (TP 1)
                                n for n, p in gpt.named_parameters()
                                if ".local_experts." not in n and not torch.equal(p, full[n])]
                    del gpt
            finally:
                destroy_parallel(process_group=False)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return hf_references(tmp_path_factory, MOE_CASES, B, S)


@pytest.mark.parametrize("world", [1, 2])
def test_converted_moe_matches_hf_logits(hf_models, world):
    from safetensors.torch import load_file

    from oar_megatron.convert import hf_model_config, mcore_to_hf
    from oar_megatron.convert.config import architecture, read_hf_config

    dirs, refs, ids = hf_models
    layouts = ["ep1"] if world == 1 else ["ep2", "etp2"]
    if world == 2:  # the raw top-k routing is checked at EP1 only
        dirs = {c: d for c, d in dirs.items() if c != "qwen3_moe_raw_topk"}
    results = run_ranks(_ranks, world, dirs, ids, layouts)
    for layout in layouts:
        for case, d in dirs.items():
            key = f"{layout}/{case}"
            logits, logp = refs[case]
            for rank, out in enumerate(results):
                err = (out[f"{key}/logits"] - logits).abs().max().item()
                assert err < TOL, f"{key} rank{rank}: max |Δlogit| {err}"
                lerr = (out[f"{key}/logp"] - logp).abs().max().item()
                assert lerr < TOL, f"{key} rank{rank}: max |Δlogp| {lerr}"
                wrong = (out[f"{key}/logits_wrong"] - logits).abs().max().item()
                assert wrong > 1e-2, f"{key}: pre_softmax flipped still matches HF ({wrong})"
                per = 4 // (2 if layout == "ep2" else 1)
                ep_rank = out[f"{key}/ranks"][1]
                assert out[f"{key}/experts"] == list(range(ep_rank * per, (ep_rank + 1) * per)), key
            # the megatron model's own parameters export back to the HF checkpoint, bit for bit
            cfg, arch = hf_model_config(d), architecture(read_hf_config(d))
            if layout == "etp2":  # expert TP 2 over TP 1: (tp_rank, ep_rank) does not tell the ranks apart; each
                assert all(out[f"{key}/shards_differ"] == [] for out in results), key  # shard is megatron's slice
                continue
            states = {out[f"{key}/ranks"][:2]: out[f"{key}/state"] for out in results}
            back = dict(mcore_to_hf(states, cfg, arch))
            ref = load_file(f"{d}/model.safetensors")
            assert set(back) == set(ref) and all(torch.equal(back[n], ref[n]) for n in ref), key
