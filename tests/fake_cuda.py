"""Run a function on N ranks whose default group refuses CPU tensors like NCCL (a CUDA-only fake backend), for the
checks that host data never reaches a device group (/work/shared/spec/GPU_CLASS_CHECKS.md; used by
``tests/cpu/test_collectives*.py``).

``run_strict(fn, world, *args)`` is ``tests.dist_harness.run_ranks`` with ``install_cuda_only_world`` in place of
the gloo initialisation: the default group (and megatron groups whose ``group_desc`` is in ``fake_descs``) run on
``torch.testing._internal.distributed.fake_pg.FakeProcessGroup`` registered for ``devices=["cuda"]``, so a CPU tensor
or a Python object sent over them raises as on a GPU cluster; ``new_group`` without a backend gives gloo (megatron's
compute groups carry the model's CPU tensors on this machine); collectives that megatron's own modules issue on a
CUDA-only group go to a gloo group with the same ranks (on GPUs megatron's tensors are on the device; megatron is
not what these tests check). A fake group moves no data: use it to check placement, gloo groups to check values.
"""

from tests.dist_harness import run_ranks

FAKE_DESCS = ("DATA_PARALLEL_GROUP",)  # megatron groups made CUDA-only besides the world (test_collectives_strict)


_MEGATRON_REROUTED = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                      "broadcast_object_list", "barrier", "reduce_scatter_tensor", "all_to_all_single", "gather_object")


def install_cuda_only_world(init_file: str, rank: int, world: int, fake_descs=FAKE_DESCS) -> None:
    """Default group on a CUDA-only fake backend; ``new_group`` without a backend → gloo unless its megatron
    ``group_desc`` is in ``fake_descs`` (then CUDA-only too). Collectives issued by megatron's own modules on a
    CUDA-only group go to a gloo group with the same ranks instead: on GPUs megatron's tensors are on the device
    (and megatron is not what this test checks); on this CPU its tensors are host tensors."""
    import inspect
    import sys

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeProcessGroup

    def creator(common_opts, backend_opts):
        return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)

    if "fakecuda" not in dist.Backend.backend_list:
        dist.Backend.register_backend("fakecuda", creator, extended_api=True, devices=["cuda"])
    original = dist.new_group
    gloo_of: dict[int, object] = {}  # id(CUDA-only group) -> gloo group with the same ranks (for megatron's calls)

    def new_group(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False,
                  group_desc=None, **kw):
        fake = backend is None and group_desc in fake_descs
        if backend is None:
            backend = "fakecuda" if fake else "gloo"
        pg = original(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options,
                      use_local_synchronization=use_local_synchronization, group_desc=group_desc, **kw)
        if fake:
            twin = original(ranks=ranks, timeout=timeout, backend="gloo",
                            use_local_synchronization=use_local_synchronization)
            gloo_of[id(pg)] = twin
        return pg

    def reroute(name, fn):
        sig = inspect.signature(fn)

        def call(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("megatron."):
                bound = sig.bind(*args, **kwargs)
                group = bound.arguments.get("group")
                key = id(dist.GroupMember.WORLD if group is None else group)
                if key in gloo_of:
                    bound.arguments["group"] = gloo_of[key]
                    return fn(*bound.args, **bound.kwargs)
            return fn(*args, **kwargs)

        return call

    dist.new_group = new_group
    dist.init_process_group("fakecuda", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gloo_of[id(dist.GroupMember.WORLD)] = original(list(range(world)), backend="gloo")
    for name in _MEGATRON_REROUTED:
        setattr(dist, name, reroute(name, getattr(dist, name)))


def run_strict(fn, world: int, *args, timeout: float = 600.0):
    """``dist_harness.run_ranks`` with each rank's world made by :func:`install_cuda_only_world`."""
    return run_ranks(fn, world, *args, timeout=timeout, init=install_cuda_only_world)
