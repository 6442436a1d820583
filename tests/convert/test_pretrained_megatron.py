"""The trainer's ``model.pretrained`` from a megatron checkpoint: a tiny random HF Qwen3 shaped as ``tiny-synthetic``
(vocab 24) is converted with ``oar-convert hf-to-mcore`` at TP1 (vocabulary padded to 128 rows) and the trainer
starts from the converted checkpoint under TP2 (32 rows): the first π_old log-probs equal HF's within 1e-4, the
warm-up is skipped and the KL reference is the loaded model. After moving the weights and one step, the run's
checkpoint (a TP2 trainer checkpoint) exports with ``mcore-to-hf`` — config.json from the converted checkpoint's
``hf/`` (found through the run's ``model.pretrained``), and once generated from the run's model config — and the
export, loaded in transformers, computes the trained actor's log-probs; a new run with ``model.pretrained`` = that
run's checkpoint root (a trainer checkpoint) starts from the trained weights."""

import json

import pytest
import torch

from tests.convert.test_pretrained_start import SMALL, TOL, _hf_logprobs, _hf_qwen3, _rows
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]


def _ranks(rank, world, ckpt, tmp, parallel):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    over = SMALL + [parallel, f"model.pretrained={ckpt}", f"logging.run_dir={tmp}/run"]
    prompts, responses = _rows()
    t = Trainer(compose_config(over))
    try:
        out = {"warmed_up_before_fit": t.warmed_up}
        batch = t.actor.pack(prompts, responses, torch.zeros(len(prompts)), pad_id=t.tokenizer.pad_token_id)
        out["old"] = t.actor.compute_old_logprobs(batch)
        out["mask"], out["ids"] = batch.response_mask, batch.input_ids
        t.fit()  # steps=0: the reference becomes the loaded model
        out["ref"] = t.actor.compute_ref_logprobs(batch)
        with torch.no_grad():  # move the weights off the HF ones (an update of a tiny run may be ~0)
            for model in t.actor.models:
                for p in model.parameters():
                    p.add_(0.01)
        t.cfg.trainer.steps, t.cfg.checkpoint.every = 1, 1
        t.fit()  # one update, checkpointed
        out["trained"] = t.actor.compute_old_logprobs(batch)
    finally:
        Trainer.close(t)
    # a new run whose model.pretrained is that run's (trainer) checkpoint root: starts from the trained weights
    t = Trainer(compose_config(SMALL + [parallel, f"model.pretrained={tmp}/run/checkpoints",
                                        f"logging.run_dir={tmp}/run_from_run"]))
    try:
        out["from_run_warmed_up"] = t.warmed_up
        out["from_run_old"] = t.actor.compute_old_logprobs(batch)
    finally:
        Trainer.close(t)
    return out


def test_pretrained_from_converted_checkpoint(tmp_path):
    import transformers
    from omegaconf import OmegaConf

    from oar_megatron.convert.cli import main

    hf = _hf_qwen3(tmp_path / "hf")
    assert main(["hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "conv"), "--quiet"]) == 0
    res = run_ranks(_ranks, 2, str(tmp_path / "conv"), str(tmp_path), "parallel=tp2", timeout=900)
    for r in res:
        assert r["warmed_up_before_fit"]
        want = _hf_logprobs(hf, r["ids"])
        for key in ("old", "ref"):
            assert (r[key].double() - want)[r["mask"]].abs().max().item() < TOL, key
    r = res[0]
    for q in res:  # model.pretrained = a trainer checkpoint: the new run starts from the trained weights
        assert q["from_run_warmed_up"] and (q["from_run_old"] - q["trained"])[q["mask"]].abs().max().item() < 1e-6
    assert (r["trained"].double() - _hf_logprobs(hf, r["ids"]))[r["mask"]].abs().max().item() > 1e-4  # it trained
    # export the TP2 trainer checkpoint: config.json via model.pretrained -> conv/hf
    ckpts = tmp_path / "run" / "checkpoints"
    assert main(["mcore-to-hf", str(ckpts), str(tmp_path / "export"), "--quiet"]) == 0
    # and with config.json generated from the run's model config (no HF directory known), the run described as
    # a Transformer Engine one
    run_cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    run_cfg.model.pretrained = None
    run_cfg.model.transformer_impl = "transformer_engine"  # same dist-checkpoint keys: the export reads them alike
    OmegaConf.save(run_cfg, tmp_path / "bare.yaml")
    assert main(["mcore-to-hf", str(ckpts), str(tmp_path / "export_gen"), "--config", str(tmp_path / "bare.yaml"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "export_gen" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    for d in ("export", "export_gen"):
        exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / d)).float().eval()
        got = _hf_logprobs(exported, r["ids"])
        assert (got - r["trained"].double())[r["mask"]].abs().max().item() < TOL, d


def test_pretrained_megatron_checkpoint_is_checked_and_allows_pp(tmp_path):
    """Validation only (no process): a converted checkpoint's hf/config.json is compared with the preset (one line
    naming the field); PP > 1 is accepted for a megatron checkpoint (dist-checkpointing reshards)."""
    import shutil

    from oar_megatron.trainer import compose_config

    _hf_qwen3(tmp_path / "hf")
    conv = tmp_path / "conv"  # the converted-checkpoint layout (weights not needed to validate)
    (conv / "step_00000000").mkdir(parents=True)
    (conv / "step_00000000" / "state.pt").write_bytes(b"")
    (conv / "latest").write_text("step_00000000\n")
    (conv / "hf").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", conv / "hf" / "config.json")
    with pytest.raises(ValueError) as e:
        compose_config(["model=tiny", f"model.pretrained={conv}"]).validate(1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.pretrained:") and "num_layers" in msg and "hf/config.json" in msg
    compose_config([f"model.pretrained={conv}", "parallel.pp=2", "rollout=sglang"]).validate(2)
