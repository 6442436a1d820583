"""avg@K and unbiased pass@k (Chen et al. 2021, eq. 1) against hand-computed values and their identities."""

import itertools
import math
import random

import pytest

from oar_megatron.metrics import avg_at_k, default_ks, pass_at_k, summarize


def _brute_pass_at_k(samples, k):
    """Fraction of k-subsets holding at least one correct sample (the quantity the estimator is unbiased for)."""
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(3, 2, 2) == 1.0  # n − c < k: every pair holds a correct one


def test_edges():
    for n in (1, 4, 64):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0


def test_matches_subset_enumeration():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 8)
        samples = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(samples), k) == pytest.approx(_brute_pass_at_k(samples, k))


def test_large_n_stable():
    # C(1024, 512) overflows a float; the product form does not.
    value = pass_at_k(1024, 3, 512)
    assert 0.0 < value < 1.0 and value == pytest.approx(1 - math.comb(1021, 512) / math.comb(1024, 512))


def test_pass1_equals_avg_and_monotonic():
    rng = random.Random(1)
    correct = [[rng.random() < p for _ in range(16)] for p in (0.0, 0.1, 0.5, 0.9, 1.0, 0.3)]
    out = summarize(correct)
    assert list(out) == ["avg@16", "pass@1", "pass@2", "pass@4", "pass@8", "pass@16"]
    assert out["pass@1"] == pytest.approx(out["avg@16"]) == pytest.approx(avg_at_k(correct))
    values = [out[f"pass@{k}"] for k in (1, 2, 4, 8, 16)]
    assert values == sorted(values)
    all_k = [summarize(correct, range(1, 17))[f"pass@{k}"] for k in range(1, 17)]
    assert all(a <= b + 1e-12 for a, b in zip(all_k, all_k[1:]))


def test_summarize_values_and_prefix():
    correct = [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    out = summarize(correct, ks=(2, 1), prefix="eval/toy/")
    assert out == pytest.approx({"eval/toy/avg@5": (0.4 + 0 + 1) / 3, "eval/toy/pass@1": (0.4 + 0 + 1) / 3,
                                 "eval/toy/pass@2": (0.7 + 0 + 1) / 3})
    assert list(out) == ["eval/toy/avg@5", "eval/toy/pass@1", "eval/toy/pass@2"]


def test_default_ks():
    assert default_ks(1) == (1,)
    assert default_ks(8) == (1, 2, 4, 8)
    assert default_ks(12) == (1, 2, 4, 8, 12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pass_at_k(4, 1, 5), "k=5 outside"),
        (lambda: pass_at_k(4, 1, 0), "k=0 outside"),
        (lambda: pass_at_k(4, 5, 1), "c=5 outside"),
        (lambda: pass_at_k(0, 0, 1), "at least one sample"),
        (lambda: summarize([[True, False]], ks=(4,)), r"pass@4 needs k in \[1, K=2\]"),
        (lambda: summarize([[True, False], [True]]), "different sample counts"),
        (lambda: summarize([]), "no problems"),
        (lambda: summarize([[]]), "problem 0 has no samples"),
        (lambda: summarize([[True, 0.5]]), "not a boolean"),
        (lambda: summarize([[True]], ks=()), "ks is empty"),
    ],
)
def test_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()
