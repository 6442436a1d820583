"""Rollout–training mismatch correction: importance weights of the trainer's π_old against the rollout engine.

The rollout engine (SGLang, bf16/FP8 kernels) samples from π_rollout, which differs numerically from the trainer's
π_old of the same weights. The policy gradient is corrected by a per-token weight w built from
ρ = π_old / π_rollout of the sampled tokens (computed in log space, |log ρ| ≤ 20):

- ``tis``     w = min(ρ, C) (and ≥ ``low`` if given): truncated importance sampling (Yao et al. 2025, "Your
              efficient RL framework secretly brings you off-policy RL training", eq. 3; C = 2 there).
- ``icepop``  w = ρ inside [low, high], 0 outside: masked IS (IcePop, Ling Team 2025, "Every step evolves",
              §3.2; α=0.5, β=2 here [I]; the paper tunes them per model).

``level``: ``token`` uses each token's ρ; ``sequence`` uses the response's product Π_t ρ_t (exp of the summed log
ratio); ``geometric`` its length-normalised geometric mean (GSPO-style). The weights are constants (detached)
and are passed to ``policy_loss(..., rollout_weights=w)``.
"""

from __future__ import annotations

import torch

from ._validate import as_mask, check_choice, check_finite, check_positive, check_shape, check_tensor
from .reduce import masked_sum

CORRECTION_MODES = ("tis", "icepop")
CORRECTION_LEVELS = ("token", "sequence", "geometric")
_DEFAULT_BAND = {"tis": (None, 2.0), "icepop": (0.5, 2.0)}


def rollout_correction(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "tis",
    level: str = "token",
    low: float | None = None,
    high: float | None = None,
    return_tensor_metrics: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Per-token correction weights [B, T] (1.0 outside ``mask``) and mismatch metrics.

    Args:
        old_logp: [B, T] trainer log-probs of the sampled tokens (π_old recomputed by the training engine).
        rollout_logp: [B, T] the rollout engine's log-probs of the same tokens.
        mask: [B, T] response-token mask.
        mode: ``tis`` (truncate) or ``icepop`` (mask outside the band).
        level: ``token``, ``sequence`` or ``geometric``.
        low, high: the band; defaults tis (none, 2.0), icepop (0.5, 2.0).
    Returns:
        (weights, metrics) with metrics ``logp_diff_mean`` / ``logp_diff_max`` (|log π_old − log π_rollout| over
        masked tokens), ``ratio_mean`` (mean ρ at the chosen level, per token), ``clip_frac`` (tis: fraction of
        tokens whose weight was truncated), ``mask_frac`` (icepop: fraction zeroed), ``weight_ess``
        ((Σw)²/(N·Σw²) over masked tokens; 1 = no correction).
    """
    check_tensor("old_logp", old_logp, ndim=2, floating=True)
    check_tensor("rollout_logp", rollout_logp, floating=True)
    check_shape("rollout_logp", rollout_logp, old_logp.shape, "old_logp")
    mask = as_mask("mask", mask, old_logp.shape, "old_logp")
    check_choice("mode", mode, CORRECTION_MODES)
    check_choice("level", level, CORRECTION_LEVELS)
    if not bool(mask.any()):
        raise ValueError("mask: selects no tokens")
    check_finite("old_logp", old_logp, mask)
    check_finite("rollout_logp", rollout_logp, mask)
    d_low, d_high = _DEFAULT_BAND[mode]
    low = d_low if low is None else check_positive("low", low, allow_zero=True)
    high = d_high if high is None else check_positive("high", high)
    if low is not None and low >= high:
        raise ValueError(f"low: must be below high={high}, got {low}")

    zero = torch.zeros((), dtype=torch.float32, device=old_logp.device)
    diff = torch.where(mask, old_logp.detach().float() - rollout_logp.detach().float(), zero)
    if level == "token":
        log_rho = diff.clamp(-20.0, 20.0)
    else:
        seq = diff.sum(dim=-1)
        if level == "geometric":
            seq = seq / mask.sum(dim=-1).clamp(min=1)
        log_rho = seq.clamp(-20.0, 20.0)[:, None].expand_as(diff)
    rho = torch.exp(log_rho)
    if mode == "tis":
        weights = rho.clamp(max=high) if low is None else rho.clamp(low, high)
        changed = (rho > high) if low is None else ((rho > high) | (rho < low))
    else:
        inside = (rho >= low) & (rho <= high)
        weights = torch.where(inside, rho, zero)
        changed = ~inside
    weights = torch.where(mask, weights, torch.ones((), device=weights.device))

    n = mask.sum()
    w_m = torch.where(mask, weights, zero)
    stats = torch.stack(
        [
            masked_sum(diff.abs(), mask) / n,
            diff.abs().max(),
            masked_sum(rho, mask) / n,
            masked_sum(changed.float(), mask) / n,
            w_m.sum().square() / (n * w_m.square().sum()).clamp(min=1e-30),
        ]
    )
    names = ["logp_diff_mean", "logp_diff_max", "ratio_mean", "clip_frac" if mode == "tis" else "mask_frac", "weight_ess"]
    metrics = dict(zip(names, stats.unbind(0) if return_tensor_metrics else stats.tolist()))
    return weights.to(old_logp.dtype), metrics
