"""tools/plot_metrics.py on two synthetic runs: PNG per key, missing keys skipped, exit code 2 with nothing to plot."""

import subprocess
import sys

import pytest

from oar_megatron.metrics import MetricsLogger

from tests.tool_loader import ROOT, load_tool
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tool():
    return load_tool("plot_metrics")


@pytest.fixture()
def runs(tmp_path):
    paths = []
    for name, slope, ess in (("grpo", 0.02, False), ("oar_g", 0.04, True)):
        with MetricsLogger(tmp_path / name, tensorboard=False) as log:
            for s in range(1, 21):
                m = {"reward/mean": min(1.0, slope * s), "response/length_mean": 30.0 - s, "policy/clip_frac": 0.01}
                if ess:
                    m["oar/ess_ratio"] = 0.9 if s != 5 else float("nan")
                log.log(s, m)
                if s % 10 == 0:
                    log.log(s, {"reward/mean": 99.0, "toy/avg@4": 0.5}, phase="eval")
        paths.append(tmp_path / name / "metrics.jsonl")
    return paths


def test_plot_runs_two_runs(runs, tmp_path):
    tool = _tool()
    notes = []
    written = tool.plot_runs(runs, out_dir=tmp_path / "plots", smooth=3, log=notes.append)
    assert [p.name for p in written] == [
        "reward_mean.png", "response_length_mean.png", "oar_ess_ratio.png", "policy_clip_frac.png"
    ]
    for p in written:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
    assert notes == ["note: grpo: no values for 'oar/ess_ratio', skipped"]
    # Eval records are not mixed into the train curve.
    steps, values = tool.series(tool.read_metrics(runs[0]), "reward/mean")
    assert steps == list(range(1, 21)) and max(values) < 99
    assert tool.series(tool.read_metrics(runs[0]), "toy/avg@4", phase="eval") == ([10, 20], [0.5, 0.5])


def test_smooth_series():
    tool = _tool()
    assert tool.smooth_series([1.0, 3.0, float("nan"), 5.0], 2)[:2] == [1.0, 2.0]
    assert tool.smooth_series([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    assert tool.smooth_series([1.0, 3.0], 1) == [1.0, 3.0]


def test_no_plottable_keys_raises(runs, tmp_path):
    tool = _tool()
    with pytest.raises(tool.NoPlottableKeys):
        tool.plot_runs(runs, ["nope/x"], tmp_path / "plots", log=lambda m: None)
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        tool.plot_runs(runs, ["reward/mean"], tmp_path / "plots", labels=["a"])


def test_cli(runs, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "tools" / "plot_metrics.py"), *map(str, runs), "--out", str(out)]
    ok = subprocess.run(cmd + ["--keys", "reward/mean,kl/mean", "--labels", "a,b"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (out / "reward_mean.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "kl_mean.png").exists()
    assert "note: a: no values for 'kl/mean'" in ok.stderr
    bad = subprocess.run(cmd + ["--keys", "kl/mean"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "nothing to plot" in bad.stderr and "kl/mean" in bad.stderr
    missing_cmd = cmd[:2] + [str(tmp_path / "none.jsonl"), "--out", str(out)]
    missing = subprocess.run(missing_cmd, capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr
