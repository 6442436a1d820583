"""Generate docs/config_reference.md from the typed schema (``TrainConfig`` and every dataclass nested in it).

    python tools/gen_config_reference.py            # (re)write docs/config_reference.md
    python tools/gen_config_reference.py --check    # exit 1 (naming this command) when the committed file is stale

For every key: its type (the dataclass annotation), its **schema default** (the dataclass field's default;
"required" when it has none), the **embedded-run default** (the value ``oar-train`` with no arguments runs with:
``configs/config.yaml`` and the group files it composes, merged onto the schema), the allowed values where
validation checks a closed set (``oar_megatron/config/train.py: KEY_CHOICES``), and a one-line description.

Descriptions come from the schema source, by one convention (``SCHEMA_CONVENTION`` below, checked here: a field
without a description stops the generator with its name): the ``#`` comment at the end of the field's line,
continued by the comment-only lines directly below it. A comment that heads a group of fields is preceded by a
blank line, so it never continues the field above it. A nested group's heading takes its class docstring's first
sentence.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config_reference.md"
COMMAND = "python tools/gen_config_reference.py"

SCHEMA_CONVENTION = (
    "a field's description is the `#` comment at the end of its line, continued by the comment-only lines directly "
    "below it; a comment heading a group of fields is preceded by a blank line")


# ------------------------------------------------------------------------------------------------ source comments

def field_comments(cls: type) -> dict[str, str]:
    """``{field: description}`` of dataclass ``cls`` from its source, by the convention in the module docstring."""
    source_file = inspect.getsourcefile(cls)
    lines = Path(source_file).read_text().splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text (without '#')
    code_lines: set[int] = set()
    src = "\n".join(lines) + "\n"
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            for n in range(tok.start[0], tok.end[0] + 1):
                code_lines.add(n)
    tree = ast.parse(src)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        last = stmt.end_lineno
        if last not in comments:
            continue
        parts = [comments[last]]
        n = last + 1
        while n <= len(lines) and n in comments and n not in code_lines:
            parts.append(comments[n])
            n += 1
        out[stmt.target.id] = " ".join(parts)
    return out


def first_sentence(cls: type) -> str:
    """The first sentence of ``cls``'s own docstring ("" when it has none: not dataclass's generated signature)."""
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    doc = doc.replace("``", "`")
    text = " ".join(doc.strip().split("\n\n")[0].split())
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z`])", text)  # not "et al. 2025", "e.g. x"
    return text if end is None else text[:end.start() + 1]


# ------------------------------------------------------------------------------------------------ types and values

def type_name(tp) -> str:
    """``int`` → ``int``; ``int | None`` → ``int | null``; ``list[str]`` → ``list[str]``."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def fmt(value) -> str:
    """A value as it is written in YAML / on the command line (JSON spelling for containers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value) if (value == "" or value.strip() != value or value.lower() in
                                     ("null", "true", "false", "yes", "no")) else value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value if not isinstance(value, list) else [
            dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value])
    return repr(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def code(value_text: str) -> str:
    return f"`{cell(value_text)}`" if value_text else ""


def nested_dataclass(tp) -> tuple[type | None, bool]:
    """(dataclass, is_list) for a field annotated with a dataclass or ``list[dataclass]``."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp)
        if dataclasses.is_dataclass(arg):
            return arg, True
    return None, False


# ------------------------------------------------------------------------------------------------ the walk

NO_RUN = object()  # list items: no embedded-run value of their own (the list's row shows it)


@dataclasses.dataclass
class Row:
    key: str
    type: str
    schema_default: str
    run_default: str
    choices: str
    description: str


@dataclasses.dataclass
class Section:
    key: str
    cls: type
    description: str
    rows: list[Row]


def _schema_default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def walk(cls: type, prefix: str, run_value, choices: dict, sections: list[Section], missing: list[str],
         description: str) -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    section = Section(prefix, cls, description, [])
    sections.append(section)
    later = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        tp = hints[f.name]
        sub, is_list = nested_dataclass(tp)
        run = getattr(run_value, f.name) if run_value is not NO_RUN else NO_RUN
        desc = comments.get(f.name, "")
        if sub is not None and not is_list:
            later.append((sub, key, run, desc or first_sentence(sub)))
            continue
        if not desc:
            missing.append(f"{cls.__module__}.{cls.__name__}.{f.name}")
        default = _schema_default(f)
        allowed = choices.get(key)
        if callable(allowed):
            allowed = allowed()
        section.rows.append(Row(
            key=key, type=type_name(tp),
            schema_default="required" if default is dataclasses.MISSING else code(fmt(default)),
            run_default="" if run is NO_RUN else code(fmt(run)),
            choices=", ".join(f"`{fmt(v)}`" for v in allowed) if allowed else "",
            description=desc))
        if is_list:  # list of dataclasses: the item's keys, documented under key[]
            later.append((sub, key + "[]", NO_RUN, desc))
    for sub, key, run, desc in later:
        walk(sub, key, run, choices, sections, missing, desc)


def collect() -> list[Section]:
    from oar_megatron.config.train import KEY_CHOICES, TrainConfig
    from oar_megatron.trainer.compose import compose_config

    run = compose_config([])  # the embedded default: what `oar-train` with no arguments runs
    unknown = [k for k in KEY_CHOICES if not _resolves(TrainConfig, k)]
    if unknown:
        raise SystemExit(f"gen_config_reference: KEY_CHOICES names {unknown[0]!r}, which is not a schema key")
    sections: list[Section] = []
    missing: list[str] = []
    hints = typing.get_type_hints(TrainConfig)
    comments = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        sub = hints[f.name]
        if f.name not in comments:
            missing.append(f"{TrainConfig.__module__}.TrainConfig.{f.name}")
        walk(sub, f.name, getattr(run, f.name), KEY_CHOICES, sections, missing, comments.get(f.name, ""))
    if missing:
        raise SystemExit(f"gen_config_reference: no description for {', '.join(missing)} (convention: "
                         f"{SCHEMA_CONVENTION})")
    return sections


def _resolves(cls: type, key: str) -> bool:
    for part in key.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        cls = nested_dataclass(hints[part])[0] or hints[part]
    return True


GROUP_FILES = {  # group -> its schema module (relative to oar_megatron/config/)
    "model": "model.py", "parallel": "parallel.py", "algorithm": "algorithm.py", "optim": "optim.py",
}


def render(sections: list[Section]) -> str:
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the typed schema; do not edit by hand. -->",
        "",
        "Every key `oar-train` and `oar-eval` accept, generated from the typed schema `TrainConfig`",
        "(`oar_megatron/config/`) by `tools/gen_config_reference.py`; `tests/test_config_reference.py` fails when this",
        "file is stale. How configs compose and validate: [configs.md](configs.md).",
        "",
        "Columns: **type** is the schema annotation (`null` = may be unset); **schema** is the dataclass default (what",
        "a key not named by any YAML file gets; *required*: no default); **embedded run** is the value `oar-train`",
        "with no arguments runs with (`configs/config.yaml` composing `model=tiny-synthetic`, `algorithm=oar_g`,",
        "`rollout=local`, `data=synthetic`, ... onto the schema); **allowed** lists the values validation accepts where",
        "it checks a closed set (`KEY_CHOICES` in `oar_megatron/config/train.py`; anything else is a one-line error",
        "naming the key). Set any key on the command line (`oar-train rollout.n_samples=16`) or pick a group file",
        "(`oar-train rollout=sglang`).",
        "",
        "Groups: " + ", ".join(f"[`{s.key}`](#{s.key.replace('.', '').replace('[]', '')})" for s in sections
                                if "." not in s.key) + ".",
        "",
    ]
    for s in sections:
        depth = "##" if "." not in s.key else "###"
        module = inspect.getsourcefile(s.cls)
        rel = Path(module).resolve().relative_to(ROOT)
        out.append(f"{depth} {s.key}")
        out.append("")
        intro = f"`{s.cls.__name__}` (`{rel}`)"
        if s.description:
            intro += f": {s.description}"
        out.append(intro)
        out.append("")
        if not s.rows:
            continue
        out.append("| key | type | schema | embedded run | allowed | description |")
        out.append("|---|---|---|---|---|---|")
        for r in s.rows:
            out.append(f"| `{r.key}` | `{cell(r.type)}` | {r.schema_default} | {r.run_default} | {r.choices} | "
                       f"{cell(r.description)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def generate() -> str:
    return render(collect())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            diff = "".join(list(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                     str(args.out), "generated"))[:40])
            print(f"{args.out} is stale; regenerate it with `{COMMAND}`\n{diff}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
