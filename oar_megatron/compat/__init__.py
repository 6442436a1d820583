"""CPU compatibility for megatron-core: runtime shims that let real megatron-core 0.16.x run under gloo without
CUDA. They apply only when ``torch.cuda.is_available()`` is False; see ``megatron_cpu`` and docs/megatron_cpu.md."""

from oar_megatron.compat.megatron_cpu import CudaToCpuMode, apply_cpu_shims, cpu_shims_active

__all__ = ["CudaToCpuMode", "apply_cpu_shims", "cpu_shims_active"]
