"""From rollouts to the training rows of one step: rewards → group advantages → (dynamic-sampling selection) →
OAR scoring sequences. Pure torch (no Megatron): the loop hands the result to ``PolicyActor.pack``.

Groups: the ``n`` samples of one prompt are one group (consecutive rows, prompt-major, as every engine returns
them) and always live on one data-parallel rank, so group statistics need no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..algorithms import compute_advantages
from ..algorithms.segment import scoring_batch_from_responses, split_responses
from ..config.algorithm import AlgorithmConfig


@dataclass
class Group:
    """One prompt's samples with their scores. ``scores``: shaped rewards (overlong penalty included);
    ``passed``: the verifier's verdict (raw score >= the pass threshold)."""

    prompt_ids: list[int]
    responses: list[list[int]]
    logprobs: list[list[float]]
    finish: list[str]
    scores: list[float]
    passed: list[bool]
    record_index: int
    answer: str
    row_ids: list[int] = field(default_factory=list)  # global ids of the samples (seed OAR-G's noise; name the rows)
    routes: list | None = None  # R3: each sample's routed experts (Sample.routed_experts), or None

    @property
    def informative(self) -> bool:
        """Verdicts not all equal (0 < accuracy < 1): the group carries an accuracy signal (DAPO dynamic sampling,
        Yu et al. 2025, eq. 11). Judged on ``passed``, not on ``scores``: shaping such as the overlong penalty can
        make the scores of an all-correct or all-wrong group differ without any sample being more correct."""
        return any(self.passed) and not all(self.passed)


@dataclass
class Experience:
    """The rows of one data-parallel rank for one step, group-major."""

    groups: list[Group]
    advantages: torch.Tensor  # [N]
    filled: int = 0  # groups kept without signal because dynamic sampling ran out of rounds
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def prompts(self) -> list[list[int]]:
        return [g.prompt_ids for g in self.groups for _ in g.responses]

    @property
    def responses(self) -> list[list[int]]:
        return [r for g in self.groups for r in g.responses]

    @property
    def rollout_logprobs(self) -> list[list[float]]:
        return [lp for g in self.groups for lp in g.logprobs]

    @property
    def row_ids(self) -> list[int]:
        return [r for g in self.groups for r in g.row_ids]

    @property
    def routed_experts(self) -> list | None:
        """Each row's routed experts from the rollout (R3, ``PolicyActor.set_rollout_routes``); None unless every
        group carries them."""
        if not self.groups or any(g.routes is None for g in self.groups):
            return None
        return [r for g in self.groups for r in g.routes]


def response_content(ids: list[int], eos: Sequence[int]) -> list[int]:
    """The response up to (excluding) its first EOS: what the reward decodes and scores."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def select_groups(candidates: Sequence[Group], want: int, *, dynamic: bool) -> tuple[list[Group], int]:
    """``want`` groups for training. Without dynamic sampling: the first ``want``. With it (DAPO eq. 11): the
    informative groups first, in arrival order; if fewer than ``want`` exist, uninformative ones fill the batch
    (they keep every rank's shapes equal; their advantages come from shaping alone, e.g. the overlong penalty, and
    are zero for unshaped rewards) — returned count ``filled``."""
    if not dynamic:
        return list(candidates[:want]), 0
    good = [g for g in candidates if g.informative]
    if len(good) >= want:
        return good[:want], 0
    rest = [g for g in candidates if not g.informative]
    filled = want - len(good)
    return good + rest[:filled], filled


def group_advantages_of(groups: Sequence[Group], algorithm: AlgorithmConfig) -> torch.Tensor:
    """[N] advantages of the rows (group-major) with the configured estimator (ALGORITHMS.md §2)."""
    if not groups:
        return torch.zeros(0)
    n = len(groups[0].responses)
    if any(len(g.responses) != n for g in groups):
        raise ValueError("groups: every group must hold the same number of samples")
    rewards = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float32)
    opts: dict[str, Any] = {}
    if algorithm.advantage.estimator == "grpo":
        opts["eps"] = algorithm.advantage.eps
    return compute_advantages(algorithm.advantage.estimator, rewards, n, **opts)


def filter_stats(groups: Sequence[Group]) -> dict[str, float]:
    """Counts of DAPO's filter over the given groups (before selection), by the verifier's verdicts."""
    if not groups:
        return {}
    return {"rollout/groups_all_correct": float(sum(all(g.passed) for g in groups)),
            "rollout/groups_all_wrong": float(sum(not any(g.passed) for g in groups)),
            "rollout/groups_uninformative": float(sum(not g.informative for g in groups))}


def scoring_for(experience: Experience, tokenizer: Any, *, answer_markers: Sequence[str], conclude: str,
                eos_token_ids: Sequence[int], pad_id: int, with_answers: bool):
    """OAR scoring sequences of the rows (``segment.scoring_batch_from_responses``): reasoning = the response up
    to the last answer marker, then ``conclude``, then the response's own answer (when P_final needs it)."""
    responses = experience.responses
    splits = split_responses(responses, tokenizer, answer_markers=tuple(answer_markers),
                             eos_token_ids=tuple(eos_token_ids))
    return scoring_batch_from_responses(experience.prompts, responses, splits, tokenizer, pad_id=pad_id,
                                        conclude=conclude, with_answers=with_answers)
