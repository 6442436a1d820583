"""Run real megatron-core 0.16.x on CPU under gloo, without CUDA: a small set of runtime shims.

megatron-core assumes a GPU in a handful of recurring ways (see docs/megatron_cpu.md and the measured gap list in
MEGATRON_CPU.md). ``apply_cpu_shims()`` closes each gap with one small named function below, and only when
``torch.cuda.is_available()`` is False; on a CUDA machine it does nothing and returns False. Nothing is written to
megatron's source files: we swap attributes on ``torch.cuda`` and on a few megatron modules at runtime, and every
megatron attribute is looked up first, so a renamed one (megatron-core 0.16-0.19 drift) is skipped with a debug log.

Placement decision: the ``CudaToCpuMode`` TorchFunctionMode is entered **globally** by ``apply_cpu_shims`` (pushed on
the calling thread's torch-function-mode stack and never popped), because megatron hard-codes ``device="cuda"``,
``.cuda()`` and ``.to("cuda")`` across masks, schedules, the optimizer and MoE bookkeeping; wrapping each caller in a
context manager would miss some. Two limits: the stack is per thread (call ``apply_cpu_shims()`` again in any other
thread that runs megatron code; it pushes the mode once per thread), and torch pops the mode while it handles a call,
so it is off inside ``loss.backward()``. Backward code allocates via ``torch.cuda.current_device()``, which therefore
returns a CPU device by itself; activation recompute, which reruns whole layers inside backward (default causal mask
built with ``device="cuda"``, any other hard-coded placement of the forward), gets the mode re-entered around its
rerun (``_shim_recompute``). The mode class is public for scoped use (``with CudaToCpuMode(): ...``).

Usage (each rank, after ``torch.distributed.init_process_group("gloo", ...)``, before building megatron objects)::

    from oar_megatron.compat import apply_cpu_shims
    apply_cpu_shims()          # False and a no-op on CUDA machines
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CudaToCpuMode", "apply_cpu_shims", "cpu_shims_active"]

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")
_LOCK = threading.Lock()
_ACTIVE = False
_THREAD = threading.local()  # .mode: the CudaToCpuMode this thread pushed
_PATCHED: list[tuple[object, str, object]] = []  # (owner, attribute, original) of every swap we made
_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


def _cpu_if_cuda(device):
    """Map a CUDA device spec ("cuda", "cuda:1", torch.device("cuda"), or an int index) to CPU; leave others."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Redirect hard-coded CUDA placement to the CPU and make ``Tensor.type()`` report ``torch.cuda.*`` names.

    Covers ``device=`` keywords of factories and ``new_*`` methods ("cuda", "cuda:N", a CUDA ``torch.device`` or an int
    index), ``Tensor.cuda()``, ``Tensor.to("cuda" | int | torch.device("cuda"))``. The ``type()`` rewrite exists
    for the optimizers' dtype dispatch (``distrib_optimizer.py``, ``optimizer.py``, ``clip_grads.py``), which compare
    against ``'torch.cuda.FloatTensor'`` etc.; a string ``torch.cuda.*Tensor`` argument to ``type()`` maps back.
    Inside ``__torch_function__`` the mode is disabled, so ``func(...)`` below runs plain torch.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]  # already "on the device": same object back, as CUDA does for a resident tensor
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                return func(args[0]).replace("torch.", "torch.cuda.", 1)
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1), *args[2:])
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu_if_cuda(kwargs["device"])}
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _cpu_if_cuda(args[1]), *args[2:])
        return func(*args, **kwargs)


class _HostStream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered, so every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _HostEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _HostEvent(_HostStream):
    """Stand-in for torch.cuda.Event: recording and waiting are no-ops on the CPU."""

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def elapsed_time(self, end_event):
        return 0.0


_HOST_STREAM = _HostStream()


def _patch(owner, name: str, new) -> bool:
    """Swap ``owner.name`` for ``new`` and remember the original; skip (debug log) if ``owner`` lacks ``name``."""
    if not hasattr(owner, name):
        log.debug("megatron_cpu: %s has no %r in this version; shim skipped", getattr(owner, "__name__", owner), name)
        return False
    _PATCHED.append((owner, name, getattr(owner, name)))
    setattr(owner, name, new)
    return True


def _import(module: str):
    """Import a megatron module, or None (debug log) when megatron or that module is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        log.debug("megatron_cpu: cannot import %s (%s); its shims are skipped", module, err)
        return None


def _shim_cuda_rng() -> None:
    """tensor_parallel/random.py (model_parallel_cuda_manual_seed, tracker add/fork): CUDA RNG -> CPU generator."""

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):  # not torch.manual_seed: that calls torch.cuda.manual_seed_all and seeds other devices
        torch.default_generator.manual_seed(int(seed))

    for owner in (torch.cuda, torch.cuda.random):
        _patch(owner, "get_rng_state", get_rng_state)
        _patch(owner, "set_rng_state", set_rng_state)
        _patch(owner, "manual_seed", manual_seed)
    random = _import("megatron.core.tensor_parallel.random")
    if random is None:
        return
    # Its _get_cuda_rng_state goes through torch.cuda.random (patched above), but _set_cuda_rng_state queues a
    # torch.cuda._lazy_call that never runs without CUDA: fork() would silently not switch streams.
    _patch(random, "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))
    # The tracker's "CUDA" generator *is* the CPU generator here, so fork() legitimately changes the CPU state.
    logging.getLogger(random.__name__).addFilter(lambda record: _FORK_WARNING not in record.getMessage())


def _shim_cuda_device() -> None:
    """~175 call sites allocate on torch.cuda.current_device() (first: rotary embedding, also in backward): the CPU."""
    # A torch.device, not the documented int: it must place tensors correctly even where CudaToCpuMode is not active,
    # e.g. inside loss.backward() (torch pops function modes while it handles that call) -> _AllToAll.backward.
    _patch(torch.cuda, "current_device", lambda: _CPU)


def _shim_cuda_sync_and_streams() -> None:
    """pipeline p2p / async checkpoint call torch.cuda.synchronize; the MoE alltoall dispatcher uses streams, events."""
    _patch(torch.cuda, "synchronize", lambda device=None: None)
    _patch(torch.cuda, "Stream", _HostStream)
    _patch(torch.cuda, "Event", _HostEvent)
    _patch(torch.cuda, "current_stream", lambda device=None: _HOST_STREAM)
    _patch(torch.cuda, "default_stream", lambda device=None: _HOST_STREAM)
    _patch(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())


def _shim_moe() -> None:
    """moe_utils.py reads te_general_gemm (NameError without TE); the alltoall dispatcher's split sizes stay tensors."""
    moe_utils = _import("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # router_gating_linear then falls back to torch matmul
    dispatcher = _import("megatron.core.transformer.moe.token_dispatcher")
    if dispatcher is None:
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts only CUDA tensors; gloo all_to_all_single needs host split sizes, not tensors.
        if as_numpy and torch.is_tensor(tensor):
            return tensor.detach().numpy()
        return tensor

    _patch(dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


def _in_cpu_mode(fn):
    """``fn`` run with a CudaToCpuMode pushed for its duration (for code that runs inside ``loss.backward()``)."""

    def wrapped(*args, **kwargs):
        with CudaToCpuMode():
            return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


def _shim_recompute() -> None:
    """Activation recompute reruns a layer's forward inside backward, where torch has popped the placement mode:
    megatron's default causal mask (``transformer/utils.py::get_default_causal_mask``, ``device="cuda"``) and any
    other hard-coded placement of the forward would fail there. Re-enter the mode around every rerun: the backward
    of ``CheckpointFunction`` (``recompute_granularity`` "full" and "selective" core attention) and
    ``CheckpointWithoutOutput._recompute`` (output-discarding recompute of norms / MoE activations)."""
    random = _import("megatron.core.tensor_parallel.random")
    if random is None:
        return
    for cls_name, attr in (("CheckpointFunction", "backward"), ("CheckpointWithoutOutputFunction", "backward"),
                           ("CheckpointWithoutOutput", "_recompute")):
        owner = getattr(random, cls_name, None)
        if owner is None:
            log.debug("megatron_cpu: %s has no %s in this version; shim skipped", random.__name__, cls_name)
            continue
        original = owner.__dict__.get(attr)
        if original is None:
            log.debug("megatron_cpu: %s.%s not found; shim skipped", cls_name, attr)
            continue
        # autograd.Function looks ``backward`` up on the class at each call, so swapping the staticmethod works.
        fn = original.__func__ if isinstance(original, staticmethod) else original
        new = _in_cpu_mode(fn)
        _patch(owner, attr, staticmethod(new) if isinstance(original, staticmethod) else new)


def _enter_mode_in_this_thread() -> None:
    """Push one CudaToCpuMode on this thread's torch-function-mode stack, once per thread (never popped)."""
    if getattr(_THREAD, "mode", None) is None:
        _THREAD.mode = CudaToCpuMode()
        _THREAD.mode.__enter__()


def apply_cpu_shims() -> bool:
    """Apply every CPU shim once per process (the placement mode once per thread) when CUDA is absent.

    Returns True when the shims are active, False on a CUDA machine (where nothing is touched). Call it on each rank
    after ``torch.distributed`` is initialised and before megatron builds models or seeds its RNG tracker.
    """
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _ACTIVE:
            _shim_cuda_rng()
            _shim_cuda_device()
            _shim_cuda_sync_and_streams()
            _shim_moe()
            _shim_recompute()
            _ACTIVE = True
            log.info("megatron_cpu: %d CPU shims applied", len(_PATCHED))
    _enter_mode_in_this_thread()
    return True


def cpu_shims_active() -> bool:
    """Whether ``apply_cpu_shims`` has patched this process."""
    return _ACTIVE
