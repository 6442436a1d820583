"""Token-count padding for FP8 GEMMs and the sequence splits: the arithmetic, in one place.

Transformer Engine's FP8 GEMMs need the token dimension of every linear layer's input — sequence × micro-batch
flattened, on each rank after the sequence-parallel / context-parallel split — to be a multiple of 16 (32 for
MXFP8: megatron ``fp8_utils.get_fp8_align_size``, ``ModelConfig.fp8_pad_multiple``). Every pass that feeds the
decoder pads to it, and masks the padding out of every loss and metric:

* padded batches [b, L] (training rows, π_old / reference passes, the shared clean pass, OAR-G rows, OAR-P copies):
  the sequence is right-padded to ``sequence_multiple(model)`` = FP8 multiple × TP (sequence parallel) × 2·CP
  (load-balanced CP halves), the rule of ``ParallelConfig.token_multiple``; each rank's ``b · L / (tp·2cp)`` tokens
  are then a multiple of the FP8 one. Right padding after a row's last token changes nothing before it (causal
  mask), and padded positions are never response tokens, scored tokens or answer tokens, so no loss, log-prob,
  saliency or metric reads them.
* local-engine decode (``policy.generate``): one position per row and sequence parallel off, so the rows of a batch
  are padded to ``fp8_multiple(model)`` with dummy rows fed ``pad_id``, whose outputs are never sampled.

The FP8 multiple is the model's: ``build_model`` records ``ModelConfig.fp8_pad_multiple()`` on each ``GPTModel`` as
``oar_fp8_multiple`` (1 without FP8); a model built elsewhere reads it from its ``TransformerConfig`` (``fp8`` /
``fp8_recipe``). :func:`set_fp8_multiple` overrides it: the CPU tests force 16 or 24 on an fp32 model, since FP8
itself (Transformer Engine) runs only on a GPU; the padding is what they check.
"""

from __future__ import annotations

import torch

__all__ = ["fp8_multiple", "pad_rows", "padded_length", "round_up", "sequence_multiple", "set_fp8_multiple"]


def _gpt(model: torch.nn.Module):
    from .forward import unwrap_model

    return unwrap_model(model)


def round_up(n: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is ≥ ``n``."""
    return -(-int(n) // multiple) * multiple


def fp8_multiple(model: torch.nn.Module) -> int:
    """Tokens per rank per GEMM must be a multiple of this (1 without FP8; module docstring)."""
    gpt = _gpt(model)
    forced = getattr(gpt, "oar_fp8_multiple", None)
    if forced is not None:
        return int(forced)
    config = gpt.config
    if not getattr(config, "fp8", None):
        return 1
    return 32 if getattr(config, "fp8_recipe", None) == "mxfp8" else 16


def sequence_multiple(model: torch.nn.Module) -> int:
    """What a padded batch's sequence length must be a multiple of: FP8 × TP (sequence parallel) × 2·CP."""
    gpt = _gpt(model)
    config = gpt.config
    multiple = fp8_multiple(gpt)
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        multiple *= config.tensor_model_parallel_size
    cp = getattr(config, "context_parallel_size", 1) or 1
    if cp > 1:
        multiple *= 2 * cp
    return multiple


def padded_length(model: torch.nn.Module, length: int) -> int:
    """The sequence length ≥ ``length`` that ``model`` is fed (a multiple of :func:`sequence_multiple`)."""
    return round_up(length, sequence_multiple(model))


def pad_rows(rows: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    """``rows`` [B, ...] with dummy rows filled with ``value`` appended up to a multiple of ``multiple`` rows."""
    extra = round_up(rows.shape[0], multiple) - rows.shape[0]
    if extra == 0:
        return rows
    return torch.cat([rows, rows.new_full((extra, *rows.shape[1:]), value)], 0)


def set_fp8_multiple(models, multiple: int | None) -> None:
    """Force the per-rank token multiple of ``models`` (a model or a list of chunks; None: back to the config's)."""
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ValueError(f"multiple: must be a positive integer or None, got {multiple!r}")
    for m in models if isinstance(models, (list, tuple)) else [models]:
        _gpt(m).oar_fp8_multiple = multiple

