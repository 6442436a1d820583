"""The ``model`` config group: the architecture a policy is built with (``policy/model.py`` turns it into a
megatron-core ``GPTModel``). Pure data: no megatron import, no GPU probing here; what depends on the machine
(Transformer Engine installed, FP8-capable GPU) is checked by ``oar_megatron.policy.model.check_model_environment``.

``MODEL_PRESETS`` holds the published shapes of the families users train (from each checkpoint's Hugging Face
``config.json``: Meta-Llama-3-8B / Llama-3.1-8B, Qwen2.5-{0.5,1.5,7}B, Qwen3-{0.6,1.7,4,8}B, Qwen3-30B-A3B) plus the
``tiny`` / ``tiny-moe`` test sizes; ``configs/model/<name>.yaml`` mirrors each preset (a test keeps them equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
ROPE_SCALINGS = ("none", "llama3")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")  # config.optim.MODEL_DTYPES
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
ROUTER_SCORES = ("softmax", "sigmoid")
ROUTER_DTYPES = ("fp32", "fp64")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
DISPATCHERS = ("allgather", "alltoall", "flex")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass(kw_only=True)
class ModelConfig:
    """Decoder-only transformer shape and numerics, named as in megatron-core's ``TransformerConfig`` / ``GPTModel``.

    Required: ``num_layers``, ``hidden_size``, ``num_attention_heads``, ``vocab_size``. ``None`` means "derive":
    ``num_query_groups`` = heads (MHA), ``ffn_hidden_size`` = 4·hidden, ``kv_channels`` = hidden / heads,
    ``moe_ffn_hidden_size`` = ``ffn_hidden_size``.
    """

    name: str | None = None  # preset name, informational
    num_layers: int  # transformer layers
    hidden_size: int  # model width
    num_attention_heads: int  # query heads
    num_query_groups: int | None = None  # GQA key/value heads
    kv_channels: int | None = None  # head dim; Qwen3 sets 128 with hidden != heads * 128
    ffn_hidden_size: int | None = None  # MLP inner width (None: 4·hidden_size)
    vocab_size: int  # the tokenizer's/checkpoint's; the embedding is padded, see padded_vocab_size(tp)
    make_vocab_size_divisible_by: int = 128  # the embedding is padded to a multiple of this · tp
    max_position_embeddings: int = 4096  # longest sequence (prompt + response) the model accepts
    position_embedding_type: str = "rope"  # rotary (rope) or a learned absolute table
    rotary_base: float = 10000.0  # RoPE theta
    rotary_percent: float = 1.0  # share of each head's dimensions rotated by RoPE
    rope_scaling: str = "none"  # none | llama3 (Llama-3.1 frequency scaling; megatron fixes low/high 1/4, orig 8192)
    rope_scaling_factor: float = 8.0  # llama3 RoPE scaling factor
    normalization: str = "RMSNorm"  # the norm of every layer and the final norm
    norm_epsilon: float = 1e-5  # normalisation epsilon
    swiglu: bool = True  # gated linear unit with SiLU; False: plain GELU MLP
    qk_layernorm: bool = False  # Qwen3
    untie_embeddings_and_output_weights: bool = False  # separate output layer (False: tied to the embedding)
    add_bias_linear: bool = False  # biases in every linear layer
    add_qkv_bias: bool = False  # Qwen2.5
    hidden_dropout: float = 0.0  # dropout after attention and MLP
    attention_dropout: float = 0.0  # dropout on attention probabilities
    init_method_std: float = 0.02  # std of the random weight initialisation

    # MoE (all layers MoE when num_moe_experts is set)
    num_moe_experts: int | None = None  # experts per MoE layer (None: a dense model)
    moe_router_topk: int = 2  # experts each token is routed to
    moe_ffn_hidden_size: int | None = None  # expert MLP width (None: ffn_hidden_size)
    moe_shared_expert_intermediate_size: int | None = None  # shared expert MLP width (None: no shared expert)
    moe_router_score_function: str = "softmax"  # how router logits become expert scores
    moe_router_pre_softmax: bool = False  # False: softmax over the top-k logits (= renormalised top-k, Qwen3-MoE)
    moe_router_dtype: str | None = None  # router computation dtype (None: the model's)
    moe_router_load_balancing_type: str = "aux_loss"  # load-balancing loss (per batch, per sequence, or none)
    moe_aux_loss_coeff: float = 0.0  # load-balancing auxiliary loss coefficient
    moe_z_loss_coeff: float | None = None  # router z-loss coefficient (None: off)
    moe_grouped_gemm: bool = False  # grouped GEMM for the local experts
    moe_token_dispatcher_type: str = "alltoall"  # how tokens reach their experts' EP ranks (flex: DeepEP, TE only)

    # implementation and precision
    transformer_impl: str = "local"  # megatron's layer spec: local (pure PyTorch, CPU too) or Transformer Engine
    params_dtype: str = "bfloat16"  # weights and activations, on CPU too: the one source of truth for
    # precision (config.optim.resolve_precision derives megatron's DDP/optimizer/loss-scale settings from it)
    fp8: str | None = None  # FP8 format of the GEMMs (None: off; Transformer Engine, bf16 only)
    fp8_recipe: str = "delayed"  # FP8 scaling recipe (blockwise: compute capability 9.0+, mxfp8: 10.0+)
    fp8_param_gather: bool = False  # keep FP8 weights and all-gather them in FP8 (megatron fp8_param)
    pretrained: str | None = None  # an HF model directory (config.json + safetensors) or a megatron checkpoint the
    # trainer starts from; its architecture must be this preset's (checked by TrainConfig.validate); docs/convert.md

    # ------------------------------------------------------------------------------------------------ derived

    @property
    def query_groups(self) -> int:
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def moe_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.ffn_size

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Embedding rows megatron allocates: ``ceil(vocab / (divisible_by·tp)) · divisible_by·tp`` (each TP shard
        holds ``padded / tp`` rows, a multiple of ``divisible_by``). Rows >= ``vocab_size`` are never real tokens."""
        multiple = self.make_vocab_size_divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple

    def fp8_pad_multiple(self) -> int:
        """Token counts (per rank, after sequence/context-parallel splitting) must be a multiple of this for FP8
        GEMMs: 32 for mxfp8, 16 for the other recipes (megatron ``fp8_utils.get_fp8_align_size``), 1 without FP8."""
        if self.fp8 is None:
            return 1
        return 32 if self.fp8_recipe == "mxfp8" else 16

    def num_params(self, tp: int = 1) -> int:
        """Total parameters of the megatron model built at TP=``tp`` (padded embedding rows counted, as allocated;
        one copy of tied weights). Layout as in the local layer spec: [q;k;v] fused, fc1 = [gate;up] when SwiGLU."""
        h, kv, heads, groups = self.hidden_size, self.head_dim, self.num_attention_heads, self.query_groups
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        qk_norm = 2 * kv * (2 if self.normalization == "LayerNorm" else 1) if self.qk_layernorm else 0
        qkv_out = (heads + 2 * groups) * kv
        attn = h * qkv_out + heads * kv * h + qk_norm
        attn += qkv_out if (self.add_bias_linear or self.add_qkv_bias) else 0
        attn += h if self.add_bias_linear else 0
        gate = 2 if self.swiglu else 1

        def mlp(ffn: int) -> int:
            bias = (gate * ffn + h) if self.add_bias_linear else 0
            return h * gate * ffn + ffn * h + bias

        if self.is_moe:
            ffn_block = self.num_moe_experts * h + self.num_moe_experts * mlp(self.moe_ffn_size)
            if self.moe_shared_expert_intermediate_size:
                ffn_block += mlp(self.moe_shared_expert_intermediate_size)
        else:
            ffn_block = mlp(self.ffn_size)
        layer = norm + attn + norm + ffn_block
        vocab = self.padded_vocab_size(tp) * h
        total = self.num_layers * layer + norm + vocab * (2 if self.untie_embeddings_and_output_weights else 1)
        if self.position_embedding_type == "learned_absolute":
            total += self.max_position_embeddings * h
        return total

    # ------------------------------------------------------------------------------------------------ checks

    def validate(self) -> ModelConfig:
        """Raise a one-line ``ValueError`` naming ``model.<key>`` for the first inconsistent setting; return self."""
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
                    "make_vocab_size_divisible_by"):
            _positive(key, getattr(self, key))
        for key in ("num_query_groups", "kv_channels", "ffn_hidden_size", "moe_ffn_hidden_size",
                    "moe_shared_expert_intermediate_size"):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))
        if self.num_attention_heads % self.query_groups:
            raise ValueError(f"model.num_query_groups: num_attention_heads ({self.num_attention_heads}) must be "
                             f"divisible by num_query_groups ({self.query_groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.kv_channels: hidden_size ({self.hidden_size}) is not divisible by "
                             f"num_attention_heads ({self.num_attention_heads}); set kv_channels (head dim)")
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        _choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        _choice("transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        _choice("params_dtype", self.params_dtype, PARAMS_DTYPES)
        if self.rotary_base <= 0 or not 0 < self.rotary_percent <= 1 or self.rope_scaling_factor <= 0:
            raise ValueError("model.rotary_base / model.rotary_percent / model.rope_scaling_factor: need "
                             "rotary_base > 0, 0 < rotary_percent <= 1, rope_scaling_factor > 0")
        if self.rope_scaling != "none" and self.position_embedding_type != "rope":
            raise ValueError(f"model.rope_scaling: {self.rope_scaling!r} needs position_embedding_type: rope")
        if self.norm_epsilon <= 0 or self.init_method_std <= 0:
            raise ValueError("model.norm_epsilon / model.init_method_std: must be > 0")
        if not (0 <= self.hidden_dropout < 1 and 0 <= self.attention_dropout < 1):
            raise ValueError("model.hidden_dropout / model.attention_dropout: must be in [0, 1)")
        self._validate_moe()
        self._validate_fp8()
        return self

    def _validate_moe(self) -> None:
        if not self.is_moe:
            for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
                if getattr(self, key) is not None:
                    raise ValueError(f"model.{key}: set, but model.num_moe_experts is unset (a dense model)")
            return
        _positive("num_moe_experts", self.num_moe_experts)
        if not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ValueError(f"model.moe_router_topk: must be in [1, num_moe_experts={self.num_moe_experts}], "
                             f"got {self.moe_router_topk}")
        _choice("moe_router_score_function", self.moe_router_score_function, ROUTER_SCORES)
        _choice("moe_router_load_balancing_type", self.moe_router_load_balancing_type, LOAD_BALANCING)
        _choice("moe_token_dispatcher_type", self.moe_token_dispatcher_type, DISPATCHERS)
        if self.moe_router_dtype is not None:
            _choice("moe_router_dtype", self.moe_router_dtype, ROUTER_DTYPES)
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff is not None and self.moe_z_loss_coeff < 0):
            raise ValueError("model.moe_aux_loss_coeff / model.moe_z_loss_coeff: must be >= 0")
        topk_one_softmax = self.moe_router_topk == 1 and self.moe_router_score_function == "softmax"
        if topk_one_softmax and not self.moe_router_pre_softmax:
            raise ValueError("model.moe_router_pre_softmax: must be true when moe_router_topk is 1 with softmax scores "
                             "(a softmax over one logit has zero gradient)")
        if self.add_bias_linear:
            raise ValueError("model.add_bias_linear: MoE experts with biases fail in backward in megatron-core 0.16 "
                             "(in-place view error in mlp.py, docs/megatron_cpu.md); use add_bias_linear: false")
        if self.moe_token_dispatcher_type == "flex" and self.transformer_impl != "transformer_engine":
            raise ValueError("model.moe_token_dispatcher_type: 'flex' (DeepEP/HybridEP) needs "
                             "transformer_impl: transformer_engine")

    def _validate_fp8(self) -> None:
        _choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        if self.fp8 is None:
            if self.fp8_param_gather:
                raise ValueError("model.fp8_param_gather: needs model.fp8 (e4m3 | hybrid)")
            return
        _choice("fp8", self.fp8, FP8_FORMATS)
        if self.transformer_impl != "transformer_engine":
            raise ValueError(f"model.fp8: FP8 ({self.fp8!r}) runs only with transformer_impl: transformer_engine, "
                             f"got {self.transformer_impl!r}")
        if self.params_dtype != "bfloat16":
            raise ValueError(f"model.fp8: FP8 training needs params_dtype: bfloat16, got {self.params_dtype!r}")
        align = self.fp8_pad_multiple()  # FP8 GEMMs need every dimension, tokens included, a multiple of it
        sizes = {"hidden_size": self.hidden_size, "ffn_hidden_size": self.ffn_size}
        if self.is_moe:
            sizes["moe_ffn_hidden_size"] = self.moe_ffn_size
        for key, size in sizes.items():
            if size % align:
                raise ValueError(f"model.{key}: FP8 ({self.fp8_recipe}) GEMMs need a multiple of {align}, got {size}")


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{key}: must be a positive integer, got {value!r}")


def _choice(key: str, value: Any, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"model.{key}: unknown {value!r}; known: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------------- presets

_LLAMA3 = dict(normalization="RMSNorm", swiglu=True, norm_epsilon=1e-5, rotary_base=500000.0,
               untie_embeddings_and_output_weights=True, vocab_size=128256)
_QWEN = dict(normalization="RMSNorm", swiglu=True, norm_epsilon=1e-6, rotary_base=1000000.0, vocab_size=151936)
_QWEN25 = dict(_QWEN, add_qkv_bias=True, max_position_embeddings=32768)
_QWEN3 = dict(_QWEN, qk_layernorm=True, kv_channels=128, max_position_embeddings=40960)

MODEL_PRESETS: dict[str, ModelConfig] = {
    # Meta-Llama-3-8B: 8K context, plain RoPE. Llama-3.1-8B: same shapes, 128K context with llama3 RoPE scaling.
    "llama3-8b": ModelConfig(name="llama3-8b", num_layers=32, hidden_size=4096, num_attention_heads=32,
                             num_query_groups=8, ffn_hidden_size=14336, max_position_embeddings=8192, **_LLAMA3),
    "llama3.1-8b": ModelConfig(name="llama3.1-8b", num_layers=32, hidden_size=4096, num_attention_heads=32,
                               num_query_groups=8, ffn_hidden_size=14336, max_position_embeddings=131072,
                               rope_scaling="llama3", rope_scaling_factor=8.0, **_LLAMA3),
    # Qwen2.5: QKV bias, tied embeddings below 3B; 32K native context (longer needs YaRN, not modelled).
    "qwen2.5-0.5b": ModelConfig(name="qwen2.5-0.5b", num_layers=24, hidden_size=896, num_attention_heads=14,
                                num_query_groups=2, ffn_hidden_size=4864, **_QWEN25),
    "qwen2.5-1.5b": ModelConfig(name="qwen2.5-1.5b", num_layers=28, hidden_size=1536, num_attention_heads=12,
                                num_query_groups=2, ffn_hidden_size=8960, **_QWEN25),
    "qwen2.5-7b": ModelConfig(name="qwen2.5-7b", num_layers=28, hidden_size=3584, num_attention_heads=28,
                              num_query_groups=4, ffn_hidden_size=18944, **{**_QWEN25, "vocab_size": 152064},
                              untie_embeddings_and_output_weights=True),
    # Qwen3 dense: QK-norm, head dim 128 regardless of hidden size; tied embeddings below 8B.
    "qwen3-0.6b": ModelConfig(name="qwen3-0.6b", num_layers=28, hidden_size=1024, num_attention_heads=16,
                              num_query_groups=8, ffn_hidden_size=3072, **_QWEN3),
    "qwen3-1.7b": ModelConfig(name="qwen3-1.7b", num_layers=28, hidden_size=2048, num_attention_heads=16,
                              num_query_groups=8, ffn_hidden_size=6144, **_QWEN3),
    "qwen3-4b": ModelConfig(name="qwen3-4b", num_layers=36, hidden_size=2560, num_attention_heads=32,
                            num_query_groups=8, ffn_hidden_size=9728, **_QWEN3),
    "qwen3-8b": ModelConfig(name="qwen3-8b", num_layers=36, hidden_size=4096, num_attention_heads=32,
                            num_query_groups=8, ffn_hidden_size=12288, untie_embeddings_and_output_weights=True,
                            **_QWEN3),
    # Qwen3-30B-A3B: every layer MoE, 128 experts top-8, no shared expert, renormalised top-k (norm_topk_prob).
    "qwen3-30b-a3b": ModelConfig(name="qwen3-30b-a3b", num_layers=48, hidden_size=2048, num_attention_heads=32,
                                 num_query_groups=4, ffn_hidden_size=6144, untie_embeddings_and_output_weights=True,
                                 num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
                                 moe_router_score_function="softmax", moe_router_dtype="fp32",
                                 moe_aux_loss_coeff=0.001, moe_token_dispatcher_type="alltoall", **_QWEN3),
    # Test sizes: every feature the families above use, small enough for CPU gloo tests.
    "tiny": ModelConfig(name="tiny", num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, vocab_size=250, make_vocab_size_divisible_by=64,
                        max_position_embeddings=128, rotary_base=10000.0, norm_epsilon=1e-6, qk_layernorm=True,
                        params_dtype="float32"),
    # The embedded default's policy (oar-train with no arguments): sized for the synthetic task's 24-token vocabulary;
    # init std 0.1 because a 64-wide model initialised at 0.02 stalls even supervised learning of the task.
    "tiny-synthetic": ModelConfig(name="tiny-synthetic", num_layers=2, hidden_size=64, num_attention_heads=4,
                                  num_query_groups=2, ffn_hidden_size=128, vocab_size=24, make_vocab_size_divisible_by=8,
                                  max_position_embeddings=64, rotary_base=10000.0, norm_epsilon=1e-6, qk_layernorm=True,
                                  init_method_std=0.1, params_dtype="float32"),
    "tiny-moe": ModelConfig(name="tiny-moe", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, vocab_size=250, make_vocab_size_divisible_by=64,
                            max_position_embeddings=128, norm_epsilon=1e-6, untie_embeddings_and_output_weights=True,
                            num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64,
                            moe_shared_expert_intermediate_size=64, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
                            moe_router_dtype="fp32", params_dtype="float32"),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A validated copy of ``MODEL_PRESETS[name]`` with ``overrides`` applied (field names as in ModelConfig)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"model.name: unknown preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"model.{bad[0]}: not a ModelConfig field")
    return replace(MODEL_PRESETS[name], **overrides).validate()


def load_structured(schema: type, group: str, source: str | Path | dict[str, Any], overrides: dict[str, Any]):
    """Merge a YAML path / name in ``configs/<group>/`` / dict onto ``schema`` (unknown keys and wrong types are
    rejected with the key named) and return the dataclass instance (not yet validated)."""
    if isinstance(source, dict):
        data = OmegaConf.create(source)
    else:
        path = Path(source)
        if path.suffix not in (".yaml", ".yml"):  # a name ("llama3.1-8b" has a dot but is no file name)
            path = CONFIG_DIR / group / f"{source}.yaml"
        if not path.is_file():
            raise ValueError(f"source: no {group} config at {path}")
        data = OmegaConf.load(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data, OmegaConf.create(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ValueError(f"{group} config: {str(exc).splitlines()[0]}") from None


def load_model(source: str | Path | dict[str, Any], **overrides: Any) -> ModelConfig:
    """A validated :class:`ModelConfig` from a YAML path, a name in ``configs/model/`` or a dict."""
    return load_structured(ModelConfig, "model", source, overrides).validate()
