"""The rollout interface: sampling settings, one generated sample, and the engine every backend implements.

Pure Python (no Megatron, no HTTP): the in-process engine (``rollout.local.LocalEngine``, sampling from the policy
being trained) and the SGLang client (``rollout.sglang.SGLangEngine``) both implement :class:`RolloutEngine`, so the
trainer sees one
``generate`` / ``sync_weights`` / ``close`` surface whatever runs the model.

Conventions shared by every engine:

* ``generate(prompts, params)`` returns ``len(prompts) * params.n`` samples, prompt-major: the samples of prompt
  ``i`` sit at ``[i*n, (i+1)*n)``.
* A stop token ends its sample and is kept as the last entry of ``response_ids`` (``finish_reason == "stop"``);
  a sample that reaches ``max_new_tokens`` without one ends with ``finish_reason == "length"``.
* ``logprobs[t]`` is log softmax(logits / temperature)[response_ids[t]] over the real vocabulary, *before* top-k /
  top-p filtering (filters shape the draw, not the reported distribution): the distribution the trainer recomputes
  (the verl / slime convention with SGLang). Temperature 0 (greedy) reports the T = 1 log-probs.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FINISH_REASONS", "RolloutEngine", "Sample", "SamplingParams"]

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``validate()`` returns ``self`` or raises a one-line ``ValueError`` naming the field."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with cumulative probability >= top_p; 1: off
    top_k: int = -1  # keep the k most likely tokens; -1 or 0: off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; kept in the response
    n: int = 1  # samples per prompt (a GRPO group)
    seed: int | None = None  # None: the engine's own reproducible stream

    def validate(self) -> SamplingParams:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"sampling.temperature: must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"sampling.top_p: must be in (0, 1], got {p!r}")
        _int("top_k", self.top_k, minimum=-1)
        _int("max_new_tokens", self.max_new_tokens, minimum=1)
        _int("n", self.n, minimum=1)
        if self.seed is not None:
            _int("seed", self.seed, minimum=0)
        stops = self.stop_token_ids
        if not isinstance(stops, tuple) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in stops):
            raise ValueError(f"sampling.stop_token_ids: must be a tuple of token ids >= 0, got {stops!r}")
        return self


def _int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"sampling.{name}: must be an integer >= {minimum}, got {value!r}")


@dataclass
class Sample:
    """One generated response. ``logprobs`` has one entry per ``response_ids`` entry (module docstring)."""

    prompt_index: int  # index into the prompts given to generate
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    weight_version: int | None = None  # the engine's weight_version that generated it (staleness); None: unknown
    # MoE routing replay from the rollout (R3; the SGLang engine with rollout.return_routed_experts): the experts
    # each token was routed to, an integer tensor [len(prompt_ids) + len(response_ids) - 1, layers, top_k] for the
    # sequence positions the engine ran a forward on (all but the last response token); None: not asked for
    routed_experts: Any = None


class RolloutEngine(abc.ABC):
    """A source of samples from the current policy. ``weight_version`` counts ``sync_weights`` calls, so a sample's
    staleness can be told by comparing versions."""

    weight_version: int = 0

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        """``len(prompts) * params.n`` samples, prompt-major (samples of prompt i at ``[i*n, (i+1)*n)``)."""

    def stream_groups(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                      ) -> Iterator[list[tuple[int, list[Sample]]]]:
        """The samples of ``generate`` as batches of groups ``(prompt_index, samples)`` in the order they finish.
        An engine that streams (the SGLang client) yields each batch while the rest still generate; this default,
        for engines that generate in one piece, yields every group in one batch, in prompt order."""
        by_prompt: dict[int, list[Sample]] = {}
        for s in self.generate(prompts, params):
            by_prompt.setdefault(s.prompt_index, []).append(s)
        yield [(i, by_prompt[i]) for i in sorted(by_prompt)]

    @abc.abstractmethod
    def sync_weights(self, source: Any = None) -> None:
        """Make the engine sample from the trainer's current weights; called after each policy update."""

    def close(self) -> None:  # noqa: B027 - optional for engines holding nothing
        """Release what the engine holds (servers, caches). Idempotent."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
