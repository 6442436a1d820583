"""HF ↔ megatron-core weight conversion: Llama-3 / 3.1 / 3.2, Qwen2 / 2.5, Qwen3, Qwen3-MoE, Mixtral.

Pure torch on state dicts keyed by megatron-core names (the local layer spec's, or the Transformer Engine spec's:
``mapping.te_name``), one model chunk of one TP rank at a time (any TP / PP / virtual PP); no megatron import here — the
model is built by ``oar_megatron.policy.build_model`` from the :class:`ModelConfig` that :func:`hf_model_config`
derives from HF's ``config.json``. See docs/convert.md.
"""

from .config import ARCHITECTURES, hf_model_config, read_hf_config  # noqa: F401
from .io import SafetensorsReader  # noqa: F401
from .mapping import TABLES, ConversionError, hf_to_mcore, mcore_to_hf, table_for  # noqa: F401
