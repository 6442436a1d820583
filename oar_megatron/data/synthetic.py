"""The built-in verifiable task the embedded default trains on: "modsum" over a character vocabulary.

Prompt ``"{a}+{b}="`` with a, b uniform in 0..base-1; the answer is ``str((a + b) % base)``. A response is

    <reasoning chars> '#' <answer digit> <eos>

the reasoning is free characters (scratch letters a..h and digits), the answer is the text after the LAST '#'.
``conclude = "#"`` and ``answer_markers = ("#",)`` are what OAR's segmentation and scoring sequences use
(``split_responses(..., answer_markers=task.answer_markers)``, ``build_scoring_batch(..., conclude=task.conclude)``).

Vocabulary (ids fixed; 24 in all): ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, "0".."9"=3..12, "+"=13, "="=14, "#"=15,
"a".."h"=16..23. Prompt ids are ``[bos] + encode(prompt)``.

``format_examples`` produces responses of the right FORMAT with a random answer digit, to teach a tiny policy the
shape of a response before RL (the analogue of starting RL from a pretrained model) without teaching the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .tokenizer import Tokenizer

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
DIGITS = tuple("0123456789")
SCRATCH = tuple("abcdefgh")
CHARS: tuple[str, ...] = DIGITS + ("+", "=", "#") + SCRATCH
VOCAB: dict[str, int] = {PAD: 0, BOS: 1, EOS: 2, **{c: 3 + k for k, c in enumerate(CHARS)}}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
REASONING_CHARS: tuple[str, ...] = SCRATCH  # letters only: a digit in the response is the answer


def char_tokenizer() -> Tokenizer:
    """The task's tokenizer: WordLevel over single characters (``tokenizers``; built in code, no files)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer(models.WordLevel(dict(VOCAB)))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()  # concatenate characters (WordLevel's default decoder joins with spaces)
    raw.add_special_tokens([PAD, BOS, EOS])
    return Tokenizer(raw, eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID, bos_token_id=BOS_ID, name="synthetic")


@dataclass
class SyntheticTask:
    """modsum: ``size`` prompts ``"{a}+{b}="`` drawn with ``seed``; answer ``(a + b) % base``.

    Args:
        base: 2..10; the answer is one digit.
        reasoning_len: reasoning characters in ``format_examples`` responses.
        size: rows in the dataset (prompts repeat: there are only base² distinct ones).
        seed: the rows are a function of (base, size, seed).
    """

    base: int = 3
    reasoning_len: int = 4
    size: int = 512
    seed: int = 0

    name: ClassVar[str] = "modsum"
    conclude: ClassVar[str] = "#"
    answer_markers: ClassVar[tuple[str, ...]] = ("#",)

    def __post_init__(self):
        for field, lo, hi in (("base", 2, 10), ("reasoning_len", 0, None), ("size", 1, None)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"SyntheticTask.{field}: expected an int in [{lo}, {hi or 'inf'}], got {v!r}")
        self.tokenizer = char_tokenizer()

    @property
    def response_len(self) -> int:
        """Tokens in a well-formed ``format_examples`` response: reasoning, '#', digit, eos."""
        return self.reasoning_len + 3

    @staticmethod
    def prompt_text(a: int, b: int) -> str:
        return f"{a}+{b}="

    def answer(self, a: int, b: int) -> str:
        return str((a + b) % self.base)

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.prompt_ids(text, chat=False)

    def rows(self) -> list[dict]:
        """The dataset rows, in the schema of a file dataset: ``{"prompt", "answer", "a", "b"}``."""
        g = torch.Generator().manual_seed(self.seed)
        ab = torch.randint(0, self.base, (self.size, 2), generator=g).tolist()
        return [{"prompt": self.prompt_text(a, b), "answer": self.answer(a, b), "a": a, "b": b} for a, b in ab]

    def format_examples(self, n: int, generator: torch.Generator | None = None) -> list[tuple[list[int], list[int]]]:
        """``n`` (prompt_ids, response_ids) pairs: random prompt, ``reasoning_len`` random reasoning chars, '#',
        a RANDOM digit in 0..base-1 (not the answer), eos."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        ab = torch.randint(0, self.base, (n, 2), generator=g).tolist()
        reasoning = torch.randint(0, len(REASONING_CHARS), (n, self.reasoning_len), generator=g).tolist()
        digits = torch.randint(0, self.base, (n,), generator=g).tolist()
        out = []
        for (a, b), chars, d in zip(ab, reasoning, digits):
            text = "".join(REASONING_CHARS[c] for c in chars) + self.conclude + str(d)
            out.append((self.prompt_ids(self.prompt_text(a, b)), self.tokenizer.encode(text) + [EOS_ID]))
        return out
