"""oar_megatron.convert without megatron: config.json → ModelConfig, HF → megatron → HF bit-identical (TP=1 and
TP=2 shards), the grouped-QKV / [gate; up] layouts checked against hand-built tensors, and one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from oar_megatron.convert import SafetensorsReader, hf_model_config, hf_to_mcore, mcore_to_hf
from oar_megatron.convert.config import architecture
from oar_megatron.convert.mapping import ConversionError, hf_shapes
from tests.convert.hf_tiny import CASES, make_hf_model


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
