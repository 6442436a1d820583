"""oar-train trainer.preflight=true: every check runs on the real layout and passes on one process and on two
pipeline ranks under torchrun; the first failing check stops the run with exit code 1 and one line naming it."""

import http.server
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from oar_megatron.trainer import compose_config
from oar_megatron.trainer.preflight import PreflightFailure, check_rollout_servers

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable}
CHECKS = ["memory", "layer spec", "process groups", "data plane", "control plane", "forward/backward", "checkpoint",
          "rollout servers"]


def _run(cmd, log: Path) -> tuple[int, str, str]:
    """A CLI run in its own session with output to files (dist-checkpointing helpers must not hold pipes)."""
    with open(log, "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)
    return proc.returncode, log.read_text(), Path(f"{log}.err").read_text()


def _rows(stdout: str) -> dict[str, tuple[str, str]]:
    """check name -> (result, detail) from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        for name in CHECKS:
            if line.startswith(name + " "):
                parts = line[len(name):].split(None, 2)
                rows[name] = (parts[0], parts[2] if len(parts) > 2 else "")
    return rows


def _preflight(tmp_path, *overrides, ranks=1):
    args = ["trainer.preflight=true", f"logging.run_dir={tmp_path / 'run'}", *overrides]
    if ranks == 1:
        cmd = [sys.executable, "-m", "oar_megatron.trainer.app", *args]
    else:
        cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(ranks), *args]
    return _run(cmd, tmp_path / "log")


def test_single_process_preflight_passes_and_leaves_nothing(tmp_path):
    rc, out, err = _preflight(tmp_path)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "preflight: all checks passed" in out
    rows = _rows(out)
    assert list(rows) == CHECKS and all(r == "ok" for r, _ in rows.values()), out
    assert rows["data plane"][1].startswith("all-reduce on cpu (gloo): world 1, tp 1, pp 1, cp 1, dp 1, dp_cp 1, ep 1")
    assert rows["control plane"][1].startswith("object broadcast over gloo twins: world 1, tp 1")
    assert rows["forward/backward"][1].startswith("2 layers of tiny-synthetic (64 wide), 32 rows x 13 tokens")
    assert "tensors saved and loaded equal" in rows["checkpoint"][1]
    assert rows["rollout servers"][1] == "skipped: local engine"
    assert not (tmp_path / "run").exists()  # the checkpoint round trip cleaned up after itself


def test_two_pipeline_ranks_pass_every_check_and_an_unreachable_server_fails(tmp_path):
    # pp=2 needs rollout=sglang; its server (a closed port) is the one check that fails
    rc, out, err = _preflight(tmp_path, "parallel.pp=2", "rollout=sglang", "rollout.server_urls=[http://127.0.0.1:9]",
                              "rollout.max_new_tokens=8", ranks=2)
    assert rc != 0, out[-3000:] + err[-3000:]
    rows = _rows(out)
    assert out.count("preflight: rollout servers FAILED") == 1  # rank 0's table only
    assert list(rows) == CHECKS and [r for r, _ in rows.values()] == ["ok"] * 7 + ["FAILED"], out
    assert rows["process groups"][1].startswith("world 2 = tp 1 x pp 2 x cp 1 x dp 1")
    assert "pp 2," in rows["data plane"][1] and "embedding 2" in rows["control plane"][1]
    assert rows["forward/backward"][1].startswith("4 layers of tiny-synthetic (64 wide), 64 rows x 13 tokens in 2 ")
    cause = [ln for ln in err.splitlines() if ln.startswith("oar-train: preflight:")]
    assert cause == ["oar-train: preflight: rollout servers failed on rank 0: http://127.0.0.1:9: unreachable "
                     "(ConnectError: [Errno 111] Connection refused)"], err[-3000:]


def test_unwritable_checkpoint_directory_fails_naming_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")  # a path under a file cannot be created, even by root
    rc, out, err = _preflight(tmp_path, f"checkpoint.dir={blocker / 'ckpt'}")
    assert rc == 1, out[-3000:] + err[-3000:]
    rows = _rows(out)
    assert list(rows) == CHECKS[:7] and rows["checkpoint"][0] == "FAILED"  # stopped at the first failure
    assert all(r == "ok" for r, _ in list(rows.values())[:6])
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"oar-train: preflight: checkpoint failed on rank 0: cannot write in {blocker / 'ckpt'}: "
                           f"[Errno 20] Not a directory"), err[-3000:]


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_rollout_server_reachability():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    live = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert check_rollout_servers(compose_config()) == "skipped: local engine"
        assert check_rollout_servers(compose_config(["rollout=sglang"])).startswith("skipped: the run starts its own")
        cfg = compose_config(["rollout=sglang", f"rollout.server_urls=[{live}/]"])
        assert check_rollout_servers(cfg).startswith(f"{live}/ HTTP 200 in ")
        cfg = compose_config(["rollout=sglang", f"rollout.server_urls=[{live},http://127.0.0.1:9]"])
        with pytest.raises(PreflightFailure, match=r"^http://127.0.0.1:9: unreachable \(ConnectError"):
            check_rollout_servers(cfg, timeout_s=2.0)
    finally:
        server.shutdown()


def test_layer_spec_check_names_a_missing_transformer_engine():
    from oar_megatron.policy.model import te_installed
    from oar_megatron.trainer.preflight import check_layer_spec

    if te_installed():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError, match="^model.transformer_impl: 'transformer_engine' needs Transformer Engine"):
        check_layer_spec(compose_config(["model.transformer_impl=transformer_engine"]))
    assert check_layer_spec(compose_config()) == "local: TransformerLayer"
