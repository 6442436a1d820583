"""Build megatron-core ``GPTModel`` chunks from a :class:`ModelConfig` under the current parallel layout.

``build_model(model_cfg, groups)`` returns this rank's model: one ``GPTModel`` (``pre_process`` / ``post_process``
from its pipeline stage), or a list of ``virtual_pp`` chunks with interleaved pipelining. Output logits are
vocab-parallel ``[B, S, V_pad/TP]`` (``V_pad = model_cfg.padded_vocab_size(tp)``) on the last stage; other stages
return hidden states ``[S/TP_sp, B, H]``. Each ``GPTModel`` carries ``oar_vocab_size = model_cfg.vocab_size`` (the
real vocabulary): ``policy.forward`` masks the padded logit columns with it, as the rollout engine samples only real
tokens.

Precision and placement: ``params_dtype`` on every device (bf16 for the large presets, fp32 for the tiny ones; CPU
runs bf16/fp16 too, with torch's CPU kernels). ``TransformerConfig`` gets ``params_dtype`` / ``pipeline_dtype`` /
``bf16`` / ``fp16`` from it, and every floating parameter is cast to it after the build, as megatron-LM's
``Float16Module`` does (megatron's local spec builds torch norms in fp32 otherwise; floating buffers such as MoE
token counts stay fp32), so the optimizer sees one dtype (``policy.optim.chunk_precision``). On GPU the model is
moved to the current CUDA device. With ``use_cpu_initialization`` (default on CPU) megatron initialises each full weight on the CPU from the shared seed and
slices it, so a TP=N shard equals the matching slice of the TP=1 weight (what the parallel-consistency harness
relies on); without it each shard is drawn from its TP rank's RNG stream on the device.
Wrapping (megatron DDP) belongs to the optimizer setup, not here; no ``Float16Module`` (the cast above replaces it,
and our passes call the ``GPTModel`` itself).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config.model import ModelConfig
from ..config.parallel import ParallelConfig
from .parallel import ParallelGroups

if TYPE_CHECKING:  # pragma: no cover
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

__all__ = ["MissingDependencyError", "build_model", "check_model_environment", "layer_spec", "transformer_config"]

# Minimum compute capability per FP8 recipe (Transformer Engine's checks: fp8 8.9 Ada / 9.0 Hopper, block scaling
# 9.0, MXFP8 10.0 Blackwell).
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.params_dtype
_INSTALL_TE = "install transformer-engine[pytorch] on a CUDA machine (pip install -e '.[gpu]')"


class MissingDependencyError(ImportError, ValueError):
    """A configuration asks for a package this machine lacks (caught as ImportError or as ValueError)."""


def te_installed() -> bool:
    """Whether Transformer Engine can be found (``transformer_engine`` importable)."""
    return importlib.util.find_spec("transformer_engine") is not None


def grouped_gemm_installed() -> bool:
    return importlib.util.find_spec("grouped_gemm") is not None


def check_model_environment(model: ModelConfig) -> None:
    """Machine checks for ``model`` before anything is built: Transformer Engine present when the config needs it,
    an FP8-capable GPU for FP8, the grouped-GEMM kernel for local grouped experts. One-line errors naming the key."""
    if model.fp8 is not None:
        if not te_installed():
            raise MissingDependencyError(f"model.fp8: FP8 ({model.fp8!r}, recipe {model.fp8_recipe!r}) needs "
                                         f"Transformer Engine, which is not installed; unset fp8 or {_INSTALL_TE}")
        if not torch.cuda.is_available():
            raise ValueError("model.fp8: FP8 needs a CUDA GPU (compute capability >= 8.9); this machine has none")
        need = FP8_MIN_CAPABILITY[model.fp8_recipe]
        have = tuple(torch.cuda.get_device_capability())
        if have < need:
            key = "fp8" if model.fp8_recipe in ("delayed", "tensorwise") else "fp8_recipe"
            raise ValueError(f"model.{key}: FP8 recipe {model.fp8_recipe!r} needs compute capability >= "
                             f"{need[0]}.{need[1]}; this GPU ({torch.cuda.get_device_name()}) is {have[0]}.{have[1]}")
    if model.transformer_impl == "transformer_engine" and not te_installed():
        raise MissingDependencyError("model.transformer_impl: 'transformer_engine' needs Transformer Engine, which is "
                                     f"not installed; use 'local' or {_INSTALL_TE}")
    if model.is_moe and model.moe_grouped_gemm and model.transformer_impl == "local" and not grouped_gemm_installed():
        raise MissingDependencyError("model.moe_grouped_gemm: with transformer_impl 'local' it needs the grouped_gemm "
                                     "package, which is not installed; use transformer_impl: transformer_engine "
                                     "or moe_grouped_gemm: false")


def _parallel_cfg(parallel: ParallelGroups | ParallelConfig) -> ParallelConfig:
    return parallel.cfg if isinstance(parallel, ParallelGroups) else parallel


def transformer_config(model: ModelConfig, parallel: ParallelGroups | ParallelConfig, *,
                       use_cpu_initialization: bool | None = None, **overrides: Any) -> TransformerConfig:
    """megatron ``TransformerConfig`` for ``model`` under ``parallel``; ``overrides`` are TransformerConfig fields
    (e.g. recompute or fusion switches) applied last. Fusions stay off: they need apex/TE kernels absent on CPU."""
    from megatron.core.transformer import TransformerConfig

    cfg = _parallel_cfg(parallel)
    cuda = torch.cuda.is_available()
    dtype = TORCH_DTYPES[model.params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups, kv_channels=model.head_dim, ffn_hidden_size=model.ffn_size,
        normalization=model.normalization, layernorm_epsilon=model.norm_epsilon, gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu, add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias, qk_layernorm=model.qk_layernorm, hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout, init_method_std=model.init_method_std,
        tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.virtual_pp, context_parallel_size=cfg.cp,
        expert_model_parallel_size=cfg.ep, expert_tensor_parallel_size=cfg.expert_tp,
        sequence_parallel=cfg.sequence_parallel, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, transformer_impl=model.transformer_impl,
        use_cpu_initialization=(not cuda) if use_cpu_initialization is None else use_cpu_initialization,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_moe_experts, moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_router_score_function=model.moe_router_score_function,
            moe_router_pre_softmax=model.moe_router_pre_softmax, moe_router_dtype=model.moe_router_dtype,
            moe_router_load_balancing_type=model.moe_router_load_balancing_type,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff, moe_z_loss_coeff=model.moe_z_loss_coeff,
            moe_grouped_gemm=model.moe_grouped_gemm, moe_token_dispatcher_type=model.moe_token_dispatcher_type)
    if model.fp8 is not None:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe, fp8_param=model.fp8_param_gather)
        if model.is_moe and model.moe_token_dispatcher_type not in ("allgather", "alltoall_seq"):
            # every expert's token count a multiple of the FP8 alignment: the router pads its routing map (megatron
            # refuses this with the allgather dispatcher, whose TEGroupedMLP pads per expert instead)
            kwargs.update(moe_router_padding_for_quantization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(model: ModelConfig):
    """The transformer-layer ``ModuleSpec``: megatron's local spec (torch norms, ``SequentialMLP`` experts unless
    grouped GEMM) or its Transformer Engine spec (fused norm+linear, TE attention, ``TEGroupedMLP``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if model.transformer_impl == "local":
        return gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=model.num_moe_experts, moe_grouped_gemm=model.moe_grouped_gemm,
            qk_layernorm=model.qk_layernorm, normalization=model.normalization)
    if not getattr(gpt_layer_specs, "HAVE_TE", False):
        raise MissingDependencyError("model.transformer_impl: 'transformer_engine' needs Transformer Engine, which "
                                     f"megatron-core could not import; use 'local' or {_INSTALL_TE}")
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        num_experts=model.num_moe_experts, moe_grouped_gemm=model.moe_grouped_gemm, qk_layernorm=model.qk_layernorm)


def build_model(model: ModelConfig, parallel: ParallelGroups | ParallelConfig, *, pre_process: bool | None = None,
                post_process: bool | None = None, vp_stage: int | None = None,
                use_cpu_initialization: bool | None = None,
                config_overrides: dict[str, Any] | None = None) -> GPTModel | list[GPTModel]:
    """This rank's ``GPTModel`` (or its ``virtual_pp`` chunks when interleaved and ``vp_stage`` is None).

    ``parallel``: the :class:`ParallelGroups` from ``init_parallel``, or the ``ParallelConfig`` megatron's parallel
    state was initialised with. ``pre_process`` / ``post_process`` default to the chunk's pipeline position;
    layers are split evenly, chunk ``v`` of stage ``p`` holding layers ``(v·pp + p)·L/(pp·vpp) + [0, L/(pp·vpp))``.
    """
    check_model_environment(model)  # before importing megatron: a missing TE fails fast and clearly
    from megatron.core import parallel_state as ps

    cfg = _parallel_cfg(parallel)
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model: megatron's parallel state is not initialised; call init_parallel() first")
    layout = cfg.validate(dist.get_world_size(), model)
    state = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if (layout.tp, layout.pp) != state:
        raise ValueError(f"parallel: build_model got tp={layout.tp}, pp={layout.pp} but parallel state was initialised "
                         f"with tp={ps.get_tensor_model_parallel_world_size()}, "
                         f"pp={ps.get_pipeline_model_parallel_world_size()}")
    config = transformer_config(model, cfg, use_cpu_initialization=use_cpu_initialization, **(config_overrides or {}))
    spec = layer_spec(model)
    if layout.virtual_pp is not None and vp_stage is None:
        return [_gpt(model, config, spec, layout.padded_vocab_size, pre_process, post_process, stage)
                for stage in range(layout.virtual_pp)]
    return _gpt(model, config, spec, layout.padded_vocab_size, pre_process, post_process, vp_stage)


def _gpt(model: ModelConfig, config, spec, padded_vocab: int, pre_process: bool | None, post_process: bool | None,
         vp_stage: int | None) -> GPTModel:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes

    interleaved = config.virtual_pipeline_model_parallel_size is not None
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=not interleaved, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=not interleaved, vp_stage=vp_stage)
    base = model.rotary_base
    gpt = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=padded_vocab,
        max_sequence_length=model.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type, rotary_percent=model.rotary_percent,
        rotary_base=int(base) if float(base).is_integer() else base, rope_scaling=model.rope_scaling == "llama3",
        rope_scaling_factor=model.rope_scaling_factor, vp_stage=vp_stage)
    # The real vocabulary (rows >= it are TP padding): policy.forward masks those logits (forward module docstring).
    gpt.oar_vocab_size = model.vocab_size
    gpt.oar_fp8_multiple = model.fp8_pad_multiple()  # tokens per rank per GEMM (policy.padding)
    for param in gpt.parameters():  # as megatron-LM's get_model: DDP / grad-norm code reads these attributes
        set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    for param in gpt.parameters():  # one dtype for every parameter (module docstring); buffers (MoE token counts,
        if param.is_floating_point() and param.dtype != config.params_dtype:  # expert bias) stay fp32
            param.data = param.data.to(config.params_dtype)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt
