"""The credit-assignment task: long responses in which a few known tokens decide the reward ("pivot").

Prompt ``"{a}+{b}="`` (``pivots=1``) or ``"{a}+{b}+{c}="`` (``pivots=2``), digits in ``0..base-1``. The worked trace
is ``p1 = (a+b) mod base`` (and ``p2 = (p1+c) mod base``); the answer is the last of them. A response is

    <trace digits> <filler letters> '#' <answer digit> <eos>

e.g. ``"2cadhbfgeah...bd#2"``. The verifier (reward ``synthetic_pivot``) is exact: 1 when the digits of the reasoning
(the text before the last '#') are exactly the trace, the answer equals its last value and the reasoning is at least
``pivots + filler_len`` characters long (without that rule GRPO shortens the filler: measured 66 → 23 tokens in 60
steps), else 0. So by
construction the **pivotal** tokens of any response are the digit tokens of its reasoning: they alone decide the
reward; the ``filler_len`` letters around them (64 by default) are free and decide nothing. GRPO hands every token
of a response the same advantage; a credit-assignment method should put it on the pivots
(:func:`pivotal_mask`; the saliency probe measures how well OAR's saliency finds them, ``algorithms/credit_eval``).

Same character vocabulary, tokenizer, ``conclude = "#"`` and answer marker as the modsum task
(``data/synthetic.py``), so OAR segments and scores responses the same way. ``format_examples`` teaches the format
before RL: the right number of trace digits with RANDOM values, the filler, '#', and the last digit copied as the
answer — the policy learns to write a trace, ramble and copy the trace's result; RL must make the trace right. (The
trace opens the response because a 2-layer tiny model does not learn, in a short warm-up, to place exactly one digit
at a random position of a 64-letter filler: measured, 300 warm-up steps left 0-2 digits per response. The pivots'
position is fixed, their value decides everything, and nothing in OAR's saliency knows where they are.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .synthetic import DIGITS, EOS_ID, REASONING_CHARS, VOCAB, char_tokenizer

__all__ = ["PivotTask", "pivotal_mask"]

_DIGIT_IDS = frozenset(VOCAB[d] for d in DIGITS)
_HASH_ID = VOCAB["#"]


def pivotal_mask(response_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which response tokens are pivots: the digit tokens before the row's LAST '#' (the reasoning's trace digits).

    Args:
        response_ids: [B, T] token ids of responses.
        mask: [B, T] bool, the valid response tokens (None: all).
    Returns:
        [B, T] bool.
    """
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids: expected [B, T], got shape {tuple(response_ids.shape)}")
    valid = torch.ones_like(response_ids, dtype=torch.bool) if mask is None else mask.bool()
    is_hash = (response_ids == _HASH_ID) & valid
    t = torch.arange(response_ids.shape[1], device=response_ids.device)
    last_hash = torch.where(is_hash, t, torch.full_like(t, -1)).amax(dim=1, keepdim=True)  # -1: no '#'
    is_digit = torch.zeros_like(valid)
    for d in _DIGIT_IDS:
        is_digit |= response_ids == d
    return is_digit & valid & (t < last_hash)


@dataclass
class PivotTask:
    """See the module docstring.

    Args:
        base: 2..10, the digits' range.
        pivots: 1 or 2 trace steps (the answer is the last).
        filler_len: letters around the trace in ``format_examples`` / ``probe_examples`` responses (>= 0; the
            responses are ``filler_len + pivots + 3`` tokens long).
        size: rows in the dataset.
        seed: the rows are a function of (base, pivots, size, seed).
    """

    base: int = 3
    pivots: int = 1
    filler_len: int = 64
    size: int = 512
    seed: int = 0

    name: ClassVar[str] = "pivot"
    conclude: ClassVar[str] = "#"
    answer_markers: ClassVar[tuple[str, ...]] = ("#",)

    def __post_init__(self):
        for field, lo, hi in (("base", 2, 10), ("pivots", 1, 2), ("filler_len", 0, None), ("size", 1, None)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"PivotTask.{field}: expected an int in [{lo}, {hi or 'inf'}], got {v!r}")
        self.tokenizer = char_tokenizer()

    @property
    def response_len(self) -> int:
        """Tokens in a well-formed response: filler, trace digits, '#', answer digit, eos."""
        return self.filler_len + self.pivots + 3

    def trace(self, operands: list[int]) -> list[int]:
        """The worked trace: p1 = (a+b) mod base, then p2 = (p1+c) mod base."""
        p = (operands[0] + operands[1]) % self.base
        out = [p]
        for c in operands[2:]:
            p = (p + c) % self.base
            out.append(p)
        return out

    def prompt_text(self, operands: list[int]) -> str:
        return "+".join(str(x) for x in operands) + "="

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.prompt_ids(text, chat=False)

    def _operands(self, n: int, g: torch.Generator) -> list[list[int]]:
        return torch.randint(0, self.base, (n, self.pivots + 1), generator=g).tolist()

    def rows(self) -> list[dict]:
        """The dataset rows: ``{"prompt", "answer", "min_reasoning"}``: ``answer`` is the trace as digits (``"21"``:
        p1 = 2, p2 = 1; the final answer is its last digit) and ``min_reasoning`` = pivots + filler_len, the shortest
        reasoning ``synthetic_pivot`` accepts (it gets both; the response must stay long)."""
        g = torch.Generator().manual_seed(self.seed)
        return [{"prompt": self.prompt_text(ops), "answer": "".join(map(str, self.trace(ops))),
                 "min_reasoning": self.pivots + self.filler_len} for ops in self._operands(self.size, g)]

    def _response(self, digits: list[int], g: torch.Generator) -> tuple[list[int], list[int]]:
        """Response ids (the trace digits, ``filler_len`` random letters, '#', the last digit, eos) and the
        positions of the trace digits."""
        filler = torch.randint(0, len(REASONING_CHARS), (self.filler_len,), generator=g).tolist()
        text = "".join(map(str, digits)) + "".join(REASONING_CHARS[c] for c in filler) + self.conclude + str(digits[-1])
        return self.tokenizer.encode(text) + [EOS_ID], list(range(len(digits)))

    def format_examples(self, n: int, generator: torch.Generator | None = None) -> list[tuple[list[int], list[int]]]:
        """``n`` (prompt_ids, response_ids) pairs of the right FORMAT: random prompt, a trace of RANDOM digits,
        ``filler_len`` letters, '#', the last trace digit copied; the arithmetic is left to RL."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        out = []
        for ops in self._operands(n, g):
            digits = torch.randint(0, self.base, (self.pivots,), generator=g).tolist()
            out.append((self.prompt_ids(self.prompt_text(ops)), self._response(digits, g)[0]))
        return out

    def probe_examples(self, n: int, seed: int = 12345) -> list[tuple[list[int], list[int], list[int]]]:
        """A fixed probe set for the saliency metrics: ``n`` (prompt_ids, response_ids, pivot positions) with the
        CORRECT trace and answer (reward 1), drawn from ``seed`` only, so every run and step scores the same rows."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for ops in self._operands(n, g):
            ids, pivots = self._response(self.trace(ops), g)
            out.append((self.prompt_ids(self.prompt_text(ops)), ids, pivots))
        return out
