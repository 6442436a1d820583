"""Run a function on N local ranks (``oar-convert`` under a TP/PP/EP layout): spawned processes with the torchrun
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` 127.0.0.1, ``MASTER_PORT`` a free loopback port),
so ``policy.init_parallel`` creates the process group itself (gloo on CPU, NCCL on GPU, one GPU per rank).

``launch(fn, world_size, *args)`` returns rank 0's result. An exception on any rank ends every rank; it comes back
as one line: a ``ValueError`` (bad input: ``ConversionError``, layout errors, ``CheckpointError`` …) as a
``ValueError`` with its message, anything else as a ``RuntimeError`` naming the rank and the exception type.
``fn`` must be a module-level function (the children import it).
"""

from __future__ import annotations

import os
import queue as _queue
import socket
import traceback

__all__ = ["free_port", "launch"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _child(fn, rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):  # the launcher's own variables win over an enclosing job's
        os.environ.pop(key, None)
    try:
        out = fn(rank, world, *args)
        results.put((rank, "ok", out if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001 - forwarded to the parent as one line
        kind = "value" if isinstance(exc, ValueError) else "error"
        results.put((rank, kind, f"{_first_line(exc)}" if kind == "value" else
                     f"{type(exc).__name__}: {_first_line(exc)}", traceback.format_exc()))


def launch(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; rank 0's return value (picklable)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, failure = None, None
    try:
        pending = set(range(world_size))
        while pending and failure is None:
            try:
                item = results.get(timeout=1.0)
            except _queue.Empty:
                dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode not in (0, None)]
                if dead:
                    failure = ("error", f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}", "")
                continue
            rank, status, *rest = item
            pending.discard(rank)
            if status == "ok":
                if rank == 0:
                    out = rest[0]
            else:
                failure = (status, rest[0] if status == "value" else f"rank {rank}: {rest[0]}", rest[1])
    finally:
        for p in procs:
            p.join(timeout=30 if failure is None else 2)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        status, line, trace = failure
        if os.environ.get("OAR_CONVERT_TRACEBACK"):
            print(trace, flush=True)
        raise (ValueError if status == "value" else RuntimeError)(line)
    return out
