"""Terminal output of the RL loop: progress bars per phase, the per-step line, result tables.

Bars are drawn only on an interactive terminal (rich's ``Console.is_terminal``) and only where ``enabled`` (rank 0);
otherwise ``phase`` is a no-op context and nothing is written at all, so Slurm logs hold just the per-step lines.

    progress = Progress(enabled=rank == 0)
    with progress.phase("rollout", total=num_prompts) as advance:
        for batch in ...:
            ...
            advance(len(batch))
    progress.log(format_step_line(step, metrics))
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress
from rich.table import Table

__all__ = ["Progress", "format_step_line", "print_table", "STEP_LINE_KEYS"]

# (metric key, template): the per-step line in this order; keys missing from the metrics are skipped.
STEP_LINE_KEYS: tuple[tuple[str, str], ...] = (
    ("reward/mean", "reward {:.2f}"),
    ("response/length_mean", "len {:.1f}"),
    ("loss/total", "loss {:.3g}"),
    ("kl/mean", "kl {:.3g}"),
    ("entropy/mean", "ent {:.3g}"),
    ("grad_norm", "gnorm {:.3g}"),
    ("oar/ess_ratio", "ess {:.2f}"),
    ("time/step_s", "{:.1f} s"),
)


def _noop_advance(n: float = 1) -> None:
    return None


class Progress:
    """Rich progress bars for the rollout and update phases; silent when disabled or not on a terminal.

    Args:
        enabled: False on every rank but 0.
        console: a rich Console (tests pass one writing to a buffer); default ``Console()`` (stdout).
        transient: remove each bar when its phase ends (the per-step line stays).
    """

    def __init__(self, enabled: bool = True, *, console: Console | None = None, transient: bool = True):
        self.console = console if console is not None else Console()
        self.enabled = bool(enabled)
        self.live = self.enabled and self.console.is_terminal
        self.transient = transient

    @contextlib.contextmanager
    def phase(self, name: str, total: float | None = None) -> Iterator[Callable[[float], None]]:
        """A bar named ``name`` with ``total`` units (None: no known total); yields ``advance(n=1)``."""
        if not self.live:
            yield _noop_advance
            return
        bar = _RichProgress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=self.transient,
        )
        with bar:
            task = bar.add_task(name, total=total)

            def advance(n: float = 1) -> None:
                bar.advance(task, n)

            yield advance

    def log(self, line: str) -> None:
        """Print one line (the per-step summary): through the console on a terminal, plain text otherwise,
        nothing when disabled."""
        if not self.enabled:
            return
        if self.live:
            self.console.print(line, markup=False, highlight=False)
        else:
            self.console.file.write(line + "\n")
            self.console.file.flush()


def format_step_line(
    step: int, metrics: Mapping[str, Any], keys: Sequence[tuple[str, str] | str] = STEP_LINE_KEYS
) -> str:
    """``step 12 | reward 0.53 | len 7.0 | loss -0.012 | ... | 3.1 s``.

    ``keys`` holds (metric key, format template) pairs, or bare keys shown as ``key {:.4g}``. Missing keys and
    None values are skipped; NaN prints as ``nan``.
    """
    parts = [f"step {step}"]
    for entry in keys:
        key, template = (entry, f"{entry} {{:.4g}}") if isinstance(entry, str) else entry
        value = metrics.get(key)
        if value is None or isinstance(value, str):
            continue
        parts.append(template.format(float(value)))
    return " | ".join(parts)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def print_table(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    console: Console | None = None,
    enabled: bool = True,
) -> str:
    """Print ``rows`` as a table and return the text printed (without colour codes).

    On a terminal this is a rich Table; otherwise (logs, pipes) a plain fixed-width table. Columns default to the
    union of row keys in order of first appearance; missing cells show ``-``; floats use 4 significant digits.
    With ``enabled=False`` nothing is printed, but the plain text is still returned.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    console = console if console is not None else Console()
    if enabled and console.is_terminal:
        table = Table(title=title)
        for c in columns:
            table.add_column(str(c), justify="left" if all(_is_text(r.get(c)) for r in rows) else "right")
        for r in cells:
            table.add_row(*r)
        recorder = Console(record=True, file=io.StringIO(), width=console.width, color_system=None)
        recorder.print(table)
        console.print(table)
        return recorder.export_text()
    text = _plain_table(title, [str(c) for c in columns], cells)
    if enabled:
        console.file.write(text)
        console.file.flush()
    return text


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or value is None


def _plain_table(title: str, header: list[str], cells: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    line = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [title, line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    return "\n".join(out) + "\n"
