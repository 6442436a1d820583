"""Logits parity of converted HF checkpoints: tiny random-weight Llama-3 (untied), Llama-3.2-style (tied, llama3
RoPE scaling), Qwen2 (QKV bias) and Qwen3 (QK-norm, head_dim 24 != 64/4) built with ``transformers`` (fp32),
converted with ``oar_megatron.convert`` from their safetensors, loaded into the project's megatron ``GPTModel``
(``build_model`` with the ``ModelConfig`` read from ``config.json``) under TP=1 and TP=2 (real gloo ranks): the
logits and the policy's response log-probs equal HF's within 1e-4 (max abs); the megatron parameters export back
to HF bit-identically; the TP=2 shards are megatron's own slices of the TP=1 weights (``partition_dim/stride``;
the embedding/output rows excepted, whose padding depends on TP).
Two spawns (one rank, two ranks), each paying the megatron import once for all four architectures.
"""

import pytest
import torch

from tests.convert.hf_tiny import CASES, hf_references
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.dist]

B, S = 2, 16
TOL = 1e-4


def _ranks(rank, world_size, dirs, ids):
    from oar_megatron.config import ParallelConfig
    from oar_megatron.convert import SafetensorsReader, hf_model_config, hf_to_mcore
    from oar_megatron.convert.config import architecture, read_hf_config
    from oar_megatron.convert.mapping import copy_into_module
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel
    from oar_megatron.policy.forward import response_logprobs
    from tests.megatron_helpers import gather_last_dim, tp_shard

    tp = world_size
    out = {}
    groups = None
    for case, d in dirs.items():
        cfg, arch = hf_model_config(d), architecture(read_hf_config(d))
        if groups is None:
            groups = init_parallel(ParallelConfig(tp=tp), cfg, seed=1)
        gpt = build_model(cfg, groups).eval()
        state = hf_to_mcore(SafetensorsReader(d), cfg, arch, tp=tp, tp_rank=rank)
        copy_into_module(gpt, state)
        if tp > 1:  # our shard == megatron's slice of the TP=1 tensor for this parameter
            full = hf_to_mcore(SafetensorsReader(d), cfg, arch)
            out[f"{case}/shards_differ"] = [n for n, p in gpt.named_parameters()
                                            if "word_embeddings" not in n and "output_layer" not in n
                                            and not torch.equal(p, tp_shard(full[n], p, rank, tp))]
        pos = torch.arange(S).expand(B, S)
        tp_group = groups.tp_group if tp > 1 else None
        with torch.no_grad():
            logits = gpt(ids, pos, attention_mask=None)  # [B, S, V_pad / TP]
            if tp > 1:
                logits = gather_last_dim(logits, tp_group)
            mask = torch.zeros(B, S, dtype=torch.bool)
            mask[:, 4:] = True  # response = tokens 4.. (prompt of 4)
            logp, _ = response_logprobs(gpt, ids, pos, mask, tp_group=tp_group)
        out[f"{case}/logits"] = logits[..., : cfg.vocab_size].clone()
        out[f"{case}/logp"] = logp
        out[f"{case}/state"] = {n: p.detach().clone() for n, p in gpt.named_parameters()}
        del gpt
    destroy_parallel(process_group=False)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return hf_references(tmp_path_factory, CASES, B, S)


@pytest.mark.parametrize("tp", [1, 2])
def test_converted_megatron_matches_hf_logits(hf_models, tp):
    from safetensors.torch import load_file

    from oar_megatron.convert import hf_model_config, mcore_to_hf
    from oar_megatron.convert.config import architecture, read_hf_config

    dirs, refs, ids = hf_models
    results = run_ranks(_ranks, tp, dirs, ids)
    for case, d in dirs.items():
        logits, logp = refs[case]
        for rank, out in enumerate(results):
            err = (out[f"{case}/logits"] - logits).abs().max().item()
            assert err < TOL, f"{case} tp{tp} rank{rank}: max |Δlogit| {err}"
            lerr = (out[f"{case}/logp"] - logp).abs().max().item()
            assert lerr < TOL, f"{case} tp{tp} rank{rank}: max |Δlogp| {lerr}"
            if tp > 1:
                assert out[f"{case}/shards_differ"] == [], case
        # the megatron model's own parameters export back to the HF checkpoint, bit for bit
        cfg, arch = hf_model_config(d), architecture(read_hf_config(d))
        states = [out[f"{case}/state"] for out in results]
        back = dict(mcore_to_hf(states, cfg, arch))
        ref = load_file(f"{d}/model.safetensors")
        assert set(back) == set(ref) and all(torch.equal(back[n], ref[n]) for n in ref), case
