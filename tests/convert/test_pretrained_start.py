"""The trainer's pretrained start (``model.pretrained``): a tiny random HF Qwen3 shaped as the ``tiny-synthetic``
preset (vocab 24 = the synthetic tokenizer's) is loaded into the actor at TP1 and TP2 (real gloo ranks) and the
first π_old log-probs equal HF's within 1e-4; the format warm-up is skipped and the KL reference is the loaded model
(π_ref log-probs equal HF's too); a run resumed from a checkpoint takes the checkpoint's weights, not the HF ones;
``oar-convert mcore-to-hf`` exports that checkpoint and the export, loaded in transformers, gives the checkpointed
model's log-probs (TP1).
Config checks (no spawn): an architecture mismatch with the composed ``model=`` preset is one line naming the
field; PP > 1 passes the pretrained checks (the PP load: test_pretrained_start_pp.py)."""

import pytest
import torch

from tests.convert.hf_tiny import make_synthetic_qwen3, save_random
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

TOL = 1e-4
SMALL = ["rollout.prompts_per_step=2", "rollout.n_samples=2", "trainer.micro_batch_size=2", "rollout.max_new_tokens=4",
         "eval.at_start=false", "eval.at_end=false", "checkpoint.save_final=false", "trainer.progress=false",
         "logging.step_line=false", "logging.tensorboard=false", "algorithm.kl.coef=0.05", "rollout.temperature=1.0",
         "trainer.steps=0"]


def _hf_qwen3(directory, seed=0):
    """A tiny random Qwen3 with the ``tiny-synthetic`` preset's architecture (fp32, tied, QK-norm)."""
    return make_synthetic_qwen3(directory, seed)


def _rows():
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 24, (5,), generator=gen).tolist() for _ in range(4)]
    responses = [torch.randint(1, 24, (n,), generator=gen).tolist() for n in (4, 3, 4, 2)]
    return prompts, responses


def _params(t):
    return {n: p.detach().clone() for n, p in t.actor.models[0].named_parameters()}


def _ranks(rank, world, hf_dir, tmp):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    parallel = ["parallel=tp2"] if world == 2 else []
    over = SMALL + parallel + [f"model.pretrained={hf_dir}", f"logging.run_dir={tmp}/run{world}"]
    prompts, responses = _rows()
    t = Trainer(compose_config(over))
    try:
        out = {"warmed_up_before_fit": t.warmed_up}
        batch = t.actor.pack(prompts, responses, torch.zeros(len(prompts)), pad_id=t.tokenizer.pad_token_id)
        out["old"] = t.actor.compute_old_logprobs(batch)
        out["mask"] = batch.response_mask
        out["ids"] = batch.input_ids
        t.fit()  # steps=0: no warm-up for a pretrained start; the reference becomes the loaded model
        out["ref"] = t.actor.compute_ref_logprobs(batch)
        with torch.no_grad():  # move the weights off the HF ones, train one step and checkpoint it
            for p in t.actor.models[0].parameters():
                p.add_(0.01)
        t.cfg.trainer.steps, t.cfg.checkpoint.every = 1, 1
        t.fit()
        saved = _params(t)
    finally:
        Trainer.close(t)
    t = Trainer(compose_config(over))  # checkpoint.resume=auto finds step 1: the checkpoint wins
    try:
        now = _params(t)
        out["resumed_step"] = t.step
        out["resumed_equal_saved"] = all(torch.equal(now[n], saved[n]) for n in saved)
        out["resumed_old"] = t.actor.compute_old_logprobs(batch)
    finally:
        Trainer.close(t)
    if world == 1:  # oar-convert mcore-to-hf on the run's checkpoint root (latest: step 1)
        from oar_megatron.convert.cli import main

        out["export_rc"] = main(["mcore-to-hf", f"{tmp}/run1/checkpoints", f"{tmp}/export"])
    return out


def _hf_logprobs(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    out = torch.zeros(ids.shape, dtype=torch.float64)
    out[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_pretrained_start_logprobs_equal_hf(tmp_path, world):
    hf = _hf_qwen3(tmp_path / "hf")
    res = run_ranks(_ranks, world, str(tmp_path / "hf"), str(tmp_path), timeout=900)
    for r in res:
        assert r["warmed_up_before_fit"]  # the format warm-up stands in for pretraining: skipped
        mask = r["mask"]
        want = _hf_logprobs(hf, r["ids"])
        for key in ("old", "ref"):
            got = r[key]
            assert got.shape == mask.shape
            assert (got.double() - want)[mask].abs().max().item() < TOL, key
        assert r["resumed_step"] == 1 and r["resumed_equal_saved"]
        assert (r["resumed_old"].double() - want)[mask].abs().max().item() > 1e-3  # not re-read from HF
    if world == 1:  # the export loads in transformers and computes the checkpointed model's log-probs
        import transformers

        r = res[0]
        assert r["export_rc"] == 0
        exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).float().eval()
        got = _hf_logprobs(exported, r["ids"])
        assert (got - r["resumed_old"].double())[r["mask"]].abs().max().item() < TOL
        assert not list(tmp_path.glob(".export.tmp-*"))


def test_pretrained_mismatch_and_pp_are_one_line_errors(tmp_path):
    from oar_megatron.trainer import compose_config

    _hf_qwen3(tmp_path / "hf")
    cfg = compose_config(["model=tiny", f"model.pretrained={tmp_path / 'hf'}"])
    with pytest.raises(ValueError) as e:
        cfg.validate(1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.pretrained:") and "num_layers" in msg, msg
    cfg = compose_config([f"model.pretrained={tmp_path / 'hf'}", "model.norm_epsilon=1e-5"])
    with pytest.raises(ValueError, match=r"^model.pretrained: .*norm_epsilon"):
        cfg.validate(1)
    # PP > 1 is no longer refused for model.pretrained (tests/convert/test_pretrained_start_pp.py); a full run is
    # refused by the local rollout engine, which generates at pp=1 only
    cfg = compose_config([f"model.pretrained={tmp_path / 'hf'}", "parallel.pp=2"])
    with pytest.raises(ValueError, match=r"^rollout.engine: the local engine needs parallel.pp=1"):
        cfg.validate(2)
    cfg = compose_config([f"model.pretrained={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match=r"^model.pretrained: .*config.json"):
        cfg.validate(1)
    compose_config([f"model.pretrained={tmp_path / 'hf'}"]).validate(1)  # the matching preset passes


def test_mcore_to_hf_bad_checkpoint_is_one_line(tmp_path, capsys):
    from oar_megatron.convert.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["mcore-to-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oar-convert: CKPT_DIR:") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def _bf16(rank, world, hf_dir, tmp):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    t = Trainer(compose_config(SMALL + [f"model.pretrained={hf_dir}", f"logging.run_dir={tmp}/bf16",
                                        "model.params_dtype=bfloat16"]))
    try:
        inner = getattr(t.actor.optimizer, "chained_optimizers", [t.actor.optimizer])[0]
        mains = [p for g in inner.fp32_from_float16_groups for p in g]
        models = [p for g in inner.float16_groups for p in g]
        return {"n": len(mains), "equal": all(torch.equal(m, p.float()) for m, p in zip(mains, models, strict=True)),
                "dtype": str(t.actor.models[0].embedding.word_embeddings.weight.dtype)}
    finally:
        Trainer.close(t)


def test_pretrained_start_bf16_refreshes_main_weights(tmp_path):
    """Mixed precision keeps fp32 main weights in the optimizer: after the load they equal the loaded (bf16)
    weights, else the first update would write the random initialisation back."""
    _hf_qwen3(tmp_path / "hf")
    (r,) = run_ranks(_bf16, 1, str(tmp_path / "hf"), str(tmp_path), timeout=900)
    assert r["dtype"] == "torch.bfloat16" and r["n"] > 0 and r["equal"]


# ------------------------------------------------------------------------------------------------------------ MoE
# tiny-moe without its shared expert and with QK-norm is a tiny Qwen3-MoE (4 experts, top-2, expert FFN 64)
MOE = ["model=tiny-moe", "model.moe_shared_expert_intermediate_size=null", "model.qk_layernorm=true"]


def _hf_qwen3_moe(directory, seed=0, vocab_size=250):
    """A tiny random Qwen3-MoE with ``MOE``'s architecture (fp32, untied, renormalised top-2 of 4 experts)."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        initializer_range=0.2)
    config.architectures = ["Qwen3MoeForCausalLM"]
    return save_random(config, directory, seed)


def _moe_ranks(rank, world, hf_dir, tmp):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    over = SMALL + MOE + [f"model.pretrained={hf_dir}", f"logging.run_dir={tmp}/moe{world}"]
    if world == 2:
        over.append("parallel.ep=2")
    prompts, responses = _rows()
    t = Trainer(compose_config(over))
    try:
        batch = t.actor.pack(prompts, responses, torch.zeros(len(prompts)), pad_id=t.tokenizer.pad_token_id)
        return {"warmed_up": t.warmed_up, "old": t.actor.compute_old_logprobs(batch), "mask": batch.response_mask,
                "ids": batch.input_ids, "ep": t.groups.ep}
    finally:
        Trainer.close(t)


@pytest.mark.parametrize("world", [1, 2])
def test_pretrained_moe_start_logprobs_equal_hf(tmp_path, world):
    """A Qwen3-MoE HF directory into the MoE preset: the first π_old log-probs equal HF's at EP1 and EP2."""
    hf = _hf_qwen3_moe(tmp_path / "hf")
    for r in run_ranks(_moe_ranks, world, str(tmp_path / "hf"), str(tmp_path), timeout=900):
        assert r["warmed_up"] and r["ep"] == world
        want = _hf_logprobs(hf, r["ids"])
        assert (r["old"].double() - want)[r["mask"]].abs().max().item() < TOL


def test_pretrained_moe_mismatch_is_one_line(tmp_path):
    """check_pretrained compares the MoE fields: tiny-moe's shared expert (Qwen3-MoE has none) is named."""
    from oar_megatron.trainer import compose_config

    _hf_qwen3_moe(tmp_path / "hf")
    cfg = compose_config(["model=tiny-moe", "model.qk_layernorm=true", f"model.pretrained={tmp_path / 'hf'}"])
    with pytest.raises(ValueError, match=r"^model.pretrained: .*moe_shared_expert_intermediate_size=None, the model "
                                         r"preset 'tiny-moe' has 64; .*override model.moe_shared_expert"):
        cfg.validate(1)
    cfg = compose_config(MOE + [f"model.pretrained={tmp_path / 'hf'}", "model.moe_router_pre_softmax=true"])
    with pytest.raises(ValueError, match=r"^model.pretrained: .*moe_router_pre_softmax=False"):
        cfg.validate(1)
    compose_config(MOE + [f"model.pretrained={tmp_path / 'hf'}"]).validate(1)  # the matching preset passes
