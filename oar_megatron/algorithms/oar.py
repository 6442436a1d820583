"""OAR advantage reshaping, credit-concentration diagnostics, and the advantage-shaper registry.

OAR (Outcome-Grounded Advantage Reshaping, arXiv 2601.07408) turns per-token saliency scores into positive token
weights with mean 1 over each response's scored (reasoning) tokens and multiplies the GRPO advantage by them:
Â_{i,t} = Â_i · w_{i,t} (ALGORITHMS.md §1.1). Since w > 0 the sign of every advantage is kept, and since Σ_t w = R
the total advantage of each response is unchanged (§5.7).

Shapes: ``B`` responses × ``T`` padded response positions (right padding).

Advantage shapers are registered by name (``register_advantage_shaper``); this is the one registry for them:

- ``none``  Â_{i,t} = Â_i                    (GRPO: one advantage per response, broadcast to its tokens)
- ``oar``   Â_{i,t} = Â_i · w_{i,t}          (w = ``oar_weights(scores, score_mask, ...)``, §1.4)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._validate import as_mask, check_finite, check_positive, check_range, check_shape, check_tensor

AdvantageShaper = Callable[..., torch.Tensor]
_SHAPERS: dict[str, AdvantageShaper] = {}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------- reshaping


def oar_weights(
    scores: torch.Tensor,
    score_mask: torch.Tensor,
    *,
    quantile: float = 0.25,
    beta: float = 1.0,
    floor: float = 0.1,
) -> torch.Tensor:
    """OAR conservative bi-level ("dual-tier") token weights, per response (ALGORITHMS.md §1.4, §5.6; API.md).

    Over the R scored tokens of a row (``score_mask``), with raw scores s:

        s  ← max(s, 0)                                   (answer_joint scores can be negative, §5.6)
        ℓ  = log1p(s);   n = (ℓ − min ℓ) / (max ℓ − min ℓ)
        τ  = quantile ``quantile`` of n (linear interpolation between order statistics, as torch.quantile's
             default and numpy.quantile's, which the authors' code uses: with n sorted, pos = q·(R−1),
             τ = lerp(n[⌊pos⌋], n[⌈pos⌉], pos − ⌊pos⌋))
        n < τ:  w = max(n / (τ + 1e-8), floor)           (noise suppression; w ∈ [floor, 1))
        n ≥ τ:  w = 1 + β (n − τ) / (1 − τ + 1e-8)        (signal boosting; w ∈ [1, 1 + β])
        w  ← w · R / Σ w                                  (mass preservation: Σ w = R, mean weight 1)

    The renormalisation divides by Σw exactly (the authors' code adds 1e-8 to it, a relative change below 1e-8;
    here Σw ≥ floor·R > 0, so the sum comes out as R up to rounding). w is monotone non-decreasing in s within a
    row and lies in [floor/(1+β), (1+β)/floor].

    Args:
        scores: [B, T] raw saliency. Only scored positions are read: NaN/inf elsewhere do not matter.
        score_mask: [B, T] bool or 0/1, the scored (reasoning) tokens of each row.
        quantile: q ∈ [0, 1), a per-row quantile LEVEL (not a raw cutoff); default 0.25 (authors' README).
        beta: boost β ≥ 0; default 1.0.
        floor: minimum pre-normalisation weight, in (0, 1]; default 0.1.
    Returns:
        w: [B, T] in float32 (float64 for float64 scores), not differentiable (weights are constants, §4):
        w > 0; Σ of w over each row's scored tokens equals their count; exactly 1.0 where ``score_mask`` is
        False; all 1.0 in a row with fewer than 2 scored tokens or constant (clamped) scores (§5.6).
    Raises:
        ValueError: bad shapes or options, or NaN/inf scores at scored positions.
    """
    check_tensor("scores", scores, ndim=2, floating=True)
    mask = as_mask("score_mask", score_mask, scores.shape, "scores")
    q = check_range("quantile", quantile, 0.0, 1.0, high_open=True)
    beta = check_positive("beta", beta, allow_zero=True)
    floor = check_range("floor", floor, 0.0, 1.0, low_open=True)
    check_finite("scores", scores.detach(), mask)
    out_dtype = _compute_dtype(scores.dtype)
    if scores.numel() == 0:
        return torch.ones(scores.shape, dtype=out_dtype, device=scores.device)

    # float64 throughout, as the authors' numpy code; unscored entries are replaced before any arithmetic.
    s = torch.where(mask, scores.detach().to(torch.float64), 0.0).clamp(min=0.0)  # [B, T]
    ell = torch.log1p(s)
    lo = torch.where(mask, ell, torch.inf).amin(dim=-1, keepdim=True)  # [B, 1]
    hi = torch.where(mask, ell, -torch.inf).amax(dim=-1, keepdim=True)
    count = mask.sum(dim=-1, keepdim=True)  # [B, 1] = R
    active = (count >= 2) & (hi > lo)  # rows that are reshaped; the rest fall back to w = 1
    span = torch.where(active, hi - lo, 1.0)
    n = torch.where(mask & active, (ell - torch.where(active, lo, 0.0)) / span, 0.0)  # [B, T] in [0, 1]

    # Per-row quantile over the scored entries: unscored entries sort last (+inf), so the first R are the values.
    srt = torch.where(mask, n, torch.inf).sort(dim=-1).values
    pos = q * (count - 1).clamp(min=0).to(torch.float64)  # [B, 1]
    below, above = pos.floor(), pos.ceil()
    v_below = srt.gather(-1, below.long())
    v_above = srt.gather(-1, above.long())
    tau = torch.lerp(v_below, v_above, pos - below)
    tau = torch.where(active, tau, 0.0)  # [B, 1]

    w_low = (n / (tau + 1e-8)).clamp(min=floor)
    w_high = 1.0 + beta * (n - tau) / (1.0 - tau + 1e-8)
    w = torch.where(n < tau, w_low, w_high)
    total = torch.where(mask, w, 0.0).sum(dim=-1, keepdim=True)  # ≥ floor·R > 0 in active rows
    w = w * (count.to(torch.float64) / torch.where(active, total, 1.0))
    return torch.where(mask & active, w, 1.0).to(out_dtype)


# ---------------------------------------------------------------------------------------------- diagnostics


def credit_metrics(token_advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Credit-concentration diagnostics per response (ALGORITHMS.md §1.5, §5.8; definitions [I]).

    With a = |Â_t| over the T masked tokens of a row (T counted per row):

        ess_ratio  = (Σ a)² / (T · Σ a²)                              ∈ (0, 1]
        top10_mass = Σ of the ⌈T/10⌉ largest a / Σ a                   ∈ [⌈T/10⌉/T, 1]

    a is divided by its row maximum first (both ratios are scale-free), so uniform advantages (GRPO) give
    exactly ess_ratio = 1.0 and top10_mass = ⌈T/10⌉/T, which is exactly 0.10 when T is a multiple of 10 (and
    e.g. 1/7 for T = 7). If OAR concentrates credit, ess_ratio falls below 1 and top10_mass rises above that.

    Rows carrying no credit — no masked token, or all advantages zero (a group whose rewards were all equal) —
    get the uniform values ess_ratio = 1.0 and top10_mass = ⌈T/10⌉/T (0.1 for T = 0), never NaN, so a logger
    can average the batch directly. To average only rows that carry credit, select
    ``(mask & (token_advantages != 0)).any(-1)``.

    Args:
        token_advantages: [B, T] per-token advantages (e.g. from ``shape_advantages``); padding is ignored.
        mask: [B, T] bool or 0/1 response-token mask.
    Returns:
        {"ess_ratio": [B], "top10_mass": [B]} in float32 (float64 for float64 input), not differentiable.
    """
    check_tensor("token_advantages", token_advantages, ndim=2, floating=True)
    mask = as_mask("mask", mask, token_advantages.shape, "token_advantages")
    check_finite("token_advantages", token_advantages.detach(), mask)
    out_dtype = _compute_dtype(token_advantages.dtype)
    a = torch.where(mask, token_advantages.detach().to(torch.float64).abs(), 0.0)  # [B, T]
    count = mask.sum(dim=-1)  # [B] = T per row
    k = (count + 9) // 10  # ⌈T/10⌉ in integers (no 0.1·T rounding)
    uniform_top = torch.where(count > 0, k.to(torch.float64) / count.clamp(min=1), 0.1)
    if a.shape[-1] == 0:
        return {"ess_ratio": torch.ones_like(uniform_top).to(out_dtype), "top10_mass": uniform_top.to(out_dtype)}

    amax = a.amax(dim=-1, keepdim=True)
    live = amax.squeeze(-1) > 0
    a = a / torch.where(amax > 0, amax, 1.0)  # uniform rows become exact ones, so their sums are exact integers
    s1 = a.sum(dim=-1)
    s2 = (a * a).sum(dim=-1)
    ess = torch.where(live, s1 * s1 / (count.to(torch.float64) * torch.where(live, s2, 1.0)), 1.0)
    # Padding holds 0 ≤ every masked |Â|, so the top-k of the whole row is the top-k of its masked tokens.
    top = a.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    top_k = top.gather(-1, (k - 1).clamp(min=0)[:, None]).squeeze(-1)
    top10 = torch.where(live, top_k / torch.where(live, s1, 1.0), uniform_top)
    return {"ess_ratio": ess.to(out_dtype), "top10_mass": top10.to(out_dtype)}


# ------------------------------------------------------------------------------------------------- registry


def register_advantage_shaper(name: str) -> Callable[[AdvantageShaper], AdvantageShaper]:
    """Decorator: register ``fn(token_advantages [B, T], mask [B, T] bool, **kwargs) -> [B, T]`` under ``name``.

    ``shape_advantages`` validates and broadcasts the advantages before calling ``fn``; a shaper must keep the
    sign of every advantage (multiply by positive weights)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")

    def deco(fn: AdvantageShaper) -> AdvantageShaper:
        if name in _SHAPERS:
            raise ValueError(f"name: advantage shaper {name!r} is already registered")
        _SHAPERS[name] = fn
        return fn

    return deco


def get_advantage_shaper(name: str) -> AdvantageShaper:
    if name not in _SHAPERS:
        raise ValueError(f"name: unknown advantage shaper {name!r}; known: {', '.join(map(repr, sorted(_SHAPERS)))}")
    return _SHAPERS[name]


def advantage_shapers() -> list[str]:
    return sorted(_SHAPERS)


def shape_advantages(name: str, advantages: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-token advantages [B, T] from shaper ``name`` (``none``, ``oar``, or any registered one).

    Args:
        name: registered shaper.
        advantages: [B] (one per response, broadcast over its tokens) or [B, T] float.
        mask: [B, T] bool or 0/1 response-token mask.
        **kwargs: the shaper's options; ``oar`` takes ``scores`` and ``score_mask`` ([B, T], the scored tokens,
            inside ``mask``) and ``quantile``, ``beta``, ``floor`` (see ``oar_weights``).
    Returns:
        [B, T] in the dtype of ``advantages``, 0 at positions outside ``mask``; every masked entry has the sign
        of the advantage it came from.
    """
    fn = get_advantage_shaper(name)
    check_tensor("advantages", advantages, ndim=(1, 2), floating=True)
    check_tensor("mask", mask, ndim=2)
    mask = as_mask("mask", mask, mask.shape, "mask")
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError(f"advantages: length {advantages.shape[0]} does not match mask batch size {mask.shape[0]}")
        check_finite("advantages", advantages)
        advantages = advantages[:, None].expand(mask.shape)
    else:
        as_mask("mask", mask, advantages.shape, "advantages")
        check_finite("advantages", advantages, mask)
    adv = torch.where(mask, advantages.detach(), torch.zeros((), dtype=advantages.dtype, device=advantages.device))
    try:
        out = fn(adv, mask, **kwargs)
    except TypeError as exc:  # unknown or missing keyword
        raise ValueError(f"kwargs: advantage shaper {name!r}: {exc}") from None
    return torch.where(mask, out.to(adv.dtype), torch.zeros((), dtype=adv.dtype, device=adv.device))


@register_advantage_shaper("none")
def _none(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return advantages


@register_advantage_shaper("oar")
def _oar(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    scores: torch.Tensor,
    score_mask: torch.Tensor,
    quantile: float = 0.25,
    beta: float = 1.0,
    floor: float = 0.1,
) -> torch.Tensor:
    check_tensor("scores", scores, ndim=2, floating=True)
    check_shape("scores", scores, mask.shape, "mask")
    check_tensor("score_mask", score_mask)
    smask = as_mask("score_mask", score_mask, mask.shape, "mask")
    if bool((smask & ~mask).any()):
        raise ValueError("score_mask: selects positions outside mask (only response tokens can be scored)")
    w = oar_weights(scores, smask, quantile=quantile, beta=beta, floor=floor)  # [B, T], > 0
    return advantages * w.to(advantages.dtype)
