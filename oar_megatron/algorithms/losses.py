"""Policy losses (one registry, one typed config), loss aggregation, and KL estimators.

Shapes: ``B`` responses × ``T`` padded response positions (right padding). ``logp``/``old_logp`` [B, T] are
natural-log probabilities of the sampled tokens under π_θ and π_old; ``advantages`` [B] (shared by a response's
tokens) or [B, T] (per token, e.g. OAR-weighted); ``mask`` [B, T] selects response tokens. Padded positions may
hold any value: they are replaced before any arithmetic, so they reach neither the loss nor its gradient.

Every method produces a per-token surrogate ``loss_tok`` [B, T] whose gradient is −A·w·∇log π_θ for a method-
specific token weight w (ALGORITHMS.md §4); ``aggregate_loss`` then reduces it with one of four modes. Sources:

- ``grpo``       PPO clipped surrogate (Schulman et al. 2017, eq. 7) with ε_low/ε_high (DAPO clip-higher, Yu et al.
                 2025, eq. 10) and optional dual-clip c (Ye et al. 2020, eq. 5): for A<0 the loss is capped at −A·c.
- ``gspo``       GSPO (Zheng et al. 2025, eq. 5, 7): length-normalised sequence ratio s_i, clipped per response.
- ``gspo_token`` GSPO-token (eq. 13–14): s_{i,t} = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)]; equals GSPO when A is shared.
- ``aspo``       ASPO (Wang et al. 2025, eq. 3 and Archer2.0 ``compute_policy_loss_archer``): hard mask, flipped
                 ratio 1/r for A>0, soft dual-clip c on both signs (ALGORITHMS.md §3.2 gives the exact weights).
- ``cispo``      CISPO (MiniMax-M1, Chen et al. 2025, eq. 4): −sg[clip(r, 1−ε_low, 1+ε_high)]·A·log π_θ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._validate import as_mask, check_choice, check_finite, check_int, check_positive, check_range, check_shape, check_tensor
from .reduce import masked_sum

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")

# --------------------------------------------------------------------------------------------------- aggregation


def aggregate_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` [B, T] to a scalar.

    Let m be the mask, n_b = Σ_t m_bt, N = global_tokens (default Σ n_b), S = global_seqs (default #rows with n_b>0):

    - ``token-mean``               Σ_bt m·v / N                                   (verl default; DAPO eq. 8)
    - ``seq-mean-token-mean``      Σ_b (Σ_t m·v / n_b) / S                         (GRPO paper, GSPO, OAR code)
    - ``seq-mean-token-sum``       Σ_b Σ_t m·v / S
    - ``seq-mean-token-sum-norm``  Σ_b Σ_t m·v / (S · norm_len)                   (Dr.GRPO; norm_len default T)

    With N and S counted once over the whole global batch (``reduce.loss_denominators``), the losses of any split
    into micro-batches and data-parallel ranks sum to the loss of the unsplit batch (each row stays whole).
    For ``seq-mean-token-sum-norm`` pass ``norm_len`` (e.g. the max response length) so it does not depend on a
    micro-batch's padding.
    """
    check_tensor("values", values, ndim=2, floating=True)
    check_choice("agg", agg, AGG_MODES)
    mask = as_mask("mask", mask, values.shape, "values")
    row_sum = masked_sum(values, mask, dim=-1)  # [B]
    if agg == "token-mean":
        denom = _denominator("global_tokens", global_tokens, mask.sum())
        return row_sum.sum() / denom.to(values.dtype)
    seqs = _denominator("global_seqs", global_seqs, mask.any(dim=-1).sum())
    if agg == "seq-mean-token-mean":
        per_seq = row_sum / mask.sum(dim=-1).clamp(min=1).to(values.dtype)
        return per_seq.sum() / seqs.to(values.dtype)
    if agg == "seq-mean-token-sum":
        return row_sum.sum() / seqs.to(values.dtype)
    length = values.shape[-1] if norm_len is None else check_int("norm_len", norm_len, minimum=1)
    return row_sum.sum() / (seqs.to(values.dtype) * length)


def _denominator(name: str, given: float | torch.Tensor | None, local: torch.Tensor) -> torch.Tensor:
    if given is None:
        if int(local) == 0:
            raise ValueError(
                "mask: selects no tokens; pass global_tokens/global_seqs when a micro-batch may be empty"
            )
        return local
    if isinstance(given, torch.Tensor):
        if given.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got shape {tuple(given.shape)}")
        value = given.reshape(())
    else:
        check_positive(name, given)
        value = torch.tensor(float(given))
    if float(value) <= 0:
        raise ValueError(f"{name}: must be > 0, got {float(value)}")
    return value.to(local.device)


# ------------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    """Typed options of every policy loss. Build with :meth:`for_method` to get a method's defaults.

    eps_low, eps_high: clip range of the token ratio (grpo, aspo, cispo) or of the sequence ratio (gspo*).
    dual_clip: c > 1 or None. grpo: standard dual-clip (A<0 loss ≤ −A·c); aspo: soft dual-clip on both signs.
    agg, norm_len: see ``aggregate_loss``.
    log_ratio_clamp: |log r| is clamped to this before exp (verl/Archer: 20) for token ratios.
    seq_log_ratio_max: upper clamp of log s for GSPO (verl: 10).
    """

    name: str
    eps_low: float
    eps_high: float
    dual_clip: float | None = None
    agg: str = "token-mean"
    norm_len: int | None = None
    log_ratio_clamp: float = 20.0
    seq_log_ratio_max: float = 10.0

    def __post_init__(self) -> None:
        check_choice("name", self.name, _LOSSES)
        check_range("eps_low", self.eps_low, 0.0, 1.0)
        check_positive("eps_high", self.eps_high, allow_zero=True)
        if self.dual_clip is not None:
            check_range("dual_clip", self.dual_clip, 1.0, float("inf"), low_open=True, high_open=True)
            if self.name not in ("grpo", "aspo"):
                raise ValueError(f"dual_clip: not supported by {self.name!r} (only 'grpo' and 'aspo')")
        check_choice("agg", self.agg, AGG_MODES)
        if self.norm_len is not None:
            check_int("norm_len", self.norm_len, minimum=1)
        check_positive("log_ratio_clamp", self.log_ratio_clamp)
        check_positive("seq_log_ratio_max", self.seq_log_ratio_max)

    @classmethod
    def for_method(cls, name: str, **options) -> PolicyLossConfig:
        """The config of method ``name`` with its paper defaults, overridden by ``options`` (unknown keys raise)."""
        check_choice("name", name, _LOSSES)
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"options: unknown option(s) {', '.join(unknown)} for policy loss {name!r}; known: {', '.join(sorted(fields))}")
        return cls(name=name, **{**_LOSSES[name].defaults, **options})


@dataclass(frozen=True)
class _LossEntry:
    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    defaults: dict
    token_advantages: bool  # False: requires advantages constant over each response


_LOSSES: dict[str, _LossEntry] = {}


def register_policy_loss(name: str, *, token_advantages: bool = True, **defaults):
    """Register ``fn(logp, old_logp, adv, mask, cfg) -> (loss_tok [B, T], stats)`` under ``name``.

    ``defaults`` are the method's default ``PolicyLossConfig`` fields. ``stats`` maps metric names to per-token
    bool masks (averaged over the mask into fractions) or float tensors [B, T] (averaged likewise); it must contain
    ``clipped`` (tokens whose gradient the clip removed) and ``ratio`` (the ratio the method clips).
    """

    def deco(fn):
        if name in _LOSSES:
            raise ValueError(f"name: policy loss {name!r} is already registered")
        _LOSSES[name] = _LossEntry(fn, defaults, token_advantages)
        return fn

    return deco


def policy_losses() -> list[str]:
    return sorted(_LOSSES)


# -------------------------------------------------------------------------------------------------- the methods


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, cfg: PolicyLossConfig) -> torch.Tensor:
    c = cfg.log_ratio_clamp
    return (logp - old_logp).clamp(-c, c)


def _ppo_clip(adv: torch.Tensor, ratio: torch.Tensor, cfg: PolicyLossConfig) -> tuple[torch.Tensor, dict]:
    """max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); the clip removes the gradient where it binds."""
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high))
    clip_high = (adv > 0) & (ratio > 1.0 + cfg.eps_high)
    clip_low = (adv < 0) & (ratio < 1.0 - cfg.eps_low)
    return loss, {"clip_frac_high": clip_high, "clip_frac_low": clip_low}


@register_policy_loss("grpo", eps_low=0.2, eps_high=0.2, dual_clip=None, agg="token-mean")
def _grpo(logp, old_logp, adv, mask, cfg):
    ratio = torch.exp(_log_ratio(logp, old_logp, cfg))
    loss, stats = _ppo_clip(adv, ratio, cfg)
    clipped = stats["clip_frac_high"] | stats["clip_frac_low"]
    if cfg.dual_clip is not None:
        # Dual-clip: for A<0 an unbounded ratio would give an unbounded loss; cap it at −A·c (zero gradient there).
        dual = (adv < 0) & (loss > -adv * cfg.dual_clip)
        loss = torch.where(dual, -adv * cfg.dual_clip, loss)
        stats["dual_clip_frac"] = dual
        clipped = clipped | dual
    return loss, {**stats, "clipped": clipped, "ratio": ratio}


def _seq_log_ratio(logp, old_logp, mask):
    """(1/|y_i|) Σ_t (log π_θ − log π_old): log of the GSPO sequence ratio s_i (eq. 7), [B]."""
    return masked_sum(logp - old_logp, mask, dim=-1) / mask.sum(dim=-1).clamp(min=1).to(logp.dtype)


def _gspo_common(log_s, adv, cfg):
    s = torch.exp(log_s.clamp(max=cfg.seq_log_ratio_max))
    loss, stats = _ppo_clip(adv, s, cfg)
    return loss, {**stats, "clipped": stats["clip_frac_high"] | stats["clip_frac_low"], "ratio": s}


@register_policy_loss("gspo", token_advantages=False, eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean")
def _gspo(logp, old_logp, adv, mask, cfg):
    # s_i depends on every token of response i (differentiable through the mean): broadcast to the tokens.
    log_s = _seq_log_ratio(logp, old_logp, mask)[:, None].expand_as(logp)
    return _gspo_common(log_s, adv, cfg)


@register_policy_loss("gspo_token", eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean")
def _gspo_token(logp, old_logp, adv, mask, cfg):
    # log s_{i,t} = sg[log s_i] + log π_θ(y_t) − sg[log π_θ(y_t)]: value log s_i, gradient ∇log π_θ(y_t) (eq. 14).
    log_s = _seq_log_ratio(logp, old_logp, mask).detach()[:, None] + logp - logp.detach()
    return _gspo_common(log_s, adv, cfg)


@register_policy_loss("aspo", eps_low=0.2, eps_high=0.2, dual_clip=3.0, agg="token-mean")
def _aspo(logp, old_logp, adv, mask, cfg):
    """Per-token weight w in ∇loss = −A·w·∇log π (ALGORITHMS.md §3.2):
    A>0: 0 if r>1+ε_high; 1/r if 1/c ≤ r ≤ 1+ε_high; c (value-clipped, gradient kept) if r<1/c.
    A<0: 0 if r<1−ε_low;  r   if 1−ε_low ≤ r ≤ c;    c (value-clipped, gradient kept) if r>c."""
    ratio = torch.exp(_log_ratio(logp, old_logp, cfg))
    pcr = ratio.clamp(max=1.0 + cfg.eps_high)  # hard mask for A>0: constant above 1+ε_high
    ncr = ratio.clamp(min=1.0 - cfg.eps_low)  # hard mask for A<0: constant below 1−ε_low
    # Flip for A>0: value −A/r; (pcr/sg(pcr)) has value 1 and gradient ∇log π, so the gradient is −A·(1/r)·∇log π.
    pos = -adv * (pcr / pcr.detach()) / pcr.detach()
    neg = -adv * ncr
    pos_mask = (adv > 0) & (ratio > 1.0 + cfg.eps_high)
    neg_mask = (adv < 0) & (ratio < 1.0 - cfg.eps_low)
    stats = {"pos_mask_frac": pos_mask, "neg_mask_frac": neg_mask}
    if cfg.dual_clip is not None:
        c = cfg.dual_clip
        # Soft dual-clip: weight value c (detached), gradient still flows through log π: loss = −A·c·log π.
        pos_dual = (adv > 0) & (1.0 / pcr > c)
        neg_dual = (adv < 0) & (ncr > c)
        pos = torch.where(pos_dual, -adv * c * logp, pos)
        neg = torch.where(neg_dual, -adv * c * logp, neg)
        stats.update(pos_dual_clip_frac=pos_dual, neg_dual_clip_frac=neg_dual, dual_clip_frac=pos_dual | neg_dual)
    loss = torch.where(adv < 0, neg, pos)
    return loss, {**stats, "clipped": pos_mask | neg_mask, "ratio": ratio}


@register_policy_loss("cispo", eps_low=1.0, eps_high=0.28, agg="token-mean")
def _cispo(logp, old_logp, adv, mask, cfg):
    """The clipped ratio is a detached weight: no token loses its gradient, large ones are only down-weighted."""
    ratio = torch.exp(_log_ratio(logp, old_logp, cfg))
    weight = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high).detach()
    truncated = (ratio > 1.0 + cfg.eps_high) | (ratio < 1.0 - cfg.eps_low)
    return -adv * weight * logp, {"trunc_frac": truncated, "clipped": torch.zeros_like(truncated), "ratio": ratio}


# ---------------------------------------------------------------------------------------------- the entry point


def policy_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    rollout_weights: torch.Tensor | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    return_tensor_metrics: bool = False,
    **options,
) -> tuple[torch.Tensor, dict]:
    """Scalar policy loss of method ``name`` and its metrics.

    Args:
        name: a registered loss (``grpo``, ``gspo``, ``gspo_token``, ``aspo``, ``cispo``).
        logp, old_logp: [B, T] log π_θ (differentiable) and log π_old of the sampled tokens.
        advantages: [B] or [B, T]. ``gspo`` needs them constant over each response (use ``gspo_token`` otherwise).
        mask: [B, T] bool or 0/1 response-token mask.
        rollout_weights: optional [B, T] non-negative per-token weights multiplying the surrogate (TIS/ICEPOP
            rollout-mismatch correction from ``rollout_correction``); treated as constants.
        global_tokens, global_seqs: denominators counted once over the whole global batch (see ``aggregate_loss``).
        return_tensor_metrics: return 0-d tensors instead of floats (no host sync).
        **options: ``PolicyLossConfig`` fields (eps_low, eps_high, dual_clip, agg, norm_len, ...).
    Returns:
        (loss, metrics): metrics has ``clip_frac`` (fraction of masked tokens whose gradient the clip removed),
        ``ratio_mean`` (mean over masked tokens of the ratio the method clips), and method-specific fractions.
    """
    cfg = PolicyLossConfig.for_method(name, **options)
    check_tensor("logp", logp, ndim=2, floating=True)
    check_tensor("old_logp", old_logp, floating=True)
    check_shape("old_logp", old_logp, logp.shape, "logp")
    mask = as_mask("mask", mask, logp.shape, "logp")
    adv = _token_advantages(advantages, logp, mask, per_row_constant=not _LOSSES[name].token_advantages, loss_name=name)
    check_finite("logp", logp.detach(), mask)
    check_finite("old_logp", old_logp, mask)
    if rollout_weights is not None:
        check_tensor("rollout_weights", rollout_weights, floating=True)
        check_shape("rollout_weights", rollout_weights, logp.shape, "logp")
        check_finite("rollout_weights", rollout_weights, mask)
        if bool((rollout_weights[mask] < 0).any()):
            raise ValueError("rollout_weights: must be >= 0 at masked positions")

    # Padding is replaced by zeros before any arithmetic: NaN/inf there cannot reach the loss or the gradient.
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp_s = torch.where(mask, logp, zero)
    old_s = torch.where(mask, old_logp.detach().to(logp.dtype), zero)
    adv_s = torch.where(mask, adv.detach().to(logp.dtype), zero)
    loss_tok, stats = _LOSSES[name].fn(logp_s, old_s, adv_s, mask, cfg)
    if rollout_weights is not None:
        loss_tok = loss_tok * torch.where(mask, rollout_weights.detach().to(logp.dtype), zero)
    loss = aggregate_loss(
        loss_tok, mask, cfg.agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_len=cfg.norm_len
    )
    return loss, _metrics(stats, mask, return_tensor_metrics)


def _token_advantages(advantages, logp, mask, *, per_row_constant: bool, loss_name: str) -> torch.Tensor:
    check_tensor("advantages", advantages, ndim=(1, 2), floating=True)
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages: length {advantages.shape[0]} does not match logp batch size {logp.shape[0]}")
        check_finite("advantages", advantages)
        return advantages[:, None].expand_as(logp)
    check_shape("advantages", advantages, logp.shape, "logp")
    check_finite("advantages", advantages, mask)
    if per_row_constant:
        big = torch.finfo(advantages.dtype).max
        hi = torch.where(mask, advantages, -big).amax(dim=-1)
        lo = torch.where(mask, advantages, big).amin(dim=-1)
        rows = mask.any(dim=-1)
        if bool(((hi - lo).abs() > 1e-6 * hi.abs().clamp(min=1.0))[rows].any()):
            raise ValueError(
                f"advantages: {loss_name!r} uses one advantage per response but got per-token values that differ "
                "within a response; use 'gspo_token' for per-token (e.g. OAR-weighted) advantages"
            )
    return advantages


def _metrics(stats: dict[str, torch.Tensor], mask: torch.Tensor, as_tensors: bool) -> dict:
    n = mask.sum().clamp(min=1)
    names, values = [], []
    for key, val in stats.items():
        name = {"clipped": "clip_frac", "ratio": "ratio_mean"}.get(key, key)
        v = val.detach()
        values.append(masked_sum(v.to(torch.float32), mask) / n)
        names.append(name)
        if key == "ratio":
            big = torch.finfo(v.dtype).max
            names += ["ratio_max", "ratio_min"]
            values += [torch.where(mask, v, -big).max().float(), torch.where(mask, v, big).min().float()]
    stacked = torch.stack(values)
    if as_tensors:
        return dict(zip(names, stacked.unbind(0)))
    return dict(zip(names, stacked.tolist()))


# ---------------------------------------------------------------------------------------------------------- KL


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, *, clamp: float | None = None) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled-token log-probs (Schulman, "Approximating KL
    divergence", 2020), [B, T], differentiable in ``logp``:

    - ``k1`` = log π_θ − log π_ref                 (unbiased, high variance, can be negative)
    - ``k2`` = ½ (log π_θ − log π_ref)²             (biased, low variance)
    - ``k3`` = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1   (unbiased, ≥ 0; GRPO/ASPO "low_var_kl")

    k3 follows verl: the log ratio is clamped to [−20, 20] before exp and the estimate to [−clamp, clamp]
    (default 10). ``clamp`` applies to k1/k2 too when given.
    """
    check_tensor("logp", logp, floating=True)
    check_tensor("ref_logp", ref_logp, floating=True)
    check_shape("ref_logp", ref_logp, logp.shape, "logp")
    check_choice("kind", kind, KL_KINDS)
    if clamp is not None:
        check_positive("clamp", clamp)
    diff = logp - ref_logp.detach().to(logp.dtype)
    if kind == "k1":
        kl = diff
    elif kind == "k2":
        kl = 0.5 * diff.square()
    else:
        neg = (-diff).clamp(-20.0, 20.0)
        kl = torch.exp(neg) - neg - 1.0
        clamp = 10.0 if clamp is None else clamp
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    kind: str = "k3",
    agg: str = "token-mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """β · agg(kl_penalty(logp, ref_logp, kind)): the reference-policy KL term to add to the policy loss (GRPO
    eq. 3, ASPO with β = 0.001 and k3). Same aggregation and global denominators as the policy loss."""
    check_positive("coef", coef, allow_zero=True)
    check_tensor("logp", logp, ndim=2, floating=True)
    check_tensor("ref_logp", ref_logp, floating=True)
    check_shape("ref_logp", ref_logp, logp.shape, "logp")
    m = as_mask("mask", mask, logp.shape, "logp")
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Padding replaced first so NaN/inf there cannot reach the gradient through exp (k3).
    kl = kl_penalty(torch.where(m, logp, zero), torch.where(m, ref_logp.to(logp.dtype), zero), kind)
    return coef * aggregate_loss(kl, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_len=norm_len)


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float,
    agg: str = "token-mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """−c · agg(H): the entropy bonus to add to the policy loss (maximising entropy), ``entropy`` [B, T] from
    ``vocab_parallel_logprob_entropy``. Same aggregation and global denominators as the policy loss."""
    check_positive("coef", coef, allow_zero=True)
    return -coef * aggregate_loss(entropy, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_len=norm_len)
