"""The ``algorithm`` config group: which advantage estimator, shaper, policy loss, KL and rollout correction a run
uses. YAML files in ``configs/algorithm/`` are instances of :class:`AlgorithmConfig`; ``validate()`` turns every
inconsistent or unknown setting into a one-line ``ValueError`` before any worker starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..algorithms.advantages import advantage_estimators
from ..algorithms.losses import KL_KINDS, PolicyLossConfig
from ..algorithms.rollout_correction import CORRECTION_LEVELS, CORRECTION_MODES

SALIENCY_METHODS = ("oar_g", "oar_p")
PFINAL_MODES = ("last", "answer_mean", "answer_joint")
SHAPERS = ("none", "oar")


@dataclass(kw_only=True)
class AdvantageConfig:
    estimator: str = "grpo"  # group-relative (std-scaled), Dr.GRPO (mean only) or leave-one-out
    eps: float = 1e-6  # added to the group std (grpo only)
    filter_groups: bool = False  # drop groups whose verdicts are all equal (DAPO dynamic sampling)
    whiten: bool = False  # whiten advantages over the data-parallel group


@dataclass(kw_only=True)
class LossConfig:
    """Policy-loss options; ``None`` takes the method's paper default (``PolicyLossConfig.for_method``)."""

    name: str = "grpo"  # the policy loss (its registry name)
    eps_low: float | None = None  # lower clip range of the (token or sequence) ratio
    eps_high: float | None = None  # upper clip range (DAPO clip-higher: above eps_low)
    dual_clip: float | None = None  # dual-clip constant c > 1 (grpo: A<0 loss capped at −A·c; aspo: soft, both signs)
    agg: str | None = None  # loss aggregation over tokens and sequences
    norm_len: int | None = None  # the constant length of "seq-mean-token-sum-norm" (Dr.GRPO); None:
    # rollout.max_new_tokens (TrainConfig.validate)

    def build(self) -> PolicyLossConfig:
        opts = {k: v for k, v in asdict(self).items() if k != "name" and v is not None}
        return PolicyLossConfig.for_method(self.name, **opts)


@dataclass(kw_only=True)
class KLConfig:
    coef: float = 0.0  # β; 0 disables the reference-policy KL term
    kind: str = "k3"  # KL estimator (Schulman's k1 / k2 / k3)


@dataclass(kw_only=True)
class ShaperConfig:
    """Token-advantage shaper. ``none``: the outcome advantage on every token. ``oar``: Â_t = Â·w_t with w from
    saliency (ALGORITHMS.md §1)."""

    name: str = "none"  # none: the outcome advantage on every token; oar: saliency-weighted
    saliency: str = "oar_g"  # OAR-G (gradient × input) or OAR-P (pad-replacement counterfactuals)
    pfinal_mode: str | None = None  # None: answer_mean for oar_g, last for oar_p (ALGORITHMS.md §1.4)
    noise_std: float = 1e-3  # OAR-G: std of the embedding noise the gradient is taken at
    quantile: float = 0.25  # reshaping threshold τ: this quantile of a row's normalised scores
    beta: float = 1.0  # boost of tokens above τ (weights lie in [floor/(1+beta), (1+beta)/floor])
    floor: float = 0.1  # weight factor of tokens below τ, before renormalisation to Σw = R
    chunk_size: int = 32  # OAR-P counterfactuals per forward


@dataclass(kw_only=True)
class RolloutCorrectionConfig:
    mode: str | None = None  # importance weights π_old / π_rollout: truncated (tis) or masked outside a band
    # (icepop); None: off
    level: str = "token"  # ratio per token, per sequence (product) or geometric (length-normalised)
    low: float | None = None  # lower bound of the band (None: tis none, icepop 0.5)
    high: float | None = None  # upper bound / truncation C (None: 2.0)


@dataclass(kw_only=True)
class AlgorithmConfig:
    name: str = "grpo"  # the preset's name (informational: metrics, run names)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)  # outcome advantages per response
    shaper: ShaperConfig = field(default_factory=ShaperConfig)  # outcome advantage → per-token advantages (OAR)
    loss: LossConfig = field(default_factory=LossConfig)  # the policy loss, its clipping and aggregation
    kl: KLConfig = field(default_factory=KLConfig)  # KL penalty against the reference policy (the policy RL starts from)
    entropy_coef: float = 0.0  # entropy bonus coefficient (0: off)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)  # TIS / ICEPOP
    # weights for the rollout engine's log-probs differing from π_old's
    updates_per_batch: int = 1  # optimizer steps (mini-batches) per rollout batch

    def validate(self) -> AlgorithmConfig:
        a = self.advantage
        if a.estimator not in advantage_estimators():
            raise ValueError(f"algorithm.advantage.estimator: unknown {a.estimator!r}; known: {', '.join(advantage_estimators())}")
        try:
            self.loss.build()
        except ValueError as exc:
            raise ValueError(f"algorithm.loss.{exc}") from None
        if self.kl.kind not in KL_KINDS:
            raise ValueError(f"algorithm.kl.kind: unknown {self.kl.kind!r}; known: {', '.join(KL_KINDS)}")
        if self.kl.coef < 0 or self.entropy_coef < 0:
            raise ValueError("algorithm.kl.coef / algorithm.entropy_coef: must be >= 0")
        s = self.shaper
        if s.name not in SHAPERS:
            raise ValueError(f"algorithm.shaper.name: unknown {s.name!r}; known: {', '.join(SHAPERS)}")
        if s.name == "oar":
            if s.saliency not in SALIENCY_METHODS:
                raise ValueError(f"algorithm.shaper.saliency: unknown {s.saliency!r}; known: {', '.join(SALIENCY_METHODS)}")
            if s.pfinal_mode is not None and s.pfinal_mode not in PFINAL_MODES:
                raise ValueError(f"algorithm.shaper.pfinal_mode: unknown {s.pfinal_mode!r}; known: {', '.join(PFINAL_MODES)}")
            if self.loss.name == "gspo":
                raise ValueError("algorithm.loss.name: 'gspo' takes one advantage per response; combine OAR with 'gspo_token'")
            if not 0 <= s.quantile < 1 or s.beta < 0 or not 0 < s.floor <= 1 or s.noise_std < 0 or s.chunk_size < 1:
                raise ValueError("algorithm.shaper: need 0 <= quantile < 1, beta >= 0, 0 < floor <= 1, noise_std >= 0, chunk_size >= 1")
        rc = self.rollout_correction
        if rc.mode is not None:
            if rc.mode not in CORRECTION_MODES:
                raise ValueError(f"algorithm.rollout_correction.mode: unknown {rc.mode!r}; known: {', '.join(CORRECTION_MODES)}")
            if rc.level not in CORRECTION_LEVELS:
                raise ValueError(f"algorithm.rollout_correction.level: unknown {rc.level!r}; known: {', '.join(CORRECTION_LEVELS)}")
        if self.updates_per_batch < 1:
            raise ValueError(f"algorithm.updates_per_batch: must be >= 1, got {self.updates_per_batch}")
        return self

    @property
    def pfinal_mode(self) -> str:
        if self.shaper.pfinal_mode is not None:
            return self.shaper.pfinal_mode
        return "answer_mean" if self.shaper.saliency == "oar_g" else "last"


def load_algorithm(source: str | Path | dict[str, Any], **overrides: Any) -> AlgorithmConfig:
    """Build a validated :class:`AlgorithmConfig` from a YAML path, a name in ``configs/algorithm/`` or a dict.

    Unknown keys and wrong types are rejected with the offending key named (OmegaConf structured merge)."""
    if isinstance(source, dict):
        data = OmegaConf.create(source)
    else:
        path = Path(source)
        if not path.suffix:
            path = Path(__file__).resolve().parents[2] / "configs" / "algorithm" / f"{source}.yaml"
        if not path.is_file():
            raise ValueError(f"source: no algorithm config at {path}")
        data = OmegaConf.load(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AlgorithmConfig), data, OmegaConf.create(overrides))
    except OmegaConfBaseException as exc:
        raise ValueError(f"algorithm config: {str(exc).splitlines()[0]}") from None
    cfg = OmegaConf.to_object(merged)
    return cfg.validate()
