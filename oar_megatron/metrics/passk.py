"""avg@K and unbiased pass@k over K sampled answers per problem (ALGORITHMS.md §3.3).

The papers evaluate each problem with K samples at temperature 0.8 and report two numbers per dataset:

    avg@K  = mean over problems of (c_i / K)                       (mean accuracy of one sample)
    pass@k = mean over problems of 1 − C(K − c_i, k) / C(K, k)     (Chen et al. 2021, HumanEval, eq. 1)

where c_i is the number of correct samples of problem i. The estimator is unbiased for the chance that at least one of
k samples drawn without replacement from the K is correct; pass@1 equals avg@K exactly. The binomial ratio is
computed as the product Π_{i=K−c+1}^{K} (1 − k/i), as in the paper's numpy snippet, so it never forms huge
binomials.
Plain Python; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["pass_at_k", "avg_at_k", "default_ks", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct: 1 − C(n−c, k)/C(n, k)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k: n, c, k must be ints, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: need at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: correct count c={c} outside [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} outside [1, n={n}] (cannot estimate pass@k from fewer than k samples)")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):  # C(n−c, k)/C(n, k) = Π_{i=n−c+1}^{n} (1 − k/i)
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean accuracy over the samples of each problem, averaged over problems (each problem weighs the same)."""
    counts = _check(correct)
    return sum(c / n for n, c in counts) / len(counts)


def default_ks(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``n``, then ``n`` itself: pass@1 ... pass@K."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return tuple(ks)


def summarize(
    correct: Sequence[Sequence[bool]], ks: Iterable[int] | None = None, *, prefix: str = ""
) -> dict[str, float]:
    """``{"avg@K": ..., "pass@k": ... for k in ks}`` for ``correct[problem][sample]`` with K samples per problem.

    Every problem must have the same number of samples K (the papers' convention: K fixed per dataset). ``ks``
    defaults to :func:`default_ks` (1, 2, 4, ..., K); each k must satisfy 1 ≤ k ≤ K. ``prefix`` is prepended to
    every key, e.g. ``prefix="eval/aime24/"`` gives ``eval/aime24/avg@64``.
    """
    counts = _check(correct)
    sizes = {n for n, _ in counts}
    if len(sizes) != 1:
        raise ValueError(f"summarize: problems have different sample counts {sorted(sizes)}; avg@K needs one K")
    (n,) = sizes
    ks = default_ks(n) if ks is None else tuple(ks)
    if not ks:
        raise ValueError("summarize: ks is empty")
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"summarize: k must be an int, got {k!r}")
        if not 1 <= k <= n:
            raise ValueError(f"summarize: pass@{k} needs k in [1, K={n}] (K samples per problem)")
    out = {f"{prefix}avg@{n}": avg_at_k(correct)}
    for k in sorted(set(ks)):
        out[f"{prefix}pass@{k}"] = sum(pass_at_k(n, c, k) for _, c in counts) / len(counts)
    return out


def _check(correct: Sequence[Sequence[bool]]) -> list[tuple[int, int]]:
    """(n, c) per problem, with the shape and value checks every entry point shares."""
    if isinstance(correct, (str, bytes)) or len(correct) == 0:
        raise ValueError("no problems given: expected correct[problem][sample] booleans")
    counts = []
    for i, samples in enumerate(correct):
        if isinstance(samples, (str, bytes)) or not hasattr(samples, "__len__"):
            raise TypeError(f"problem {i}: expected a sequence of booleans, got {type(samples).__name__}")
        if len(samples) == 0:
            raise ValueError(f"problem {i} has no samples")
        c = 0
        for s in samples:
            if s not in (0, 1):  # True/False, 0/1 (also numpy bools)
                raise ValueError(f"problem {i}: sample value {s!r} is not a boolean")
            c += int(bool(s))
        counts.append((len(samples), c))
    return counts
