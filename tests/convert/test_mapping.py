"""oar_megatron.convert without megatron: config.json → ModelConfig, HF → megatron → HF bit-identical (TP=1 and
TP=2 shards), the grouped-QKV / [gate; up] layouts checked against hand-built tensors, and one-line errors."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from oar_megatron.convert import SafetensorsReader, hf_model_config, hf_to_mcore, mcore_to_hf
from oar_megatron.convert.config import architecture
from oar_megatron.convert.mapping import ConversionError, hf_shapes
from tests.convert.hf_tiny import CASES, MOE_CASES, make_hf_model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for case in CASES:
        d = tmp_path_factory.mktemp(case.replace(".", "_"))
        make_hf_model(case, d)
        out[case] = d
    return out


def _arch(d):
    return architecture(json.loads((d / "config.json").read_text()))


def test_config_json_to_model_config(hf_dirs):
    llama = hf_model_config(hf_dirs["llama3"])
    assert (llama.rotary_base, llama.rope_scaling, llama.untie_embeddings_and_output_weights) == \
        (500000.0, "none", True)
    assert (llama.num_query_groups, llama.head_dim, llama.ffn_size, llama.vocab_size) == (2, 16, 128, 100)
    tied = hf_model_config(hf_dirs["llama3.2"])
    assert (tied.rope_scaling, tied.rope_scaling_factor, tied.untie_embeddings_and_output_weights) == \
        ("llama3", 8.0, False)
    qwen2 = hf_model_config(hf_dirs["qwen2"])
    assert (qwen2.add_qkv_bias, qwen2.qk_layernorm, qwen2.norm_epsilon, qwen2.rotary_base) == (True, False, 1e-6, 1e6)
    qwen3 = hf_model_config(hf_dirs["qwen3"])
    assert (qwen3.qk_layernorm, qwen3.add_qkv_bias, qwen3.kv_channels, qwen3.head_dim) == (True, False, 24, 24)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_mcore_hf_round_trip_is_bit_identical(hf_dirs, case, tp):
    d = hf_dirs[case]
    cfg, arch = hf_model_config(d), _arch(d)
    shards = [hf_to_mcore(SafetensorsReader(d), cfg, arch, tp=tp, tp_rank=r) for r in range(tp)]
    emb = shards[0]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == cfg.padded_vocab_size(tp) // tp  # vocab padding added on import
    assert ("output_layer.weight" in shards[0]) == cfg.untie_embeddings_and_output_weights
    back = dict(mcore_to_hf(shards if tp > 1 else shards[0], cfg, arch))
    ref = load_file(str(d / "model.safetensors"))
    assert set(back) == set(ref)
    for name, t in ref.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # exported tensors save as safetensors (contiguous, no shared storage) and reload identically
    save_file(back, str(d / f"export_tp{tp}.safetensors"))
    again = load_file(str(d / f"export_tp{tp}.safetensors"))
    assert all(torch.equal(again[n], ref[n]) for n in ref)


def test_layouts_by_hand(hf_dirs):
    """Grouped QKV per query group [q_g0, q_g1, k_g, v_g] (2 q heads per group, head dim 16); fc1 = [gate; up] with
    each TP shard holding [gate_r; up_r]; the padded embedding rows are zero and TP shards split rows."""
    d = hf_dirs["qwen2"]
    cfg, ref = hf_model_config(d), load_file(str(d / "model.safetensors"))
    full = hf_to_mcore(ref, cfg, "qwen2")
    p = "model.layers.1.self_attn."
    q, k, v = ref[p + "q_proj.weight"], ref[p + "k_proj.weight"], ref[p + "v_proj.weight"]
    want = torch.cat([q[0:32], k[0:16], v[0:16], q[32:64], k[16:32], v[16:32]])
    assert torch.equal(full["decoder.layers.1.self_attention.linear_qkv.weight"], want)
    qb, kb, vb = ref[p + "q_proj.bias"], ref[p + "k_proj.bias"], ref[p + "v_proj.bias"]
    assert torch.equal(full["decoder.layers.1.self_attention.linear_qkv.bias"],
                       torch.cat([qb[0:32], kb[0:16], vb[0:16], qb[32:64], kb[16:32], vb[16:32]]))
    gate, up = ref["model.layers.0.mlp.gate_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(full["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate, up]))
    tp1 = hf_to_mcore(ref, cfg, "qwen2", tp=2, tp_rank=1)
    assert torch.equal(tp1["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[64:], up[64:]]))
    assert torch.equal(tp1["decoder.layers.1.self_attention.linear_qkv.weight"], want[64:])  # query group 1
    assert torch.equal(tp1["decoder.layers.0.self_attention.linear_proj.weight"],
                       ref["model.layers.0.self_attn.o_proj.weight"][:, 32:])
    emb = full["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 64) and torch.equal(emb[:100], ref["model.embed_tokens.weight"])
    assert not emb[100:].any()


def test_one_line_errors(hf_dirs, tmp_path):
    d = hf_dirs["qwen3"]
    cfg, ref = hf_model_config(d), load_file(str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"architectures: unsupported 'GPT2LMHeadModel'"):
        hf_model_config({**json.loads((d / "config.json").read_text()), "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match=r"rope_scaling: rope_type 'yarn'"):
        hf_model_config({**json.loads((d / "config.json").read_text()), "rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(ConversionError, match=r"unknown architecture 'gpt2'"):
        hf_to_mcore(ref, cfg, "gpt2")
    missing = {k: v for k, v in ref.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    with pytest.raises(ConversionError, match=r"HF tensor 'model.layers.1.self_attn.k_norm.weight' missing"):
        hf_to_mcore(missing, cfg, "qwen3")
    with pytest.raises(ConversionError, match=r"unexpected HF tensor 'model.layers.0.self_attn.q_proj.bias'"):
        hf_to_mcore({**ref, "model.layers.0.self_attn.q_proj.bias": torch.zeros(96)}, cfg, "qwen3")
    bad = {**ref, "model.layers.0.mlp.up_proj.weight": torch.zeros(127, 64)}
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \[127, 64\]"):
        hf_to_mcore(bad, cfg, "qwen3")
    with pytest.raises(ConversionError, match=r"tp=4 does not divide num_query_groups=2"):
        hf_to_mcore(ref, cfg, "qwen3", tp=4)
    state = hf_to_mcore(ref, cfg, "qwen3")
    with pytest.raises(ConversionError, match=r"megatron tensor 'decoder.final_layernorm.weight' missing"):
        list(mcore_to_hf({k: v for k, v in state.items() if k != "decoder.final_layernorm.weight"}, cfg, "qwen3"))
    short = {**state, "decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(10, 64)}
    with pytest.raises(ConversionError, match=r"'decoder.layers.0.self_attention.linear_qkv.weight'"):
        list(mcore_to_hf(short, cfg, "qwen3"))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"safetensors: cannot read .*model.safetensors"):
        SafetensorsReader(tmp_path)
    assert hf_shapes(cfg, "qwen3")["model.layers.0.self_attn.q_norm.weight"] == (24,)


def test_sharded_checkpoint_is_read_lazily_by_index(tmp_path):
    """``save_pretrained`` with a small shard size writes several files and an index; the reader follows it, and a
    truncated shard is an error naming that file."""
    model = make_hf_model("qwen3", tmp_path / "hf")
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg = hf_model_config(tmp_path / "sharded")
    ref = load_file(str(tmp_path / "hf" / "model.safetensors"))
    with SafetensorsReader(tmp_path / "sharded") as reader:
        assert sorted(reader.names()) == sorted(ref)
        back = dict(mcore_to_hf(hf_to_mcore(reader, cfg, "qwen3"), cfg, "qwen3"))
    assert all(torch.equal(back[n], ref[n]) for n in ref)
    shard = tmp_path / "sharded" / files[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"safetensors: cannot read .*{files[1]}"):
        hf_to_mcore(SafetensorsReader(tmp_path / "sharded"), cfg, "qwen3")


def test_tied_checkpoint_with_an_lm_head_copy(hf_dirs):
    """A tied checkpoint that also stores ``lm_head.weight`` converts when it equals the embedding, else errors."""
    d = hf_dirs["llama3.2"]
    cfg, ref = hf_model_config(d), load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in ref and not cfg.untie_embeddings_and_output_weights
    emb = ref["model.embed_tokens.weight"]
    state = hf_to_mcore({**ref, "lm_head.weight": emb.clone()}, cfg, "llama")
    assert "output_layer.weight" not in state
    with pytest.raises(ConversionError, match=r"'lm_head.weight' differs from the embedding"):
        hf_to_mcore({**ref, "lm_head.weight": emb + 1}, cfg, "llama")


# ------------------------------------------------------------------------------------------------------------ MoE

# the published config.json of Qwen/Qwen3-30B-A3B (transformers 4.51) and mistralai/Mixtral-8x7B-v0.1
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "vocab_size": 32000}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    out = {}
    for case in MOE_CASES:
        d = tmp_path_factory.mktemp(case)
        make_hf_model(case, d)
        out[case] = d
    return out


def test_moe_config_json_to_model_config(moe_dirs, tmp_path):
    q = hf_model_config(moe_dirs["qwen3_moe"])  # transformers 5 writes num_local_experts for Qwen3-MoE
    assert (q.num_moe_experts, q.moe_router_topk, q.moe_ffn_size, q.moe_router_pre_softmax) == (4, 2, 32, False)
    assert (q.moe_router_score_function, q.moe_router_dtype, q.moe_shared_expert_intermediate_size) == \
        ("softmax", "fp32", None)
    assert (q.qk_layernorm, q.kv_channels, q.moe_aux_loss_coeff) == (True, 24, 0.001)
    assert hf_model_config(moe_dirs["qwen3_moe_raw_topk"]).moe_router_pre_softmax  # no renormalisation
    m = hf_model_config(moe_dirs["mixtral"])
    assert (m.num_moe_experts, m.moe_router_topk, m.moe_ffn_size, m.moe_router_pre_softmax, m.qk_layernorm) == \
        (4, 2, 48, False, False)
    # the real Qwen3-30B-A3B config.json is the qwen3-30b-a3b preset (architecture fields and MoE fields)
    from oar_megatron.config.model import model_preset
    from oar_megatron.convert.config import ARCHITECTURE_FIELDS, MOE_FIELDS, check_pretrained

    real = hf_model_config(QWEN3_30B_A3B)
    preset = model_preset("qwen3-30b-a3b")
    for attr, _ in ARCHITECTURE_FIELDS + MOE_FIELDS + (("max_position_embeddings", ""), ("moe_aux_loss_coeff", "")):
        assert getattr(real, attr) == getattr(preset, attr), attr
    (tmp_path / "q30").mkdir()
    (tmp_path / "q30" / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    assert check_pretrained(model_preset("qwen3-30b-a3b", pretrained=str(tmp_path / "q30"))) == "qwen3_moe"
    mix = hf_model_config(MIXTRAL_8X7B)
    assert (mix.num_moe_experts, mix.moe_router_topk, mix.moe_ffn_size, mix.query_groups, mix.head_dim,
            mix.moe_router_pre_softmax, mix.moe_aux_loss_coeff) == (8, 2, 14336, 8, 128, False, 0.02)


def test_check_pretrained_moe_fields(moe_dirs):
    """What fixes the MoE computation is compared with the preset: top-k, expert FFN, routing, shared expert."""
    from oar_megatron.convert.config import check_pretrained

    d = moe_dirs["qwen3_moe"]
    good = hf_model_config(d)
    assert check_pretrained(dataclasses.replace(good, pretrained=str(d), name="x", ffn_hidden_size=None)) == \
        "qwen3_moe"  # the dense FFN size is unused when every layer is MoE
    for key, value in (("moe_router_topk", 1), ("moe_ffn_hidden_size", 64), ("moe_router_pre_softmax", True),
                       ("moe_shared_expert_intermediate_size", 64), ("num_moe_experts", 8),
                       ("moe_router_score_function", "sigmoid")):
        bad = dataclasses.replace(good, pretrained=str(d), name="tiny-moe", **{key: value})
        with pytest.raises(ValueError, match=rf"^model.pretrained: .* gives {key}=.*override model.{key}$"):
            check_pretrained(bad)


@pytest.mark.parametrize("case", list(MOE_CASES))
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)])
def test_moe_round_trip_is_bit_identical(moe_dirs, case, tp, ep):
    d = moe_dirs[case]
    cfg, arch = hf_model_config(d), _arch(d)
    states = {(t, e): hf_to_mcore(SafetensorsReader(d), cfg, arch, tp=tp, tp_rank=t, ep=ep, ep_rank=e)
              for t in range(tp) for e in range(ep)}
    local = sorted({n.split(".local_experts.")[1].split(".")[0] for n in states[(0, 0)] if "local_experts" in n})
    assert local == [str(j) for j in range(4 // ep)]  # EP-local numbering
    back = dict(mcore_to_hf(states if (tp, ep) != (1, 1) else states[(0, 0)], cfg, arch))
    ref = load_file(str(d / "model.safetensors"))
    assert set(back) == set(ref)
    for name, t in ref.items():
        assert torch.equal(back[name], t), name
    if tp == 2 and ep == 1:  # expert TP 1 under TP 2: experts whole on every TP rank, exported from TP rank 0
        one = {(t, 0): hf_to_mcore(ref, cfg, arch, tp=2, tp_rank=t, etp=1) for t in range(2)}
        down = next(n for n in ref if n.startswith("model.layers.0.") and (n.endswith("experts.3.down_proj.weight")
                                                                          or n.endswith("experts.3.w2.weight")))
        assert torch.equal(one[(1, 0)]["decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight"], ref[down])
        back = dict(mcore_to_hf(one, cfg, arch, etp=1))
        assert all(torch.equal(back[n], ref[n]) for n in ref)


def test_moe_layouts_by_hand(moe_dirs):
    """EP rank 1 of 2 holds global experts 2, 3 as local 0, 1; fc1 = [gate; up] (Mixtral: [w1; w3]), fc2 = down
    (w2); under expert TP 2 each shard holds [gate_r; up_r] and down's column half; the router is replicated."""
    d = moe_dirs["mixtral"]
    cfg, ref = hf_model_config(d), load_file(str(d / "model.safetensors"))
    p = "model.layers.1.block_sparse_moe."
    r1 = hf_to_mcore(ref, cfg, "mixtral", ep=2, ep_rank=1)
    m = "decoder.layers.1.mlp."
    w1, w3, w2 = (ref[p + f"experts.3.{w}.weight"] for w in ("w1", "w3", "w2"))
    assert torch.equal(r1[m + "experts.local_experts.1.linear_fc1.weight"], torch.cat([w1, w3]))
    assert torch.equal(r1[m + "experts.local_experts.1.linear_fc2.weight"], w2)
    assert torch.equal(r1[m + "router.weight"], ref[p + "gate.weight"])
    t1 = hf_to_mcore(ref, cfg, "mixtral", tp=2, tp_rank=1, ep=2, ep_rank=1)
    assert torch.equal(t1[m + "experts.local_experts.1.linear_fc1.weight"], torch.cat([w1[24:], w3[24:]]))
    assert torch.equal(t1[m + "experts.local_experts.1.linear_fc2.weight"], w2[:, 24:])
    assert torch.equal(t1[m + "router.weight"], ref[p + "gate.weight"])
    q = hf_to_mcore(load_file(str(moe_dirs["qwen3_moe"] / "model.safetensors")), hf_model_config(
        moe_dirs["qwen3_moe"]), "qwen3_moe", ep=4, ep_rank=2)
    qref = load_file(str(moe_dirs["qwen3_moe"] / "model.safetensors"))
    assert torch.equal(q["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"],
                       torch.cat([qref["model.layers.0.mlp.experts.2.gate_proj.weight"],
                                  qref["model.layers.0.mlp.experts.2.up_proj.weight"]]))
    assert hf_shapes(cfg, "mixtral")["model.layers.0.block_sparse_moe.experts.1.w2.weight"] == (64, 48)


def test_moe_one_line_errors(moe_dirs):
    d = moe_dirs["qwen3_moe"]
    base = json.loads((d / "config.json").read_text())
    for key, value, match in (
            ("mlp_only_layers", [1], r"^config.json mlp_only_layers: dense layers"),
            ("decoder_sparse_step", 2, r"^config.json decoder_sparse_step: only 1"),
            ("shared_expert_intermediate_size", 64, r"^config.json shared_expert_intermediate_size: shared experts"),
            ("num_experts_per_tok", 1, r"^config.json num_experts_per_tok: top-1 with renormalised"),
            ("moe_intermediate_size", None, r"^config.json moe_intermediate_size: missing")):
        with pytest.raises(ValueError, match=match):
            hf_model_config({**base, key: value})
    mix = json.loads((moe_dirs["mixtral"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"^config.json router_jitter_noise: router jitter"):
        hf_model_config({**mix, "router_jitter_noise": 0.1})
    with pytest.raises(ValueError, match=r"^config.json sliding_window: sliding-window"):
        hf_model_config({**mix, "sliding_window": 4096})
    cfg, ref = hf_model_config(d), load_file(str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"^convert: ep=3 does not divide num_moe_experts=4$"):
        hf_to_mcore(ref, cfg, "qwen3_moe", ep=3)
    with pytest.raises(ConversionError, match=r"^convert: etp=3 does not divide tp=4; pass etp_rank"):
        hf_to_mcore(ref, cfg, "qwen3_moe", tp=4, tp_rank=0, etp=3)
    with pytest.raises(ConversionError, match=r"^convert: etp=64 does not divide moe_ffn_hidden_size=32$"):
        hf_to_mcore(ref, cfg, "qwen3_moe", etp=64, etp_rank=0)
    missing = {k: v for k, v in ref.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"}
    with pytest.raises(ConversionError, match=r"HF tensor 'model.layers.1.mlp.experts.3.up_proj.weight' missing"):
        hf_to_mcore(missing, cfg, "qwen3_moe", ep=2, ep_rank=0)  # checked before reading, whatever the EP rank
    bad = {**ref, "model.layers.0.mlp.experts.0.down_proj.weight": torch.zeros(64, 128)}
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.experts.0.down_proj.weight' has shape \[64, 128\]"):
        hf_to_mcore(bad, cfg, "qwen3_moe")
    states = {(0, e): hf_to_mcore(ref, cfg, "qwen3_moe", ep=2, ep_rank=e) for e in range(2)}
    with pytest.raises(ConversionError, match=r"^convert: megatron state for \(pp_rank, vp_stage, tp_rank, ep_rank\)=\(0, None, 0, 0\) is missing from"):
        list(mcore_to_hf({(0, 1): states[(0, 1)]}, cfg, "qwen3_moe"))
    wrong = {(0, 0): states[(0, 0)], (0, 1): states[(0, 0)] | {"decoder.layers.0.mlp.experts.local_experts.2."
                                                               "linear_fc1.weight": torch.zeros(64, 64)}}
    with pytest.raises(ConversionError, match=r"unexpected megatron tensor .*experts.2.* on TP rank 0, EP rank 1"):
        list(mcore_to_hf(wrong, cfg, "qwen3_moe"))
    dense = hf_model_config(QWEN3_30B_A3B | {"architectures": ["Qwen3ForCausalLM"]})
    with pytest.raises(ConversionError, match=r"^convert: ep=2 / etp=1 given for a dense model"):
        hf_to_mcore({}, dense, "qwen3", ep=2)


def test_ep_rank_reads_only_its_experts(moe_dirs):
    """Streaming: EP rank 1 of 2 reads experts 2, 3 only (and every non-expert tensor once)."""
    d = moe_dirs["qwen3_moe"]
    cfg, ref = hf_model_config(d), load_file(str(d / "model.safetensors"))
    read = []

    class Counting:
        names, shape = staticmethod(lambda: list(ref)), staticmethod(lambda n: tuple(ref[n].shape))

        @staticmethod
        def get(name):
            read.append(name)
            return ref[name]

    hf_to_mcore(Counting, cfg, "qwen3_moe", ep=2, ep_rank=1)
    experts = {n.split(".experts.")[1].split(".")[0] for n in read if ".experts." in n}
    assert experts == {"2", "3"} and len(read) == len(set(read))
    assert {n for n in ref if ".experts." not in n} <= set(read)
