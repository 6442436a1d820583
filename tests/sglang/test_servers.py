"""oar_megatron.rollout.servers without SGLang: command lines, ports, logs, health waiting, start errors and stop,
against a fake ``python`` that (per $FAKE_MODE) serves /health on the --port it is given, never serves, or dies."""

import json
import os
import subprocess
import signal
import sys
import textwrap
import time

import httpx
import pytest

from oar_megatron.rollout import servers as sv
from oar_megatron.rollout.servers import SGLangServers, ServerStartError, router_command, server_command

FAKE = textwrap.dedent(f"""\
    #!{sys.executable}
    import http.server, json, os, sys, time
    argv = sys.argv[1:]
    print("fake", " ".join(argv), flush=True)
    mode = os.environ.get("FAKE_MODE", "serve")
    if mode == "die":
        print("boom: cannot load model", flush=True); sys.exit(3)
    if mode == "hang":
        time.sleep(3600)
    port = int(argv[argv.index("--port") + 1])
    host = argv[argv.index("--host") + 1]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            key = os.environ.get("FAKE_KEY")
            ok = not key or self.headers.get("Authorization") == "Bearer " + key
            body = (argv[1] + " " + os.environ.get("CUDA_VISIBLE_DEVICES", "-") + " "
                    + os.environ.get("SGLANG_USE_CPU_ENGINE", "-")).encode()
            if self.path == "/workers":  # the router's worker list: the --worker-urls, healthy
                urls = argv[argv.index("--worker-urls") + 1:argv.index("--policy")]
                body = json.dumps({{"workers": [{{"url": u, "is_healthy": True}} for u in urls]}}).encode()
            self.send_response(200 if ok else 401); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    # a child in the same process group, as the real server's scheduler is: stop() must end it too
    if os.fork() == 0:
        time.sleep(3600)
    time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
    http.server.HTTPServer((host, port), H).serve_forever()
""")


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "fakepython"
    path.write_text(FAKE)
    path.chmod(0o755)
    return str(path)


def test_server_command_cpu_and_gpu_flags():
    cpu = server_command("/py", "/m", port=123, dtype=None, skip_tokenizer_init=True, api_key="k",
                         weight_version="v3", extra_args=["--random-seed", 7])
    assert cpu[:3] == ["/py", "-m", "sglang.launch_server"]
    s = " ".join(cpu)
    for part in ("--model-path /m", "--host 127.0.0.1", "--port 123", "--dtype float32", "--device cpu",
                 "--attention-backend torch_native", "--sampling-backend pytorch", "--skip-server-warmup",
                 "--max-total-tokens 4096", "--skip-tokenizer-init", "--api-key k", "--weight-version v3"):
        assert part in s, part
    assert cpu[-2:] == ["--random-seed", "7"]
    gpu = server_command("/py", "/m", port=1, device="cuda", extra_args=["--tp-size", "2"])
    assert "--device" not in gpu and "torch_native" not in gpu and "--skip-tokenizer-init" not in gpu
    assert gpu[gpu.index("--dtype") + 1] == "auto" and gpu[-2:] == ["--tp-size", "2"]
    own = server_command("/py", "/m", port=1, extra_args=["--max-total-tokens", "999"])
    assert own.count("--max-total-tokens") == 1
    with pytest.raises(ValueError, match="device"):
        server_command("/py", "/m", port=1, device="tpu")


def test_router_command_binds_metrics_to_loopback():
    cmd = router_command("/py", ["http://a:1", "http://b:2"], port=5, metrics_port=6)
    s = " ".join(cmd)
    assert "-m sglang_router.launch_router" in s and "--worker-urls http://a:1 http://b:2" in s
    assert "--prometheus-host 127.0.0.1 --prometheus-port 6" in s and "--host 127.0.0.1 --port 5" in s
    with pytest.raises(ValueError, match="worker"):
        router_command("/py", [], port=5, metrics_port=6)


def test_free_ports_distinct_and_bindable():
    ports = sv._free_ports("127.0.0.1", 8)
    assert len(set(ports)) == 8 and all(1024 <= p < 65536 for p in ports)
    assert 0 < sv.free_port() < 65536


def test_default_python_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OAR_SGLANG_PYTHON", raising=False)
    monkeypatch.setenv("OAR_SGLANG_VENV", str(tmp_path / "v"))
    assert sv.default_sglang_python() == str(tmp_path / "v" / "bin" / "python")
    monkeypatch.setenv("OAR_SGLANG_PYTHON", "/opt/sgl/bin/python")
    assert sv.default_sglang_python() == "/opt/sgl/bin/python"


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        SGLangServers("/m", 0)
    with pytest.raises(ValueError, match="devices"):
        SGLangServers("/m", 2, devices=["0", "1"])  # cpu
    with pytest.raises(ValueError, match="1 devices given for 2"):
        SGLangServers("/m", 2, device="cuda", devices=["0"])
    with pytest.raises(ServerStartError, match="not an executable"):
        SGLangServers("/m", 1, python="/nonexistent/python").start()


def _group_gone(pgid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_start_health_router_logs_kill_and_stop(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DELAY", "0.7")  # /health refuses connections at first
    monkeypatch.setenv("FAKE_KEY", "sekret")
    run = tmp_path / "run"
    with SGLangServers("/models/tiny", 2, python=fake_python, router=True, run_dir=run, api_key="sekret",
                       startup_timeout=30) as s:
        assert len(s.urls) == 2 and len(set(s.urls)) == 2 and s.router_url not in s.urls
        assert all(u.startswith("http://127.0.0.1:") for u in s.urls + [s.router_url])
        h = s.headers()
        for u in s.urls:
            assert httpx.get(u + "/health", headers=h).text == "sglang.launch_server - 1"  # CPU env var set
        assert httpx.get(s.router_url + "/health", headers=h).text.startswith("sglang_router.launch_router")
        assert sorted(p.name for p in run.iterdir()) == ["sglang-router.log", "sglang-server-0.log",
                                                         "sglang-server-1.log"]
        log0 = (run / "sglang-server-0.log").read_text()
        assert log0.startswith(f"$ {fake_python} -m sglang.launch_server --model-path /models/tiny")
        assert "--api-key REDACTED" in log0 and "sekret" not in log0.split("\n")[0]  # the key is not logged
        assert "fake -m sglang.launch_server" in log0
        rlog = (run / "sglang-router.log").read_text()
        assert " ".join(["--worker-urls", *s.urls]) in rlog and "--prometheus-host 127.0.0.1" in rlog
        assert s.startup_seconds >= 0.7
        pgids = [p.popen.pid for p in s.servers + [s.router]]
        s.kill(0)
        assert not s.alive(0) and s.alive(1) and _group_gone(pgids[0])
        assert httpx.get(s.urls[1] + "/health", headers=h).status_code == 200
    assert all(_group_gone(g) for g in pgids)  # the forked children too
    s.stop()  # idempotent


def test_cuda_visible_devices_per_server(fake_python, tmp_path):
    with SGLangServers("/m", 2, python=fake_python, device="cuda", devices=["2,3", "5"], run_dir=tmp_path) as s:
        assert [httpx.get(u + "/health").text.split()[1] for u in s.urls] == ["2,3", "5"]


def test_server_that_dies_raises_with_log_tail(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "die")
    s = SGLangServers("/m", 2, python=fake_python, run_dir=tmp_path, startup_timeout=30)
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3 before it was healthy.*boom: cannot load"):
        s.start()
    assert all(not p.alive() for p in s.servers)


def test_server_that_never_serves_times_out_and_is_stopped(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "hang")
    s = SGLangServers("/m", 1, python=fake_python, run_dir=tmp_path, startup_timeout=1.5, stop_grace=1)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)did not answer /health with 200 within 2 s.*fake -m sglang"):
        s.start()
    assert time.monotonic() - t0 < 10
    assert not s.servers[0].alive() and _group_gone(s.servers[0].popen.pid)


def test_sigterm_ignored_falls_back_to_sigkill(tmp_path):
    stubborn = tmp_path / "stubborn"
    stubborn.write_text(FAKE.replace("import http.server, json, os, sys, time",
                                     "import http.server, json, os, sys, time, signal\n"
                                     "signal.signal(signal.SIGTERM, signal.SIG_IGN)"))
    stubborn.chmod(0o755)
    s = SGLangServers("/m", 1, python=str(stubborn), run_dir=tmp_path, stop_grace=0.5).start()
    pid = s.servers[0].popen.pid
    t0 = time.monotonic()
    s.stop()
    assert _group_gone(pid) and time.monotonic() - t0 < 5
    assert s.servers[0].popen.returncode == -signal.SIGKILL


def test_atexit_stops_servers(fake_python, tmp_path):
    # a child interpreter starts a server and exits without stop(): atexit must end the server's group
    code = textwrap.dedent(f"""
        from oar_megatron.rollout.servers import SGLangServers
        s = SGLangServers("/m", 1, python={fake_python!r}, run_dir={str(tmp_path)!r}).start()
        print(s.servers[0].popen.pid, flush=True)
    """)
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert _group_gone(int(out.stdout.split()[-1]))


def _cli(fake_python, tmp_path, *args, **env):
    e = dict(os.environ, SLURMD_NODENAME="127.0.0.1", **env)
    return subprocess.Popen([sys.executable, "-m", "oar_megatron.rollout.servers", str(tmp_path / "model"),
                             "--python", fake_python, "--host", "auto", "--run-dir", str(tmp_path / "logs/{host}"),
                             "--url-file", str(tmp_path / "urls/{host}.json"), *args], env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_file(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_cli_on_a_server_node_url_file_sigterm_and_death(fake_python, tmp_path):
    """The CLI launch/slurm.sh runs on each server node: binds the node's name, reports its URLs once healthy,
    stops its servers on SIGTERM (exit 0), and exits 1 naming a server that died."""
    proc = _cli(fake_python, tmp_path, "--n", "2", "--api-key-env", "MY_KEY", "--max-total-tokens", "99",
                MY_KEY="sekret", FAKE_KEY="sekret")
    rec = _wait_file(tmp_path / "urls" / "127.0.0.1.json", proc)
    assert rec["host"] == "127.0.0.1" and len(rec["urls"]) == 2 and rec["router_url"] is None
    assert all(u.startswith("http://127.0.0.1:") for u in rec["urls"]) and rec["log_dir"] == str(tmp_path / "logs/127.0.0.1")
    log0 = (tmp_path / "logs" / "127.0.0.1" / "sglang-server-0.log").read_text()
    assert "--host 127.0.0.1" in log0 and "--api-key REDACTED" in log0 and "--max-total-tokens 99" in log0
    assert httpx.get(rec["urls"][0] + "/health", headers={"Authorization": "Bearer sekret"}).status_code == 200
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "SIGTERM received, stopping" in out, (out, err)
    with pytest.raises(httpx.HTTPError):
        httpx.get(rec["urls"][0] + "/health", timeout=2)

    proc = _cli(fake_python, tmp_path / "b")
    rec = _wait_file(tmp_path / "b" / "urls" / "127.0.0.1.json", proc)
    server = subprocess.run(["pgrep", "-f", f"{fake_python} -m sglang.launch_server --model-path {tmp_path}/b/model"],
                            capture_output=True, text=True).stdout.split()
    os.kill(int(server[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "sglang server 0 on 127.0.0.1 exited" in err, (out, err)


def test_cli_reports_a_start_failure_in_the_url_file(fake_python, tmp_path):
    proc = _cli(fake_python, tmp_path, FAKE_MODE="die")
    rec = _wait_file(tmp_path / "urls" / "127.0.0.1.json", proc)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "exited with code 3 before it was healthy" in rec["error"]
    assert "boom: cannot load model" in err  # the log tail, on the node's stderr (the job log)
    proc = subprocess.run([sys.executable, "-m", "oar_megatron.rollout.servers", "/m", "--api-key-env", "UNSET_KEY_X"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "$UNSET_KEY_X is not set" in proc.stderr


def test_server_nodes_wait_and_overrides(tmp_path):
    from oar_megatron.rollout.server_nodes import ServerNodesError, overrides, wait_for_nodes

    d = tmp_path / "urls"
    d.mkdir()
    (d / "a.json").write_text(json.dumps({"host": "a", "urls": ["http://a:1", "http://a:2"], "router_url": None}))
    with pytest.raises(ServerNodesError, match=r"sglang servers on node b not healthy after 0 s \(1 of 2 nodes"):
        wait_for_nodes(d, ["a", "b"], timeout_s=0.2, poll_s=0.05)
    with pytest.raises(ServerNodesError, match="the sglang server step exited before node b was ready"):
        wait_for_nodes(d, ["a", "b"], timeout_s=60, alive=lambda: False, poll_s=0.05)
    (tmp_path / "logs" / "b").mkdir(parents=True)
    (tmp_path / "logs" / "b" / "sglang-server-0.log").write_text("line 1\nCUDA out of memory\n")
    (d / "b.json").write_text(json.dumps({"host": "b", "error": "sglang server 0 exited with code 1"}))
    with pytest.raises(ServerNodesError, match=r"(?s)node b failed to start: sglang server 0 exited.*CUDA out of"):
        wait_for_nodes(d, ["a", "b"], timeout_s=1, logs=tmp_path / "logs")
    (d / "b.json").write_text(json.dumps({"host": "b", "urls": ["http://b:1"], "router_url": "http://b:9"}))
    recs = wait_for_nodes(d, ["b", "a"], timeout_s=1)
    assert [r["host"] for r in recs] == ["b", "a"]
    assert overrides(recs) == ["rollout.server_urls=[http://b:1,http://a:1,http://a:2]",
                               "rollout.router_url=http://b:9"]
    with pytest.raises(ServerNodesError, match="2 server nodes run a router"):
        overrides([recs[0], recs[0]])
