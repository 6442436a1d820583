"""Cheap string rewards: ``synthetic_modsum`` and ``synthetic_pivot`` (the built-in tasks) and ``exact``."""

from __future__ import annotations

from .registry import register_reward


@register_reward("synthetic_modsum")
def synthetic_modsum(response: str, answer: str, **meta) -> float:
    """1.0 if the text after the LAST '#' (stripped; a literal trailing ``<eos>`` ignored) equals ``answer``."""
    if "#" not in response:
        return 0.0
    tail = response.rsplit("#", 1)[1].split("<eos>", 1)[0].strip()
    return 1.0 if tail == answer.strip() else 0.0


@register_reward("exact")
def exact(response: str, answer: str, **meta) -> float:
    """1.0 if the stripped response equals the stripped answer."""
    return 1.0 if response.strip() == answer.strip() else 0.0


@register_reward("synthetic_pivot")
def synthetic_pivot(response: str, answer: str, min_reasoning: int = 0, **meta) -> float:
    """The pivot task (``data/pivot.py``): ``answer`` is the trace as digits (``"21"``). 1.0 if the digits of the
    reasoning (before the LAST '#') are exactly the trace, the text after it (a trailing ``<eos>`` ignored) is the
    trace's last digit, and the reasoning has at least ``min_reasoning`` characters (the row's meta: trace + filler,
    so responses stay long); letters anywhere in the reasoning are free."""
    if "#" not in response or not answer:
        return 0.0
    reasoning, tail = response.rsplit("#", 1)
    tail = tail.split("<eos>", 1)[0].strip()
    trace = "".join(ch for ch in reasoning if ch.isdigit())
    ok = trace == answer.strip() and tail == answer.strip()[-1] and len(reasoning) >= int(min_reasoning)
    return 1.0 if ok else 0.0
