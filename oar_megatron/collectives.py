"""Every ``torch.distributed`` collective the project issues goes through this module (megatron's own internals
excepted; ``tests/test_collectives_scan.py`` scans the package's source for any other call). Pure torch: no megatron
import, so ``oar_megatron.algorithms`` may use it.

Two planes.

* **Data plane** (tensors of the model: log-prob statistics, gathered saliency, pipeline deliveries, sampled
  tokens): :func:`all_reduce`, :func:`all_gather`, :func:`broadcast`, :func:`send`, :func:`recv` over the *device
  group* the caller passes (megatron's TP/PP/CP/DP/... groups; NCCL on GPUs). The tensor must already live on the
  group's registered device; a cheap check, always on, raises a one-line ``RuntimeError`` naming the collective,
  the tensor's device and the group's device, instead of an NCCL crash (or a silent host round trip) on a cluster.
* **Control plane** (metrics, flags, Python objects, counters, barriers): :func:`broadcast_object`,
  :func:`all_gather_object`, :func:`any_rank`, :func:`all_ranks`, :func:`sum_over_ranks`, :func:`max_over_ranks`,
  :func:`mean_over_ranks`, :func:`barrier`. Given a device group (or None: the world), they run over its gloo
  *twin*, so host data never meets an NCCL group — the way megatron keeps its own CPU-side traffic on
  ``get_data_parallel_group_gloo``.

Registry. :func:`register` is called once by ``policy.parallel.init_parallel`` (by every rank, same arguments in
the same order) with every group the project uses and the policy's device. It tags the groups and the world as
device groups and gives each a gloo twin: a group whose backend is already gloo is its own twin, a twin given by
the caller (megatron's gloo data-parallel groups) is reused, otherwise one ``new_group(ranks, backend="gloo")`` is
made per distinct rank list. ``new_group`` must be called by every rank in the same order, also for groups it is
not in, so the rank lists of every group are first all-gathered over the world's twin and enumerated identically
on every rank. Twins are registered as device groups of the CPU (so a host tensor may be reduced over a twin with
the data-plane calls, e.g. advantage whitening in the loop). :func:`reset` (``destroy_parallel``) tears it down.

Unregistered groups (tests building plain gloo groups; torch.distributed uninitialised; world size 1) keep
working: size-1 groups and an uninitialised torch.distributed are no-ops, an unregistered gloo group is its own
control plane, and the data-plane device check is skipped for groups that were never registered. A control-plane
call on an unregistered non-gloo group is an error (it would put host data on NCCL).

What the device check can and cannot see. It compares ``tensor.device`` with the group's registered device. On a
GPU cluster this catches a host tensor sent over an NCCL group (and a tensor on the wrong GPU). On this CPU-only
machine the policy's device *is* the CPU, so a host-built tensor is indistinguishable from a model tensor and the
check cannot fire. The design covers that case by construction and by tests instead:
(1) host data has its own API (the control plane), which only ever uses twins, so it cannot reach a device group;
(2) no module but this one may call a collective (source scan, ``tests/test_collectives_scan.py``);
(3) ``tests/cpu/test_collectives_strict.py`` runs real TP2 and DP2 trainer steps with a world (and the data-parallel
group) built on a CUDA-only fake backend (``torch.testing._internal.distributed.fake_pg.FakeProcessGroup``
registered for ``devices=["cuda"]``), which refuses CPU tensors exactly as NCCL does, while megatron's compute
groups stay gloo (on CPU they must carry the model's CPU tensors); any host traffic on those groups fails the test;
(4) the data-plane call sites (sampling, pipeline deliveries, reductions) are checked with fake CUDA tensors under
``torch._subclasses.fake_tensor.FakeTensorMode`` and a fake CUDA group registered with device ``cuda``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather", "all_gather_object", "all_ranks", "all_reduce", "any_rank", "barrier", "broadcast",
    "broadcast_object", "check_device", "control_group", "destroy_external_group", "device_of",
    "init_external_group", "is_registered", "max_over_ranks",
    "mean_over_ranks", "rank", "recv", "register", "register_group", "registered", "reset", "send", "size",
    "sum_over_ranks",
]

_WORLD = "world"  # registry key of the default group


@dataclass(frozen=True)
class _Entry:
    group: Any  # the group itself (None for the world)
    device: torch.device  # where data-plane tensors of this group must live
    control: Any  # the gloo twin (a group object; _LOCAL: size 1, nothing to communicate)
    size: int
    created: bool = False  # the twin was created by register() (reset() destroys it)


_LOCAL = object()  # twin of a size-1 group: control-plane calls return the local value
_REGISTRY: dict[Any, _Entry] = {}
_NAMES: dict[str, Any] = {}  # name -> group of the registered device groups ("world": None), in registration order
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


# ----------------------------------------------------------------------------------------------- registry


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _key(group: Any) -> Any:
    if group is None or group is dist.GroupMember.WORLD:
        return _WORLD
    return id(group)


def _backend(group: Any) -> str:
    return str(dist.get_backend(group))


def register_group(group: Any, *, device: torch.device | str, control: Any = None, name: str | None = None) -> None:
    """Tag one group (None: the world) as a device group of ``device`` with the gloo group ``control`` as its
    control-plane twin (None: ``group`` itself, which must then be a gloo group); ``name`` lists it in
    :func:`registered`. Local: no collective is issued; :func:`register` is the collective form that creates the
    twins."""
    device = torch.device(device)
    twin = control if control is not None else (dist.GroupMember.WORLD if group is None else group)
    if twin is not None and _initialized() and _backend(twin) != "gloo":
        raise ValueError(f"control: the control-plane twin must be a gloo group, got backend {_backend(twin)!r}")
    if name is not None:
        _NAMES[name] = group
    n = size(group) if _initialized() else 1
    _REGISTRY[_key(group)] = _Entry(group, device, _LOCAL if n == 1 else twin, n)
    if twin is not None and twin is not group and _key(twin) not in _REGISTRY:
        _REGISTRY[_key(twin)] = _Entry(twin, torch.device("cpu"), twin, n)


def register(groups: Mapping[str, Any], *, device: torch.device | str,
             twins: Mapping[str, Any] | None = None) -> None:
    """Register the world and every group of ``groups`` (name → this rank's group; None values are skipped) as
    device groups of ``device`` and give each a gloo twin (module docstring). ``twins``: name → an existing gloo
    group with the same ranks (megatron's ``get_data_parallel_group_gloo``), reused instead of creating one.

    Collective over the world: every rank calls it with the same names in the same order. A no-op registration of
    the CPU world when torch.distributed is not initialised."""
    device = torch.device(device)
    reset()
    _NAMES.update({"world": None, **{n: g for n, g in groups.items() if g is not None}})
    if not _initialized():
        _REGISTRY[_WORLD] = _Entry(None, device, _LOCAL, 1)
        return
    world = dist.get_world_size()
    if world == 1:
        _REGISTRY[_WORLD] = _Entry(None, device, _LOCAL, 1)
        for g in groups.values():
            if g is not None:
                _REGISTRY[_key(g)] = _Entry(g, device, _LOCAL, 1)
        return
    twins = dict(twins or {})
    created: list[Any] = []
    if _backend(None) == "gloo":
        world_twin = dist.GroupMember.WORLD  # the default group is gloo: it is its own twin
    else:
        world_twin = dist.new_group(list(range(world)), backend="gloo")
        created.append(world_twin)
    _REGISTRY[_WORLD] = _Entry(None, device, world_twin, world, bool(created))
    resolved: dict[tuple[int, ...], Any] = {tuple(range(world)): world_twin}  # same on every rank, twins per member

    # Every rank's rank lists (and whether each group needs a twin), enumerated identically everywhere.
    names = [n for n, g in groups.items() if g is not None]
    mine = {}
    for name in names:
        g = groups[name]
        ranks = tuple(dist.get_process_group_ranks(g))
        mine[name] = (ranks, _backend(g) == "gloo" or twins.get(name) is not None)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=world_twin)
    me = dist.get_rank()
    for name in sorted({n for per_rank in everyone for n in per_rank}):  # the same order on every rank
        lists: dict[tuple[int, ...], bool] = {}
        for per_rank in everyone:  # a rank without this group adds no list (the union is the same everywhere)
            if name not in per_rank:
                continue
            ranks, has_twin = per_rank[name]
            lists[ranks] = lists.get(ranks, False) or has_twin
        for ranks in sorted(lists):
            if ranks in resolved or len(ranks) == 1:
                continue
            if lists[ranks]:  # the members already hold a gloo group for these ranks
                resolved[ranks] = _existing_twin(groups, twins, names, ranks) if me in ranks else None
                continue
            pg = dist.new_group(list(ranks), backend="gloo")
            resolved[ranks] = pg if me in ranks else None
            if me in ranks:
                created.append(pg)
    for name in names:
        g = groups[name]
        ranks = mine[name][0]
        if len(ranks) == 1:
            _REGISTRY.setdefault(_key(g), _Entry(g, device, _LOCAL, 1))
            continue
        twin = resolved[ranks]
        if _key(g) not in _REGISTRY:
            _REGISTRY[_key(g)] = _Entry(g, device, twin, len(ranks), any(twin is c for c in created))
        if twin is not None and _key(twin) not in _REGISTRY:
            _REGISTRY[_key(twin)] = _Entry(twin, torch.device("cpu"), twin, len(ranks))


def _existing_twin(groups: Mapping[str, Any], twins: Mapping[str, Any], names: list[str],
                   ranks: tuple[int, ...]) -> Any:
    """This rank's gloo group over ``ranks``: a given twin, or a group of ``groups`` that is itself gloo."""
    for name in names:
        g = groups[name]
        if tuple(dist.get_process_group_ranks(g)) != ranks:
            continue
        if twins.get(name) is not None:
            return twins[name]
        if _backend(g) == "gloo":
            return g
    raise RuntimeError(f"collectives.register: no gloo group over ranks {list(ranks)} on this rank")


def reset() -> None:
    """Forget every registration and destroy the twins :func:`register` created (``destroy_parallel``)."""
    entries = list(_REGISTRY.values())
    _REGISTRY.clear()
    _NAMES.clear()
    if not _initialized():
        return
    seen = set()
    for e in entries:
        if e.created and id(e.control) not in seen:
            seen.add(id(e.control))
            try:
                dist.destroy_process_group(e.control)
            except (RuntimeError, ValueError):  # already gone with the default group
                pass


def registered() -> dict[str, tuple[Any, torch.device, Any]]:
    """name → (group, device, control twin) of every named device group, the world (``"world"``, group None) first:
    what a preflight exercises (one data-plane and one control-plane collective per group)."""
    return {n: (g, _REGISTRY[_key(g)].device, control_group(g)) for n, g in _NAMES.items() if _key(g) in _REGISTRY}


def is_registered(group: Any = None) -> bool:
    return _key(group) in _REGISTRY


def device_of(group: Any = None) -> torch.device | None:
    """The registered data-plane device of ``group`` (None: the world); None when unregistered."""
    e = _REGISTRY.get(_key(group))
    return None if e is None else e.device


def control_group(group: Any = None) -> Any:
    """The gloo group that carries ``group``'s control-plane traffic (None: the world), as a group object (the
    default group itself when that is gloo). For an unregistered group: the group itself when it is gloo, else a
    ``RuntimeError``. A size-1 group (or torch.distributed uninitialised) is returned as is."""
    e = _REGISTRY.get(_key(group))
    if e is not None:
        return group if e.control is _LOCAL else e.control
    if not _initialized():
        return group
    if _backend(group) == "gloo":
        return dist.GroupMember.WORLD if group is None else group
    what = "the default group" if group is None else "this group"
    raise RuntimeError(f"collectives: {what} has backend {_backend(group)!r} and no registered gloo twin; host "
                       "data cannot travel on it (register the groups with collectives.register)")


def size(group: Any = None) -> int:
    """Ranks in ``group`` (None: the world); 1 when torch.distributed is not initialised."""
    if group is not None and id(group) in _EXTERNAL:
        return _EXTERNAL[id(group)]
    if not _initialized():
        return 1
    e = _REGISTRY.get(_key(group))
    return e.size if e is not None else dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank within ``group`` (None: the world); 0 when torch.distributed is not initialised."""
    return dist.get_rank(group) if _initialized() else 0


def _global(group: Any, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# ------------------------------------------------------------------------------------------ control plane


def _control(group: Any) -> tuple[bool, Any]:
    """(local, twin): local when there is nothing to communicate."""
    if size(group) == 1:
        return True, None
    return False, control_group(group)


def broadcast_object(obj: Any, group: Any = None, src: int = 0) -> Any:
    """``obj`` of rank ``src`` of ``group`` (a group rank; None: the world) on every rank of ``group``."""
    local, twin = _control(group)
    if local:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_global(group, src), group=twin)
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` in group-rank order, on every rank of ``group`` (None: the world)."""
    local, twin = _control(group)
    if local:
        return [obj]
    out: list[Any] = [None] * size(group)
    dist.all_gather_object(out, obj, group=twin)
    return out


def _reduce_host(values: Sequence[float], op: str, group: Any) -> list[float]:
    if op not in _OPS:
        raise ValueError(f"op: unknown reduction {op!r}; known: {', '.join(map(repr, _OPS))}")
    local, twin = _control(group)
    if local:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=_OPS[op], group=twin)
    return t.tolist()


def sum_over_ranks(values: float | Sequence[float], group: Any = None) -> float | list[float]:
    """Σ over the ranks of ``group`` (None: the world) of a host scalar or a list of them (float64)."""
    if isinstance(values, (int, float)):
        return _reduce_host([values], "sum", group)[0]
    return _reduce_host(values, "sum", group)


def max_over_ranks(values: float | Sequence[float], group: Any = None) -> float | list[float]:
    """Maximum over the ranks of ``group`` (None: the world) of a host scalar or a list of them."""
    if isinstance(values, (int, float)):
        return _reduce_host([values], "max", group)[0]
    return _reduce_host(values, "max", group)


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank when ``flag`` is True on any rank of ``group`` (None: the world)."""
    return bool(_reduce_host([1.0 if flag else 0.0], "max", group)[0] > 0)


def all_ranks(flag: bool, group: Any = None) -> bool:
    """True on every rank when ``flag`` is True on every rank of ``group`` (None: the world)."""
    return bool(_reduce_host([1.0 if flag else 0.0], "min", group)[0] > 0)


def mean_over_ranks(metrics: Mapping[str, float], group: Any = None) -> dict[str, float]:
    """Per-key mean over the ranks of ``group`` (None: the world) of rank-local scalars. Keys may differ across
    ranks (e.g. pipeline stages): the result has the union of keys, each averaged over the ranks that hold it with a
    finite value (NaN when none does). Summation in rank order, float64."""
    gathered = all_gather_object({k: float(v) for k, v in metrics.items()}, group)
    keys = sorted({k for part in gathered for k in part})
    out = {}
    for k in keys:
        vals = [part[k] for part in gathered if k in part and math.isfinite(part[k])]
        out[k] = float(sum(vals) / len(vals)) if vals else float("nan")
    return out


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group`` (None: the world), over its gloo twin."""
    local, twin = _control(group)
    if not local:
        dist.barrier(group=twin)


# --------------------------------------------------------------------------------------------- data plane


def check_device(collective: str, tensor: torch.Tensor, group: Any = None) -> None:
    """One-line ``RuntimeError`` when ``tensor`` is not on ``group``'s registered device (no check for groups that
    were never registered)."""
    e = _REGISTRY.get(_key(group))
    if e is None:
        return
    want, got = e.device, tensor.device
    if got.type != want.type or (want.index is not None and got.index is not None and got.index != want.index):
        raise RuntimeError(f"collectives.{collective}: tensor on {got} but the group's device is {want} (host data "
                           "goes through the control plane, model tensors must live on the policy's device)")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """In-place all-reduce of a device tensor over ``group`` (None: the world); ``op`` in sum/max/min. Returns
    ``tensor``. Not differentiable."""
    if op not in _OPS:
        raise ValueError(f"op: unknown reduction {op!r}; known: {', '.join(map(repr, _OPS))}")
    if size(group) == 1:
        return tensor
    check_device("all_reduce", tensor, group)
    dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on every rank) in group-rank order; not differentiable."""
    n = size(group)
    if n == 1:
        return [tensor]
    check_device("all_gather", tensor, group)
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def broadcast(tensor: torch.Tensor, src: int = 0, group: Any = None, *, cancel: Any = None,
              poll_s: float = 0.01) -> torch.Tensor:
    """In-place broadcast of group rank ``src``'s ``tensor`` to every rank of ``group``; returns ``tensor``.
    ``cancel``: a callable polled while the broadcast is in flight (it is then issued asynchronously); when it
    returns true the wait is abandoned with a ``RuntimeError`` — the group is left unusable (destroy it): for a
    broadcast whose peers may never take part (an external process that refused the transfer)."""
    if size(group) == 1:
        return tensor
    check_device("broadcast", tensor, group)
    if cancel is None:
        dist.broadcast(tensor, src=_global(group, src), group=group)
        return tensor
    import time

    work = dist.broadcast(tensor, src=_global(group, src), group=group, async_op=True)
    while not work.is_completed():
        if cancel():
            raise RuntimeError("collectives.broadcast: abandoned (a peer will not take part)")
        time.sleep(poll_s)
    work.wait()
    return tensor


def send(tensor: torch.Tensor, dst: int, group: Any = None) -> None:
    """Send ``tensor`` to group rank ``dst`` of ``group`` (blocking)."""
    check_device("send", tensor, group)
    dist.send(tensor.contiguous(), dst=_global(group, dst), group=group)


def recv(tensor: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
    """Receive into ``tensor`` from group rank ``src`` of ``group`` (blocking); returns ``tensor``."""
    check_device("recv", tensor, group)
    dist.recv(tensor, src=_global(group, src), group=group)
    return tensor


# ------------------------------------------------------------------------------------------ external groups

_EXTERNAL: dict[int, int] = {}  # id(group) -> size of the groups made by init_external_group (kept across reset())


def init_external_group(*, backend: str, master_address: str, master_port: int, world_size: int, rank: int,
                        group_name: str, timeout_s: float) -> Any:
    """A process group shared with processes outside the trainer's world (SGLang workers receiving weights:
    ``/init_weights_update_group``), made the way SGLang's ``init_custom_process_group`` makes its side: a TCP
    rendezvous at ``master_address:master_port`` (this rank listens when ``rank`` is 0), a prefix store named
    ``group_name``, identity rank mapping. Blocks until every member joined or ``timeout_s`` passed. Works with or
    without an initialised default group. The group is a data-plane group: use :func:`broadcast` on it (its size
    is known to :func:`size` even when torch.distributed is not initialised); :func:`destroy_external_group`."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    timeout = timedelta(seconds=float(timeout_s))
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{int(master_port)}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    _EXTERNAL[id(pg)] = world_size
    return pg


def destroy_external_group(group: Any) -> None:
    """Tear down a group made by :func:`init_external_group` (errors of an already broken group are ignored)."""
    _EXTERNAL.pop(id(group), None)
    try:
        dist.destroy_process_group(group)
    except (RuntimeError, ValueError, KeyError):
        pass
