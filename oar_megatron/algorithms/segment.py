"""Response segmentation for OAR and the scoring sequences built from it (ALGORITHMS.md §1.2, §5.1, §5.2).

A response is ``reasoning | answer span | EOS``. OAR scores only the reasoning tokens; the answer span and EOS
keep weight 1 and are not part of the Σw = R renormalisation (§5.1). The reasoning is always a prefix of the
response, so reasoning token k *is* response position k: scores and weights need no re-alignment.

Everything works on the generated token ids, never on re-tokenised text: the tokenizer is only asked to
``decode`` (any object with ``decode(ids)``: ``tokenizers.Tokenizer``, HF ``PreTrainedTokenizerFast``, ...), and,
for building scoring sequences, to ``encode`` the fixed template strings.

Scoring sequence (§1.2, §5.2), one per response, token ids:

    prompt (intro + question + bridge) | reasoning (the response's own ids) | conclude | [answer]

``conclude`` is a fixed string that elicits the answer, by default ``"\\n\\nTherefore, the final answer is
\\\\boxed{"`` [I]; P_final ``last`` is the next-token distribution at its final token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._validate import check_int, check_tensor

DEFAULT_ANSWER_MARKERS: tuple[str, ...] = ("</think>", "\\boxed{")
DEFAULT_CONCLUDE = "\n\nTherefore, the final answer is \\boxed{"


# --------------------------------------------------------------------------------------- tokenizer adapters


def decode_ids(tokenizer: Any, ids: Sequence[int]) -> str:
    """``tokenizer.decode(ids)`` keeping special tokens (``</think>`` is special in most thinking models, and
    ``tokenizers.Tokenizer.decode`` drops special tokens by default)."""
    ids = [int(i) for i in ids]
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except TypeError:  # a minimal tokenizer with decode(ids) only
        return tokenizer.decode(ids)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS/EOS), for ``tokenizers.Tokenizer`` (returns an
    ``Encoding``) and HF tokenizers (return a list) alike."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    if not hasattr(tokenizer, "encode"):
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no encode(text)")
    out = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in getattr(out, "ids", out)]


# -------------------------------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class ResponseSplit:
    """Where one response splits (token indices into the response, half-open ranges).

    reasoning_len: tokens [0, reasoning_len) are the scored reasoning.
    answer_start, answer_end: the answer span [answer_start, answer_end), from the token holding the first
        character of the final answer marker to the first EOS (or the end); empty when no marker was found.
    content_len: index of the first EOS token (or the length): EOS and anything after it are never scored.
    marker: the marker that split the response, or None.
    answer_text: the extracted final answer: the contents of the last ``\\boxed{...}`` from the marker on (braces
        balanced; the rest of the text if unclosed), else the stripped text after the marker; "" without a marker.
    """

    reasoning_len: int
    answer_start: int
    answer_end: int
    content_len: int
    marker: str | None
    answer_text: str


def extract_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` in ``text`` with balanced braces (the rest of the text when the box
    is never closed), or None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return text[i:]


def _as_id_list(name: str, ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
        ids = ids.tolist()
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        raise ValueError(f"{name}: expected a sequence of token ids, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{name}: token ids must be non-negative ints, got {i!r}")
        out.append(i)
    return out


def _check_markers(answer_markers: Any) -> tuple[str, ...]:
    if isinstance(answer_markers, str) or not isinstance(answer_markers, Sequence) or not answer_markers:
        raise ValueError(f"answer_markers: expected a non-empty sequence of strings, got {answer_markers!r}")
    if not all(isinstance(m, str) and m for m in answer_markers):
        raise ValueError(f"answer_markers: every marker must be a non-empty string, got {answer_markers!r}")
    return tuple(answer_markers)


def _check_eos(eos_token_ids: Any) -> frozenset[int]:
    if isinstance(eos_token_ids, int) and not isinstance(eos_token_ids, bool):
        eos_token_ids = (eos_token_ids,)
    if not isinstance(eos_token_ids, (Sequence, set, frozenset)) or isinstance(eos_token_ids, str):
        raise ValueError(f"eos_token_ids: expected an int or a collection of ints, got {eos_token_ids!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_token_ids):
        raise ValueError(f"eos_token_ids: token ids must be non-negative ints, got {eos_token_ids!r}")
    return frozenset(eos_token_ids)


def _marker_token(tokenizer: Any, ids: list[int], marker: str) -> int:
    """Index of the token holding the first character of the LAST occurrence of ``marker`` in decode(ids), or -1.

    The largest k with ``marker in decode(ids[k:])``, by bisection (O(log n) decodes). Decoding suffixes rather than
    prefixes keeps this right for markers that straddle token boundaries or start inside a token, and it only
    assumes that decoding a suffix reproduces the text of that suffix apart from its first character.
    """
    if marker not in decode_ids(tokenizer, ids):
        return -1
    lo, hi = 0, len(ids) - 1  # invariant: marker in decode(ids[lo:]); answer ≤ hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if marker in decode_ids(tokenizer, ids[mid:]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_response(
    response_ids: Sequence[int] | torch.Tensor,
    tokenizer: Any,
    *,
    answer_markers: Sequence[str] = DEFAULT_ANSWER_MARKERS,
    eos_token_ids: int | Sequence[int] = (),
    score_unmarked: bool = True,
) -> ResponseSplit:
    """Split one response into scored reasoning and the final-answer span (ALGORITHMS.md §5.1).

    The content is the response up to its first EOS token. The first marker of ``answer_markers`` that occurs in
    the content decides the split, at its LAST occurrence: by default ``</think>`` (thinking models: the reasoning
    is the thought, even when it contains ``\\boxed{}``), else the last ``\\boxed{``. The token holding the marker's
    first character opens the answer span, so a token that mixes reasoning text and the marker (e.g. `` \\bo``)
    keeps weight 1 — conservative.

    Args:
        response_ids: [T] generated token ids (list or 1-D integer tensor), without padding.
        tokenizer: anything with ``decode(ids)``.
        answer_markers: markers in priority order.
        eos_token_ids: EOS/end-of-turn ids; the content ends at the first one.
        score_unmarked: with no marker (e.g. a truncated response), score the whole content (True, default: the
            conclude template still elicits an answer) or nothing (False: the response keeps w = 1).
    Returns:
        ResponseSplit.
    """
    ids = _as_id_list("response_ids", response_ids)
    markers = _check_markers(answer_markers)
    eos = _check_eos(eos_token_ids)
    if not hasattr(tokenizer, "decode"):
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no decode(ids)")
    content_len = next((k for k, t in enumerate(ids) if t in eos), len(ids))
    content = ids[:content_len]
    for marker in markers:
        k = _marker_token(tokenizer, content, marker)
        if k < 0:
            continue
        tail = decode_ids(tokenizer, content[k:])
        from_marker = tail[tail.rfind(marker):]
        boxed = extract_boxed(from_marker)
        answer = boxed if boxed is not None else from_marker[len(marker):]
        return ResponseSplit(k, k, content_len, content_len, marker, answer.strip())
    reasoning_len = content_len if score_unmarked else 0
    return ResponseSplit(reasoning_len, content_len, content_len, content_len, None, "")


def split_responses(
    response_ids: torch.Tensor | Sequence[Sequence[int]],
    tokenizer: Any,
    *,
    response_mask: torch.Tensor | None = None,
    **kwargs,
) -> list[ResponseSplit]:
    """``split_response`` for each row. ``response_ids`` is a list of id lists, or a [B, T] tensor with
    ``response_mask`` [B, T] (right padding: row b has ``response_mask[b].sum()`` tokens); kwargs as
    ``split_response``."""
    if isinstance(response_ids, torch.Tensor):
        check_tensor("response_ids", response_ids, ndim=2)
        if response_mask is None:
            rows = response_ids.tolist()
        else:
            check_tensor("response_mask", response_mask, ndim=2)
            if tuple(response_mask.shape) != tuple(response_ids.shape):
                raise ValueError(
                    f"response_mask: shape {tuple(response_mask.shape)} does not match response_ids shape "
                    f"{tuple(response_ids.shape)}"
                )
            lengths = response_mask.bool().sum(dim=-1).tolist()
            rows = [r[:n] for r, n in zip(response_ids.tolist(), lengths)]
    else:
        if response_mask is not None:
            raise ValueError("response_mask: only for a [B, T] tensor of response_ids (lists carry their lengths)")
        if not isinstance(response_ids, Sequence):
            kind = type(response_ids).__name__
            raise ValueError(f"response_ids: expected a [B, T] tensor or a list of id lists, got {kind}")
        rows = list(response_ids)
    return [split_response(r, tokenizer, **kwargs) for r in rows]


def score_mask_from_splits(splits: Sequence[ResponseSplit], num_tokens: int) -> torch.Tensor:
    """[B, num_tokens] bool: True at the reasoning positions [0, reasoning_len) of each response — the
    ``score_mask`` for ``oar_weights`` / ``shape_advantages("oar", ...)``."""
    check_int("num_tokens", num_tokens, minimum=0)
    if not all(isinstance(s, ResponseSplit) for s in splits):
        raise ValueError("splits: expected a sequence of ResponseSplit")
    lens = torch.tensor([s.reasoning_len for s in splits], dtype=torch.long)
    if lens.numel() and int(lens.max()) > num_tokens:
        raise ValueError(f"num_tokens: {num_tokens} is shorter than the longest reasoning ({int(lens.max())} tokens)")
    return torch.arange(num_tokens)[None, :] < lens[:, None]


# ------------------------------------------------------------------------------------------ scoring sequences


@dataclass(frozen=True)
class ScoringBatch:
    """Right-padded scoring sequences ``prompt | reasoning | conclude | answer`` (ALGORITHMS.md §1.2, §5.2).

    input_ids: [B, L] long, padded with ``pad_id``.
    attention_mask: [B, L] bool, True on real tokens.
    reasoning_start: [B] index of the first reasoning token (= prompt length).
    reasoning_len: [B] R_b; sequence position reasoning_start + k holds response token k.
    answer_pos: [B] index of the first answer token (= length of prompt + reasoning + conclude); P_final ``last``
        is read at answer_pos − 1, the position that predicts it.
    answer_len: [B] A_b answer tokens at [answer_pos, answer_pos + A_b) (0 when no answer was appended).
    pad_id: the padding id, also the OAR-P replacement token (§5.3).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    reasoning_start: torch.Tensor
    reasoning_len: torch.Tensor
    answer_pos: torch.Tensor
    answer_len: torch.Tensor
    pad_id: int

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def reasoning_mask(self) -> torch.Tensor:
        """[B, L] bool, True at reasoning positions."""
        col = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None, :]
        start = self.reasoning_start[:, None]
        return (col >= start) & (col < start + self.reasoning_len[:, None])

    def to(self, device: torch.device | str) -> ScoringBatch:
        return ScoringBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.reasoning_start.to(device),
            self.reasoning_len.to(device), self.answer_pos.to(device), self.answer_len.to(device), self.pad_id,
        )


def _id_rows(name: str, rows: Any, batch: int | None) -> list[list[int]]:
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError(f"{name}: expected a list of token-id lists, got {type(rows).__name__}")
    out = [_as_id_list(f"{name}[{b}]", r) for b, r in enumerate(rows)]
    if batch is not None and len(out) != batch:
        raise ValueError(f"{name}: {len(out)} rows, expected {batch} (one per response)")
    return out


def build_scoring_batch(
    prompts: Sequence[Sequence[int]],
    reasonings: Sequence[Sequence[int]],
    conclude: Sequence[int] | Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]] | None = None,
    *,
    pad_id: int,
) -> ScoringBatch:
    """Token-id scoring sequences ``prompt | reasoning | conclude [| answer]``, right-padded (§1.2, §5.2).

    Args:
        prompts: B prompt id lists (intro + question + bridge, i.e. the chat-templated prompt).
        reasonings: B reasoning id lists (the response ids [0, reasoning_len), see ``split_response``).
        conclude: one id list shared by all rows, or B lists.
        answers: B answer id lists (needed by P_final modes ``answer_mean`` / ``answer_joint``), or None.
        pad_id: padding id; also the token OAR-P substitutes (§5.3).
    Returns:
        ScoringBatch.
    """
    check_int("pad_id", pad_id, minimum=0)
    prompt_rows = _id_rows("prompts", prompts, None)
    b = len(prompt_rows)
    reasoning_rows = _id_rows("reasonings", reasonings, b)
    if isinstance(conclude, torch.Tensor) or (
        isinstance(conclude, Sequence) and all(isinstance(c, int) and not isinstance(c, bool) for c in conclude)
    ):
        shared = _as_id_list("conclude", conclude)
        conclude_rows = [shared] * b
    else:
        conclude_rows = _id_rows("conclude", conclude, b)
    answer_rows = [[] for _ in range(b)] if answers is None else _id_rows("answers", answers, b)

    seqs, lens = [], []
    for p, r, c, a in zip(prompt_rows, reasoning_rows, conclude_rows, answer_rows):
        if len(p) + len(r) + len(c) == 0:
            raise ValueError("prompts: a row with empty prompt, reasoning and conclude has no position to read P_final")
        seqs.append(p + r + c + a)
        lens.append((len(p), len(r), len(p) + len(r) + len(c), len(a)))
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = True
    meta = torch.tensor(lens, dtype=torch.long).reshape(b, 4)
    return ScoringBatch(input_ids, attention_mask, meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], pad_id)


def scoring_batch_from_responses(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    splits: Sequence[ResponseSplit],
    tokenizer: Any,
    *,
    pad_id: int,
    conclude: str = DEFAULT_CONCLUDE,
    with_answers: bool = True,
) -> ScoringBatch:
    """``build_scoring_batch`` from responses and their splits: reasoning = response[:reasoning_len], conclude =
    ``encode(conclude)``, answer = ``encode(split.answer_text)`` (each piece tokenised on its own, as the authors'
    code does). For thinking models pass a conclude that closes the thought, e.g. ``"</think>\\n\\n..."``."""
    response_rows = _id_rows("responses", responses, len(prompts))
    if len(splits) != len(response_rows) or not all(isinstance(s, ResponseSplit) for s in splits):
        raise ValueError(f"splits: expected {len(response_rows)} ResponseSplit, one per response")
    reasonings = [r[: s.reasoning_len] for r, s in zip(response_rows, splits)]
    answers = [encode_text(tokenizer, s.answer_text) for s in splits] if with_answers else None
    return build_scoring_batch(prompts, reasonings, encode_text(tokenizer, conclude), answers, pad_id=pad_id)
