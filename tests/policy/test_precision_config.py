"""Precision has one source of truth, ``model.params_dtype``: every preset × the default optimizer config resolves to
megatron settings that agree with each other (TransformerConfig, DDP config, OptimizerConfig, loss scaling), and a
setting that contradicts the model dtype is a one-line error naming the key. Config-only: no weights, no ranks."""

from types import SimpleNamespace

import pytest
import torch

from oar_megatron.config import MODEL_PRESETS, ParallelConfig, model_preset
from oar_megatron.config.model import load_structured
from oar_megatron.config.optim import OptimConfig, resolve_precision
from oar_megatron.policy.model import transformer_config
from oar_megatron.policy.optim import chunk_precision, ddp_config, optimizer_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _one_line(exc_info) -> str:
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def _default_optims():
    return [OptimConfig(), load_structured(OptimConfig, "optim", "default", {})]


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_every_preset_with_default_optimizer_is_consistent(name, distributed_optimizer):
    model = MODEL_PRESETS[name]
    tc = transformer_config(model, ParallelConfig())
    for optim in _default_optims():
        p = resolve_precision(model.params_dtype, optim.validate())
        oc = optimizer_config(p, optim, distributed_optimizer=distributed_optimizer)
        dc = ddp_config(p, distributed_optimizer=distributed_optimizer, overlap_grad_reduce=False)
        dtype = DTYPES[model.params_dtype]
        # The model is built in its configured dtype (CPU included) and the optimizer is told the same dtype.
        assert tc.params_dtype == tc.pipeline_dtype == oc.params_dtype == dtype
        assert (tc.bf16, tc.fp16) == (oc.bf16, oc.fp16) == (dtype == torch.bfloat16, dtype == torch.float16)
        # megatron picks FP32Optimizer unless fp16 or bf16 or the distributed optimizer: a 16-bit model must get a
        # mixed-precision optimizer (fp32 main weights), whatever the layout.
        mixed_optimizer = oc.fp16 or oc.bf16 or oc.use_distributed_optimizer
        assert mixed_optimizer or dtype == torch.float32
        # fp32 main grads (DDP buffers reduced in fp32) and fp32 main weights: megatron's only choice without the
        # precision-aware optimizer (TE FusedAdam).
        assert dc.grad_reduce_in_fp32 and oc.main_grads_dtype == oc.main_params_dtype == torch.float32
        assert not oc.use_precision_aware_optimizer and oc.use_distributed_optimizer == distributed_optimizer
        # Loss scaling: dynamic for fp16 (megatron's DynamicGradScaler, built when fp16 and loss_scale is None),
        # none for bf16/fp32.
        assert oc.loss_scale is None
        assert p.dynamic_loss_scale == (dtype == torch.float16)
        assert oc.fp8_recipe is None  # presets are not FP8


def test_large_presets_are_bf16_and_tiny_ones_fp32():
    # What the test above covers: every 16-bit preset is bf16 (and so gets Float16Optimizer / DistributedOptimizer).
    dtypes = {name: m.params_dtype for name, m in MODEL_PRESETS.items()}
    assert {n for n, d in dtypes.items() if d == "float32"} == {"tiny", "tiny-moe", "tiny-synthetic"}
    assert set(dtypes.values()) == {"float32", "bfloat16"}


def test_fp16_and_fp8_resolve():
    fp16 = model_preset("tiny", params_dtype="float16")
    p = resolve_precision(fp16.params_dtype, OptimConfig(initial_loss_scale=1024.0))
    oc = optimizer_config(p, OptimConfig(initial_loss_scale=1024.0), distributed_optimizer=False)
    assert oc.fp16 and not oc.bf16 and oc.loss_scale is None and oc.initial_loss_scale == 1024.0
    static = OptimConfig(loss_scale=128.0)
    p = resolve_precision("float16", static)
    assert not p.dynamic_loss_scale and optimizer_config(p, static, distributed_optimizer=True).loss_scale == 128.0
    p = resolve_precision("bfloat16", static)  # a static scale is allowed for bf16 (megatron's ConstantGradScaler)
    assert p.loss_scale == 128.0 and not p.dynamic_loss_scale
    fp8 = model_preset("qwen3-8b", transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="tensorwise")
    p = resolve_precision(fp8.params_dtype, OptimConfig(), fp8_recipe=fp8.fp8_recipe if fp8.fp8 else None)
    assert optimizer_config(p, OptimConfig(), distributed_optimizer=True).fp8_recipe == "tensorwise"


@pytest.mark.parametrize("dtype,optim,match", [
    ("float32", dict(loss_scale=128.0), "optim.loss_scale: loss scaling is for 16-bit models"),
    ("float32", dict(initial_loss_scale=1024.0), "optim.initial_loss_scale: the dynamic loss scale is for float16"),
    ("bfloat16", dict(initial_loss_scale=1024.0), "optim.initial_loss_scale: the dynamic loss scale is for float16"),
    ("float16", dict(loss_scale=0.0), "optim.loss_scale: must be > 0"),
    ("float16", dict(initial_loss_scale=-1.0), "optim.initial_loss_scale: must be > 0"),
    ("float64", {}, "model.params_dtype: unknown 'float64'"),
])
def test_contradictions_are_one_line_errors(dtype, optim, match):
    with pytest.raises(ValueError, match=match) as exc:
        resolve_precision(dtype, OptimConfig(**optim))
    _one_line(exc)


def test_train_config_checks_precision_and_the_old_bf16_switch_is_gone():
    from oar_megatron.trainer.compose import compose_config

    with pytest.raises(ValueError, match="optim.loss_scale: loss scaling is for 16-bit models") as exc:
        compose_config(["optim.loss_scale=128"]).validate(1)  # the default model (tiny-synthetic) is fp32
    _one_line(exc)
    cfg = compose_config(["model.params_dtype=bfloat16", "optim.loss_scale=128"])
    cfg.validate(1)
    with pytest.raises(Exception, match="bf16"):  # precision is the model's: optim.bf16 is no longer a key
        compose_config(["optim.bf16=true"])


def test_chunk_precision_reads_the_built_model_and_refuses_a_mismatch():
    def chunk(config_dtype, *param_dtypes):
        module = torch.nn.Module()
        for i, d in enumerate(param_dtypes):
            module.register_parameter(f"w{i}", torch.nn.Parameter(torch.zeros(2, dtype=d)))
        module.config = SimpleNamespace(params_dtype=config_dtype, fp8=None, fp8_recipe="delayed")
        return module

    p = chunk_precision([chunk(torch.bfloat16, torch.bfloat16)], OptimConfig())
    assert p.params_dtype == "bfloat16" and p.bf16 and p.mixed and not p.dynamic_loss_scale
    with pytest.raises(ValueError, match="model.params_dtype: the model was configured bfloat16 but holds "
                                         "torch.float32 parameters") as exc:
        chunk_precision([chunk(torch.bfloat16, torch.bfloat16, torch.float32)], OptimConfig())
    _one_line(exc)


# ------------------------------------------------------------------------------------------------ FP8 padding


def _gpt_with(config):
    """A GPTModel shell holding only a ``TransformerConfig``: what policy.padding reads (no weights, no TE)."""
    from megatron.core.models.gpt import GPTModel

    shell = GPTModel.__new__(GPTModel)
    shell.config = config
    return shell


@pytest.mark.parametrize("recipe,layout,multiple", [
    ("delayed", dict(tp=1), 16),
    ("tensorwise", dict(tp=4, sequence_parallel=True), 16 * 4),
    ("blockwise", dict(tp=2, sequence_parallel=True, cp=2), 16 * 2 * 4),
    ("mxfp8", dict(tp=4, sequence_parallel=True, cp=2), 32 * 4 * 4),
])
def test_fp8_padding_arithmetic_follows_the_model_and_layout(recipe, layout, multiple):
    from oar_megatron.policy import MissingDependencyError, check_model_environment
    from oar_megatron.policy.padding import (fp8_multiple, pad_rows, padded_length, round_up, sequence_multiple,
                                             set_fp8_multiple)

    model = model_preset("qwen3-8b", transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe=recipe)
    parallel = ParallelConfig(**layout)
    with pytest.raises(MissingDependencyError, match="model.fp8: FP8 .* needs Transformer Engine"):
        check_model_environment(model)  # this CPU has no TE: the build is refused before anything happens
    world = parallel.tp * parallel.cp
    assert parallel.validate(world, model).token_multiple == multiple
    gpt = _gpt_with(transformer_config(model, parallel))  # the config FP8 would run with; TE is never touched
    assert fp8_multiple(gpt) == model.fp8_pad_multiple() == (32 if recipe == "mxfp8" else 16)
    assert sequence_multiple(gpt) == multiple  # the same rule as ParallelConfig.token_multiple
    for length in (1, 7, multiple - 1, multiple, multiple + 1, 3 * multiple + 5):
        padded = padded_length(gpt, length)
        assert padded >= length and padded - length < multiple and padded % multiple == 0
        for b in (1, 3):  # each rank's token count after the SP/CP split is a multiple of the FP8 alignment
            per_rank = b * padded // (parallel.tp if parallel.sequence_parallel else 1) // (
                2 * parallel.cp if parallel.cp > 1 else 1)
            assert per_rank % fp8_multiple(gpt) == 0
    set_fp8_multiple(gpt, 24)  # the tests' override replaces the FP8 factor only
    assert sequence_multiple(gpt) == multiple // model.fp8_pad_multiple() * 24
    set_fp8_multiple(gpt, None)
    assert sequence_multiple(gpt) == multiple
    with pytest.raises(ValueError, match="multiple: must be a positive integer or None, got 0"):
        set_fp8_multiple(gpt, 0)
    assert [round_up(n, 16) for n in (0, 1, 16, 17)] == [0, 16, 16, 32]
    rows = pad_rows(torch.tensor([[5, 6], [7, 8], [9, 9]]), 4, 0)  # decode batches: dummy rows of pad_id
    assert rows.tolist() == [[5, 6], [7, 8], [9, 9], [0, 0]] and pad_rows(rows, 4, 0) is rows
    without = _gpt_with(transformer_config(model_preset("qwen3-8b"), ParallelConfig()))
    assert (fp8_multiple(without), padded_length(without, 7)) == (1, 7)  # no FP8, no SP/CP: no padding


def test_fp8_model_dimensions_must_align():
    with pytest.raises(ValueError, match="model.ffn_hidden_size: FP8 .* need a multiple of 16, got 100") as exc:
        model_preset("tiny", transformer_impl="transformer_engine", params_dtype="bfloat16", fp8="e4m3",
                     ffn_hidden_size=100)
    _one_line(exc)
    for name, preset in MODEL_PRESETS.items():  # every preset can turn FP8 on (mxfp8 needs 32)
        if preset.hidden_size >= 896:
            model_preset(name, transformer_impl="transformer_engine", params_dtype="bfloat16", fp8="e4m3")


@pytest.mark.parametrize("dispatcher,padded", [("alltoall", True), ("allgather", False)])
def test_fp8_moe_router_pads_expert_token_counts(dispatcher, padded, monkeypatch):
    # FP8 grouped GEMMs need each expert's token count aligned: the router pads with the alltoall dispatcher
    # (megatron's moe_router_padding_for_quantization); allgather refuses that switch, and without FP8 it stays off.
    # TransformerConfig asks TE's version for FP8 MoE: answer as TE >= 1.7 would (TE itself is never touched)
    import megatron.core.transformer.transformer_config as tc

    monkeypatch.setattr(tc, "is_te_min_version", lambda *a, **k: True)
    moe = model_preset("qwen3-30b-a3b", transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="tensorwise",
                       moe_token_dispatcher_type=dispatcher)
    assert transformer_config(moe, ParallelConfig(ep=2)).moe_router_padding_for_quantization is padded
    plain = model_preset("qwen3-30b-a3b", transformer_impl="transformer_engine", moe_token_dispatcher_type=dispatcher)
    assert not transformer_config(plain, ParallelConfig(ep=2)).moe_router_padding_for_quantization
