"""Start and stop SGLang servers (and an optional ``sglang-router``) as subprocesses of the trainer or a test.

SGLang pins another torch and transformers than the trainer, so its servers run from a Python environment of their
own: by default the CPU test venv built by ``launch/setup_sglang_cpu.sh`` (``$OAR_SGLANG_VENV``, default
``~/.cache/oar_megatron/sglang-venv``); on a GPU cluster point ``python=`` (or ``$OAR_SGLANG_PYTHON``) at your SGLang
environment's interpreter. Nothing here imports sglang.

    with SGLangServers("/path/to/hf_model", n=2, router=True, run_dir="runs/x/sglang") as s:
        s.urls        # ["http://127.0.0.1:PORT", ...]  one per server (weight and pause endpoints go here)
        s.router_url  # "http://127.0.0.1:PORT"  (/generate, /health, /get_model_info)

Each server gets a free loopback port (``host`` to change), its own process group, its log in ``run_dir``
(``sglang-server-<i>.log``, ``sglang-router.log``). ``start()`` returns once every ``/health`` answers 200 (and the
router's ``/workers`` lists every server healthy: it adds them in the background and answers 503 until then); a server
that exits or stays unhealthy past ``startup_timeout`` raises :class:`ServerStartError` with the tail of its log.
``stop()`` sends SIGTERM to each process group, then SIGKILL after ``stop_grace`` s; it also runs at context-manager
exit and at interpreter exit. ``kill(i)`` SIGKILLs server ``i`` at once (fault tests).

CPU (``device="cpu"``): ``--device cpu`` with the flags measured in shared/spec SGLANG_CPU.md (torch-native
attention, PyTorch sampling, no warm-up, a small KV pool) and ``SGLANG_USE_CPU_ENGINE=1`` in the environment (without
it ``--device cpu`` goes down CUDA paths). GPU (``device="cuda"``): server ``i`` sees ``CUDA_VISIBLE_DEVICES =
devices[i]`` (e.g. ``["0", "1"]``, or ``["0,1", "2,3"]`` with ``extra_args=["--tp-size", "2"]``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

__all__ = ["SGLangServers", "ServerStartError", "default_sglang_python", "free_port", "router_command",
           "server_command", "sglang_venv_dir", "this_node"]

# Flags measured on a 2-core AVX2 machine with sglang 0.5.23 (SGLANG_CPU.md): the server is ready in ~40 s.
CPU_SERVER_FLAGS = ("--attention-backend", "torch_native", "--sampling-backend", "pytorch", "--skip-server-warmup")
CPU_MAX_TOTAL_TOKENS = 4096
CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": "1"}


class ServerStartError(RuntimeError):
    """A server or the router exited, or did not answer ``/health`` in time; the message carries its log tail."""


def sglang_venv_dir() -> Path:
    """Where ``launch/setup_sglang_cpu.sh`` builds the SGLang venv."""
    env = os.environ.get("OAR_SGLANG_VENV")
    return Path(env) if env else Path.home() / ".cache" / "oar_megatron" / "sglang-venv"


def default_sglang_python() -> str:
    """``$OAR_SGLANG_PYTHON`` if set, else the SGLang venv's interpreter (which may not exist yet)."""
    return os.environ.get("OAR_SGLANG_PYTHON") or str(sglang_venv_dir() / "bin" / "python")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; a later bind by the server can still race)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free_ports(host: str, k: int) -> list[int]:
    # Hold every socket until all k are picked, so the k ports are distinct.
    socks = []
    try:
        for _ in range(k):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server_command(python: str, model_path: str | os.PathLike, *, port: int, host: str = "127.0.0.1",
                   device: str = "cpu", dtype: str | None = None, skip_tokenizer_init: bool = False,
                   api_key: str | None = None, weight_version: str | None = None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The argv of one ``sglang.launch_server``. ``dtype`` None: float32 on CPU (exact log-probs), auto on GPU."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"sglang server device: must be 'cpu' or 'cuda', got {device!r}")
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host,
           "--port", str(port), "--dtype", dtype or ("float32" if device == "cpu" else "auto")]
    if device == "cpu":
        cmd += ["--device", "cpu", *CPU_SERVER_FLAGS]
        if "--max-total-tokens" not in extra_args:
            cmd += ["--max-total-tokens", str(CPU_MAX_TOTAL_TOKENS)]
    if skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if api_key:
        cmd += ["--api-key", api_key]
    if weight_version is not None:
        cmd += ["--weight-version", str(weight_version)]
    return cmd + [str(a) for a in extra_args]


def router_command(python: str, worker_urls: Sequence[str], *, port: int, metrics_port: int,
                   host: str = "127.0.0.1", policy: str = "round_robin", api_key: str | None = None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The argv of ``sglang_router.launch_router``; its Prometheus endpoint is bound to ``host`` (its default,
    0.0.0.0:29000, would expose it and collide between runs)."""
    if not worker_urls:
        raise ValueError("sglang router: needs at least one worker URL")
    return [python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy, "--prometheus-host", host,
            "--prometheus-port", str(metrics_port), *(["--api-key", api_key] if api_key else []),
            *[str(a) for a in extra_args]]


def _log_tail(path: Path, n_lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-n_lines:])


def _shown(cmd: Sequence[str]) -> str:
    """The command for the log, shell-quoted, with the ``--api-key`` value masked."""
    import shlex

    return shlex.join("REDACTED" if i and cmd[i - 1] == "--api-key" else a for i, a in enumerate(cmd))


class _Proc:
    def __init__(self, name: str, cmd: list[str], url: str, log_path: Path, env: Mapping[str, str]):
        self.name, self.cmd, self.url, self.log_path = name, cmd, url, log_path
        self._log = open(log_path, "ab")
        self._log.write(("$ " + _shown(cmd) + "\n").encode())
        self._log.flush()
        try:
            self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def close_log(self) -> None:
        with contextlib.suppress(Exception):
            self._log.close()


def _stop_procs(procs: list[_Proc], grace: float) -> None:
    """SIGTERM every leader, wait up to ``grace`` s, then SIGKILL each whole process group. Safe to call twice.

    The leader alone gets SIGTERM: an SGLang server then shuts its scheduler and detokenizer down itself (a group-wide
    SIGTERM makes it report a crashed child and sleep 5 s for diagnostics). The final group SIGKILL ends whatever
    is left, the children of a leader that ignored SIGTERM or died first included."""
    for p in procs:
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        p.signal_group(signal.SIGKILL)  # the group: also the server's scheduler / detokenizer children
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=5)
        p.close_log()


class SGLangServers:
    """N SGLang servers (+ optional router) as subprocesses; see the module docstring.

    Keyword-only settings: ``python`` (default :func:`default_sglang_python`), ``device`` ("cpu" | "cuda"),
    ``devices`` (one ``CUDA_VISIBLE_DEVICES`` string per server, GPU only; default one GPU each, ``str(i)``),
    ``dtype``, ``host`` (default loopback), ``skip_tokenizer_init``, ``api_key``, ``weight_version``,
    ``extra_args`` (appended to every server's command), ``router`` / ``router_policy`` / ``router_args``,
    ``run_dir`` (logs; default a fresh temporary directory), ``env`` (extra environment for every process),
    ``startup_timeout`` (s, per start), ``stop_grace`` (s between SIGTERM and SIGKILL).
    """

    def __init__(self, model_path: str | os.PathLike, n: int = 1, *, python: str | None = None,
                 device: str = "cpu", devices: Sequence[str] | None = None, dtype: str | None = None,
                 host: str = "127.0.0.1", skip_tokenizer_init: bool = False, api_key: str | None = None,
                 weight_version: str | None = None, extra_args: Sequence[str] = (), router: bool = False,
                 router_policy: str = "round_robin", router_args: Sequence[str] = (),
                 run_dir: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 600.0, stop_grace: float = 10.0):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"sglang servers: n must be an int >= 1, got {n!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"sglang servers: device must be 'cpu' or 'cuda', got {device!r}")
        if devices is not None:
            if device != "cuda":
                raise ValueError("sglang servers: devices= is for device='cuda' (CUDA_VISIBLE_DEVICES per server)")
            if len(devices) != n:
                raise ValueError(f"sglang servers: {len(devices)} devices given for {n} servers")
        self.model_path = str(model_path)
        self.n = n
        self.python = python or default_sglang_python()
        self.device, self.dtype, self.host = device, dtype, host
        self.devices = list(devices) if devices is not None else ([str(i) for i in range(n)] if device == "cuda"
                                                                   else None)
        self.skip_tokenizer_init, self.api_key, self.weight_version = skip_tokenizer_init, api_key, weight_version
        self.extra_args = list(extra_args)
        self.use_router, self.router_policy, self.router_args = router, router_policy, list(router_args)
        self._run_dir_arg = run_dir
        self.run_dir: Path | None = None
        self.env = dict(env or {})
        self.startup_timeout, self.stop_grace = startup_timeout, stop_grace
        self.servers: list[_Proc] = []
        self.router: _Proc | None = None
        self.startup_seconds: float | None = None
        self._atexit = None

    # ---- public surface -------------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.servers]

    @property
    def router_url(self) -> str | None:
        return self.router.url if self.router else None

    @property
    def log_paths(self) -> list[Path]:
        return [p.log_path for p in self.servers] + ([self.router.log_path] if self.router else [])

    def __enter__(self) -> SGLangServers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> SGLangServers:
        """Launch every server (concurrently), wait for each ``/health``, then the router. Raises
        :class:`ServerStartError` (after stopping everything it started) on a death or timeout."""
        if self.servers:
            raise RuntimeError("sglang servers: already started")
        if not (os.path.isfile(self.python) and os.access(self.python, os.X_OK)):
            raise ServerStartError(f"sglang python {self.python!r} is not an executable file: build the CPU venv "
                                   f"with launch/setup_sglang_cpu.sh, or pass python= / set OAR_SGLANG_PYTHON")
        if self._run_dir_arg is None:
            import tempfile
            self.run_dir = Path(tempfile.mkdtemp(prefix="oar-sglang-"))
        else:
            self.run_dir = Path(self._run_dir_arg)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self._register_atexit()
        try:
            ports = _free_ports(self.host, self.n)
            for i in range(self.n):
                cmd = server_command(self.python, self.model_path, port=ports[i], host=self.host, device=self.device,
                                     dtype=self.dtype, skip_tokenizer_init=self.skip_tokenizer_init,
                                     api_key=self.api_key, weight_version=self.weight_version,
                                     extra_args=self.extra_args)
                env = self._env()
                if self.devices is not None:
                    env["CUDA_VISIBLE_DEVICES"] = self.devices[i]
                self.servers.append(_Proc(f"sglang server {i}", cmd, _url(self.host, ports[i]),
                                          self.run_dir / f"sglang-server-{i}.log", env))
            self._wait_healthy(self.servers, t0)
            if self.use_router:
                port, metrics_port = _free_ports(self.host, 2)  # picked now: nothing took them meanwhile
                cmd = router_command(self.python, self.urls, port=port, metrics_port=metrics_port,
                                     host=self.host, policy=self.router_policy, api_key=self.api_key,
                                     extra_args=self.router_args)
                self.router = _Proc("sglang router", cmd, _url(self.host, port),
                                    self.run_dir / "sglang-router.log", self._env())
                self._wait_healthy([self.router], time.monotonic())
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Terminate the router and every server (SIGTERM to each process group, SIGKILL after ``stop_grace``)."""
        procs = ([self.router] if self.router else []) + self.servers
        _stop_procs(procs, self.stop_grace)
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` and its children at once, as a crash would (fault tests); the others keep serving."""
        p = self.servers[i]
        p.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=10)

    def alive(self, i: int) -> bool:
        return self.servers[i].alive()

    def log_tail(self, i: int | None = None, n_lines: int = 40) -> str:
        """The last lines of server ``i``'s log (``None``: the router's)."""
        p = self.router if i is None else self.servers[i]
        return _log_tail(p.log_path, n_lines) if p else ""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # ---- internals ------------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.device == "cpu":
            env.update(CPU_ENV)
        env.update(self.env)
        return env

    def _register_atexit(self) -> None:
        ref = weakref.ref(self)

        def _cleanup():
            obj = ref()
            if obj is not None:
                obj.stop()

        self._atexit = _cleanup
        atexit.register(_cleanup)

    def _ready(self, client: httpx.Client, p: _Proc) -> bool:
        if client.get(p.url + "/health").status_code != 200:
            return False
        if p is not self.router:
            return True
        # The router answers /health at once and adds its workers in the background (503 until then): ready when
        # /workers lists every server as healthy (a router without /workers: /health alone).
        r = client.get(p.url + "/workers")
        if r.status_code == 404:
            return True
        workers = r.json().get("workers", []) if r.status_code == 200 else []
        healthy = {w.get("url") for w in workers if w.get("is_healthy", True)}
        return healthy >= set(self.urls)

    def _wait_healthy(self, procs: list[_Proc], t0: float) -> None:
        pending = list(procs)
        with httpx.Client(timeout=httpx.Timeout(5.0), headers=self.headers(), trust_env=False) as client:
            while pending:
                for p in list(pending):
                    if not p.alive():
                        raise ServerStartError(
                            f"{p.name} exited with code {p.popen.returncode} before it was healthy "
                            f"(log {p.log_path}); last lines:\n{_log_tail(p.log_path)}")
                    try:
                        if self._ready(client, p):
                            pending.remove(p)
                    except (httpx.HTTPError, ValueError):
                        pass
                if not pending:
                    break
                if time.monotonic() - t0 > self.startup_timeout:
                    p = pending[0]
                    raise ServerStartError(
                        f"{p.name} at {p.url} did not answer /health with 200 within {self.startup_timeout:.0f} s "
                        f"(log {p.log_path}); last lines:\n{_log_tail(p.log_path)}")
                time.sleep(0.5)


def this_node() -> str:
    """This node's name as the cluster knows it: ``$SLURMD_NODENAME`` under Slurm, else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _write_json_atomic(path: Path, obj: dict) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # a reader sees the whole file or none


class _Stop(Exception):
    """SIGTERM / SIGINT while serving (Slurm ends the server step, the job script's trap, Ctrl-C)."""


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m oar_megatron.rollout.servers MODEL [--n N] [--router] ...``: start servers, print their URLs, serve
    until SIGTERM / Ctrl-C (then stop them: exit 0) or until one dies (exit 1, naming it with its log tail).

    On a cluster (``launch/slurm.sh`` with ``OAR_SGLANG_NODES``) each server node runs it with ``--host auto`` (bind
    this node's name, ``$SLURMD_NODENAME``: the servers are reachable from the training nodes; never the default,
    which is loopback) and ``--url-file DIR/{host}.json``: once every server (and router) answers ``/health`` the file
    is written atomically with ``{"host", "urls", "router_url", "log_dir", "pid"}``; a start failure writes
    ``{"host", "error"}`` instead, so the job script fails at once naming the node. Unknown arguments go to every
    ``sglang.launch_server``."""
    import argparse
    import shlex

    ap = argparse.ArgumentParser(prog="python -m oar_megatron.rollout.servers", description=_main.__doc__)
    ap.add_argument("model_path")
    ap.add_argument("--n", type=int, default=1, help="servers on this node")
    ap.add_argument("--router", action="store_true", help="also an sglang-router in front of them")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--devices", nargs="+", default=None,
                    help="CUDA_VISIBLE_DEVICES per server, e.g. --devices 0,1 2,3 (with --tp-size 2)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="bind address (default loopback); 'auto': this node's name ($SLURMD_NODENAME or hostname)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--python", default=None, help="the SGLang environment's interpreter (default $OAR_SGLANG_PYTHON)")
    ap.add_argument("--run-dir", default=None, help="server logs (default a temporary directory)")
    ap.add_argument("--url-file", default=None, help="write the URLs here once healthy ('{host}' is replaced)")
    ap.add_argument("--api-key-env", default=None, help="name of an environment variable holding the --api-key")
    ap.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    ap.add_argument("--skip-tokenizer-init", action="store_true")
    args, extra = ap.parse_known_args(argv)
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    host = this_node() if args.host == "auto" else args.host
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            ap.error(f"--api-key-env: ${args.api_key_env} is not set")
    url_file = Path(args.url_file.replace("{host}", host)) if args.url_file else None
    run_dir = args.run_dir.replace("{host}", host) if args.run_dir else None

    def _on_signal(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    s = SGLangServers(args.model_path, args.n, python=args.python, device=args.device, devices=args.devices,
                      dtype=args.dtype, host=host, router=args.router, run_dir=run_dir, api_key=api_key,
                      skip_tokenizer_init=args.skip_tokenizer_init, extra_args=extra,
                      startup_timeout=args.startup_timeout)
    try:
        try:
            s.start()
        except ServerStartError as e:
            print(f"sglang servers on {host}: {e}", file=sys.stderr, flush=True)
            if url_file:
                _write_json_atomic(url_file, {"host": host, "error": str(e).splitlines()[0],
                                              "log_dir": str(s.run_dir)})
            return 1
        if url_file:
            _write_json_atomic(url_file, {"host": host, "urls": s.urls, "router_url": s.router_url,
                                          "log_dir": str(s.run_dir), "pid": os.getpid()})
        print(f"ready in {s.startup_seconds:.1f} s on {host}: servers {shlex.join(s.urls)} router {s.router_url} "
              f"logs {s.run_dir}", flush=True)
        while True:
            dead = [i for i in range(s.n) if not s.alive(i)]
            if dead or (s.router is not None and not s.router.alive()):
                name = f"sglang server {dead[0]}" if dead else "sglang router"
                print(f"{name} on {host} exited; last lines of its log:\n{s.log_tail(dead[0] if dead else None)}",
                      file=sys.stderr, flush=True)
                return 1
            time.sleep(1)
    except _Stop as e:
        print(f"sglang servers on {host}: {e} received, stopping", flush=True)
        return 0
    finally:
        for sig in old:  # a second SIGTERM must not kill us half-way: the servers run in sessions of their own
            signal.signal(sig, signal.SIG_IGN)
        s.stop()
        for sig, h in old.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(_main())
