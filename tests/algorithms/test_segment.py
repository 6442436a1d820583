"""Response segmentation and scoring sequences (ALGORITHMS.md §1.2, §5.1, §5.2), with a real local tokenizer."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from oar_megatron.algorithms.segment import (
    DEFAULT_CONCLUDE,
    ResponseSplit,
    ScoringBatch,
    build_scoring_batch,
    decode_ids,
    encode_text,
    extract_boxed,
    score_mask_from_splits,
    scoring_batch_from_responses,
    split_response,
    split_responses,
)

CORPUS = [
    "Let x = 3 so 2x = 6. The answer is \\boxed{6}.",
    "We add 4 and 5 to get 9, so the answer is \\boxed{9}",
    "Think step by step. </think> The final answer is \\boxed{12}.",
    "Therefore, the final answer is \\boxed{\\frac{1}{2}}",
]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained here on a few strings (nothing downloaded); </think> is a special token."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(CORPUS * 5, trainer)
    return t


PAD, EOS, THINK = 0, 1, 2


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


class CharPieces:
    """A minimal duck-typed tokenizer: ids index a list of text pieces; only decode(ids), no keyword arguments."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_boxed_marker_straddling_tokens(tok):
    reasoning = enc(tok, "We add 4 and 5 to get 9, so the answer is")
    answer = enc(tok, " \\boxed{9}.")
    # The marker is split over several tokens and starts inside the first one (" \\" holds the leading space).
    assert tok.decode([answer[0]]) == " \\"
    assert not any("\\boxed{" in tok.decode([i]) for i in answer)
    ids = reasoning + answer + [EOS, PAD, PAD]
    sp = split_response(ids, tok, eos_token_ids=[EOS])
    n = len(reasoning)
    assert sp == ResponseSplit(n, n, n + len(answer), n + len(answer), "\\boxed{", "9")


def test_last_boxed_wins_and_nested_braces(tok):
    first = enc(tok, "Let x = 3 so \\boxed{3} is wrong; redo: 2x = 6 and")
    last = enc(tok, " \\boxed{\\frac{1}{2}}")
    sp = split_response(torch.tensor(first + last), tok)
    assert sp.reasoning_len == len(first) and sp.marker == "\\boxed{"
    assert sp.answer_text == "\\frac{1}{2}"
    assert sp.answer_end == sp.content_len == len(first) + len(last)


def test_think_marker_takes_priority(tok):
    thought = enc(tok, "Think step by step, maybe \\boxed{1}")
    summary = enc(tok, " The final answer is \\boxed{12}.")
    ids = thought + [THINK] + summary + [EOS]
    assert "</think>" in decode_ids(tok, ids) and "</think>" not in tok.decode(ids)  # special token kept
    sp = split_response(ids, tok, eos_token_ids=EOS)
    assert (sp.reasoning_len, sp.marker, sp.answer_text) == (len(thought), "</think>", "12")
    assert sp.answer_end == len(ids) - 1
    # Markers are tried in the given order: boxed first splits at the last \boxed{ instead.
    sp2 = split_response(ids, tok, eos_token_ids=EOS, answer_markers=("\\boxed{", "</think>"))
    assert sp2.marker == "\\boxed{" and sp2.reasoning_len > len(thought) + 1
    # Thought only, answer text after </think> without a box.
    sp3 = split_response(thought + [THINK] + enc(tok, " 12 "), tok)
    assert (sp3.reasoning_len, sp3.answer_text) == (len(thought), "12")


def test_no_marker_and_eos(tok):
    body = enc(tok, "We add 4 and 5 to get 9")
    sp = split_response(body + [EOS] + enc(tok, "\\boxed{1}"), tok, eos_token_ids=(EOS,))
    assert sp == ResponseSplit(len(body), len(body), len(body), len(body), None, "")  # text after EOS is ignored
    sp = split_response(body, tok, score_unmarked=False)
    assert (sp.reasoning_len, sp.answer_start, sp.answer_end) == (0, len(body), len(body))
    assert split_response([], tok) == ResponseSplit(0, 0, 0, 0, None, "")
    assert split_response([EOS], tok, eos_token_ids=EOS).content_len == 0


def test_duck_typed_tokenizer_marker_inside_token():
    pieces = ["so ", "it is \\bo", "xed", "{7", "}", "<e>"]
    t = CharPieces(pieces)
    sp = split_response([0, 0, 1, 2, 3, 4, 5], t, eos_token_ids=[5])
    # Token 2 ("it is \\bo") holds the marker's first character: it opens the answer span.
    assert sp == ResponseSplit(2, 2, 6, 6, "\\boxed{", "7")
    sp = split_response([1, 2, 3], t)  # marker in the very first token, unclosed box
    assert sp == ResponseSplit(0, 0, 3, 3, "\\boxed{", "7")


def test_extract_boxed():
    assert extract_boxed("a \\boxed{1} b \\boxed{x^{2}+1} c") == "x^{2}+1"
    assert extract_boxed("\\boxed{12") == "12"
    assert extract_boxed("no box") is None


def test_split_responses_batched_and_score_mask(tok):
    rows = [
        enc(tok, "We add 4 and 5 to get 9, so") + enc(tok, " \\boxed{9}") + [EOS],
        enc(tok, "Let x = 3") + [THINK] + enc(tok, " \\boxed{6}") + [EOS],
        enc(tok, "We add"),
    ]
    width = max(map(len, rows)) + 2
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    splits = split_responses(ids, tok, response_mask=mask, eos_token_ids=[EOS])
    assert splits == [split_response(r, tok, eos_token_ids=[EOS]) for r in rows]
    assert split_responses(rows, tok, eos_token_ids=[EOS]) == splits
    sm = score_mask_from_splits(splits, width)
    assert sm.dtype == torch.bool and sm.shape == (3, width)
    assert sm.sum(-1).tolist() == [s.reasoning_len for s in splits]
    assert (sm <= mask).all() and not sm[0, splits[0].reasoning_len :].any()
    assert sm[2].sum() == len(rows[2])  # no marker: the whole content is scored by default


def test_build_scoring_batch_layout():
    b = build_scoring_batch([[5, 6], [7]], [[11, 12, 13], [14]], [9, 9], [[8], [8, 8]], pad_id=0)
    assert isinstance(b, ScoringBatch)
    assert b.input_ids.tolist() == [[5, 6, 11, 12, 13, 9, 9, 8], [7, 14, 9, 9, 8, 8, 0, 0]]
    assert b.attention_mask.tolist() == [[True] * 8, [True] * 6 + [False] * 2]
    assert b.reasoning_start.tolist() == [2, 1] and b.reasoning_len.tolist() == [3, 1]
    assert b.answer_pos.tolist() == [7, 4] and b.answer_len.tolist() == [1, 2]
    assert b.reasoning_mask().tolist() == [
        [False, False, True, True, True, False, False, False],
        [False, True, False, False, False, False, False, False],
    ]
    # Per-row conclude, no answers.
    b2 = build_scoring_batch([[5], [6]], [[1], []], [[9], [9, 9]], pad_id=3)
    assert b2.input_ids.tolist() == [[5, 1, 9], [6, 9, 9]] and b2.answer_len.tolist() == [0, 0]
    assert b2.answer_pos.tolist() == [3, 3]


def test_scoring_batch_from_responses(tok):
    prompt = enc(tok, "Let x = 3.")
    resp = enc(tok, "so 2x = 6 and the answer is") + enc(tok, " \\boxed{6}") + [EOS]
    sp = split_response(resp, tok, eos_token_ids=[EOS])
    b = scoring_batch_from_responses([prompt], [resp], [sp], tok, pad_id=PAD)
    conclude = encode_text(tok, DEFAULT_CONCLUDE)
    ans = encode_text(tok, "6")
    assert b.input_ids[0].tolist() == prompt + resp[: sp.reasoning_len] + conclude + ans  # the response's own ids
    assert tok.decode(b.input_ids[0].tolist()) == "Let x = 3.so 2x = 6 and the answer is" + DEFAULT_CONCLUDE + "6"
    assert int(b.answer_pos[0]) == len(prompt) + sp.reasoning_len + len(conclude)
    b_no = scoring_batch_from_responses([prompt], [resp], [sp], tok, pad_id=PAD, with_answers=False)
    assert b_no.answer_len.tolist() == [0]


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda t: split_response("abc", t), "response_ids"),
        (lambda t: split_response([1, -2], t), "response_ids"),
        (lambda t: split_response(torch.ones(2, 2, dtype=torch.long), t), "response_ids"),
        (lambda t: split_response([1], t, answer_markers=()), "answer_markers"),
        (lambda t: split_response([1], t, answer_markers="\\boxed{"), "answer_markers"),
        (lambda t: split_response([1], t, answer_markers=("",)), "answer_markers"),
        (lambda t: split_response([1], t, eos_token_ids="x"), "eos_token_ids"),
        (lambda t: split_response([1], t, eos_token_ids=[-1]), "eos_token_ids"),
        (lambda t: split_response([1], object()), "tokenizer"),
        (lambda t: split_responses(torch.ones(2, 3, dtype=torch.long), t, response_mask=torch.ones(2, 4)),
         "response_mask"),
        (lambda t: split_responses([[1]], t, response_mask=torch.ones(1, 1)), "response_mask"),
        (lambda t: split_responses(torch.ones(3, dtype=torch.long), t), "response_ids"),
        (lambda t: score_mask_from_splits([ResponseSplit(5, 5, 5, 5, None, "")], 3), "num_tokens"),
        (lambda t: score_mask_from_splits([1], 3), "splits"),
        (lambda t: score_mask_from_splits([], -1), "num_tokens"),
        (lambda t: encode_text(t, 3), "text"),
        (lambda t: encode_text(CharPieces([]), "x"), "tokenizer"),
        (lambda t: build_scoring_batch([[1]], [[2]], [3], pad_id=-1), "pad_id"),
        (lambda t: build_scoring_batch([[1]], [[2], [3]], [3], pad_id=0), "reasonings"),
        (lambda t: build_scoring_batch([[1]], [[2]], [3], [[1], [2]], pad_id=0), "answers"),
        (lambda t: build_scoring_batch([[1]], [[2]], [[3], [4]], pad_id=0), "conclude"),
        (lambda t: build_scoring_batch([[]], [[]], [], pad_id=0), "prompts"),
        (lambda t: build_scoring_batch("ab", [[2]], [3], pad_id=0), "prompts"),
        (lambda t: scoring_batch_from_responses([[1]], [[2]], [], t, pad_id=0), "splits"),
    ],
)
def test_segment_bad_input(tok, call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call(tok)
