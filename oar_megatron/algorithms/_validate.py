"""Argument checks shared by the public numerics API.

Every public function of :mod:`oar_megatron.algorithms` validates its inputs with these helpers, so a bad call
fails with a ``ValueError`` whose message starts with the argument's name and says what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def check_tensor(name: str, x: Any, *, ndim: int | tuple[int, ...] | None = None, floating: bool = False) -> torch.Tensor:
    """Require a tensor (optionally of given rank(s) and floating dtype)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...] | torch.Size, ref_name: str) -> None:
    """Require ``x.shape == shape`` (the shape of the tensor called ``ref_name``)."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match {ref_name} shape {tuple(shape)}")


def as_mask(name: str, mask: Any, shape: tuple[int, ...] | torch.Size, ref_name: str) -> torch.Tensor:
    """Validate a 0/1 or bool mask of ``shape`` and return it as a bool tensor."""
    check_tensor(name, mask)
    check_shape(name, mask, shape, ref_name)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name}: a mask must be bool or hold only 0 and 1")
        return mask != 0
    raise ValueError(f"{name}: unsupported mask dtype {mask.dtype}; use bool or 0/1 values")


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Require finite values (only where ``mask`` is True, if given)."""
    vals = x if mask is None else x[mask]
    if vals.numel() and not bool(torch.isfinite(vals).all()):
        where = "" if mask is None else " at masked positions"
        raise ValueError(f"{name}: contains NaN or infinite values{where}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; known: {', '.join(map(repr, choices))}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: must be finite, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be {bound}, got {value}")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}")
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if value != value or not (ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{name}: must be in {lb}{low}, {high}{hb}, got {value}")
    return float(value)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value
