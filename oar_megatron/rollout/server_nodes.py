"""SGLang servers on dedicated nodes of the training job (``launch/slurm.sh`` with ``OAR_SGLANG_NODES=k``).

Each server node runs ``python -m oar_megatron.rollout.servers MODEL --host auto --url-file DIR/{host}.json
--run-dir LOGS/{host}`` in one background ``srun`` step; that CLI writes ``DIR/<node>.json`` atomically once its
servers answer ``/health`` (``{"host", "urls", "router_url", ...}``) or once they failed (``{"host", "error"}``).
The job script then waits here for every node's file and turns them into the trainer's overrides::

    python -m oar_megatron.rollout.server_nodes --dir DIR --hosts n1 n2 --logs LOGS --timeout 1800 --watch-pid PID
    rollout.server_urls=[http://n1:30001,http://n2:30001]      (one override per line on stdout)
    rollout.router_url=http://n1:30002                        (when the single server node runs a router)

Exit 1 with a message naming the node (and the tail of its server log) when a node reports an error, when the
server step (``--watch-pid``) exits before every node is ready, or after ``--timeout`` seconds. Nothing here imports
sglang or torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["ServerNodesError", "overrides", "wait_for_nodes"]


class ServerNodesError(RuntimeError):
    """A server node failed or did not report in time; the message names it."""


def _tail(logs: Path | None, host: str, n_lines: int = 20) -> str:
    if logs is None:
        return ""
    node_dir = logs / host
    files = sorted(node_dir.glob("*.log")) if node_dir.is_dir() else []
    if not files:
        return f"\n(no server log under {node_dir})"
    out = []
    for f in files:
        lines = f.read_text(errors="replace").splitlines()[-n_lines:]
        out.append(f"\n--- last lines of {f}:\n" + "\n".join(lines))
    return "".join(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by the job script) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_for_nodes(url_dir: str | os.PathLike, hosts: Sequence[str], *, timeout_s: float,
                   logs: str | os.PathLike | None = None, alive: Callable[[], bool] | None = None,
                   poll_s: float = 0.5) -> list[dict]:
    """Every host's record from ``url_dir/<host>.json``, in ``hosts`` order, once all are written. Raises
    :class:`ServerNodesError` on a node's error record, when ``alive()`` turns false first, or after ``timeout_s``."""
    if not hosts:
        raise ValueError("server nodes: no hosts to wait for")
    url_dir = Path(url_dir)
    logs_dir = Path(logs) if logs is not None else None
    records: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for host in hosts:
            if host in records:
                continue
            path = url_dir / f"{host}.json"
            if not path.is_file():
                continue
            rec = json.loads(path.read_text())
            if rec.get("error"):
                raise ServerNodesError(f"sglang servers on node {host} failed to start: {rec['error']}"
                                       f"{_tail(logs_dir, host)}")
            if not rec.get("urls"):
                raise ServerNodesError(f"sglang servers on node {host}: {path} lists no URLs")
            records[host] = rec
        if len(records) == len(hosts):
            return [records[h] for h in hosts]
        missing = [h for h in hosts if h not in records]
        if alive is not None and not alive():
            raise ServerNodesError(f"the sglang server step exited before node {missing[0]} was ready "
                                   f"({len(missing)} of {len(hosts)} nodes never reported){_tail(logs_dir, missing[0])}")
        if time.monotonic() > deadline:
            raise ServerNodesError(f"sglang servers on node {missing[0]} not healthy after {timeout_s:.0f} s "
                                   f"({len(missing)} of {len(hosts)} nodes never reported){_tail(logs_dir, missing[0])}")
        time.sleep(poll_s)


def overrides(records: Sequence[dict]) -> list[str]:
    """The trainer's Hydra overrides for these nodes: every worker URL in ``rollout.server_urls`` (weights are pushed
    to each; the client balances generation over them) and, when exactly one node runs a router, its URL."""
    urls = [u for rec in records for u in rec["urls"]]
    out = [f"rollout.server_urls=[{','.join(urls)}]"]
    routers = [rec["router_url"] for rec in records if rec.get("router_url")]
    if len(routers) > 1:
        raise ServerNodesError(f"{len(routers)} server nodes run a router; the trainer takes one rollout.router_url "
                               "(run the router on one node only, or none: the client balances over the workers)")
    if routers:
        out.append(f"rollout.router_url={routers[0]}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m oar_megatron.rollout.server_nodes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the server nodes write <host>.json")
    ap.add_argument("--hosts", nargs="+", required=True)
    ap.add_argument("--logs", default=None, help="the server logs' directory (<logs>/<host>/*.log), for errors")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for every node")
    ap.add_argument("--watch-pid", type=int, default=None, help="the server step's srun: fail when it exits")
    args = ap.parse_args(argv)
    alive = (lambda: _pid_alive(args.watch_pid)) if args.watch_pid else None
    try:
        records = wait_for_nodes(args.dir, args.hosts, timeout_s=args.timeout, logs=args.logs, alive=alive)
        lines = overrides(records)
    except ServerNodesError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
