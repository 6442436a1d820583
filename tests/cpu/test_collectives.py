"""``oar_megatron.collectives``: control-plane values over gloo twins, the data plane's device check, twin creation
and teardown (docs/architecture.md, "Communication"). Three ranks whose world is CUDA-only (NCCL-like, see
``tests/fake_cuda.py``), one spawn; plus the no-op behaviour without torch.distributed."""

import math

import pytest
import torch

from tests.fake_cuda import run_strict

pytestmark = pytest.mark.dist


def _ranks(rank, world):
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from oar_megatron import collectives as C
    from oar_megatron.algorithms import loss_denominators
    from oar_megatron.algorithms.context_parallel import gather_zigzag
    from oar_megatron.policy.generate import _draw
    from oar_megatron.policy.pipeline import _deliver
    from oar_megatron.rollout import SamplingParams

    out = {}
    # three ranks; every rank creates every group in the same order (torch's rule for new_group)
    gloo01, gloo2 = dist.new_group([0, 1], backend="gloo"), dist.new_group([2], backend="gloo")
    fake12, fake0 = dist.new_group([1, 2], backend="fakecuda"), dist.new_group([0], backend="fakecuda")
    fake02, fake1 = dist.new_group([0, 2], backend="fakecuda"), dist.new_group([1], backend="fakecuda")
    gloo02 = dist.new_group([0, 2], backend="gloo")
    fake_all = dist.new_group([0, 1, 2], backend="fakecuda")
    gpair = gloo01 if rank < 2 else gloo2  # already gloo: its own twin
    fpair = fake12 if rank > 0 else fake0  # NCCL-like: a twin is created for [1, 2]
    given = fake02 if rank != 1 else fake1  # NCCL-like with a given gloo twin (as megatron's gloo DP groups)
    n_before = len(dist.distributed_c10d._world.pg_map)
    C.register({"gpair": gpair, "fpair": fpair, "given": given, "all": fake_all, "none": None}, device="cuda:0",
               twins={"given": gloo02} if rank != 1 else {})
    out["created"] = len(dist.distributed_c10d._world.pg_map) - n_before
    out["twins"] = [C.control_group(gpair) is gpair, C.control_group(given) is (gloo02 if rank != 1 else fake1),
                    C.control_group(fake_all) is C.control_group(None),
                    [str(dist.get_backend(C.control_group(g))) for g in (None, fpair)]]
    out["devices"] = [str(C.device_of(g)) for g in (None, fpair, C.control_group(None))]
    reg = C.registered()
    out["registered"] = [list(reg), reg["fpair"][0] is fpair, str(reg["world"][1]), reg["given"][2] is
                         C.control_group(given)]

    # control plane over twins (the world and the fake groups refuse host data themselves)
    out["bcast"] = C.broadcast_object({"r": rank}, src=1)
    out["bcast_pair"] = C.broadcast_object(f"from {rank}", group=fpair, src=1)  # group rank 1 of [1, 2]: rank 2
    out["gather"] = C.all_gather_object((rank, "x" * rank), group=given)
    out["any"] = (C.any_rank(rank == 1), C.any_rank(False, group=fpair), C.all_ranks(rank == 1),
                  C.all_ranks(True))
    out["sum"] = C.sum_over_ranks(1.5 + rank)
    out["sums"] = C.sum_over_ranks([1.0, float(rank)], group=fpair)
    out["max"] = C.max_over_ranks(float(rank * 10))
    metrics = {"a": 1.0 + rank, "b": float("nan") if rank == 0 else 4.0, f"only{rank}": 7.0 + rank}
    out["mean"] = C.mean_over_ranks(metrics)
    C.barrier()
    C.barrier(fpair)
    single = (fake0, fake1, gloo2)[rank]
    out["single"] = (C.broadcast_object(rank, group=single), C.all_gather_object(rank, group=single),
                     C.sum_over_ranks(2.0, group=single))

    # data plane: real values over the world's twin (registered as a CPU group, so host tensors are right there)
    twin = C.control_group(None)
    x = torch.tensor([1.0, 2.0]) * (rank + 1)
    out["all_reduce"] = C.all_reduce(x.clone(), "sum", twin).tolist()
    out["all_gather"] = [t.tolist() for t in C.all_gather(x, twin)]
    out["broadcast"] = C.broadcast(x.clone(), src=1, group=twin).tolist()
    out["recv"] = None
    if rank == 0:
        C.send(torch.tensor([5.0, 6.0]), dst=1, group=twin)
    elif rank == 1:
        out["recv"] = C.recv(torch.empty(2), src=0, group=twin).tolist()

    # the device check: a host tensor on a device group is a one-line error naming the collective and devices
    errors = {}
    for name, call in (("all_reduce", lambda: C.all_reduce(torch.ones(2), group=fake_all)),
                       ("all_gather", lambda: C.all_gather(torch.ones(2), group=None)),
                       ("broadcast", lambda: C.broadcast(torch.ones(2), group=None)),
                       ("send", lambda: C.send(torch.ones(2), dst=(rank + 1) % world, group=None)),
                       ("recv", lambda: C.recv(torch.ones(2), src=(rank + 1) % world, group=fake_all))):
        try:
            call()
            errors[name] = None
        except RuntimeError as e:
            errors[name] = str(e)
    out["errors"] = errors
    torch.cuda.get_device_capability = lambda *a, **k: (8, 0)  # dist.broadcast asks it of a CUDA tensor
    with FakeTensorMode(allow_non_fake_inputs=True):  # tensors on the group's device pass (fake group: no data)
        y = torch.ones(3, device="cuda")
        out["fake_ok"] = [str(C.all_reduce(y, "max", fake_all).device), len(C.all_gather(y, None)),
                          str(C.broadcast(y, 0, None).device)]
        # the local engine's TP draw: sampled and broadcast on the device, nothing through the host
        tok, lp = _draw(torch.randn(3, 20, device="cuda"), SamplingParams(temperature=0.8, top_k=4), 17, None,
                        fake_all)
        out["draw"] = [(str(t.device), str(t.dtype), tuple(t.shape)) for t in (tok, lp)]
        # other data-plane call sites: loss denominators over DP, the CP gather, the pipeline delivery
        mask = torch.ones(2, 6, dtype=torch.bool, device="cuda")
        g_tok, g_seq = loss_denominators([mask], group=fake_all)
        full = gather_zigzag(torch.randn(2, 4, device="cuda"), fake_all, dim=1)
        got = _deliver(torch.randn(5, device="cuda") if rank == 2 else None, (5,), torch.float32,
                       torch.device("cuda", 0), src=2, pp_group=fake_all, broadcast=True)
        out["sites"] = [(str(t.device), tuple(t.shape)) for t in (g_tok, g_seq, full, got)]
    try:
        C.all_reduce(torch.ones(1), "mean", twin)
    except ValueError as e:
        out["bad_op"] = str(e)

    C.reset()
    out["after_reset"] = (C.is_registered(fpair), C.device_of(None), C.registered())
    try:
        C.any_rank(True)  # the world is CUDA-only and no longer has a twin
    except RuntimeError as e:
        out["unregistered"] = str(e)
    # one group by hand (no collective): a twin must be gloo
    try:
        C.register_group(fake_all, device="cuda:0", control=fake_all)
    except ValueError as e:
        out["bad_twin"] = str(e)
    C.register_group(fake_all, device="cuda:0", control=dist.new_group([0, 1, 2], backend="gloo"), name="by_hand")
    out["by_hand_any"] = C.any_rank(rank == 2, group=fake_all)  # over the given twin
    out["by_hand"] = [list(C.registered()), str(C.device_of(fake_all)), C.size(fake_all)]
    C.reset()
    return out


def test_control_plane_data_plane_and_twins_on_three_ranks():
    res = run_strict(_ranks, 3)
    for rank, r in enumerate(res):
        # created twins: the world's everywhere, [1, 2]'s on its members; gloo groups, given twins and size-1 groups
        # need none, and a group with the world's ranks shares the world's twin
        assert r["created"] == (1 if rank == 0 else 2)
        assert r["twins"] == [True, True, True, ["gloo", "gloo" if rank > 0 else "fakecuda"]]  # size 1: itself
        assert r["devices"] == ["cuda:0", "cuda:0", "cpu"]
        assert r["registered"] == [["world", "gpair", "fpair", "given", "all"], True, "cuda:0", True]
        assert r["bcast"] == {"r": 1} and r["bcast_pair"] == f"from {0 if rank == 0 else 2}"
        assert r["gather"] == ([(1, "x")] if rank == 1 else [(0, ""), (2, "xx")])
        assert r["any"] == (True, False, False, True)
        assert r["sum"] == 7.5 and r["max"] == 20.0
        assert r["sums"] == ([1.0, 0.0] if rank == 0 else [2.0, 3.0])
        mean = r["mean"]
        assert mean["a"] == 2.0 and mean["b"] == 4.0  # NaN-free mean over the ranks holding a finite value
        assert (mean["only0"], mean["only1"], mean["only2"]) == (7.0, 8.0, 9.0)  # union of keys
        assert r["single"] == (rank, [rank], 2.0)
        assert r["all_reduce"] == [6.0, 12.0]
        assert r["all_gather"] == [[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]
        assert r["broadcast"] == [2.0, 4.0]
        assert r["recv"] == ([5.0, 6.0] if rank == 1 else None)
        for name, err in r["errors"].items():
            assert err == (f"collectives.{name}: tensor on cpu but the group's device is cuda:0 (host data goes "
                           "through the control plane, model tensors must live on the policy's device)"), name
        assert r["fake_ok"] == ["cuda:0", 3, "cuda:0"]
        assert r["draw"] == [("cuda:0", "torch.int64", (3,)), ("cuda:0", "torch.float32", (3,))]
        assert r["sites"] == [("cuda:0", ()), ("cuda:0", ()), ("cuda:0", (2, 12)), ("cuda:0", (5,))]
        assert r["bad_op"] == "op: unknown reduction 'mean'; known: 'sum', 'max', 'min'"
        assert r["after_reset"] == (False, None, {})
        assert "has backend 'fakecuda' and no registered gloo twin" in r["unregistered"]
        assert r["bad_twin"] == "control: the control-plane twin must be a gloo group, got backend 'fakecuda'"
        assert r["by_hand"] == [["by_hand"], "cuda:0", 3] and r["by_hand_any"] is True


def test_without_torch_distributed_everything_is_local():
    from oar_megatron import collectives as C

    C.register({"tp": None}, device="cpu")
    try:
        assert C.size() == 1 and C.rank() == 0
        assert C.broadcast_object([1, 2]) == [1, 2] and C.all_gather_object("a") == ["a"]
        assert C.any_rank(True) and not C.any_rank(False) and C.sum_over_ranks([1.0, 2.0]) == [1.0, 2.0]
        m = C.mean_over_ranks({"x": 2.0, "y": float("nan")})
        assert m["x"] == 2.0 and math.isnan(m["y"])
        C.barrier()
        t = torch.ones(2)
        assert C.all_reduce(t) is t and C.all_gather(t)[0] is t and C.broadcast(t) is t
    finally:
        C.reset()
