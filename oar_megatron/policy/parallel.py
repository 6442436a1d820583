"""Parallel initialisation, once per process: the default process group from the launcher's environment, then
megatron-core's model-parallel groups and RNG, returned as a :class:`ParallelGroups` that numerics take explicitly.

Launchers understood by :func:`rank_env` (torchrun wins when both are present, e.g. torchrun inside srun):

* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``.
* Slurm (one task per GPU, ``srun python ...``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS_PER_NODE``; ``MASTER_ADDR`` defaults to the first host of ``SLURM_JOB_NODELIST`` and
  ``MASTER_PORT`` to ``20000 + SLURM_JOB_ID % 10000``.
* neither: one process (rank 0 of 1) on a free local port.

Backend: NCCL when CUDA is available (the CUDA device is set from the local rank first), gloo otherwise, where
``apply_cpu_shims()`` is applied so megatron-core runs on the CPU (docs/megatron_cpu.md).
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .. import collectives
from ..config.model import ModelConfig
from ..config.parallel import ParallelConfig, ParallelLayout

__all__ = ["ParallelGroups", "RankEnv", "destroy_parallel", "init_parallel", "rank_env"]

_OWNS_PROCESS_GROUP = False  # init_parallel created the default process group (destroy_parallel then destroys it)


@dataclass(frozen=True, kw_only=True)
class RankEnv:
    """This process's place in the job, as the launcher describes it."""

    launcher: str  # torchrun | slurm | none
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    master_addr: str
    master_port: int | None  # None: pick a free port (single process only)

    def init_method(self) -> str:
        port = self.master_port if self.master_port is not None else _free_port()
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{port}"


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """Parse the torchrun or Slurm variables in ``environ`` (default ``os.environ``); pure, raises a one-line
    ``ValueError`` naming the variable that is missing or malformed."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world = _rank_world(env, "RANK", "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else _single_default(world, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None
        addr = env["MASTER_ADDR"] if "MASTER_ADDR" in env else _single_default(world, "MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _single_default(world, "MASTER_PORT", None)
        launcher = "torchrun"
    elif "SLURM_PROCID" in env or "SLURM_NTASKS" in env:
        rank, world = _rank_world(env, "SLURM_PROCID", "SLURM_NTASKS")
        local_rank = (_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env
                      else _single_default(world, "SLURM_LOCALID", 0))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        local_world = int(per_node.split("(")[0]) if per_node.split("(")[0].isdigit() else None
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = first_slurm_host(nodelist)
        else:
            addr = _single_default(world, "SLURM_JOB_NODELIST", "127.0.0.1")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = 20000 + _int(env, "SLURM_JOB_ID") % 10000
        else:
            port = _single_default(world, "MASTER_PORT", None)
        launcher = "slurm"
    else:
        rank, world, local_rank, local_world, addr, port, launcher = 0, 1, 0, 1, "127.0.0.1", None, "none"
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
    if local_rank < 0 or (local_world is not None and local_rank >= local_world):
        key = "SLURM_LOCALID" if launcher == "slurm" else "LOCAL_RANK"
        raise ValueError(f"{key}: {local_rank} is not in [0, {local_world})")
    return RankEnv(launcher=launcher, rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=addr, master_port=port)


def first_slurm_host(nodelist: str) -> str:
    """First host of a compressed Slurm node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``,
    ``"r[1-2]-n[07-08]"`` -> ``"r1-n07"``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + (first_slurm_host(suffix) if "[" in suffix else suffix)


def _rank_world(env: Mapping[str, str], rank_key: str, world_key: str) -> tuple[int, int]:
    rank, world = _int(env, rank_key), _int(env, world_key)
    if world < 1:
        raise ValueError(f"{world_key}: must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"{rank_key}: {rank} is not in [0, {world_key}={world})")
    return rank, world


def _int(env: Mapping[str, str], key: str) -> int:
    if key not in env:
        raise ValueError(f"{key}: missing from the environment")
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}: expected an integer, got {env[key]!r}") from None


def _single_default(world: int, key: str, default: Any) -> Any:
    if world > 1:
        raise ValueError(f"{key}: missing from the environment (needed when the world size is {world})")
    return default


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True, kw_only=True)
class ParallelGroups:
    """Process groups, ranks and sizes of one process after :func:`init_parallel`.

    Groups are ``torch.distributed`` groups taken from megatron's ``parallel_state`` (``dp_group`` excludes CP;
    ``dp_cp_group`` is what gradients are reduced over). ``pg_collection`` is megatron's own bundle of the same
    groups (``ProcessGroupCollection``) for megatron APIs that take one.
    """

    cfg: ParallelConfig
    layout: ParallelLayout
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    ep_rank: int
    etp_rank: int
    expert_dp_rank: int
    tp_group: Any
    pp_group: Any
    cp_group: Any
    dp_group: Any
    dp_cp_group: Any
    ep_group: Any
    etp_group: Any
    expert_dp_group: Any
    mp_group: Any
    embedding_group: Any
    pg_collection: Any

    tp = property(lambda self: self.layout.tp)
    pp = property(lambda self: self.layout.pp)
    vpp = property(lambda self: self.layout.virtual_pp)
    cp = property(lambda self: self.layout.cp)
    ep = property(lambda self: self.layout.ep)
    etp = property(lambda self: self.layout.etp)
    dp = property(lambda self: self.layout.dp)
    expert_dp = property(lambda self: self.layout.expert_dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_flags(self, vp_stage: int | None = None) -> tuple[bool, bool]:
        """``(pre_process, post_process)`` of model chunk ``vp_stage`` on this rank: whether it holds the embedding
        (first chunk of the first stage) and the output layer (last chunk of the last stage)."""
        if self.vpp is None:
            return self.is_first_stage, self.is_last_stage
        if vp_stage is None or not 0 <= vp_stage < self.vpp:
            raise ValueError(f"vp_stage: need 0 <= vp_stage < virtual_pp={self.vpp}, got {vp_stage!r}")
        return self.is_first_stage and vp_stage == 0, self.is_last_stage and vp_stage == self.vpp - 1


def init_parallel(parallel_cfg: ParallelConfig, model_cfg: ModelConfig, *, backend: str | None = None,
                  seed: int = 1234) -> ParallelGroups:
    """Validate the layout, create the default process group if there is none, then megatron's groups and RNG.

    Order: (1) ``parallel_cfg.validate(world, model_cfg)`` and the machine checks of
    ``policy.model.check_model_environment`` before anything is created; (2) on GPU ``torch.cuda.set_device(local
    rank)``; (3) ``init_process_group`` from :func:`rank_env` (``backend`` default: nccl on GPU, gloo on CPU) unless one
    exists; (4) on CPU ``apply_cpu_shims()``; (5) ``parallel_state.initialize_model_parallel``; (6) seeds:
    ``random``/``numpy``/``torch`` with ``seed`` on every rank (same CPU stream everywhere, so
    ``use_cpu_initialization`` builds identical full weights on each rank) and
    ``model_parallel_cuda_manual_seed(seed)`` (tensor-parallel streams ``seed + 2718 + tp_rank``).
    """
    global _OWNS_PROCESS_GROUP
    from .model import check_model_environment

    cuda = torch.cuda.is_available()
    env = None if dist.is_initialized() else rank_env()
    world = dist.get_world_size() if env is None else env.world_size
    layout = parallel_cfg.validate(world, model_cfg)
    check_model_environment(model_cfg)

    if env is None:
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", -1)))
        if local_rank < 0:
            local_rank = dist.get_rank() % max(torch.cuda.device_count(), 1) if cuda else 0
    else:
        local_rank = env.local_rank
    if cuda:
        torch.cuda.set_device(local_rank)
    if env is not None:
        backend = backend or ("nccl" if cuda else "gloo")
        kwargs = {"device_id": torch.device("cuda", local_rank)} if cuda and backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method=env.init_method(), rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(minutes=parallel_cfg.timeout_minutes),
                                **kwargs)
        _OWNS_PROCESS_GROUP = True
    if not cuda:
        from ..compat.megatron_cpu import apply_cpu_shims

        apply_cpu_shims()

    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        raise RuntimeError("init_parallel: megatron's parallel state is already initialised; "
                           "call destroy_parallel() first")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.virtual_pp, context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=parallel_cfg.timeout_minutes, order=parallel_cfg.order)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)

    groups = ParallelGroups(
        cfg=parallel_cfg, layout=layout, rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
        backend=dist.get_backend(), device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(), etp_rank=ps.get_expert_tensor_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        ep_group=ps.get_expert_model_parallel_group(), etp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(), mp_group=ps.get_model_parallel_group(),
        embedding_group=ps.get_embedding_group(check_initialized=False),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    _register_collectives(groups, ps)
    return groups


# megatron's groups the project uses, by name (the world is registered by collectives.register itself)
_GROUP_NAMES = ("tp", "pp", "cp", "dp", "dp_cp", "ep", "etp", "expert_dp", "mp", "embedding")


def _register_collectives(groups: ParallelGroups, ps) -> None:
    """Tag every group as a data-plane group of the policy's device and give it a gloo twin (``collectives``);
    megatron's own gloo data-parallel groups serve as the twins of ``dp``, ``dp_cp`` and ``expert_dp``."""
    twins = {}
    for name, get in (("dp", lambda: ps.get_data_parallel_group_gloo()),
                      ("dp_cp", lambda: ps.get_data_parallel_group_gloo(with_context_parallel=True)),
                      ("expert_dp", lambda: ps.get_expert_data_parallel_group_gloo())):
        try:
            twins[name] = get()
        except (AssertionError, AttributeError, RuntimeError):  # megatron built no gloo group: one is created
            pass
    collectives.register({name: getattr(groups, f"{name}_group") for name in _GROUP_NAMES},
                         device=groups.device, twins=twins)


def destroy_parallel(*, process_group: bool | None = None) -> None:
    """Tear down megatron's groups; also the default process group when ``process_group`` is True, or when it is
    None and :func:`init_parallel` created it (a group created by the caller, e.g. a test harness, is left alone)."""
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as ps

    collectives.reset()
    ps.destroy_model_parallel()
    if (process_group or (process_group is None and _OWNS_PROCESS_GROUP)) and dist.is_initialized():
        dist.destroy_process_group()
        _OWNS_PROCESS_GROUP = False
