"""The in-process rollout engine: samples from the very model chunks the trainer updates (``policy.generate``).

Parameters are shared with the trainer, so ``sync_weights`` copies nothing; it only bumps ``weight_version``.
Randomness is reproducible and resumable: each ``generate`` call draws from a fresh generator on the model's
device (sampling never copies logits to the host) seeded with ``params.seed`` when given, else with a hash of
(engine seed, call counter); ``state_dict()`` holds the counter, the weight version and the seed, so a resumed run
draws what the uninterrupted run would have. Every TP rank builds the same engine with the same seed and returns
the same samples; the seed differs per data-parallel rank, so the state is per rank (the trainer checkpoints it per
rank). A state without ``seed`` (the counters shared by every rank) loads into an engine of any seed: after a change
of data-parallel layout each new rank continues the shared counters with its own stream.

Megatron is imported on the first ``generate`` call, not when this module is imported.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from .base import RolloutEngine, Sample, SamplingParams

__all__ = ["LocalEngine"]


class LocalEngine(RolloutEngine):
    """Sample from ``model_chunks`` (one ``GPTModel`` chunk, possibly DDP-wrapped, or a list holding one) in this
    process. See ``policy.generate.generate`` for the sampling rules; ``last_stats`` times the latest call."""

    def __init__(self, model_chunks: torch.nn.Module | Sequence[torch.nn.Module], *, vocab_size: int,
                 tp_group: Any = None, max_batch_size: int = 64, pad_id: int = 0, seed: int = 0):
        from ..policy.generate import PP_ERROR

        chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
        if len(chunks) != 1:
            raise ValueError(f"model_chunks: got {len(chunks)} chunks (virtual pipeline stages); {PP_ERROR}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
        self.model = chunks[0]
        self.vocab_size = vocab_size
        self.tp_group = tp_group
        self.max_batch_size = max_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.calls = 0  # generate calls so far (the seed stream position)
        self.weight_version = 0
        self.last_stats: dict[str, float] = {}
        self._closed = False

    def _generator(self, params: SamplingParams) -> torch.Generator:
        if params.seed is not None:
            seed = params.seed
        else:  # a well-mixed 63-bit seed per (engine seed, call): no overlap between calls or between engines
            digest = hashlib.blake2b(f"oar-rollout:{self.seed}:{self.calls}".encode(), digest_size=8).digest()
            seed = int.from_bytes(digest, "little") >> 1
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(seed)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        from ..policy.generate import generate

        if self._closed:
            raise RuntimeError("LocalEngine: generate called after close()")
        params = params.validate()
        generator = self._generator(params)
        self.calls += 1
        start = time.perf_counter()
        samples = generate(self.model, prompts, params, vocab_size=self.vocab_size, generator=generator,
                           tp_group=self.tp_group, max_batch_size=self.max_batch_size, pad_id=self.pad_id)
        seconds = time.perf_counter() - start
        for s in samples:
            s.weight_version = self.weight_version
        tokens = sum(len(s.response_ids) for s in samples)
        self.last_stats = {"samples": float(len(samples)), "tokens": float(tokens), "seconds": seconds,
                           "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
                           "weight_version": float(self.weight_version)}
        return samples

    def sync_weights(self, source: Any = None) -> None:
        """The trainer's parameters are this engine's: nothing to copy (``source`` is accepted for interface parity
        and ignored). Bumps ``weight_version``."""
        self.weight_version += 1

    def close(self) -> None:
        self._closed = True

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "weight_version": self.weight_version, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters; a ``seed`` in ``state`` must be this engine's (module docstring)."""
        missing = {"calls", "weight_version"} - set(state)
        if missing:
            raise ValueError(f"state: missing key {sorted(missing)[0]!r} (expected calls, weight_version)")
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"state.seed: checkpoint was written with seed {state['seed']}, engine has {self.seed}")
        self.calls = int(state["calls"])
        self.weight_version = int(state["weight_version"])
