"""Test tooling: bridges for running the real SGLang server on a CPU-only machine (docs/sglang.md).

launch/setup_sglang_cpu.sh copies this module, ``oar_sglang_shims.pth`` (which imports it at interpreter start) and
the stub ``sgl_kernel`` package into the SGLang CPU venv's site-packages. Nothing here is imported by oar_megatron.

What this module bridges: PyPI's ``torchvision`` wheel beside the CPU torch build fails at import with
``operator torchvision::nms does not exist`` (its compiled ops do not load against this torch, and its fake-tensor
registrations then name an op nobody defined). SGLang imports torchvision through transformers' image utilities even
for text models. So, right before ``torchvision`` is first imported, the two op schemas it registers fakes for
(``nms``, ``qnms``) are defined through ``torch.library`` (schemas only: calling them raises "no kernel"). The hook
costs nothing until torchvision is imported (torch is not imported at interpreter start) and then removes itself.
"""

import sys

_LIB = None  # keeps the torch.library fragment (and so the schemas) alive


def _define_torchvision_schemas() -> None:
    global _LIB
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        name = schema.split("(")[0]
        if not _op_exists(name):
            lib.define(schema)
    _LIB = lib


def _op_exists(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


class _TorchvisionSchemaHook:
    """A sys.meta_path entry that defines the schemas when ``torchvision`` is first imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _define_torchvision_schemas()
        return None  # the regular finders import the real package


if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionSchemaHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionSchemaHook())
