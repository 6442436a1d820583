"""Model and parallel configs, launcher-environment parsing and the machine checks, in one process without megatron.

Shapes are checked against the published parameter totals of each checkpoint (model cards), so a wrong preset field
(head dim, tied embeddings, FFN size, experts) shows up as a wrong count.
"""

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oar_megatron.config import MODEL_PRESETS, ModelConfig, ParallelConfig, load_model, load_parallel, model_preset
from oar_megatron.policy import MissingDependencyError, build_model, check_model_environment, init_parallel, rank_env
from oar_megatron.policy import model as policy_model
from oar_megatron.policy.parallel import RankEnv, first_slurm_host

MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def _one_line_error(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------------------ presets


def test_every_preset_has_a_yaml_and_back():
    assert {p.stem for p in MODEL_DIR.glob("*.yaml")} == set(MODEL_PRESETS)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_yaml_equals_preset_and_validates(name):
    loaded = load_model(MODEL_DIR / f"{name}.yaml")
    assert loaded == MODEL_PRESETS[name] == load_model(name)
    assert loaded.name == name
    assert model_preset(name) == loaded


# Published totals (model cards: Llama-3-8B 8.03B; Qwen2.5 0.49/1.54/7.61B; Qwen3 0.6/1.7/4.0/8.2B; Qwen3-30B-A3B 30.5B)
PUBLISHED = {"llama3-8b": 8.03e9, "llama3.1-8b": 8.03e9, "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9,
             "qwen2.5-7b": 7.61e9, "qwen3-0.6b": 0.6e9, "qwen3-1.7b": 1.7e9, "qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9,
             "qwen3-30b-a3b": 30.5e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published_totals(name):
    assert abs(MODEL_PRESETS[name].num_params() / PUBLISHED[name] - 1) < 0.015


def test_preset_details_that_counts_cannot_see():
    q30 = MODEL_PRESETS["qwen3-30b-a3b"]
    assert (q30.num_moe_experts, q30.moe_router_topk, q30.moe_ffn_hidden_size, q30.num_layers) == (128, 8, 768, 48)
    assert q30.moe_shared_expert_intermediate_size is None and not q30.moe_router_pre_softmax
    assert MODEL_PRESETS["qwen2.5-7b"].add_qkv_bias and not MODEL_PRESETS["qwen3-8b"].add_qkv_bias
    assert MODEL_PRESETS["qwen3-8b"].qk_layernorm and MODEL_PRESETS["qwen3-8b"].head_dim == 128
    assert MODEL_PRESETS["llama3.1-8b"].rope_scaling == "llama3" and MODEL_PRESETS["llama3-8b"].rope_scaling == "none"
    assert MODEL_PRESETS["llama3-8b"].rotary_base == 500000.0 and MODEL_PRESETS["qwen3-4b"].rotary_base == 1e6


def test_padded_vocab_and_fp8_multiple():
    tiny, q8 = MODEL_PRESETS["tiny"], MODEL_PRESETS["qwen3-8b"]
    assert [tiny.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [256, 256, 256, 512]
    assert [q8.padded_vocab_size(tp) for tp in (1, 2, 8)] == [151936, 152064, 152576]
    assert tiny.fp8_pad_multiple() == 1
    te = dict(transformer_impl="transformer_engine", params_dtype="bfloat16", fp8="hybrid")
    assert model_preset("tiny", **te).fp8_pad_multiple() == 16
    assert model_preset("tiny", **te, fp8_recipe="mxfp8").fp8_pad_multiple() == 32


@given(vocab=st.integers(1, 300_000), div=st.sampled_from([1, 8, 64, 128]), tp=st.sampled_from([1, 2, 3, 4, 8]))
def test_padded_vocab_properties(vocab, div, tp):
    padded = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=1, vocab_size=vocab,
                         make_vocab_size_divisible_by=div).padded_vocab_size(tp)
    assert padded % (div * tp) == 0 and 0 <= padded - vocab < div * tp


# ------------------------------------------------------------------------------------------------ model validation

TE_BF16 = dict(transformer_impl="transformer_engine", params_dtype="bfloat16")


@pytest.mark.parametrize(
    "preset,overrides,match",
    [
        ("tiny", {"num_layers": 0}, "model.num_layers: must be a positive integer, got 0"),
        ("tiny", {"num_query_groups": 3}, r"model.num_query_groups: num_attention_heads \(4\) must be divisible"),
        ("tiny", {"hidden_size": 66}, r"model.kv_channels: hidden_size \(66\) is not divisible"),
        ("tiny", {"normalization": "BatchNorm"}, "model.normalization: unknown 'BatchNorm'"),
        ("tiny", {"rope_scaling": "yarn"}, "model.rope_scaling: unknown 'yarn'; known: none, llama3"),
        ("tiny", {"rope_scaling": "llama3", "position_embedding_type": "learned_absolute"}, "model.rope_scaling:"),
        ("tiny", {"transformer_impl": "te"}, "model.transformer_impl: unknown 'te'"),
        ("tiny", {"params_dtype": "float64"}, "model.params_dtype: unknown 'float64'"),
        ("tiny", {"rotary_percent": 0.0}, "model.rotary_base / model.rotary_percent"),
        ("tiny", {"hidden_dropout": 1.0}, "model.hidden_dropout"),
        ("tiny", {"moe_ffn_hidden_size": 64}, "model.moe_ffn_hidden_size: set, but model.num_moe_experts is unset"),
        ("tiny-moe", {"moe_router_topk": 5}, r"model.moe_router_topk: must be in \[1, num_moe_experts=4\]"),
        ("tiny-moe", {"moe_router_topk": 1}, "model.moe_router_pre_softmax: must be true"),
        ("tiny-moe", {"add_bias_linear": True}, "model.add_bias_linear: MoE experts with biases"),
        ("tiny-moe", {"moe_router_score_function": "relu"}, "model.moe_router_score_function: unknown 'relu'"),
        ("tiny-moe", {"moe_token_dispatcher_type": "flex"}, "model.moe_token_dispatcher_type: 'flex'"),
        ("tiny-moe", {"moe_aux_loss_coeff": -1.0}, "model.moe_aux_loss_coeff"),
        ("tiny-moe", {"moe_router_dtype": "bf16"}, "model.moe_router_dtype: unknown 'bf16'"),
        ("tiny", {"fp8": "e4m3"}, "model.fp8: FP8 \\('e4m3'\\) runs only with transformer_impl: transformer_engine"),
        ("tiny", {"fp8": "e5m2", **TE_BF16}, "model.fp8: unknown 'e5m2'; known: e4m3, hybrid"),
        ("tiny", {"fp8": "e4m3", "transformer_impl": "transformer_engine"}, "model.fp8: FP8 training needs params"),
        ("tiny", {"fp8": "e4m3", "fp8_recipe": "nvfp4", **TE_BF16}, "model.fp8_recipe: unknown 'nvfp4'"),
        ("tiny", {"fp8_param_gather": True}, "model.fp8_param_gather: needs model.fp8"),
    ],
)
def test_bad_model_settings(preset, overrides, match):
    with pytest.raises(ValueError, match=match) as exc:
        model_preset(preset, **overrides)
    _one_line_error(exc)


def test_model_loading_errors_name_the_key():
    with pytest.raises(ValueError, match="model.name: unknown preset 'gpt5'"):
        model_preset("gpt5")
    with pytest.raises(ValueError, match="model.hidden: not a ModelConfig field"):
        model_preset("tiny", hidden=3)
    with pytest.raises(ValueError, match="model config: Key 'hidden' not in 'ModelConfig'"):
        load_model("tiny", hidden=3)
    with pytest.raises(ValueError, match="model config: Value 'many' of type 'str' could not be converted"):
        load_model("tiny", num_layers="many")
    with pytest.raises(ValueError, match="model config: .*missing mandatory value: num_layers"):
        load_model({})
    with pytest.raises(ValueError, match="source: no model config"):
        load_model("no-such-model")
    assert load_model({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10}).ffn_size == 32


# ------------------------------------------------------------------------------------------------ parallel validation

TINY_TE = dict(transformer_impl="transformer_engine")


@pytest.mark.parametrize(
    "world,kwargs,preset,overrides,match",
    [
        (6, dict(tp=4), "tiny", {}, r"parallel.tp/pp/cp: world size 6 is not divisible by tp\*pp\*cp = 4\*1\*1 = 4"),
        (8, dict(tp=8), "tiny", {}, r"parallel.tp: model.num_attention_heads \(4\) is not divisible by tp \(8\)"),
        (4, dict(tp=4), "tiny", dict(num_attention_heads=12, num_query_groups=6, hidden_size=96),
         r"parallel.tp: model.num_query_groups \(6\) must be a multiple or a divisor of tp \(4\)"),
        (2, dict(sequence_parallel=True), "tiny", {}, "parallel.sequence_parallel: needs tp > 1"),
        (2, dict(tp=2, sequence_parallel=True), "tiny", {}, "parallel.sequence_parallel: needs model.transformer_impl"),
        (2, dict(virtual_pp=2), "tiny", {}, "parallel.virtual_pp: interleaved pipelining needs pp > 1"),
        (3, dict(pp=3), "tiny", {}, r"parallel.pp: model.num_layers \(4\) does not split evenly"),
        (2, dict(pp=2, virtual_pp=4), "tiny", {}, r"pp\*virtual_pp = 8 model chunks"),
        (2, dict(cp=2), "tiny", {}, "parallel.cp: context parallelism needs model.transformer_impl"),
        (2, dict(ep=2), "tiny", {}, "parallel.ep/etp: expert parallelism needs a MoE model"),
        (3, dict(ep=3), "tiny-moe", {}, r"parallel.ep: model.num_moe_experts \(4\) is not divisible by ep \(3\)"),
        (2, dict(ep=4), "tiny-moe", {}, r"parallel.ep/etp: etp\*ep = 1\*4 must divide tp\*cp\*dp = 2"),
        (4, dict(tp=2, ep=4, sequence_parallel=True), "tiny-moe", TINY_TE, r"etp\*ep = 2\*4 must divide tp\*cp\*dp"),
        (2, dict(tp=2), "tiny-moe", {}, "parallel.sequence_parallel: a MoE model with tp > 1 needs sequence_parallel"),
        (2, dict(overlap_param_gather=True, distributed_optimizer=False), "tiny", {}, "parallel.overlap_param_gather"),
        (2, dict(tp=0), "tiny", {}, "parallel.tp: must be a positive integer, got 0"),
        (2, dict(order="pp-dp-tp"), "tiny", {}, "parallel.order: unknown 'pp-dp-tp'"),
        (0, {}, "tiny", {}, "world_size: must be a positive integer"),
    ],
)
def test_bad_layouts(world, kwargs, preset, overrides, match):
    model = model_preset(preset, **overrides)
    with pytest.raises(ValueError, match=match) as exc:
        ParallelConfig(**kwargs).validate(world, model)
    _one_line_error(exc)


def test_layouts_that_megatron_accepts():
    q30 = model_preset("qwen3-30b-a3b", transformer_impl="transformer_engine")
    layout = ParallelConfig(tp=2, pp=2, ep=8, etp=1, sequence_parallel=True).validate(16, q30)
    assert (layout.dp, layout.expert_dp, layout.layers_per_chunk, layout.padded_vocab_size) == (4, 1, 24, 152064)
    assert layout.token_multiple == 2
    q8 = model_preset("qwen3-8b", transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="mxfp8")
    layout = ParallelConfig(tp=4, pp=2, virtual_pp=3, cp=2, sequence_parallel=True).validate(32, q8)
    assert (layout.dp, layout.layers_per_chunk, layout.token_multiple) == (2, 6, 32 * 4 * 4)
    assert ParallelConfig(tp=4).validate(4, MODEL_PRESETS["tiny"]).dp == 1  # 2 KV groups < tp=4: replicated
    assert ParallelConfig(ep=2).validate(4, MODEL_PRESETS["tiny-moe"]).expert_dp == 2
    assert ParallelConfig(tp=2, ep=2, etp=1, sequence_parallel=True).validate(
        2, model_preset("tiny-moe", **TINY_TE)).expert_dp == 1  # experts reuse the TP ranks


def test_load_parallel():
    assert load_parallel({"tp": 2, "pp": 2}) == ParallelConfig(tp=2, pp=2)
    with pytest.raises(ValueError, match="parallel config: Key 'dp' not in 'ParallelConfig'"):
        load_parallel({"dp": 2})


# ------------------------------------------------------------------------------------------------ launcher env


def test_rank_env_torchrun():
    env = rank_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "node0", "MASTER_PORT": "29400",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})  # torchrun inside srun: torchrun's variables win
    assert env == RankEnv(launcher="torchrun", rank=5, world_size=8, local_rank=1, local_world_size=4,
                          master_addr="node0", master_port=29400)
    assert env.init_method() == "tcp://node0:29400"
    single = rank_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert (single.master_addr, single.master_port, single.local_rank) == ("127.0.0.1", None, 0)
    assert single.init_method().startswith("tcp://127.0.0.1:")


def test_rank_env_slurm():
    env = rank_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
                    "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "123456"})
    assert env == RankEnv(launcher="slurm", rank=5, world_size=8, local_rank=1, local_world_size=4,
                          master_addr="gpu003", master_port=23456)
    env = rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "MASTER_ADDR": "fe80::1",
                    "MASTER_PORT": "1234"})
    assert env.init_method() == "tcp://[fe80::1]:1234" and env.local_world_size is None


def test_rank_env_without_launcher():
    env = rank_env({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("none", 0, 1, 0)


@pytest.mark.parametrize(
    "environ,match",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK: expected an integer, got 'x'"),
        ({"RANK": "0"}, "WORLD_SIZE: missing from the environment"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
         r"RANK: 2 is not in \[0, WORLD_SIZE=2\)"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, r"LOCAL_RANK: missing from the environment \(needed when the world size"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR: missing"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE: must be >= 1"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_RANK: 2 is not in \[0"),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2"}, r"SLURM_PROCID: 3 is not in \[0, SLURM_NTASKS=2\)"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "SLURM_JOB_NODELIST: missing"),
    ],
)
def test_rank_env_errors(environ, match):
    with pytest.raises(ValueError, match=match) as exc:
        rank_env(environ)
    _one_line_error(exc)


@pytest.mark.parametrize("nodelist,host", [("node7", "node7"), ("a1,b2", "a1"), ("gpu[003-005,9],cpu1", "gpu003"),
                                           ("r[1-2]-n[07-08],x", "r1-n07"), ("pre[12]", "pre12")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


# ------------------------------------------------------------------------------------------------ machine checks

FP8 = dict(transformer_impl="transformer_engine", params_dtype="bfloat16", fp8="e4m3")
needs_no_te = pytest.mark.skipif(policy_model.te_installed(), reason="Transformer Engine is installed here")


@needs_no_te
def test_transformer_engine_missing_is_a_clear_error():
    te = model_preset("tiny", transformer_impl="transformer_engine")
    for call in (lambda: check_model_environment(te), lambda: build_model(te, ParallelConfig()),
                 lambda: init_parallel(ParallelConfig(), te)):
        with pytest.raises(MissingDependencyError, match="model.transformer_impl: 'transformer_engine' needs "
                           "Transformer Engine, which is not installed; use 'local' or install") as exc:
            call()
        _one_line_error(exc)
        assert isinstance(exc.value, ImportError) and isinstance(exc.value, ValueError)
    assert not torch.distributed.is_initialized()  # init_parallel failed before creating a process group
    with pytest.raises(MissingDependencyError, match=r"model.fp8: FP8 \('e4m3', recipe 'delayed'\) needs Transformer "
                       "Engine, which is not installed"):
        check_model_environment(model_preset("tiny", **FP8))


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(policy_model, "te_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"FakeGPU sm_{capability}")


@pytest.mark.parametrize(
    "capability,recipe,match",
    [
        (None, "delayed", "model.fp8: FP8 needs a CUDA GPU"),
        ((8, 0), "delayed", r"model.fp8: FP8 recipe 'delayed' needs compute capability >= 8.9; this GPU .* is 8.0"),
        ((8, 6), "tensorwise", "model.fp8: FP8 recipe 'tensorwise' needs compute capability >= 8.9"),
        ((8, 9), "blockwise", r"model.fp8_recipe: FP8 recipe 'blockwise' needs compute capability >= 9.0"),
        ((9, 0), "mxfp8", r"model.fp8_recipe: FP8 recipe 'mxfp8' needs compute capability >= 10.0; this GPU .* is 9.0"),
        ((8, 9), "delayed", None),
        ((9, 0), "blockwise", None),
        ((10, 0), "mxfp8", None),
    ],
)
def test_fp8_needs_a_capable_gpu(monkeypatch, capability, recipe, match):
    _fake_gpu(monkeypatch, capability)
    model = model_preset("tiny", **FP8, fp8_recipe=recipe)
    if match is None:
        check_model_environment(model)
        return
    with pytest.raises(ValueError, match=match) as exc:
        check_model_environment(model)
    _one_line_error(exc)


def test_local_grouped_gemm_needs_its_kernel(monkeypatch):
    monkeypatch.setattr(policy_model, "grouped_gemm_installed", lambda: False)
    with pytest.raises(MissingDependencyError, match="model.moe_grouped_gemm: with transformer_impl 'local' it needs"):
        check_model_environment(model_preset("tiny-moe", moe_grouped_gemm=True))
    check_model_environment(model_preset("tiny-moe"))
