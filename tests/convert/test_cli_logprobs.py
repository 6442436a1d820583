"""``oar-convert logprobs`` and ``verify`` on a tiny random HF Qwen3 (head_dim 24 ≠ hidden/heads, QK-norm):

- the installed console script at TP1 (a subprocess) and ``convert.cli.main`` at TP2 (two local gloo ranks started
  by ``convert.launch.run_local``) give the log-probs of ``transformers`` within 1e-4, for sequences of different
  lengths (padding + mask);
- ``verify --tp 2`` passes (exit 0) and prints max |Δlogit|, top-1 agreement and a bit-identical round trip;
- bad IN.json / model paths / layouts are one line on stderr (exit 2), and no OUT.json is left behind;
- the launcher names a failing rank in one line, and times out.
The trainer-checkpoint source and a failing ``verify`` are in ``test_console_e2e.py``."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.convert.hf_tiny import make_hf_model, make_synthetic_qwen3

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]
SEQS = [[1, 5, 7, 9, 3, 2, 8, 8, 0, 99], [4, 8, 15], [16, 23, 42, 4, 8, 60, 61], [98, 97]]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def console(name: str) -> str:
    """The installed console script next to this interpreter (pyproject [project.scripts])."""
    exe = Path(sys.executable).parent / name
    assert exe.is_file(), f"{exe}: console script not installed (pip install -e .)"
    return str(exe)


def hf_logprobs(model, seqs):
    out = []
    with torch.no_grad():
        for s in seqs:
            logp = torch.log_softmax(model(torch.tensor([s])).logits[0].double(), -1)
            out.append(logp[:-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0])
    return out


def max_diff(got, want):
    assert [len(g) for g in got] == [len(w) for w in want]
    return max((torch.tensor(g, dtype=torch.float64) - w).abs().max().item() for g, w in zip(got, want))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "qwen3"
    model = make_hf_model("qwen3", d)
    return d, model


@pytest.mark.dist
@pytest.mark.megatron
def test_logprobs_tp1_console_and_tp2_equal_hf(hf, tmp_path):
    from oar_megatron.convert.cli import main

    hf_dir, model = hf
    (tmp_path / "in.json").write_text(json.dumps({"sequences": SEQS}))
    want = hf_logprobs(model, SEQS)
    p = subprocess.run([console("oar-convert"), "logprobs", str(hf_dir), "--tokens", str(tmp_path / "in.json"),
                        "--out", str(tmp_path / "tp1.json")], env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    tp1 = json.loads((tmp_path / "tp1.json").read_text())["logprobs"]
    assert max_diff(tp1, want) < TOL
    assert main(["logprobs", str(hf_dir), "--tokens", str(tmp_path / "in.json"), "--out",
                 str(tmp_path / "tp2.json"), "--tp", "2"]) == 0
    tp2 = json.loads((tmp_path / "tp2.json").read_text())["logprobs"]
    assert max_diff(tp2, want) < TOL
    assert sorted(os.listdir(tmp_path)) == ["in.json", "tp1.json", "tp2.json"]  # no temporary files left


@pytest.mark.dist
@pytest.mark.megatron
def test_verify_passes_on_a_good_directory(hf, capsys):
    from oar_megatron.convert.cli import main

    hf_dir, _ = hf
    assert main(["verify", str(hf_dir), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0] + " " + ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert float(lines["max |Δlogit|"].split()[2]) < TOL, out
    assert float(lines["max |Δlogprob|"].split()[2]) < TOL, out
    assert "100.0%" in lines["top-1 agreement"], out
    assert "bit-identical (25 tensors)" in out and out.rstrip().endswith("PASS"), out


def test_verify_result_fails_on_tolerance_or_round_trip():
    from oar_megatron.convert.verify import VerifyResult

    ok = dict(max_dlogit=1e-6, max_dlogprob=1e-6, top1=1.0, positions=10, round_trip=True, first_diff=None,
              tensors=3, tol=1e-4, route="x")
    assert VerifyResult(**ok).passed
    assert not VerifyResult(**{**ok, "max_dlogit": 2e-4}).passed
    assert not VerifyResult(**{**ok, "max_dlogprob": float("inf")}).passed
    bad = VerifyResult(**{**ok, "round_trip": False, "first_diff": "model.norm.weight"})
    assert not bad.passed and "DIFFERS, first: model.norm.weight" in "\n".join(bad.lines())


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ({"seqs": [[1, 2]]}, "must hold"),
    ({"sequences": []}, "must hold"),
    ({"sequences": [[1, 2], [3]]}, r"sequences\[1\] has 1 token"),
    ({"sequences": [[1, 2, 100]]}, r"token id 100 outside the vocabulary \[0, 100\)"),
    ({"sequences": [[1, -1]]}, "token id -1 outside"),
    ({"sequences": [[1, 2.5]]}, "not a list of integer"),
    ({"sequences": [[1] * 129]}, "more than the model's max_position_embeddings"),
])
def test_logprobs_bad_tokens_file_is_one_line(hf, tmp_path, capsys, content, match):
    import re

    from oar_megatron.convert.cli import main

    hf_dir, _ = hf
    if content is not None:
        (tmp_path / "in.json").write_text(content if isinstance(content, str) else json.dumps(content))
    rc = main(["logprobs", str(hf_dir), "--tokens", str(tmp_path / "in.json"), "--out", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("oar-convert: --tokens:"), err
    assert re.search(match, err), err
    assert not (tmp_path / "out.json").exists()


def test_logprobs_bad_model_or_layout_is_one_line(hf, tmp_path, capsys):
    from oar_megatron.convert.cli import main

    hf_dir, _ = hf
    (tmp_path / "in.json").write_text(json.dumps({"sequences": [[1, 2]]}))
    (tmp_path / "empty").mkdir()
    for model, extra, match in [(tmp_path / "missing", [], "does not exist"),
                                (tmp_path / "empty", [], "neither an HF model directory"),
                                (hf_dir, ["--ep", "2"], "--ep: expert parallelism needs an MoE model"),
                                (hf_dir, ["--tp", "3"], "parallel.tp")]:
        rc = main(["logprobs", str(model), "--tokens", str(tmp_path / "in.json"), "--out", str(tmp_path / "o.json"),
                   *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------------------------------------------- launcher


def _fails_on_rank_1():
    if os.environ["RANK"] == "1":
        raise ValueError("bad thing\nsecond line")
    time.sleep(60)  # rank 0 would wait in a collective: the launcher must kill it
    return "never"


def _sleeps():
    time.sleep(60)


def _returns_rank():
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
            "port": os.environ["MASTER_PORT"], "t": torch.arange(3)}


@pytest.mark.dist
def test_run_local_returns_rank0_names_a_failing_rank_and_times_out():
    from oar_megatron.convert.launch import RankError, run_local

    got = run_local(_returns_rank, 2, timeout=120)
    assert got["rank"] == 0 and got["world"] == 2 and torch.equal(got["t"], torch.arange(3))
    start = time.monotonic()
    with pytest.raises(RankError) as e:
        run_local(_fails_on_rank_1, 2, timeout=120)
    assert str(e.value) == "rank 1 failed: ValueError: bad thing" and e.value.rank == 1
    assert "second line" in e.value.details
    with pytest.raises(RankError, match=r"^timed out after 3 s \(2 of 2 ranks still running\)$"):
        run_local(_sleeps, 2, timeout=3)
    assert time.monotonic() - start < 50  # neither waited for the sleeping ranks


def test_readonly_checkpoint_manager_leaves_the_root_alone(tmp_path):
    """oar-convert reads checkpoints with ``CheckpointManager(readonly=True)``: a run saving into the same root
    keeps its ``.tmp-*`` directory; a missing root is not created; saving is refused."""
    from oar_megatron.checkpoint import CheckpointManager
    from oar_megatron.checkpoint.manager import CheckpointError

    (tmp_path / "ckpt" / ".tmp-step_00000003").mkdir(parents=True)
    manager = CheckpointManager(tmp_path / "ckpt", groups=None, readonly=True)
    assert (tmp_path / "ckpt" / ".tmp-step_00000003").is_dir()
    CheckpointManager(tmp_path / "missing", groups=None, readonly=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(CheckpointError, match="read-only"):
        manager.save(3, None, common={})


def _fake_checkpoint(root, step=1):
    """A checkpoint root as the manager lays it out (only what resolution reads: latest, step_*/state.pt)."""
    step_dir = root / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    (step_dir / "state.pt").write_bytes(b"")
    (root / "latest").write_text(step_dir.name + "\n")
    return step_dir


def test_resolve_model_source_kinds_and_errors(hf, tmp_path):
    import shutil

    from omegaconf import OmegaConf

    from oar_megatron.convert.source import resolve_model_source
    from oar_megatron.trainer import compose_config

    hf_dir, _ = hf
    s = resolve_model_source(hf_dir)
    assert (s.kind, s.arch, s.hf_dir, s.step_dir) == ("hf", "qwen3", hf_dir, None)
    assert (s.model.kv_channels, s.model.qk_layernorm, s.model.vocab_size) == (24, True, 100)

    # a converted checkpoint (hf-to-mcore): ROOT/hf/config.json describes the model
    step = _fake_checkpoint(tmp_path / "conv")
    (tmp_path / "conv" / "hf").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "conv" / "hf")
    for given in (tmp_path / "conv", step):
        s = resolve_model_source(given)
        assert (s.kind, s.arch, s.hf_dir, s.step_dir, s.converted) == ("megatron", "qwen3", tmp_path / "conv" / "hf",
                                                                       step, True)

    # a trainer checkpoint: the run's config.yaml (the root's parent's); HF config from model.pretrained
    synth = tmp_path / "synth"
    make_synthetic_qwen3(synth)
    for pretrained, hf_want in ((synth, synth), (None, None)):
        run = tmp_path / f"run-{pretrained is not None}"
        step = _fake_checkpoint(run / "checkpoints", 7)
        over = [f"model.pretrained={pretrained}"] if pretrained else []
        (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose_config(over))))
        s = resolve_model_source(run / "checkpoints")
        assert (s.kind, s.arch, s.hf_dir, s.step_dir, s.converted) == ("megatron", "qwen3", hf_want, step, False)
        assert (s.model.name, s.model.make_vocab_size_divisible_by) == ("tiny-synthetic", 8)  # the run's preset

    # errors: one line naming the path
    (tmp_path / "noweights").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "noweights")
    orphan = _fake_checkpoint(tmp_path / "orphan" / "ckpt")
    (tmp_path / "badlatest").mkdir()
    (tmp_path / "badlatest" / "latest").write_text("nonsense")
    for path, match in ((tmp_path / "noweights", "config.json but no \\*.safetensors"),
                        (orphan, "without a model description"),
                        (tmp_path / "badlatest", "corrupt"),
                        (hf_dir / "config.json", "not a directory")):
        with pytest.raises(ValueError, match=match) as e:
            resolve_model_source(path)
        assert "\n" not in str(e.value)


def test_verify_mcore_of_another_architecture_is_one_line(hf, tmp_path, capsys):
    """``verify HF --mcore CKPT``: a checkpoint whose model is not HF's is refused before any rank starts."""
    from omegaconf import OmegaConf

    from oar_megatron.convert.cli import main
    from oar_megatron.trainer import compose_config

    hf_dir, _ = hf
    _fake_checkpoint(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose_config([]))))
    rc = main(["verify", str(hf_dir), "--mcore", str(tmp_path / "run" / "checkpoints")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("oar-convert: --mcore:") and "config.json gives" in err, err


@pytest.mark.dist
@pytest.mark.megatron
@pytest.mark.parametrize("case,layout", [("llama3.2", ["--pp", "2"]), ("qwen3_moe", ["--ep", "2"])])
def test_verify_under_pp_and_ep(case, layout, tmp_path, capsys):
    """``verify`` imports HF weights per pipeline stage (tied Llama-3.2: the last stage's embedding copy) and per
    expert-parallel rank, and the round trip gathers every rank's chunks back (bit-identical)."""
    from oar_megatron.convert.cli import main
    from tests.convert.hf_tiny import make_hf_model

    make_hf_model(case, tmp_path / case, num_hidden_layers=4 if case == "llama3.2" else 2)
    assert main(["verify", str(tmp_path / case), *layout]) == 0
    out = capsys.readouterr().out
    assert "bit-identical" in out and out.rstrip().endswith("PASS"), out
