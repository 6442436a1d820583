"""Test tooling: a stub ``sgl_kernel`` for SGLang's CPU mode on a machine without SGLang's compiled CPU kernels.

What it bridges: with ``--device cpu`` (and ``SGLANG_USE_CPU_ENGINE=1``) SGLang imports a few ``*_cpu`` kernels from
``sgl_kernel`` at start-up (``copy_all_layer_kv_cache_cpu``, ``assign_req_to_token_pool_cpu``, ...). The real package
is a CUDA wheel on PyPI; its CPU kernels exist only as a source build for AVX-512/AMX Xeons. With the flags
``oar_megatron.rollout.servers`` passes on CPU (torch_native attention, pytorch sampling) none of them is called.

So every attribute of this module is a function that RAISES if called: the imports pass, and any call that a future
SGLang makes fails loudly, naming the kernel, instead of computing something wrong. Installed into the SGLang CPU venv
only, by launch/setup_sglang_cpu.sh.
"""

__version__ = "0.0.0+oar-stub"


class SglKernelStubCalled(RuntimeError):
    pass


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _stub(*args, **kwargs):
        raise SglKernelStubCalled(f"sgl_kernel.{name} was called, but this is the oar_megatron test stub "
                                  f"(tests/sglang_shims): SGLang's compiled kernels are not installed")

    _stub.__name__ = _stub.__qualname__ = name
    return _stub
