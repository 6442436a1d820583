"""``SGLangEngine.start_local_servers`` (``rollout=sglang`` with no ``server_urls``) without SGLang, against the fake
``python`` of tests/sglang/test_servers.py: the initial weights are exported as ``sync_dir/v0`` exactly as a sync
writes them, the servers are started on that directory (``--skip-tokenizer-init``, ``--weight-version 0``, logs in the
given run directory) while the caller goes on, ``wait_local_servers`` hands over the URLs, ``close()`` stops them; a
missing interpreter or a server that dies is one ``RolloutError`` naming it (with the log's last lines)."""

import os

import pytest
import torch
from safetensors.torch import load_file

from oar_megatron.rollout.sglang import RolloutError, SGLangEngine
from tests.rollout.test_sglang_sync import _actor, _model
from tests.sglang.test_servers import fake_python  # noqa: F401 - the fixture


def _engine(tmp_path, python, n=2):
    cfg = _model()
    local = {"n": n, "router": False, "python": python, "dtype": None, "device": "cpu", "extra_args": [],
             "run_dir": tmp_path / "logs", "env": {"PYTHONPATH": ""}, "startup_timeout": 30, "stop_grace": 2}
    return cfg, SGLangEngine([], vocab_size=cfg.vocab_size, sync_dir=tmp_path / "sync", model=cfg, arch="qwen3",
                             local_servers=local)


def test_local_servers_start_on_the_exported_weights_and_stop(tmp_path, fake_python):  # noqa: F811
    cfg, eng = _engine(tmp_path, fake_python)
    actor, hf = _actor(cfg, seed=0)
    eng.start_local_servers(actor, wait=False)
    assert eng.workers == []  # started in the background
    v0 = tmp_path / "sync" / "v0"
    got = load_file(str(v0 / "model.safetensors"))
    assert got.keys() == hf.keys() and all(torch.equal(got[k], hf[k]) for k in hf)
    eng.wait_local_servers()
    assert len(eng.workers) == 2 and eng.expected_version == "0" and eng.server_start_s > 0
    procs = [p.popen for p in eng.servers.servers]
    for i in range(2):
        cmd = (tmp_path / "logs" / f"sglang-server-{i}.log").read_text().splitlines()[0]
        assert f"--model-path {v0}" in cmd and "--skip-tokenizer-init" in cmd and "--weight-version 0" in cmd
    eng.start_local_servers(actor)  # running already: nothing happens
    assert [p.popen for p in eng.servers.servers] == procs
    eng.close()
    assert eng.servers is None and all(p.poll() is not None for p in procs)


def test_local_servers_errors_are_one_rollout_error(tmp_path, fake_python, monkeypatch):  # noqa: F811
    cfg, eng = _engine(tmp_path / "a", "/nonexistent/python")
    with pytest.raises(RolloutError, match=r"^sglang local servers: sglang python '/nonexistent/python' is not an "):
        eng.start_local_servers(_actor(cfg, seed=0)[0])
    monkeypatch.setenv("FAKE_MODE", "die")
    cfg, eng = _engine(tmp_path / "b", fake_python, n=1)
    with pytest.raises(RolloutError, match=r"sglang server 0 exited with code 3 (.|\n)*boom: cannot load model"):
        eng.start_local_servers(_actor(cfg, seed=0)[0])
    assert eng.servers is None and os.environ["FAKE_MODE"] == "die"
