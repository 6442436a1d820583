"""HF ``config.json`` → the project's :class:`ModelConfig` for the supported architectures (dense and MoE).

Every HF setting that changes the computation is either carried (RoPE θ, llama3 RoPE scaling, head dim, QKV bias,
QK-norm, tied embeddings, norm epsilon, experts / top-k / expert FFN / top-k renormalisation) or refused with a
one-line ``ValueError`` naming the ``config.json`` key.

MoE routing (logits parity in tests/cpu/test_convert_parity_moe.py): HF Qwen3-MoE takes softmax over all experts,
the top-k, and renormalises them when ``norm_topk_prob`` (= softmax over the top-k logits); HF Mixtral always
renormalises. megatron-core's ``moe_router_pre_softmax=False`` is the softmax over the top-k logits, ``True`` the
softmax over all experts then top-k without renormalisation: so ``pre_softmax = not norm_topk_prob`` (Mixtral:
False).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.model import ModelConfig

__all__ = ["ARCHITECTURES", "MOE_ARCHITECTURES", "check_pretrained", "hf_model_config", "read_hf_config"]

# HF ``architectures[0]`` → the table name in ``convert.mapping.TABLES``
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")
# megatron-core's llama3 RoPE scaling has these fixed (rotary_pos_embedding._apply_scaling defaults)
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_hf_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """``config.json`` as a dict, from an HF model directory, the file itself, or a dict (returned as is)."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"config.json: not found at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"config.json: {path} is not valid JSON ({exc})") from None


def architecture(hf: dict[str, Any]) -> str:
    """The mapping table name for ``hf`` (``architectures[0]``); unknown → one-line error."""
    archs = hf.get("architectures") or []
    name = archs[0] if archs else None
    if name not in ARCHITECTURES:
        raise ValueError(f"config.json architectures: unsupported {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE θ and scaling: transformers 5 writes ``rope_parameters`` (θ inside), 4.x ``rope_theta`` and
    ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": float(theta)}
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise ValueError(f"config.json rope_scaling: rope_type {kind!r} is not supported (default | llama3)")
    for key, want in _MEGATRON_LLAMA3.items():
        if key in params and float(params[key]) != float(want):
            raise ValueError(f"config.json rope_scaling.{key}: megatron-core's llama3 scaling fixes it at {want}, "
                             f"got {params[key]}")
    out.update(rope_scaling="llama3", rope_scaling_factor=float(params.get("factor", 8.0)))
    return out


def _moe(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """The MoE fields of ``ModelConfig`` (every layer MoE, no shared expert, dropless, fp32 router); what megatron
    cannot compute as HF does is refused. ``router_aux_loss_coef`` becomes ``moe_aux_loss_coeff`` (HF's
    pretraining coefficient; it changes no logits, only the training loss)."""
    if arch == "qwen3_moe":
        experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes num_local_experts
        ffn_key, pre_softmax = "moe_intermediate_size", not hf.get("norm_topk_prob", False)
        if hf.get("mlp_only_layers"):
            raise ValueError(f"config.json mlp_only_layers: dense layers among MoE layers are not supported "
                             f"(got {hf['mlp_only_layers']})")
        if hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"config.json decoder_sparse_step: only 1 (every layer MoE) is supported, got "
                             f"{hf['decoder_sparse_step']}")
    else:  # mixtral: softmax, top-k, renormalised
        experts, ffn_key, pre_softmax = hf.get("num_local_experts"), "intermediate_size", False
        if hf.get("router_jitter_noise"):
            raise ValueError(f"config.json router_jitter_noise: router jitter is not supported, got "
                             f"{hf['router_jitter_noise']}")
        if hf.get("sliding_window") is not None:
            raise ValueError(f"config.json sliding_window: sliding-window attention is not supported, got "
                             f"{hf['sliding_window']}")
    for key in ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", "n_shared_experts"):
        if hf.get(key):
            raise ValueError(f"config.json {key}: shared experts are not supported for {arch}")
    for key, value in (("num_experts" if arch == "qwen3_moe" else "num_local_experts", experts),
                       (ffn_key, hf.get(ffn_key)), ("num_experts_per_tok", hf.get("num_experts_per_tok"))):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.json {key}: missing or not a positive integer ({value!r})")
    if hf["num_experts_per_tok"] == 1 and not pre_softmax:
        raise ValueError("config.json num_experts_per_tok: top-1 with renormalised probabilities (a constant weight "
                         "1) is not supported (model.moe_router_pre_softmax must be true for top-1)")
    return dict(num_moe_experts=experts, moe_router_topk=hf["num_experts_per_tok"], moe_ffn_hidden_size=hf[ffn_key],
                moe_router_score_function="softmax", moe_router_pre_softmax=pre_softmax, moe_router_dtype="fp32",
                moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)))


def hf_model_config(source: str | Path | dict[str, Any], *, params_dtype: str = "float32",
                    make_vocab_size_divisible_by: int = 128, name: str | None = None) -> ModelConfig:
    """A validated :class:`ModelConfig` equal in computation to the HF model of ``source`` (dir, file or dict)."""
    hf = read_hf_config(source)
    arch = architecture(hf)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise ValueError(f"config.json {key}: missing")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act: {hf['hidden_act']!r} is not supported (silu, SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias: MLP biases are not supported")
    if arch in ("llama", "qwen3", "qwen3_moe", "mixtral") and hf.get("attention_bias"):
        raise ValueError("config.json attention_bias: biases on q/k/v/o projections are not supported")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window: sliding-window attention is not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    cfg = ModelConfig(
        name=name, num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] or arch.startswith("qwen3") else None,
        ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), normalization="RMSNorm", swiglu=True,
        qk_layernorm=arch.startswith("qwen3"), add_qkv_bias=arch == "qwen2",
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        params_dtype=params_dtype, **_rope(hf), **(_moe(hf, arch) if arch in MOE_ARCHITECTURES else {}))
    return cfg.validate()


# (ModelConfig attribute, the key named in errors): what a checkpoint's config.json fixes. Derived values
# (query_groups, head_dim, ffn_size) compare what the model computes, whether the preset spells them out or not.
ARCHITECTURE_FIELDS = (
    ("num_layers", "num_layers"), ("hidden_size", "hidden_size"), ("num_attention_heads", "num_attention_heads"),
    ("query_groups", "num_query_groups"), ("head_dim", "kv_channels"), ("ffn_size", "ffn_hidden_size"),
    ("vocab_size", "vocab_size"), ("position_embedding_type", "position_embedding_type"),
    ("rotary_base", "rotary_base"), ("rotary_percent", "rotary_percent"), ("rope_scaling", "rope_scaling"),
    ("normalization", "normalization"), ("norm_epsilon", "norm_epsilon"), ("swiglu", "swiglu"),
    ("qk_layernorm", "qk_layernorm"), ("add_bias_linear", "add_bias_linear"), ("add_qkv_bias", "add_qkv_bias"),
    ("untie_embeddings_and_output_weights", "untie_embeddings_and_output_weights"),
    ("num_moe_experts", "num_moe_experts"),
)
# MoE models also fix these (compared when config.json is MoE; ``ffn_size`` is then skipped: every layer is MoE)
MOE_FIELDS = (
    ("moe_router_topk", "moe_router_topk"), ("moe_ffn_size", "moe_ffn_hidden_size"),
    ("moe_router_pre_softmax", "moe_router_pre_softmax"), ("moe_router_score_function", "moe_router_score_function"),
    ("moe_shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
)


def compare_architecture(model: ModelConfig, want: ModelConfig, source: str, *, key: str = "model.pretrained") -> None:
    """``model`` must compute what ``want`` (read from ``source``) does: the fields of ``ARCHITECTURE_FIELDS`` (plus
    ``rope_scaling_factor`` under llama3 scaling; for MoE ``MOE_FIELDS`` and not the unused dense FFN size). The
    first difference is a one-line ``ValueError`` starting with ``key`` and naming the field."""
    fields = ARCHITECTURE_FIELDS + ((("rope_scaling_factor", "rope_scaling_factor"),)
                                    if want.rope_scaling != "none" else ())
    if want.is_moe:
        fields = tuple(f for f in fields if f[0] != "ffn_size") + MOE_FIELDS
    for attr, name in fields:
        got, need = getattr(model, attr), getattr(want, attr)
        if got != need:
            raise ValueError(f"{key}: {source} gives {name}={need!r}, the model preset "
                             f"{model.name or '(unnamed)'!r} has {got!r}; compose the matching model= preset or "
                             f"override model.{name}")


def check_pretrained(model: ModelConfig) -> str:
    """``model.pretrained``'s ``config.json`` must describe the composed preset's architecture (the fields of
    ``ARCHITECTURE_FIELDS``; plus ``rope_scaling_factor`` under llama3 scaling, ``MOE_FIELDS`` for MoE): the first
    difference is a one-line ``ValueError`` naming the field. Returns the mapping table name (``architecture``)."""
    src = model.pretrained
    try:
        hf = read_hf_config(src)
        arch = architecture(hf)
        want = hf_model_config(hf)
    except ValueError as exc:
        raise ValueError(f"model.pretrained: {src}: {exc}") from None
    compare_architecture(model, want, f"{src}/config.json")
    return arch
