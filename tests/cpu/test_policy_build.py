"""oar_megatron.policy on real gloo ranks: init_parallel + build_model for dense and MoE presets under TP, SP, PP,
virtual PP and EP, with logits compared against the single-layout model.

Two spawns only (each pays the ~6 s megatron import): one rank for the builds and the environment-driven process
group, two ranks for every layout. Each layout's reference (TP=1 / EP=1) is built in the same rank function from the
same seed; ``use_cpu_initialization`` (the CPU default) makes TP shards slices of the TP=1 weights, and PP / EP
stages load the reference weights by global name.
"""

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.megatron_helpers import gather_last_dim, load_renamed, stage_renamer

pytestmark = [pytest.mark.megatron, pytest.mark.dist]

B, S = 2, 8


def _batch(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    return ids, labels, torch.arange(S).expand(B, S)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------- 1 rank


def _single_rank(rank, world_size):
    import math
    import os

    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel

    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel, transformer_config

    out = {}
    # The launcher path: no process group yet, torchrun variables in the environment.
    dist.destroy_process_group()  # the harness's; init_parallel must create its own from the environment
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    tiny = model_preset("tiny")
    groups = init_parallel(ParallelConfig(), tiny, seed=3)
    out["env_init"] = (dist.is_initialized(), groups.backend, groups.world_size, groups.dp, groups.tp_group is not None,
                       groups.pg_collection.tp is groups.tp_group, groups.stage_flags())
    destroy_parallel()
    out["destroyed_own_group"] = not dist.is_initialized()
    groups = init_parallel(ParallelConfig(), tiny, seed=3)

    # Tiny dense: parameter count as the config computes it, fp32, tied output, vocab-padded logits.
    gpt = build_model(tiny, groups)
    ids, labels, pos = _batch(tiny.vocab_size)
    logits = gpt(ids, pos, attention_mask=None)
    loss = gpt(ids, pos, attention_mask=None, labels=labels)
    loss.mean().backward()
    out["dense"] = dict(
        is_gpt=isinstance(gpt, GPTModel), flags=(gpt.pre_process, gpt.post_process),
        n_params=sum(p.numel() for p in gpt.parameters()), want_params=tiny.num_params(1),
        dtypes={str(p.dtype) for p in gpt.parameters()}, logits_shape=tuple(logits.shape),
        layers=len(gpt.decoder.layers), tied=gpt.share_embeddings_and_output_weights, oar_vocab=gpt.oar_vocab_size,
        loss_finite=bool(torch.isfinite(loss).all()), all_grads=all(p.grad is not None for p in gpt.parameters()))
    del gpt

    # Llama-3.1 RoPE scaling reaches megatron's rotary embedding: compare with the published formula.
    scaled = build_model(model_preset("tiny", rope_scaling="llama3", rope_scaling_factor=8.0), groups)
    dim, base = tiny.head_dim, tiny.rotary_base
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    wavelen = 2 * math.pi / inv
    smooth = (8192 / wavelen - 1) / (4 - 1)
    medium = (1 - smooth) * inv / 8 + smooth * inv
    want = torch.where(wavelen < 8192 / 4, inv, torch.where(wavelen > 8192, inv / 8, medium))
    out["rope_scaling_err"] = (scaled.rotary_pos_emb.inv_freq - want).abs().max().item()
    out["rope_scaled_some"] = bool((scaled.rotary_pos_emb.inv_freq < inv).any())
    del scaled

    # Tiny MoE: experts, shared expert and router built; loss (with aux/z losses registered) backpropagates.
    tiny_moe = model_preset("tiny-moe")
    moe = build_model(tiny_moe, groups)
    loss = moe(ids, pos, attention_mask=None, labels=labels)
    loss.mean().backward()
    mlp = moe.decoder.layers[0].mlp
    out["moe"] = dict(
        n_params=sum(p.numel() for p in moe.parameters()), want_params=tiny_moe.num_params(1),
        local_experts=len(mlp.experts.local_experts), shared=mlp.shared_experts is not None,
        loss_finite=bool(torch.isfinite(loss).all()),
        expert_grads=sum(p.grad is not None and p.grad.abs().sum().item() > 0
                         for n, p in moe.named_parameters() if "local_experts" in n))
    del moe

    # Full-size configs build a TransformerConfig on CPU (no weights): their dtype and shapes passed through.
    q8 = transformer_config(model_preset("qwen3-8b"), ParallelConfig(tp=4, pp=2))
    q30 = transformer_config(model_preset("qwen3-30b-a3b"), ParallelConfig(tp=2, ep=8, etp=1, sequence_parallel=True))
    out["qwen3-8b"] = (q8.params_dtype, q8.bf16, q8.kv_channels, q8.num_query_groups, q8.qk_layernorm,
                       q8.gated_linear_unit, q8.normalization, q8.pipeline_dtype, q8.use_cpu_initialization)
    out["qwen3-30b-a3b"] = (q30.num_moe_experts, q30.moe_router_topk, q30.moe_ffn_hidden_size,
                            q30.expert_tensor_parallel_size, q30.moe_router_dtype, q30.moe_token_dispatcher_type)
    destroy_parallel(process_group=False)  # the harness destroys the default group
    return out


def test_single_rank_init_from_env_and_builds():
    (out,) = run_ranks(_single_rank, 1)
    assert out["env_init"] == (True, "gloo", 1, 1, True, True, (True, True))
    assert out["destroyed_own_group"]
    dense = out["dense"]
    assert dense["is_gpt"] and dense["flags"] == (True, True) and dense["tied"]
    assert dense["n_params"] == dense["want_params"]
    assert dense["dtypes"] == {"torch.float32"}
    assert dense["logits_shape"] == (B, S, 256) and dense["layers"] == 4
    assert dense["oar_vocab"] == 250  # the real vocabulary, recorded for policy.forward's padded-row masking
    assert dense["loss_finite"] and dense["all_grads"]
    assert out["rope_scaling_err"] < 1e-9 and out["rope_scaled_some"]
    moe = out["moe"]
    assert moe["n_params"] == moe["want_params"]
    assert moe["local_experts"] == 4 and moe["shared"] and moe["loss_finite"]
    assert moe["expert_grads"] == 2 * 2 * 4  # fc1 and fc2 of 4 experts in 2 layers
    # model.params_dtype on every device (the CPU included): the presets' bf16
    assert out["qwen3-8b"] == (torch.bfloat16, True, 128, 8, True, True, "RMSNorm", torch.bfloat16, True)
    assert out["qwen3-30b-a3b"] == (128, 8, 768, 1, "fp32", "alltoall")


# ------------------------------------------------------------------------------------------------- 2 ranks


def _two_ranks(rank, world_size):
    import torch.distributed as dist

    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel

    tiny, tiny_moe = model_preset("tiny"), model_preset("tiny-moe")
    ids, labels, pos = _batch(tiny.vocab_size)
    out = {}

    def run(cfg, model_cfg):
        groups = init_parallel(cfg, model_cfg, seed=11)
        return groups, build_model(model_cfg, groups)

    # Reference: TP=1 (DP=2), same seed on both ranks.
    _, ref = run(ParallelConfig(), tiny)
    ref_logits = ref(ids, pos, attention_mask=None).detach()
    ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    destroy_parallel()

    # TP=2: full logits equal the TP=1 ones (sequence parallel needs TE norms: not buildable here).
    groups, gpt = run(ParallelConfig(tp=2), tiny)
    logits = gpt(ids, pos, attention_mask=None).detach()
    out["tp2"] = dict(shard=tuple(gpt.embedding.word_embeddings.weight.shape), local_vocab=logits.shape[-1],
                      err=(gather_last_dim(logits, groups.tp_group) - ref_logits).abs().max().item())
    destroy_parallel()

    # PP=2: stage flags, layer split, tied output weight synchronised from the first stage's embedding; with the
    # reference weights loaded, a hand-driven two-stage forward reproduces the TP=1 logits.
    groups, gpt = run(ParallelConfig(pp=2), tiny)
    info = dict(flags=(gpt.pre_process, gpt.post_process), layers=[l.layer_number for l in gpt.decoder.layers],
                pp_rank=groups.pp_rank, stage_flags=groups.stage_flags())
    if gpt.post_process:
        info["tied_synced"] = torch.equal(gpt.output_layer.weight, ref_params["embedding.word_embeddings.weight"])
    offset = groups.pp_rank * 2
    load_renamed(gpt, ref_params, stage_renamer(offset, tied_output=True))
    with torch.no_grad():
        if gpt.pre_process:
            hidden = gpt(ids, pos, attention_mask=None)  # [S, B, H]
            dist.send(hidden.contiguous(), dst=1, group=groups.pp_group)
            info["hidden_shape"] = tuple(hidden.shape)
        else:
            hidden = torch.empty(S, B, tiny.hidden_size)
            dist.recv(hidden, src=0, group=groups.pp_group)
            gpt.set_input_tensor(hidden)
            info["err"] = (gpt(ids, pos, attention_mask=None) - ref_logits).abs().max().item()
    out["pp2"] = info
    destroy_parallel()

    # Virtual PP: pp=2 x 2 chunks of one layer each, interleaved (chunk v of stage p holds layer v*2 + p + 1).
    groups = init_parallel(ParallelConfig(pp=2, virtual_pp=2), tiny, seed=11)
    chunks = build_model(tiny, groups.cfg)
    out["vpp"] = [((c.pre_process, c.post_process), [l.layer_number for l in c.decoder.layers]) for c in chunks]
    destroy_parallel()

    # MoE: EP=1 reference, then EP=2 with the reference weights (expert i of EP rank r is global expert 2r + i);
    # each rank routes its own batch, so EP=2 experts serve tokens of both ranks.
    g = torch.Generator().manual_seed(100 + rank)
    ids, labels = torch.randint(0, tiny_moe.vocab_size, (2, B, S), generator=g)
    _, moe_ref = run(ParallelConfig(), tiny_moe)
    moe_ref_logits = moe_ref(ids, pos, attention_mask=None).detach()
    moe_params = {n: p.detach().clone() for n, p in moe_ref.named_parameters()}
    destroy_parallel()
    groups, moe = run(ParallelConfig(ep=2), tiny_moe)

    def expert_name(name):
        head, sep, tail = name.partition("local_experts.")
        if not sep:
            return name
        index, rest = tail.split(".", 1)
        return f"{head}local_experts.{groups.ep_rank * 2 + int(index)}.{rest}"

    load_renamed(moe, moe_params, expert_name)
    logits = moe(ids, pos, attention_mask=None)
    loss = moe(ids, pos, attention_mask=None, labels=labels)
    loss.mean().backward()
    out["ep2"] = dict(local_experts=len(moe.decoder.layers[0].mlp.experts.local_experts), ep_rank=groups.ep_rank,
                      err=(logits.detach() - moe_ref_logits).abs().max().item(),
                      grads_finite=all(torch.isfinite(p.grad).all().item()
                                       for p in moe.parameters() if p.grad is not None))
    destroy_parallel()
    return out


def test_two_rank_layouts_match_single_layout():
    results = run_ranks(_two_ranks, 2)
    for rank, out in enumerate(results):
        assert out["tp2"]["shard"] == (128, 64) and out["tp2"]["local_vocab"] == 128
        assert out["tp2"]["err"] < 1e-5, out["tp2"]
        assert out["ep2"]["local_experts"] == 2 and out["ep2"]["ep_rank"] == rank
        assert out["ep2"]["err"] < 1e-5 and out["ep2"]["grads_finite"], out["ep2"]
    first, last = results[0]["pp2"], results[1]["pp2"]
    assert first["flags"] == first["stage_flags"] == (True, False) and first["layers"] == [1, 2]
    assert last["flags"] == last["stage_flags"] == (False, True) and last["layers"] == [3, 4]
    assert first["hidden_shape"] == (S, B, 64)
    assert last["tied_synced"] and last["err"] < 1e-5, last
    assert results[0]["vpp"] == [((True, False), [1]), ((False, False), [3])]
    assert results[1]["vpp"] == [((False, False), [2]), ((False, True), [4])]
