"""Run a function on N local ranks, as torchrun would, and return rank 0's result.

``run_local(fn, world_size, *args, timeout=...)`` starts ``world_size`` processes (``torch.multiprocessing``,
spawn), each with the torchrun variables set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` a free local port), and calls ``fn(*args)`` in each. ``fn`` sets up its
own parallel state with the project's ``policy.init_parallel`` (which reads those variables: NCCL with
``cuda:LOCAL_RANK`` when CUDA is available, one GPU per rank, gloo on the CPU with the megatron CPU shims) and
tears it down with ``destroy_parallel``. ``fn`` must be a module-level function (the children import it).

Results: rank 0's return value comes back (``torch.save`` bytes, loaded with ``weights_only=True``: tensors,
numbers, strings, None and containers of them); the other ranks' are dropped. The first rank to fail — an
exception, or a process that dies without one (killed, out of memory) — ends the launch: the others are killed
and :class:`RankError` says in one line which rank failed and why (its traceback is kept on the exception). Past
``timeout`` seconds every rank is killed and :class:`RankError` says so.

This is product code (``oar-convert logprobs`` / ``verify`` start their ranks with it); the tests' own harness is
``tests/dist_harness.py`` (file rendezvous, every rank's result).
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback

__all__ = ["RankError", "check_world_size", "run_local"]


class RankError(RuntimeError):
    """A local rank failed (``rank``; None when the launch as a whole timed out); one line, the traceback in
    ``.details``."""

    def __init__(self, message: str, *, rank: int | None = None, exc_type: str | None = None, details: str = ""):
        super().__init__(message)
        self.rank, self.exc_type, self.details = rank, exc_type, details


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_world_size(world_size: int) -> None:
    """One GPU per rank when CUDA is available: refuse more ranks than visible GPUs (one line)."""
    import torch

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size: must be a positive integer, got {world_size!r}")
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise ValueError(f"world size: {world_size} ranks need {world_size} GPUs (one per rank), "
                         f"{torch.cuda.device_count()} visible")


def _child(fn, rank: int, world_size: int, port: int, threads: int, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):  # torchrun's variables win anyway; keep the child unambiguous
        os.environ.pop(key, None)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        out = fn(*args)
        payload = b""
        if rank == 0:
            buf = io.BytesIO()
            torch.save(out, buf)
            payload = buf.getvalue()
        results.put((rank, "ok", payload))
    except BaseException as exc:  # noqa: BLE001 - forwarded to the parent as one line + traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        results.put((rank, "error", (type(exc).__name__, first, traceback.format_exc())))


def run_local(fn, world_size: int, *args, timeout: float = 1800.0):
    """Call ``fn(*args)`` on ``world_size`` local ranks (module docstring) and return rank 0's result."""
    import torch
    import torch.multiprocessing as mp

    check_world_size(world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, threads, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    done: set[int] = set()
    value = None
    try:
        while len(done) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise RankError(f"timed out after {timeout:g} s ({world_size - len(done)} of {world_size} ranks "
                                    f"still running)") from None
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode is not None]
                if dead:
                    time.sleep(0.5)  # a rank that put its result just before exiting: let the queue deliver it
                    if results.empty():
                        r = dead[0]
                        raise RankError(f"rank {r} died without a result (exit code {procs[r].exitcode})", rank=r)
                continue
            if status == "error":
                exc_type, first, details = payload
                raise RankError(f"rank {rank} failed: {exc_type}: {first}", rank=rank, exc_type=exc_type,
                                details=details)
            done.add(rank)
            if rank == 0:
                value = torch.load(io.BytesIO(payload), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=10 if len(done) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return value
