"""Show how OAR splits responses into scored reasoning and the final-answer span (ALGORITHMS.md §5.1).

Use it to check a tokenizer and marker set before a run: each JSONL row's response is tokenised (or its token ids
are taken as given), split with ``oar_megatron.algorithms.split_response``, and printed as
``[scored reasoning] | answer span | after EOS`` with the extracted answer.

    python tools/inspect_split.py --tokenizer path/to/tokenizer.json --input rollouts.jsonl \
        [--field response | --ids-field response_ids] [--marker '</think>' --marker '\\boxed{'] [--eos-id 151645]

``--tokenizer`` is a local ``tokenizer.json`` or a directory holding one (a Hugging Face model folder); nothing
is downloaded. Rows that cannot be read are reported with their line number and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer

from oar_megatron.algorithms import DEFAULT_ANSWER_MARKERS, decode_ids, encode_text, split_response


def load_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise SystemExit(f"inspect_split: --tokenizer: no tokenizer.json at {p}")
    return Tokenizer.from_file(str(p))


def render(ids: list[int], tokenizer: Tokenizer, markers, eos_ids) -> str:
    s = split_response(ids, tokenizer, answer_markers=markers, eos_token_ids=eos_ids)
    reasoning = decode_ids(tokenizer, ids[: s.reasoning_len])
    answer = decode_ids(tokenizer, ids[s.answer_start : s.answer_end])
    rest = decode_ids(tokenizer, ids[s.content_len :])
    head = f"scored {s.reasoning_len}/{len(ids)} tokens, marker {s.marker!r}, answer {s.answer_text!r}"
    return f"{head}\n  [{reasoning}] | {answer}" + (f" | {rest}" if rest else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--input", required=True, help="JSONL file, one response per line")
    ap.add_argument("--field", default="response", help="text field (default: response)")
    ap.add_argument("--ids-field", default=None, help="token-id field; takes precedence over --field")
    ap.add_argument("--marker", action="append", default=None, help="answer marker, in priority order (repeatable)")
    ap.add_argument("--eos-id", action="append", type=int, default=[], help="EOS / end-of-turn id (repeatable)")
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    markers = tuple(args.marker) if args.marker else DEFAULT_ANSWER_MARKERS
    shown = bad = 0
    with open(args.input, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if shown >= args.limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids = [int(i) for i in row[args.ids_field]] if args.ids_field else encode_text(tok, row[args.field])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                print(f"line {lineno}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
                bad += 1
                continue
            print(f"#{lineno} {render(ids, tok, markers, args.eos_id)}")
            shown += 1
    print(f"{shown} shown, {bad} skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
