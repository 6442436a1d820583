"""The saliency probe (``eval.saliency_probe_every``): how well OAR's saliency finds the tokens that decide the
reward, measured during training on the pivot task, where they are known (data/pivot.py).

A fixed probe set of ``eval.saliency_probe_size`` correct pivot-task responses (``PivotTask.probe_examples``: the
same rows for every run, step and algorithm) is scored by the current policy with OAR-G in each P_final mode and
with OAR-P (``PolicyActor.saliency``, the same passes OAR's shaper runs, under any TP / PP layout), and each score is
compared with the known pivots (``algorithms/credit_eval``): ``saliency/<method>_<mode>/precision_at_k`` and
``.../auroc``, next to ``saliency/random/*`` (i.i.d. uniform scores, fixed seed) and ``saliency/uniform/*`` (the
chance level). Logged under phase ``saliency``. Every rank runs the passes (they are collective over TP / PP);
every rank gets the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from ..algorithms.credit_eval import saliency_quality
from ..algorithms.segment import scoring_batch_from_responses, split_responses

__all__ = ["PROBE_METHODS", "SaliencyProbe"]

PROBE_METHODS = (("oar_g", "last"), ("oar_g", "answer_mean"), ("oar_g", "answer_joint"), ("oar_p", "last"))


class SaliencyProbe:
    """See the module docstring. ``task``: a ``PivotTask``; ``size`` probe rows."""

    def __init__(self, task: Any, tokenizer: Any, *, size: int, answer_markers, conclude: str, pad_id: int,
                 methods=PROBE_METHODS):
        if not hasattr(task, "probe_examples"):
            raise ValueError(f"eval.saliency_probe_every: needs a task with known pivotal tokens (data.synthetic.task="
                             f"pivot), got {getattr(task, 'name', task)!r}")
        examples = task.probe_examples(size)
        self.prompts = [p for p, _, _ in examples]
        self.responses = [r for _, r, _ in examples]
        splits = split_responses(self.responses, tokenizer, answer_markers=tuple(answer_markers),
                                 eos_token_ids=tuple(tokenizer.eos_token_ids))
        self.scoring = {w: scoring_batch_from_responses(self.prompts, self.responses, splits, tokenizer,
                                                        pad_id=pad_id, conclude=conclude, with_answers=w)
                        for w in (False, True)}
        width = max(len(r) for r in self.responses)
        self.pivotal = torch.zeros(len(examples), width, dtype=torch.bool)  # response token k of row b is a pivot
        for b, (_, _, pivots) in enumerate(examples):
            self.pivotal[b, pivots] = True
        self.pad_id = pad_id
        self.methods = tuple(methods)

    def measure(self, actor: Any) -> dict[str, float]:
        """One probe: ``saliency/<method>_<mode>/{precision_at_k,auroc}`` and the ``random`` / ``uniform``
        references (computed on the first method's scored tokens: they depend only on the rows)."""
        n = len(self.prompts)
        out: dict[str, float] = {}
        for i, (method, mode) in enumerate(self.methods):
            batch = actor.pack(self.prompts, self.responses, torch.zeros(n), pad_id=self.pad_id,
                               scoring=self.scoring[mode != "last"], row_ids=list(range(n)))
            sal = actor.saliency(batch, method, mode)
            scores, mask = sal.scores.detach().cpu().double(), sal.mask.cpu().bool()
            pivotal = self.pivotal[:, : scores.shape[1]]
            q = saliency_quality(scores, pivotal, mask, generator=torch.Generator().manual_seed(1234))
            out[f"saliency/{method}_{mode}/precision_at_k"] = q["precision_at_k"]
            out[f"saliency/{method}_{mode}/auroc"] = q["auroc"]
            if i == 0:
                for ref in ("random", "uniform"):
                    out[f"saliency/{ref}/precision_at_k"] = q[f"{ref}/precision_at_k"]
                    out[f"saliency/{ref}/auroc"] = q[f"{ref}/auroc"]
                out["saliency/rows"] = q["rows"]
        return out
