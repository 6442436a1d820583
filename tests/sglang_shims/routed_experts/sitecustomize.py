"""Test tooling, loaded only by SGLang CPU servers started with this directory on ``PYTHONPATH`` (the R3 real-server
test): lets ``--enable-return-routed-experts`` start on a CPU-only torch. Nothing in oar_megatron imports it.

The gap (sglang 0.5.23): the routed-experts capturer's host buffer (``state_capturer.base.BaseHostCache``) is
allocated with ``pool_host.common.ALLOC_MEMORY_FUNCS[device]``, whose default for any device but npu / musa / xpu
(``alloc_with_host_register``) pins the buffer with ``cudaHostRegister`` — on a CPU build of torch that is
``AssertionError: Torch not compiled with CUDA enabled`` and the server dies at start. On CPU the buffer is already
host memory, so this shim registers a plain allocation for ``"cpu"`` (the same tensor, not pinned) right after that
module is first imported. Nothing else changes.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "sglang.srt.mem_cache.pool_host.common"


def _alloc_cpu(dims, dtype, device, pin_memory, allocator=None, registration_granularity_bytes=None):
    import torch

    return torch.empty(dims, dtype=dtype, device=device)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        module.ALLOC_MEMORY_FUNCS["cpu"] = _alloc_cpu


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _TARGET not in sys.modules:
    sys.meta_path.insert(0, _Finder())
