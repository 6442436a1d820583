"""Run a function on N real gloo ranks (separate processes) and collect what each rank returns.

Used by every multi-rank test: ``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a
gloo process group in each (file-based rendezvous in a fresh temporary directory, so tests never fight over ports),
calls ``fn(rank, world_size, *args)`` and returns the list of per-rank results (anything picklable; tensors are
sent as CPU tensors). An exception on any rank is re-raised in the test with that rank's traceback.
``fn`` must be a module-level function so the spawned children can import it. Results travel as ``torch.save``
bytes (not shared-memory tensors, which vanish when a rank exits before the parent reads them) and are loaded with
``weights_only=True``: return tensors, numbers, strings and containers of them.
"""

from __future__ import annotations

import io
import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _gloo_world(init_file: str, rank: int, world_size: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def _child(fn, rank, world_size, init_file, args, queue, init=_gloo_world):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        init(init_file, rank, world_size)
        try:
            buf = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buf)
            queue.put((rank, "ok", buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - forwarded to the parent test
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, init=_gloo_world):
    """``init(init_file, rank, world_size)`` creates each rank's default process group (module-level, picklable);
    the default is a plain gloo world."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, init_file, args, queue, init))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout)
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
        finally:
            for p in procs:
                p.join(timeout=10 if not errors else 1)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise RuntimeError("\n".join(errors))
        return [results[r] for r in range(world_size)]
