"""docs/troubleshooting.md names only things that exist: every metric, config key, group option and log line it cites.

What is checked, in the page's code (inline spans and fenced blocks alike):

* metric names: spans like ``reward/timeouts`` (a metric prefix, a slash, a name) must be a string the package writes:
  a literal, or an f-string template whose fields match the name's parts (``time/{name}_s`` covers
  ``time/sync_s``); a trailing ``*`` or ``/`` (``rollout/invalid_*``, ``routing/``) needs a literal starting so;
* config keys: ``group.key`` or ``group.key=value`` must resolve in the typed schema (``TrainConfig``), and a value
  of a key with allowed values (``KEY_CHOICES``) must be one of them; ``group=option`` must name a
  ``configs/<group>/<option>.yaml``;
* log lines: every line of a ``text`` block is a message the package prints; split at its ``<placeholders>`` and
  ``...``, each fragment (3+ visible characters) must occur in the literal part of a string in ``oar_megatron/``.

The commands in its ``bash`` blocks are run by tests/test_doc_commands.py like every other documented command.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from oar_megatron.config.train import KEY_CHOICES, TrainConfig
from tests.doc_markdown import FIELD, ROOT, fenced_blocks, in_source_piece, inline_spans, source_templates

PAGE = ROOT / "docs" / "troubleshooting.md"
METRIC_PREFIXES = ("reward", "rollout", "sync", "time", "throughput", "loss", "kl", "oar", "policy", "response",
                   "entropy", "routing", "update", "eval")
METRIC = re.compile(rf"^(?:{'|'.join(METRIC_PREFIXES)})/[A-Za-z0-9_/*]*$")
GROUPS = tuple(f.name for f in dataclasses.fields(TrainConfig))
KEY = re.compile(rf"^((?:{'|'.join(GROUPS)})\.[A-Za-z_][A-Za-z0-9_.]*)(?:=(.*))?$")
OPTION = re.compile(rf"^\+?((?:{'|'.join(GROUPS)}|experiment))=([\w.-]+)$")
PLACEHOLDER = re.compile(r"<[^<>]*>|\.\.\.|…")


def _tokens() -> list[str]:
    """Inline spans, plus the whitespace-separated words of bash blocks (overrides, comments dropped)."""
    text = PAGE.read_text()
    out = [s.text for s in inline_spans(text)]
    for block in fenced_blocks(text):
        if block.info in ("bash", "sh", "shell", "console"):
            for line in block.lines:
                out += line.split("#", 1)[0].split()
    return out


def _metric_written(name: str) -> bool:
    templates = source_templates()
    if name.endswith(("*", "/")):
        prefix = name.rstrip("*")
        return any(t.startswith(prefix) for t in templates)
    for t in templates:
        if t == name:
            return True
        if FIELD in t and t.split(FIELD)[0] and name.startswith(t.split(FIELD)[0]):
            pattern = "".join(re.escape(p) if p != FIELD else "[A-Za-z0-9_]+" for p in re.split(f"({FIELD})", t))
            if re.fullmatch(pattern, name):
                return True
    return False


def _resolves(key: str) -> bool:
    cls = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        tp = hints[part]
        args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        cls = tp if dataclasses.is_dataclass(tp) else (args[0] if args else tp)
    return True


def test_page_cites_metrics_keys_and_options():
    tokens = _tokens()
    metrics = [t for t in tokens if METRIC.match(t)]
    keys = [KEY.match(t) for t in tokens if KEY.match(t)]
    options = [OPTION.match(t) for t in tokens if OPTION.match(t)]
    # the page covers the failures it promises, each with its evidence
    for must in ("reward/timeouts", "rollout/logp_diff_abs_mean", "sync/update_s", "time/sync_s"):
        assert must in metrics, must
    for must in ("parallel.timeout_minutes", "reward.timeout_s", "rollout.update_timeout_s",
                 "algorithm.rollout_correction.mode", "trainer.micro_batch_size"):
        assert must in [m.group(1) for m in keys], must
    bad_metrics = [m for m in metrics if not _metric_written(m)]
    assert not bad_metrics, f"docs/troubleshooting.md cites metrics the code never writes: {bad_metrics}"
    bad_keys = [m.group(0) for m in keys if not _resolves(m.group(1).rstrip("."))]
    assert not bad_keys, f"docs/troubleshooting.md cites keys missing from the schema: {bad_keys}"
    for m in keys:
        key, value = m.group(1), m.group(2)
        allowed = KEY_CHOICES.get(key)
        if value and allowed and re.fullmatch(r"[\w-]+", value) and value != "null":
            names = allowed() if callable(allowed) else allowed
            assert value in names, f"{m.group(0)}: {key} accepts {names}"
    for m in options:
        group, name = m.groups()
        assert (ROOT / "configs" / group / f"{name}.yaml").is_file(), f"{m.group(0)}: no configs/{group}/{name}.yaml"


def test_log_lines_are_printed_by_the_code():
    blocks = [b for b in fenced_blocks(PAGE.read_text()) if b.info == "text"]
    lines = [line for b in blocks for line in b.lines if line.strip()]
    assert len(lines) >= 10
    for line in lines:
        fragments = [f for f in PLACEHOLDER.split(line) if len(f.strip()) >= 3]
        assert fragments, line
        missing = [f for f in fragments if not in_source_piece(f)]
        assert not missing, f"docs/troubleshooting.md: {line!r}: not in oar_megatron/'s strings: {missing}"


@pytest.mark.parametrize("line, ok", [
    ("reward <fn>: <n> of <N> items timed out after <t>s (scored 0)", True),
    ("reward <fn>: <n> of <N> items took too long", False),
])
def test_log_line_check_catches_a_renamed_message(line, ok):
    fragments = [f for f in PLACEHOLDER.split(line) if len(f.strip()) >= 3]
    assert all(in_source_piece(f) for f in fragments) is ok


def test_metric_check_catches_an_unknown_name():
    assert _metric_written("time/sync_s") and _metric_written("rollout/invalid_timeout")
    assert _metric_written("rollout/invalid_*") and not _metric_written("rollout/nonexistent_metric")
