"""Progress bars stay silent off a terminal or when disabled; the step line and tables render as documented."""

import io

from rich.console import Console

from oar_megatron.metrics import STEP_LINE_KEYS, Progress, format_step_line, print_table

METRICS = {
    "reward/mean": 0.53,
    "response/length_mean": 7.0,
    "loss/total": -0.012,
    "kl/mean": 0.001,
    "entropy/mean": 1.23,
    "grad_norm": 0.41,
    "oar/ess_ratio": 0.91,
    "time/step_s": 3.1,
}


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=100, color_system=None), buf


def _use(progress: Progress) -> None:
    with progress.phase("rollout", total=4) as advance:
        for _ in range(4):
            advance()
    with progress.phase("update", total=None) as advance:
        advance(2)


def test_not_a_tty_no_bar_output():
    console, buf = _console(terminal=False)
    progress = Progress(console=console)
    assert not progress.live
    _use(progress)
    assert buf.getvalue() == ""
    progress.log("step 1 | reward 0.50")  # the step line still goes to logs
    assert buf.getvalue() == "step 1 | reward 0.50\n"


def test_disabled_no_output_at_all():
    console, buf = _console(terminal=True)
    progress = Progress(enabled=False, console=console)
    _use(progress)
    progress.log("step 1")
    assert buf.getvalue() == ""
    assert print_table("t", [{"a": 1}], console=console, enabled=False) == "t\na\n-\n1\n"
    assert buf.getvalue() == ""


def test_terminal_draws_bars():
    console, buf = _console(terminal=True)
    progress = Progress(console=console, transient=False)
    assert progress.live
    _use(progress)
    progress.log("step 1 | [red]x")  # no markup interpretation
    out = buf.getvalue()
    assert "rollout" in out and "4/4" in out and "update" in out
    assert "step 1 | [red]x" in out


def test_step_line_exact():
    assert format_step_line(12, METRICS) == (
        "step 12 | reward 0.53 | len 7.0 | loss -0.012 | kl 0.001 | ent 1.23 | gnorm 0.41 | ess 0.91 | 3.1 s"
    )
    assert [k for k, _ in STEP_LINE_KEYS] == list(METRICS)


def test_step_line_skips_missing_and_custom_keys():
    assert format_step_line(3, {"reward/mean": 0.5, "kl/mean": None, "grad_norm": float("nan")}) == (
        "step 3 | reward 0.50 | gnorm nan"
    )
    assert format_step_line(0, {}) == "step 0"
    line = format_step_line(5, {"policy/clip_frac": 0.0123, "x": 2}, keys=[("policy/clip_frac", "clip {:.1%}"), "x"])
    assert line == "step 5 | clip 1.2% | x 2"


ROWS = [
    {"dataset": "aime24", "avg@64": 0.2, "pass@64": 0.5},
    {"dataset": "amc23", "avg@64": 0.123456, "pass@64": None},
]


def test_table_plain_text_when_not_a_tty():
    console, buf = _console(terminal=False)
    text = print_table("eval step 10", ROWS, console=console)
    assert text == (
        "eval step 10\n"
        "dataset  avg@64  pass@64\n"
        "-------  ------  -------\n"
        "aime24   0.2     0.5\n"
        "amc23    0.1235  -\n"
    )
    assert buf.getvalue() == text


def test_table_rich_on_terminal():
    console, buf = _console(terminal=True)
    text = print_table("eval", ROWS, console=console, columns=["dataset", "pass@64"])
    assert "┃ dataset ┃ pass@64 ┃" in text and "avg@64" not in text
    assert "\x1b[" not in text  # returned without colour codes
    assert "aime24" in buf.getvalue()
