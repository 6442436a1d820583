"""Transformer Engine parameter names (``transformer_impl: transformer_engine``) without Transformer Engine.

TE cannot be installed here, so no TE model can be built. The strongest check available:

1. the layer spec the project builds TE models from (``policy.model.layer_spec``, i.e. megatron-core 0.16's
   ``get_gpt_layer_with_transformer_engine_spec`` with the model's arguments) is constructed for real — megatron's
   ``TESpecProvider`` imports without TE, its TE classes standing as placeholders — and walked: which TE module
   sits at which attribute path (fused ``linear_qkv`` / ``linear_fc1`` = ``TELayerNormColumnParallelLinear``,
   ``input_layernorm`` / dense ``pre_mlp_layernorm`` = ``IdentityOp``, QK-norm = ``TENorm``, ...);
2. each TE module's own parameter names are taken from TE's source (``transformer_engine/pytorch/module``:
   ``LayerNormLinear`` registers ``layer_norm_weight`` [+ ``layer_norm_bias`` for LayerNorm], ``weight`` [+ ``bias``
   when biased]; ``Linear``: ``weight`` [+ ``bias``]; ``RMSNorm``: ``weight``; ``LayerNorm``: ``weight``, ``bias``;
   ``DotProductAttention``: none), megatron's TE wrappers passing ``bias=add_bias_linear`` (``linear_qkv``:
   ``add_bias_linear or add_qkv_bias``); the non-layer modules (embedding, final norm ``TENorm``, output layer
   ``ColumnParallelLinear``) keep their names;

and the converted state's names (``hf_to_mcore`` with the TE config, every architecture, PP chunks too) must be
exactly those, the tensors equal the local-spec ones, and the round trip stays bit-identical. Independently, the
renaming equals megatron's own local → TE key map (the local spec's ``sharded_state_dict_keys_map``)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from oar_megatron.convert import hf_model_config, hf_to_mcore, mcore_to_hf
from oar_megatron.convert.config import architecture
from oar_megatron.convert.mapping import te_name
from tests.convert.hf_tiny import CASES, make_hf_model

pytestmark = [pytest.mark.megatron]


@pytest.fixture(scope="module")
def te_spec():
    """A function model cfg → the TE layer ModuleSpec the project would build, constructed without TE."""
    import warnings

    from megatron.core.extensions import transformer_engine as te
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    from oar_megatron.policy.model import layer_spec

    saved = {(gpt_layer_specs, "HAVE_TE"): gpt_layer_specs.HAVE_TE,
             (gpt_layer_specs, "TESpecProvider"): getattr(gpt_layer_specs, "TESpecProvider", None),
             (provider, "is_te_min_version"): provider.is_te_min_version}

    def build(cfg):
        gpt_layer_specs.HAVE_TE = True  # as with TE installed: the import at the top of gpt_layer_specs succeeds
        gpt_layer_specs.TESpecProvider = provider.TESpecProvider
        provider.is_te_min_version = lambda *a, **k: True  # a current TE (TENorm for QK-norm, not apex's)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return layer_spec(cfg)
        finally:
            for (mod, attr), value in saved.items():
                setattr(mod, attr, value)

    return build, te


def _param_names(spec, cfg, te, prefix=""):
    """Parameter names of a ModuleSpec tree whose leaves are TE (or identity) modules."""
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    def bias(path):
        return cfg.add_bias_linear or (cfg.add_qkv_bias and path.endswith("linear_qkv."))

    norm_bias = ["bias"] if cfg.normalization == "LayerNorm" else []
    leaves = [  # from TE's source (module docstring); identity ops hold nothing
        (te.TELayerNormColumnParallelLinear, lambda p: ["layer_norm_weight"] + [f"layer_norm_{b}" for b in norm_bias]
         + ["weight"] + (["bias"] if bias(p) else [])),
        (te.TEColumnParallelLinear, lambda p: ["weight"] + (["bias"] if bias(p) else [])),
        (te.TERowParallelLinear, lambda p: ["weight"] + (["bias"] if bias(p) else [])),
        (te.TENorm, lambda p: ["weight"] + norm_bias),
        (te.TEDotProductAttention, lambda p: []),
        (IdentityOp, lambda p: []), (IdentityFuncOp, lambda p: []),
    ]
    out = []
    if isinstance(spec, ModuleSpec):
        if spec.submodules is not None and dataclasses.is_dataclass(spec.submodules):
            for f in dataclasses.fields(spec.submodules):
                out += _param_names(getattr(spec.submodules, f.name), cfg, te, f"{prefix}{f.name}.")
        return out
    if spec is None or isinstance(spec, dict) or (callable(spec) and getattr(spec, "__name__", "") in (
            "get_bias_dropout_add",)):
        return []  # activation_func None, sharded_state_dict_keys_map, the bias-dropout-add functions
    for cls, names in leaves:
        if spec is cls:
            return [prefix + n for n in names(prefix)]
    raise AssertionError(f"unknown module {spec!r} at {prefix!r}")


@pytest.fixture(scope="module")
def hf4(tmp_path_factory):
    out = {}
    for case in CASES:
        d = tmp_path_factory.mktemp(case.replace(".", "_"))
        make_hf_model(case, d, num_hidden_layers=4)
        out[case] = (hf_model_config(d), architecture(json.loads((d / "config.json").read_text())),
                     load_file(str(d / "model.safetensors")))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_te_names_equal_the_te_spec_parameters(hf4, te_spec, case):
    build, te = te_spec
    cfg, arch, ref = hf4[case]
    te_cfg = dataclasses.replace(cfg, transformer_impl="transformer_engine")
    layer = sorted(_param_names(build(te_cfg), te_cfg, te))
    assert "self_attention.linear_qkv.layer_norm_weight" in layer and "mlp.linear_fc1.layer_norm_weight" in layer
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in layer)
    for pp, chunks in ((1, [(0, None)]), (2, [(0, None), (1, None)])):
        for p, v in chunks:
            state = hf_to_mcore(ref, te_cfg, arch, tp=2, tp_rank=1, pp=pp, pp_rank=p, vp_stage=v)
            local = hf_to_mcore(ref, cfg, arch, tp=2, tp_rank=1, pp=pp, pp_rank=p, vp_stage=v)
            want = {f"decoder.layers.{i}.{n}" for i in range(cfg.num_layers // pp) for n in layer}
            if p == 0:
                want.add("embedding.word_embeddings.weight")
            if p == pp - 1:
                want |= {"decoder.final_layernorm.weight", "output_layer.weight"} if (
                    cfg.untie_embeddings_and_output_weights or pp > 1) else {"decoder.final_layernorm.weight"}
            assert set(state) == want, (case, pp, p, sorted(set(state) ^ want))
            assert list(state) == [te_name(n, te_cfg) for n in local]
            assert all(torch.equal(state[te_name(n, te_cfg)], t) for n, t in local.items())
    back = dict(mcore_to_hf(hf_to_mcore(ref, te_cfg, arch), te_cfg, arch))
    assert set(back) == set(ref) and all(torch.equal(back[n], ref[n]) for n in ref)


def test_te_renaming_equals_megatrons_local_to_te_key_map(hf4):
    """megatron's local spec carries the keys its checkpoints map to the TE spec's; ours agree for every name."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm").submodules \
        .sharded_state_dict_keys_map
    cfg, arch, ref = hf4["qwen2"]
    te_cfg = dataclasses.replace(cfg, transformer_impl="transformer_engine")
    for name in hf_to_mcore(ref, cfg, arch):
        want = name
        if name.startswith("decoder.layers."):
            head, rest = name.split(".", 3)[:3], name.split(".", 3)[3]
            for old, new in keys_map.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
            want = ".".join(head) + "." + rest
        assert te_name(name, te_cfg) == want


def test_te_moe_names(te_spec):
    """MoE layers under TE: ``pre_mlp_layernorm`` stays a TENorm (the spec walk shows it), sequential experts keep
    their names, grouped experts (``TEGroupedMLP``, one TE ``GroupedLinear`` per fc; megatron's
    ``TEGroupedLinear._sharded_state_dict_grouped`` reads ``weight{e}``) are renamed."""
    from oar_megatron.config.model import ModelConfig

    build, te = te_spec
    moe = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100, num_moe_experts=4,
                      transformer_impl="transformer_engine")
    spec = build(moe)
    assert spec.submodules.pre_mlp_layernorm is te.TENorm
    assert spec.submodules.self_attention.submodules.linear_qkv is te.TELayerNormColumnParallelLinear
    assert te_name("decoder.layers.1.pre_mlp_layernorm.weight", moe) == "decoder.layers.1.pre_mlp_layernorm.weight"
    assert te_name("decoder.layers.1.input_layernorm.weight", moe) == \
        "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    seq = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
    assert te_name(seq, moe) == seq
    grouped = dataclasses.replace(moe, moe_grouped_gemm=True)
    assert te_name(seq, grouped) == "decoder.layers.0.mlp.experts.linear_fc1.weight3"
    assert te_name("decoder.layers.0.mlp.router.weight", grouped) == "decoder.layers.0.mlp.router.weight"
