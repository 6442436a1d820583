"""HF in, train, HF out — through the installed console scripts, as a user runs them:

tiny random HF Qwen3 shaped as ``tiny-synthetic`` → ``oar-train model=tiny-synthetic model.pretrained=HF`` (2 RL
steps, checkpointed) → ``oar-convert mcore-to-hf RUN/checkpoints OUT`` → ``transformers`` loads OUT, whose weights
are the trained ones (they differ from HF's; ``oar-convert verify OUT --mcore RUN/checkpoints`` finds the
checkpoint's parameters exported bit-identical to OUT's tensors and the logits equal) and whose log-probs equal
``oar-convert logprobs RUN/checkpoints --pp 2`` (a trainer checkpoint as the source, resharded to two pipeline
stages) within 1e-4; and a copy of OUT with one element of one tensor moved by 1e-3 FAILS ``oar-convert verify
--mcore RUN/checkpoints`` (exit 1), naming that tensor."""

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.convert.hf_tiny import make_synthetic_qwen3
from tests.convert.test_cli_logprobs import TOL, _env, console, hf_logprobs, max_diff

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

TRAIN = ["model=tiny-synthetic", "trainer.steps=2", "rollout.prompts_per_step=2", "rollout.n_samples=2",
         "trainer.micro_batch_size=2", "rollout.max_new_tokens=4", "eval.at_start=false", "eval.at_end=false",
         "trainer.progress=false", "logging.tensorboard=false",
         # the synthetic reward is 0 for a random model: the entropy bonus makes sure the two steps move the weights
         "algorithm.entropy_coef=0.1", "optim.lr=1e-3"]
TAMPERED = "model.layers.1.self_attn.o_proj.weight"
SEQS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]


def _run(args, expect=0):
    p = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == expect, f"{args[:2]} exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_pretrained_run_exports_through_console_scripts(tmp_path):
    import transformers

    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    initial = make_synthetic_qwen3(hf_dir)
    text = _run([console("oar-train"), *TRAIN, f"model.pretrained={hf_dir}", f"logging.run_dir={run}"])
    assert f"loaded pretrained weights from {hf_dir}" in text
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    _run([console("oar-convert"), "mcore-to-hf", str(run / "checkpoints"), str(out)])
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    before, after = initial.state_dict(), exported.state_dict()
    assert before.keys() == after.keys()
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) >= len(before) // 2, moved  # the run trained them

    (tmp_path / "in.json").write_text(json.dumps({"sequences": SEQS}))
    _run([console("oar-convert"), "logprobs", str(run / "checkpoints"), "--tokens", str(tmp_path / "in.json"),
          "--out", str(tmp_path / "lp.json"), "--pp", "2"])  # a TP1/PP1 checkpoint resharded to two stages
    got = json.loads((tmp_path / "lp.json").read_text())["logprobs"]
    assert max_diff(got, hf_logprobs(exported, SEQS)) < TOL
    assert max_diff(got, hf_logprobs(initial, SEQS)) > 1e-2

    # the checkpoint's parameters exported again equal OUT's tensors bit for bit, and the logits agree
    text = _run([console("oar-convert"), "verify", str(out), "--mcore", str(run / "checkpoints"), "--num", "2",
                 "--length", "8"])
    assert "bit-identical (24 tensors)" in text and text.rstrip().endswith("PASS"), text
    # a deliberately corrupted export (one element of one tensor moved by 1e-3): verify fails (exit 1), naming it
    shutil.copytree(out, tmp_path / "bad")
    tensors = load_file(str(out / "model.safetensors"))
    tensors[TAMPERED][3, 5] += 1e-3
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    text = _run([console("oar-convert"), "verify", str(tmp_path / "bad"), "--mcore", str(run / "checkpoints"),
                 "--num", "2", "--length", "8"], expect=1)
    assert f"DIFFERS, first: {TAMPERED}" in text and text.rstrip().endswith("FAIL"), text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "hf", "in.json", "lp.json", "out", "run"]
