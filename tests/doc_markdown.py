"""Reading the project's Markdown (README.md, docs/*.md) and its source strings, for the documentation tests.

* ``fenced_blocks(text)``: the fenced code blocks with their info string, first line number and the line just
  before the opening fence (where a ``<!-- gpu-only -->`` marker goes).
* ``inline_spans(text)``: the inline code spans outside fenced blocks (a span may wrap a line), with the text that
  follows each span on its line.
* ``source_templates()``: every string literal of ``oar_megatron/`` (``ast``, nothing imported) with each
  formatted field of an f-string, and each ``%``-format directive, replaced by ``FIELD``: what log lines and error
  messages are made of. Implicitly concatenated literals are one template (Python's parser joins them).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELD = "\x00"
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_PERCENT = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrfgixXe]")


@dataclass
class Block:
    info: str  # the info string's first word ("bash", "text", "" ...)
    line: int  # 1-based line of the first content line
    lines: list[str]
    before: str  # the last non-blank line before the opening fence


@dataclass
class Span:
    text: str  # whitespace-normalised content
    line: int  # 1-based line where it starts
    after: str  # the rest of the line after the closing backtick


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m.group(2)
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j])
            j += 1
        blocks.append(Block(m.group(3).lower(), i + 2, body, before))
        i = j + 1
    return blocks


def without_fences(text: str) -> str:
    """``text`` with every fenced block's lines blanked (line numbers kept)."""
    out, inside, fence = [], False, ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if not inside and m:
            inside, fence = True, m.group(2)
            out.append("")
        elif inside:
            if line.strip().startswith(fence):
                inside = False
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def inline_spans(text: str) -> list[Span]:
    body = without_fences(text)
    spans = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", body):
        line = body.count("\n", 0, m.start()) + 1
        rest = body[m.end():].split("\n", 1)[0]
        spans.append(Span(" ".join(m.group(1).split()), line, rest))
    return spans


def _template(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _PERCENT.sub(FIELD, node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_PERCENT.sub(FIELD, v.value) if isinstance(v, ast.Constant) else FIELD for v in node.values)
    return None


@lru_cache(maxsize=1)
def source_templates() -> tuple[str, ...]:
    out: set[str] = set()
    for path in sorted((ROOT / "oar_megatron").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                out.add(_template(node))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(_template(node))
    return tuple(sorted(out))


@lru_cache(maxsize=1)
def source_pieces() -> frozenset[str]:
    """The literal pieces between fields of every template."""
    return frozenset(p for t in source_templates() for p in t.split(FIELD) if p)


def in_source_piece(fragment: str) -> bool:
    """``fragment`` occurs in a literal piece, or is composed of pieces where one message is a field of another
    (``f"oar-train: {msg}"`` with ``msg = f"memory: ..."``): a suffix of a piece, whole pieces, then a prefix of one."""
    pieces = source_pieces()
    if any(fragment in piece for piece in pieces):
        return True
    n = len(fragment)
    heads = [j for j in range(1, n) if any(p.endswith(fragment[:j]) for p in pieces)]
    reach = set(heads)  # fragment[:j] covered, the next part starts a piece
    for i in range(1, n):
        if i not in reach:
            continue
        for p in pieces:
            if fragment.startswith(p, i) and i + len(p) < n:
                reach.add(i + len(p))
    return any(any(p.startswith(fragment[i:]) for p in pieces) for i in reach)
