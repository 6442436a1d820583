"""How well token saliency finds the tokens that decide the reward, when those are known (the pivot task).

Per row, over the scored tokens (``mask``), with ``pivotal`` the known deciding tokens:

* ``precision_at_k``: the share of the k highest-scored tokens that are pivotal, k = the row's number of pivotal
  tokens (R-precision; Manning, Raghavan & Schütze, *Introduction to Information Retrieval*, 2008, §8.4). Ties at the
  k-th score are broken at random *in expectation*: tokens tied at the threshold count fractionally, so constant
  scores give exactly k / n (the chance level) and the value never depends on sort order.
* ``auroc``: the probability that a random pivotal token outscores a random non-pivotal one, ties counting 1/2 —
  the Mann–Whitney U statistic divided by n_pos · n_neg (Hanley & McNeil 1982, eq. 1 and §II). Chance is 0.5, a
  perfect ranking 1.0, a reversed one (a sign bug) 0.0.

Rows with no pivotal or no non-pivotal scored token are undefined (NaN) and left out of the means of
:func:`saliency_quality`. Pure torch, no Megatron; scores are taken as given (raw, before OAR's reshaping).
"""

from __future__ import annotations

import torch

from ._validate import check_tensor

__all__ = ["precision_at_k", "saliency_auroc", "saliency_quality"]


def _check(scores: torch.Tensor, pivotal: torch.Tensor, mask: torch.Tensor) -> None:
    check_tensor("scores", scores, ndim=2)
    for name, t in (("pivotal", pivotal), ("mask", mask)):
        check_tensor(name, t, ndim=2)
        if t.shape != scores.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != scores {tuple(scores.shape)}")


def precision_at_k(scores: torch.Tensor, pivotal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R-precision per row (module docstring). scores: [B, T] float; pivotal, mask: [B, T] bool. Returns [B] float64
    (NaN for a row without pivotal tokens among its scored ones)."""
    _check(scores, pivotal, mask)
    out = torch.full((scores.shape[0],), float("nan"), dtype=torch.float64)
    for b in range(scores.shape[0]):
        m = mask[b].bool()
        s, p = scores[b][m].double(), pivotal[b][m].bool()
        k = int(p.sum())
        if k == 0:
            continue
        tau = torch.topk(s, k).values[-1]  # the k-th highest score
        above, tied = s > tau, s == tau
        slots = k - int(above.sum())  # places in the top k left for the tied tokens
        hits = float((above & p).sum()) + slots * float((tied & p).sum()) / float(tied.sum())
        out[b] = hits / k
    return out


def saliency_auroc(scores: torch.Tensor, pivotal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """AUROC per row (module docstring): mean over (pivotal, non-pivotal) pairs of [s_p > s_n] + ½[s_p = s_n].
    scores: [B, T]; pivotal, mask: [B, T] bool. Returns [B] float64 (NaN when a class is empty)."""
    _check(scores, pivotal, mask)
    out = torch.full((scores.shape[0],), float("nan"), dtype=torch.float64)
    for b in range(scores.shape[0]):
        m = mask[b].bool()
        s, p = scores[b][m].double(), pivotal[b][m].bool()
        pos, neg = s[p], s[~p]
        if pos.numel() == 0 or neg.numel() == 0:
            continue
        diff = pos[:, None] - neg[None, :]
        out[b] = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    return out


def saliency_quality(scores: torch.Tensor, pivotal: torch.Tensor, mask: torch.Tensor, *,
                     generator: torch.Generator | None = None) -> dict[str, float]:
    """Batch means of precision@k and AUROC for ``scores``, and for two references on the same rows: ``random``
    (i.i.d. uniform scores from ``generator``) and ``uniform`` (constant scores: exactly the chance level).
    Keys: ``precision_at_k``, ``auroc``, ``random/precision_at_k``, ``random/auroc``, ``uniform/precision_at_k``,
    ``uniform/auroc``, ``rows`` (rows where both are defined)."""
    _check(scores, pivotal, mask)
    rand = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
    const = torch.zeros(scores.shape, dtype=torch.float64)
    out: dict[str, float] = {}
    defined = None
    for prefix, s in (("", scores), ("random/", rand), ("uniform/", const)):
        prec, auc = precision_at_k(s, pivotal, mask), saliency_auroc(s, pivotal, mask)
        ok = ~(prec.isnan() | auc.isnan())
        defined = ok if defined is None else defined
        out[f"{prefix}precision_at_k"] = float(prec[ok].mean()) if ok.any() else float("nan")
        out[f"{prefix}auroc"] = float(auc[ok].mean()) if ok.any() else float("nan")
    out["rows"] = float(defined.sum())
    return out
