"""Overlapped passes: π_old, reference and OAR saliency of the groups that have finished generating, computed while
the rest still generate (SGLang servers on their own devices leave the trainer's ranks idle during rollouts).

The trainer feeds :meth:`OverlapPasses.add` every batch of groups the engine streams (``stream_groups``) that may be
trained on (scored, and past the dynamic-sampling filter: informative, while the step still lacks informative
groups); each call runs the passes on the groups it can (a multiple of the micro-batch size in rows; the rest wait
for the next batch) and keeps the results per group. :meth:`OverlapPasses.fill` then completes the step's chosen
groups — passes for any group not computed yet (a group the filter let through late, or a remainder) — and writes
the results into the full training batch: ``ref_logp``, ``old_logp``, the rollout-correction weights (recomputed on
the full batch) and the saliency for ``PolicyActor.compute_token_advantages``.

Same results as without overlap: the passes are per row (no term mixes rows: log-probs, per-row OAR noise seeded by
the row id, which names the sample, not its position in the batch), run on the same weights (no update happens
during the rollout), so only the batch shapes differ (row padding, rows per pass): fp32 agrees to rounding
(tests/trainer/test_overlap.py). A group computed but not chosen (dynamic sampling took enough earlier groups) costs
its passes and nothing else.

Not with expert parallelism (the EP all-to-all spans data-parallel ranks whose groups finish at different times) or
MoE routing replay (routes are recorded per micro-batch of the step's batch): the trainer refuses
``rollout.overlap: true`` there. No Megatron import: the actor runs the passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..algorithms.saliency import Saliency
from .experience import Group

__all__ = ["OverlapPasses"]


@dataclass
class _Rows:
    """One group's pass results: [n, L_c] log-probs (None off the last pipeline stage / without a reference) and
    [n, W_c] saliency scores and mask (None without the OAR shaper); widths are those of the pass's batch."""

    size: int
    ref_logp: torch.Tensor | None
    old_logp: torch.Tensor | None
    scores: torch.Tensor | None
    score_mask: torch.Tensor | None


class OverlapPasses:
    """Per-step store of pass results (module docstring). ``pack(groups)`` builds the training rows of ``groups``
    (the trainer's own packing: prompts, responses, rollout log-probs, OAR scoring sequences, row ids), so a group's
    rows are the same here and in the step's batch."""

    def __init__(self, actor, pack: Callable[[Sequence[Group]], object], *, micro_batch_size: int,
                 saliency: bool) -> None:
        self.actor = actor
        self.pack = pack
        self.mbs = int(micro_batch_size)
        self.with_saliency = bool(saliency)
        self.done: dict[int, _Rows] = {}  # keyed by the group's first row id
        self.pending: list[Group] = []
        self.passes = 0  # pass batches run (overlapped and in fill)
        self.overlapped: set[int] = set()  # groups (first row id) whose passes ran in add(), during the rollout
        self.stats: dict[str, float] = {}  # fill(): rollout/overlap_frac, rollout/overlap_unused_rows

    def add(self, groups: Sequence[Group]) -> None:
        """Run the passes on the longest prefix of the waiting groups whose rows fill whole micro-batches."""
        self.pending += [g for g in groups if g.row_ids[0] not in self.done]
        rows, take = 0, 0
        for i, g in enumerate(self.pending):
            rows += len(g.responses)
            if rows % self.mbs == 0:
                take = i + 1
        if take:
            now, self.pending = self.pending[:take], self.pending[take:]
            self._run(now)
            self.overlapped.update(g.row_ids[0] for g in now)

    def _run(self, groups: Sequence[Group]) -> None:
        batch = self.pack(groups)
        self.actor.compute_ref_logprobs(batch)
        self.actor.compute_old_logprobs(batch)
        sal = self.actor.saliency(batch) if self.with_saliency else None
        self.passes += 1
        start = 0
        for g in groups:
            sl = slice(start, start + len(g.responses))
            start = sl.stop
            self.done[g.row_ids[0]] = _Rows(
                len(g.responses), None if batch.ref_logp is None else batch.ref_logp[sl],
                None if batch.old_logp is None else batch.old_logp[sl],
                None if sal is None else sal.scores[sl].cpu(), None if sal is None else sal.mask[sl].cpu())

    def fill(self, batch, groups: Sequence[Group]) -> Saliency | None:
        """Complete the passes of ``groups`` (the step's chosen groups, the rows of ``batch`` in order) and write
        them into ``batch``; returns the rows' saliency (None without the OAR shaper). ``stats``: the fraction of
        the batch's rows whose passes ran during the rollout and the rows computed there but not chosen."""
        missing = [g for g in groups if g.row_ids[0] not in self.done]
        rows = sum(len(g.responses) for g in missing)
        extra = [g for g in groups if g.row_ids[0] in self.done]
        while rows % self.mbs and extra:  # whole micro-batches: recompute as few computed groups as needed
            g = extra.pop()
            missing.append(g)
            rows += len(g.responses)
        chosen = {g.row_ids[0]: len(g.responses) for g in groups}
        early = sum(chosen[k] for k in self.overlapped if k in chosen) - sum(
            len(g.responses) for g in missing if g.row_ids[0] in self.overlapped)
        unused = sum(self.done[k].size for k in self.overlapped if k not in chosen)
        self.stats = {"rollout/overlap_frac": early / max(batch.size, 1), "rollout/overlap_unused_rows": float(unused)}
        if missing:
            self._run(missing)
        parts = [self.done[g.row_ids[0]] for g in groups]
        n, width = batch.input_ids.shape
        if batch.size != sum(len(g.responses) for g in groups):
            raise ValueError(f"overlap: batch of {batch.size} rows for groups of "
                             f"{sum(len(g.responses) for g in groups)}")

        def rows_of(name: str, cols: int, dtype) -> torch.Tensor | None:
            got = [getattr(p, name) for p in parts]
            if any(t is None for t in got):
                return None
            out = torch.zeros(n, cols, dtype=dtype)
            r = 0
            for t in got:
                w = min(cols, t.shape[1])
                out[r:r + t.shape[0], :w] = t[:, :w]
                r += t.shape[0]
            return out

        batch.ref_logp = rows_of("ref_logp", width, torch.float32)
        batch.old_logp = rows_of("old_logp", width, torch.float32)
        self.actor.compute_rollout_weights(batch)
        if not self.with_saliency:
            return None
        cols = max(p.scores.shape[1] for p in parts)
        scores, mask = rows_of("scores", cols, torch.float32), rows_of("score_mask", cols, torch.bool)
        return Saliency(scores, mask)
