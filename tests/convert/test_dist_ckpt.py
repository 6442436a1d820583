"""Megatron distributed checkpoints in and out (``convert.checkpoint``, ``oar-convert hf-to-mcore`` / ``mcore-to-hf``).

Tiny random HF Qwen3 (untied, QK-norm) and Llama-3.2-style (tied, llama3 RoPE) models (``hf_tiny``, vocab 100):

- ``hf-to-mcore`` at TP1 and TP2 (vocabulary padded to a multiple of 8·TP: 104 rows at TP1, 112 at TP2; the
  Llama one through the CLI at the default 128: 256 rows): each converted checkpoint loads into a TP1 and a TP2
  model (``load_model_weights``; another padding than the saved one each time) whose logits and log-probs equal
  HF's within 1e-4;
- ``mcore-to-hf`` of each (TP1- and TP2-saved) is bit-identical to the HF tensors, several shards with an index
  under a small ``--max-shard-size``;
- a generated ``config.json`` round trip; one-line errors with nothing left behind.
"""

import json
import shutil

import pytest
import torch

from tests.convert.hf_tiny import make_hf_model
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.dist]

B, S = 2, 16
TOL = 1e-4


def _load(rank, world, cases, ids, export_dir):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import dist_checkpointing

    from oar_megatron.checkpoint import load_model_weights
    from oar_megatron.config import ParallelConfig
    from oar_megatron.convert import hf_model_config
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel
    from oar_megatron.policy.forward import response_logprobs
    from tests.megatron_helpers import gather_last_dim

    out, groups = {}, None
    for name, (hf_dir, ckpt) in cases.items():
        cfg = hf_model_config(hf_dir, make_vocab_size_divisible_by=8)  # 104 rows at TP1, 112 at TP2
        if groups is None:
            groups = init_parallel(ParallelConfig(tp=world), cfg, seed=1)
        gpt = build_model(cfg, groups).eval()
        state = load_model_weights([gpt], ckpt)
        out[f"{name}/converted"] = bool(state["common"]["converted"])
        meta = dist_checkpointing.load_tensors_metadata(f"{ckpt}/step_00000000/dist")
        out[f"{name}/saved_rows"] = meta["embedding.word_embeddings.weight"].global_shape[0]
        out[f"{name}/model_rows"] = gpt.embedding.word_embeddings.weight.shape[0] * world
        pos = torch.arange(S).expand(B, S)
        tp_group = groups.tp_group if world > 1 else None
        with torch.no_grad():
            logits = gpt(ids, pos, attention_mask=None)
            if world > 1:
                logits = gather_last_dim(logits, tp_group)
            mask = torch.zeros(B, S, dtype=torch.bool)
            mask[:, 4:] = True
            logp, _ = response_logprobs(gpt, ids, pos, mask, tp_group=tp_group)
        out[f"{name}/logits"] = logits[..., : cfg.vocab_size].clone()
        out[f"{name}/logp"] = logp
        if name == "qwen3_tp1":  # the trainer's API on a weights-only checkpoint: CheckpointManager.load(actor)
            from oar_megatron.checkpoint import CheckpointManager
            from oar_megatron.config.algorithm import AlgorithmConfig
            from oar_megatron.config.optim import OptimConfig
            from oar_megatron.policy.actor import PolicyActor

            algorithm = AlgorithmConfig()
            algorithm.kl.coef = 0.0
            actor = PolicyActor(model=cfg, parallel=ParallelConfig(tp=world), optim=OptimConfig(),
                                algorithm=algorithm, groups=groups, reference=None)
            got = CheckpointManager(ckpt, keep_last=0, groups=groups).load(
                actor, load_optimizer=False, load_rng=False, load_reference=False)
            mine = dict(gpt.named_parameters())
            out["actor_load_step"] = got["step"]
            out["actor_load_equal"] = all(torch.equal(p, mine[n]) for n, p in actor.models[0].named_parameters())
            del actor
        del gpt
    destroy_parallel(process_group=False)
    if world == 1:  # one process: export every converted checkpoint (mcore-to-hf uses the one-rank group)
        from oar_megatron.convert.cli import main

        for name, (_, ckpt) in cases.items():
            out[f"{name}/export_rc"] = main(["mcore-to-hf", ckpt, f"{export_dir}/{name}", "--max-shard-size", "40KB",
                                             "--quiet"])
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from oar_megatron.convert.checkpoint import hf_to_mcore_checkpoint
    from oar_megatron.convert.cli import main

    base = tmp_path_factory.mktemp("dist_ckpt")
    ids = torch.randint(0, 100, (B, S), generator=torch.Generator().manual_seed(5))
    refs = {}
    for case in ("qwen3", "llama3.2"):
        model = make_hf_model(case, base / case)
        (base / case / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, "case": case}))
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        logp = torch.nn.functional.pad(logp, (1, 0))
        logp[:, :4] = 0
        refs[case] = (logits, logp)
    cases = {"qwen3_tp1": (str(base / "qwen3"), str(base / "q_tp1")),
             "qwen3_tp2": (str(base / "qwen3"), str(base / "q_tp2")),
             "llama32_tp2": (str(base / "llama3.2"), str(base / "l_tp2"))}
    hf_to_mcore_checkpoint(base / "qwen3", base / "q_tp1", tp=1, make_vocab_size_divisible_by=8, quiet=True)
    hf_to_mcore_checkpoint(base / "qwen3", base / "q_tp2", tp=2, make_vocab_size_divisible_by=8, quiet=True)
    assert main(["hf-to-mcore", str(base / "llama3.2"), str(base / "l_tp2"), "--tp", "2", "--quiet"]) == 0
    return base, cases, refs, ids


@pytest.mark.parametrize("world", [1, 2])
def test_converted_checkpoint_loads_under_any_tp_and_exports_bit_identical(converted, world):
    from safetensors.torch import load_file

    base, cases, refs, ids = converted
    for name, (_, ckpt) in cases.items():  # the converted-checkpoint format
        assert (base / ckpt / "latest").read_text().strip() == "step_00000000"
        hf = base / ckpt / "hf"
        assert all((hf / f).is_file() for f in ("config.json", "generation_config.json", "tokenizer_config.json"))
        assert not list(base.glob(f".{name}.tmp-*"))
    out = run_ranks(_load, world, cases, ids, str(base / "export"))[0]
    assert out["actor_load_step"] == 0 and out["actor_load_equal"]
    for name, (hf_dir, _) in cases.items():
        case = "qwen3" if name.startswith("qwen3") else "llama3.2"
        logits, logp = refs[case]
        assert out[f"{name}/converted"]
        saved = {"qwen3_tp1": 104, "qwen3_tp2": 112, "llama32_tp2": 256}[name]
        assert out[f"{name}/saved_rows"] == saved and out[f"{name}/model_rows"] == {1: 104, 2: 112}[world]
        err = (out[f"{name}/logits"] - logits).abs().max().item()
        assert err < TOL, f"{name} loaded at tp{world}: max |Δlogit| {err}"
        assert (out[f"{name}/logp"] - logp).abs().max().item() < TOL, name
        if world == 1:  # mcore-to-hf: bit-identical, sharded with an index
            assert out[f"{name}/export_rc"] == 0
            exp = base / "export" / name
            index = json.loads((exp / "model.safetensors.index.json").read_text())
            files = sorted(set(index["weight_map"].values()))
            assert len(files) > 1 and all((exp / f).stat().st_size <= 40_000 + 4096 for f in files)
            got = {}
            for f in files:
                got.update(load_file(str(exp / f)))
            assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
            ref = load_file(f"{hf_dir}/model.safetensors")
            assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref), name
            assert all(index["weight_map"][n] in files for n in ref)
            assert json.loads((exp / "config.json").read_text())["architectures"] == \
                json.loads((base / hf_dir / "config.json").read_text())["architectures"]
            assert (exp / "generation_config.json").is_file()
            assert (exp / "tokenizer_config.json").read_text() == (base / hf_dir / "tokenizer_config.json").read_text()


def _resave_pp2(rank, world, cases, out_root):
    """Load each converted checkpoint into this PP stage's model and save it again under PP=2 (weights only)."""
    import warnings

    warnings.filterwarnings("ignore")
    from oar_megatron.checkpoint import CheckpointManager, load_model_weights
    from oar_megatron.config import ParallelConfig
    from oar_megatron.convert import hf_model_config
    from oar_megatron.policy import build_model, destroy_parallel, init_parallel

    groups, layers = None, {}
    for name, (hf_dir, ckpt) in cases.items():
        cfg = hf_model_config(hf_dir, make_vocab_size_divisible_by=8)
        if groups is None:
            groups = init_parallel(ParallelConfig(pp=2), cfg, seed=1)
        gpt = build_model(cfg, groups)
        load_model_weights([gpt], ckpt)
        layers[name] = sorted(n for n, _ in gpt.named_parameters())
        CheckpointManager(f"{out_root}/{name}", keep_last=0, groups=groups).save_weights(
            0, [gpt], common={"step": 0, "converted": True})
    destroy_parallel(process_group=False)
    return layers


def test_pp2_saved_checkpoint_exports_bit_identical(converted, tmp_path):
    """A PP=2-saved checkpoint (each stage its layers; tied embeddings: the output layer on the last stage shares the
    embedding's key) exports to the original HF tensors."""
    from safetensors.torch import load_file

    from oar_megatron.convert.cli import main

    base, cases, _, _ = converted
    cases = {k: v for k, v in cases.items() if k != "qwen3_tp1"}
    first, last = run_ranks(_resave_pp2, 2, cases, str(tmp_path / "pp2"))
    for name, (hf_dir, _) in cases.items():
        assert "embedding.word_embeddings.weight" in first[name] and "output_layer.weight" not in first[name]
        assert "decoder.final_layernorm.weight" in last[name] and "embedding.word_embeddings.weight" not in last[name]
        shutil.copytree(base / cases[name][1] / "hf", tmp_path / "pp2" / name / "hf")
        assert main(["mcore-to-hf", str(tmp_path / "pp2" / name), str(tmp_path / name), "--quiet"]) == 0
        got, ref = load_file(str(tmp_path / name / "model.safetensors")), load_file(f"{hf_dir}/model.safetensors")
        assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref), name


def test_dist_keys_map_to_local_module_names():
    """The global dist-checkpointing keys of a MoE GPTModel (as megatron-core 0.16 saves them: fused-norm key names,
    layers and experts as prepended axes) map to the local spec's TP1 parameter names."""
    from types import SimpleNamespace

    from oar_megatron.config.model import ModelConfig
    from oar_megatron.convert.checkpoint import _dist_slices

    saved = {"embedding.word_embeddings.weight": (56, 32), "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
             (2, 32), "decoder.layers.self_attention.linear_proj.weight": (2, 32, 32),
             "decoder.layers.self_attention.linear_qkv.weight": (2, 96, 32),
             "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 32), "decoder.layers.mlp.router.weight": (2, 4, 32),
             "decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 4, 96, 32),
             "decoder.layers.mlp.experts.experts.linear_fc2.weight": (2, 4, 32, 48),
             "decoder.final_layernorm.weight": (32,), "output_layer.weight": (56, 32),
             "optimizer.state.exp_avg.output_layer.weight": (56, 32), "reference.output_layer.weight": (56, 32)}
    meta = {k: SimpleNamespace(global_shape=v, dtype=torch.float32) for k, v in saved.items()}
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=50,
                      num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48).validate()
    slices = _dist_slices(meta, cfg)
    layer = ["input_layernorm.weight", "pre_mlp_layernorm.weight", "mlp.router.weight",
             "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
             *(f"mlp.experts.local_experts.{e}.linear_fc{k}.weight" for e in range(4) for k in (1, 2))]
    want = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight",
            *(f"decoder.layers.{i}.{n}" for i in range(2) for n in layer)}
    assert set(slices) == want
    s = slices["decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"]
    assert (s.key, s.index, s.shape) == ("decoder.layers.mlp.experts.experts.linear_fc2.weight", (1, 2), (32, 48))
    s = slices["decoder.layers.0.input_layernorm.weight"]
    assert (s.key, s.index, s.shape) == ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (0,), (32,))


@pytest.mark.parametrize("case", ["qwen3", "llama3.2", "qwen2", "llama3"])
def test_generated_config_round_trip(tmp_path, case):
    """config.json generated from the ModelConfig (a run without an HF directory) reads back to the same config,
    and transformers builds from it a model computing the original's logits with the original weights."""
    import transformers

    from oar_megatron.convert import hf_model_config
    from oar_megatron.convert.checkpoint import hf_config_from_model
    from oar_megatron.convert.source import arch_of_model

    model = make_hf_model(case, tmp_path)
    cfg = hf_model_config(tmp_path)
    gen = hf_config_from_model(cfg, arch_of_model(cfg))
    assert hf_model_config(gen) == cfg
    assert gen["architectures"] == json.loads((tmp_path / "config.json").read_text())["architectures"]
    config = transformers.AutoConfig.for_model(gen["model_type"], **{k: v for k, v in gen.items() if k != "model_type"})
    again = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    again.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def _err(capsys):
    err = capsys.readouterr().err
    assert err.startswith("oar-convert: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """No process is started for these: every check runs before the ranks (headers only)."""
    from safetensors.torch import load_file, save_file

    from oar_megatron.convert.cli import main

    hf = tmp_path / "hf"
    make_hf_model("qwen3", hf)
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' save progress

    def run(*args):
        rc = main(["hf-to-mcore", *map(str, args), "--quiet"])
        assert rc == 2 and not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
        return _err(capsys)

    bad = tmp_path / "unknown"
    shutil.copytree(hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    assert "GPT2LMHeadModel" in run(bad, out)
    assert "parallel.tp" in run(hf, out, "--tp", "3")  # 4 heads, 2 groups
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(hf / "config.json", missing)
    tensors = load_file(str(hf / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(missing / "model.safetensors"))
    assert "model.layers.1.mlp.up_proj.weight" in run(missing, out)
    save_file({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, str(missing / "model.safetensors"))
    assert "model.layers.0.mlp.extra.weight" in run(missing, out)
    save_file({**tensors, "model.norm.weight": torch.zeros(3)}, str(missing / "model.safetensors"))
    assert "model.norm.weight" in run(missing, out)
    data = (hf / "model.safetensors").read_bytes()
    (missing / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    assert "model.safetensors" in run(missing, out)
    out.mkdir()
    assert main(["hf-to-mcore", str(hf), str(out)]) == 2 and "exists" in _err(capsys)


def test_mcore_to_hf_bad_checkpoint_is_one_line(converted, tmp_path, capsys):
    from oar_megatron.convert.cli import main

    base, cases, _, _ = converted
    out = tmp_path / "out"
    capsys.readouterr()

    def run(*args):
        rc = main(["mcore-to-hf", *map(str, args), "--quiet"])
        assert rc == 2 and not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
        return _err(capsys)

    ckpt = tmp_path / "ckpt"
    shutil.copytree(base / "q_tp2", ckpt)
    other = tmp_path / "other"  # --hf-config naming another model: the mismatch names the field
    shutil.copytree(ckpt / "hf", other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    assert "--hf-config" in (msg := run(ckpt, out, "--hf-config", other)) and "ffn_hidden_size=96" in msg
    assert "max-shard-size" in run(ckpt, out, "--max-shard-size", "lots")
    dist = ckpt / "step_00000000" / "dist"
    shard = sorted(dist.glob("*.distcp"), key=lambda f: f.stat().st_size)[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    assert "dist checkpoint" in run(ckpt, out)
    (dist / ".metadata").write_bytes(b"garbage")
    assert "metadata" in run(ckpt, out)
    (tmp_path / "empty").mkdir()
    assert "CKPT_DIR" in run(tmp_path / "empty", out)


def test_bf16_sharded_hf_round_trip(tmp_path):
    """A bf16 HF checkpoint saved in several shards (with its index) converts in bf16 (its own dtype, the default)
    and exports back bit-identical, in bf16, with config.json's dtype bf16."""
    from oar_megatron.convert.checkpoint import mcore_to_hf_checkpoint
    from oar_megatron.convert.cli import main
    from oar_megatron.convert.io import SafetensorsReader

    model = make_hf_model("llama3", tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"), max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert main(["hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "conv"), "--quiet"]) == 0
    assert main(["mcore-to-hf", str(tmp_path / "conv"), str(tmp_path / "out"), "--quiet"]) == 0
    with SafetensorsReader(tmp_path / "hf") as ref, SafetensorsReader(tmp_path / "out") as got:
        assert set(ref.names()) == set(got.names())
        for n in ref.names():
            a, b = ref.get(n), got.get(n)
            assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), n
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    # read in many small batches (a few layer slices each, as a model larger than the read budget is)
    mcore_to_hf_checkpoint(tmp_path / "conv", tmp_path / "out_small", read_budget=20_000, quiet=True)
    with SafetensorsReader(tmp_path / "out") as a, SafetensorsReader(tmp_path / "out_small") as b:
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


@pytest.mark.dist
@pytest.mark.megatron
def test_moe_converted_under_ep2_exports_bit_identical(tmp_path):
    """Qwen3-MoE converted by two expert-parallel ranks (each saves its own experts under their global dist keys)
    exports back with ``mcore-to-hf`` bit-identical, experts gathered from both EP ranks' shards."""
    from oar_megatron.convert.cli import main
    from oar_megatron.convert.io import SafetensorsReader

    make_hf_model("qwen3_moe", tmp_path / "hf")
    assert main(["hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "conv"), "--ep", "2", "--quiet"]) == 0
    assert main(["mcore-to-hf", str(tmp_path / "conv"), str(tmp_path / "out"), "--quiet"]) == 0
    with SafetensorsReader(tmp_path / "hf") as ref, SafetensorsReader(tmp_path / "out") as got:
        assert set(ref.names()) == set(got.names())
        assert any(".experts.3." in n for n in ref.names())
        for n in ref.names():
            assert torch.equal(ref.get(n), got.get(n)), n
