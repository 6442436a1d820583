"""``math``: a 0/1 reward from ``math-verify`` (LaTeX / boxed answers), which parses and never evaluates model output.

The gold answer is wrapped as ``\\boxed{...}`` unless it already contains one, so plain ground truths such as
``1/2`` or ``\\frac{\\sqrt{3}}{2}`` parse as LaTeX. From the response only the LAST ``\\boxed{}`` is parsed when
there is one (the same answer span OAR's segmentation uses; math-verify alone would take the first box), else the
whole response (math-verify then looks for the final expression). math-verify's own signal-based timeouts only
work in a main thread; elsewhere they are switched off and the caller (``RewardRunner``, isolated) enforces the
limit.
"""

from __future__ import annotations

import threading

from .registry import register_reward

_TIMEOUT_S = 5


def _gold_text(answer: str) -> str:
    answer = answer.strip()
    if "\\boxed" in answer:
        return answer
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$")
    return f"\\boxed{{{answer}}}"


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (braces balanced; the rest of the text if unclosed), or None.

    The same rule as ``algorithms.segment.extract_boxed`` (tests/rewards check they agree), kept here so that reward
    worker processes do not import torch (seconds per worker, paid again whenever a timed-out pool is replaced).
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 1
    for j in range(start + len("\\boxed{"), len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"):j]
    return text[start + len("\\boxed{"):]


@register_reward("math")
def math_reward(response: str, answer: str, **meta) -> float:
    """1.0 if math-verify finds the response's final answer equal to ``answer``, else 0.0."""
    from math_verify import parse, verify

    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = parse(_gold_text(answer), parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math: the reference answer {answer!r:.80} does not parse")
    boxed = last_boxed(response)
    pred = parse(response if boxed is None else f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0


def _warmup() -> None:
    import math_verify  # noqa: F401  (sympy and the LaTeX grammar load lazily; pay for it before the clock runs)

    math_reward("\\boxed{1}", "1")


math_reward.warmup = _warmup
