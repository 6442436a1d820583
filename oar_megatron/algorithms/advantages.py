"""Outcome advantages for the GRPO family, group filtering and whitening.

Shapes: ``N`` responses; the responses to one prompt are contiguous, ``group_size`` of them (``N % group_size == 0``).

Estimators are registered by name (``register_advantage_estimator``); the trainer picks one from its config:

- ``grpo``    Â_i = (r_i − mean_g r) / (std_g r + ε), std unbiased (Bessel)      — DeepSeekMath GRPO; GSPO eq. 6
- ``dr_grpo`` Â_i = r_i − mean_g r  (no std scaling)                               — Dr.GRPO, Liu et al. 2025, §3.1
- ``rloo``    Â_i = r_i − mean_{j≠i} r_j  (leave-one-out baseline)                 — Ahmadian et al. 2024, eq. 5

A group of size 1 has no baseline and gives advantage 0 (API.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validate import check_finite, check_int, check_positive, check_tensor
from .reduce import ProcessGroup, all_reduce, masked_sum

AdvantageEstimator = Callable[..., torch.Tensor]
_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn(rewards [N], group_size, **options) -> advantages [N]`` under ``name``."""

    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in _ESTIMATORS:
            raise ValueError(f"name: advantage estimator {name!r} is already registered")
        _ESTIMATORS[name] = fn
        return fn

    return deco


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    if name not in _ESTIMATORS:
        raise ValueError(f"name: unknown advantage estimator {name!r}; known: {', '.join(sorted(_ESTIMATORS))}")
    return _ESTIMATORS[name]


def advantage_estimators() -> list[str]:
    return sorted(_ESTIMATORS)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    check_tensor("rewards", rewards, ndim=1, floating=True)
    check_int("group_size", group_size, minimum=1)
    if rewards.numel() == 0:
        raise ValueError("rewards: empty; expected at least one group")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards: length {rewards.numel()} is not a multiple of group_size={group_size} "
            "(the responses of one prompt must be contiguous)"
        )
    check_finite("rewards", rewards)
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO group-normalised advantages, one scalar per response.

    Args:
        rewards: [N] float, responses of one prompt contiguous.
        group_size: responses per prompt (G).
        scale_by_std: divide by the unbiased group std + ``eps`` (GRPO); False = Dr.GRPO mean-centering only.
        eps: added to the std (verl: 1e-6).
    Returns:
        [N] advantages in the dtype of ``rewards``; 0 for every member of a group of size 1.
    """
    check_positive("eps", eps, allow_zero=True)
    g = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    centered = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        denom = g.std(dim=1, unbiased=True, keepdim=True) + eps
        # A constant group is centred to exactly 0; keep it 0 (not 0/0) when eps = 0.
        centered = torch.where(denom > 0, centered / denom.clamp(min=torch.finfo(g.dtype).tiny), 0.0)
    return centered.reshape(-1)


@register_advantage_estimator("grpo")
def _grpo(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6) -> torch.Tensor:
    return group_advantages(rewards, group_size, scale_by_std=True, eps=eps)


@register_advantage_estimator("dr_grpo")
def _dr_grpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    return group_advantages(rewards, group_size, scale_by_std=False)


@register_advantage_estimator("rloo")
def _rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    g = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    # r_i - (sum - r_i)/(G-1) = G/(G-1) * (r_i - mean)
    return (g - g.mean(dim=1, keepdim=True)).mul(group_size / (group_size - 1)).reshape(-1)


def compute_advantages(name: str, rewards: torch.Tensor, group_size: int, **options) -> torch.Tensor:
    """Advantages [N] by registered estimator ``name`` (``grpo``, ``dr_grpo``, ``rloo``)."""
    fn = get_advantage_estimator(name)
    try:
        return fn(rewards, group_size, **options)
    except TypeError as exc:  # unknown keyword
        raise ValueError(f"options: {exc}") from None


@dataclass(frozen=True)
class GroupFilter:
    """Result of :func:`filter_groups`: ``keep`` [N] bool per response; counts are per group."""

    keep: torch.Tensor
    num_groups: int
    num_dropped: int
    num_all_correct: int
    num_all_wrong: int


def filter_groups(rewards: torch.Tensor, group_size: int, *, atol: float = 0.0) -> GroupFilter:
    """Drop groups whose rewards are all equal (zero advantage, no learning signal).

    DAPO "dynamic sampling" (Yu et al. 2025, eq. 11) and Archer2.0 ``rejection_sample``. A group is dropped when
    max − min ≤ ``atol``. ``num_all_correct``/``num_all_wrong`` count dropped groups whose common reward is the
    group-set maximum / minimum reward (1 / 0 for binary rewards). Singleton groups are always dropped.
    """
    check_positive("atol", atol, allow_zero=True)
    g = _grouped(rewards, group_size)
    spread = g.max(dim=1).values - g.min(dim=1).values
    flat = spread <= atol
    hi, lo = rewards.max(), rewards.min()
    first = g[:, 0]
    n_correct = int((flat & (first == hi) & (hi != lo)).sum()) if hi != lo else 0
    n_wrong = int((flat & (first == lo) & (hi != lo)).sum()) if hi != lo else 0
    return GroupFilter(
        keep=(~flat).repeat_interleave(group_size),
        num_groups=g.shape[0],
        num_dropped=int(flat.sum()),
        num_all_correct=n_correct,
        num_all_wrong=n_wrong,
    )


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    group: ProcessGroup | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Whiten ``values`` with the mean and (biased) variance of the selected entries over all ranks of ``group``.

    ``values`` any shape; ``mask`` bool of the same shape (None = all). Statistics are all-reduced over ``group``
    (e.g. the data-parallel × context-parallel group), so every rank normalises with the global batch moments.
    ``shift_mean=False`` keeps the mean (rescales the spread only). Entries outside ``mask`` are returned unchanged.
    """
    check_tensor("values", values, floating=True)
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    elif mask.shape != values.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match values shape {tuple(values.shape)}")
    mask = mask.bool()
    check_finite("values", values, mask)
    stats = torch.stack(
        [
            masked_sum(values.detach().double(), mask),
            masked_sum(values.detach().double() ** 2, mask),
            mask.sum().double(),
        ]
    )
    s, s2, n = all_reduce(stats, "sum", group).tolist()
    if n == 0:
        raise ValueError("mask: selects no entries on any rank; nothing to whiten")
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0)
    out = (values - mean) * (1.0 / (var + eps) ** 0.5)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, values)
