"""Cheap string rewards: ``synthetic_modsum`` (the built-in task) and ``exact``."""

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
