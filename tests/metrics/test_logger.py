"""MetricsLogger: the JSONL record, resume truncation, kill tolerance, TensorBoard and the optional backends."""

import builtins
import json
import math

import pytest
import torch

from oar_megatron.metrics import MetricsLogger, read_metrics, truncate_metrics
from oar_megatron.metrics import logger as logger_mod


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_jsonl_round_trip(tmp_path):
    with MetricsLogger(tmp_path / "run", tensorboard=False) as log:
        log.log(1, {"reward/mean": 0.5, "loss": {"total": -0.25}, "n": 3, "ok": True, "note": "x"})
        log.log(1, {"aime24/avg@64": 0.125}, phase="eval")
        log.log(2, {"reward/mean": 0.75, "kl/mean": torch.tensor(0.5), "bad": float("nan"), "inf": float("inf")})
    path = tmp_path / "run" / "metrics.jsonl"
    records = read_metrics(path)
    assert _strip_time(records) == [
        {"step": 1, "phase": "train", "reward/mean": 0.5, "loss/total": -0.25, "n": 3, "ok": True, "note": "x"},
        {"step": 1, "phase": "eval", "aime24/avg@64": 0.125},
        {"step": 2, "phase": "train", "reward/mean": 0.75, "kl/mean": 0.5, "bad": None, "inf": None},
    ]
    assert all(isinstance(r["time"], float) for r in records)
    lines = path.read_text().splitlines()
    assert '"bad": null' in lines[2] and "NaN" not in lines[2]  # strict JSON
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


def test_bad_values_and_reserved_names(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 2})
        with pytest.raises(TypeError, match="'v'"):
            log.log(1, {"v": [1, 2]})
        with pytest.raises(TypeError, match="'t'"):
            log.log(1, {"t": torch.ones(2)})


def test_disabled_writes_nothing(tmp_path):
    run = tmp_path / "rank1"
    with MetricsLogger(run, enabled=False, tensorboard=True, wandb={"project": "x"}) as log:
        log.log(1, {"reward/mean": 1.0})
        assert log.truncate_after(0) == 0
    assert not run.exists()


def _run(path, steps, **kwargs):
    with MetricsLogger(path, tensorboard=False, **kwargs) as log:
        for s in steps:
            log.log(s, {"reward/mean": s / 10, "loss/total": -s / 100})
            if s % 2 == 0:
                log.log(s, {"toy/avg@4": s / 20}, phase="eval")


def test_resume_equals_uninterrupted(tmp_path):
    _run(tmp_path / "straight", range(1, 9))
    # Interrupted run: got to step 6, last checkpoint at step 4, killed mid-write of a line.
    _run(tmp_path / "resumed", range(1, 7))
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "time": 1.0, "pha')
    _run(tmp_path / "resumed", range(5, 9), resume_step=4)
    straight = _strip_time(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    resumed = _strip_time(read_metrics(tmp_path / "resumed" / "metrics.jsonl"))
    assert resumed == straight and len(straight) == 12


def test_truncate_after_method_and_function(tmp_path):
    _run(tmp_path, range(1, 6))
    path = tmp_path / "metrics.jsonl"
    assert truncate_metrics(path, 5) == 0
    assert truncate_metrics(path, 3) == 3  # train 4, eval 4, train 5
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 2, 3]
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        assert log.truncate_after(1) == 3
        log.log(2, {"reward/mean": 0.2})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert truncate_metrics(tmp_path / "missing.jsonl", 0) == 0


def test_truncated_last_line_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]
    # A fresh (non-resume) logger cuts the partial line before appending, so the file stays readable.
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(3, {"a": 3})
    assert [r["a"] for r in read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as log:
        log.log(1, {"reward/mean": 0.25, "note": "skipped"})
        log.log(2, {"reward/mean": 0.75})
        log.log(2, {"toy/avg@4": 0.5}, phase="eval")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"reward/mean", "eval/toy/avg@4"}
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.25), (2, 0.75)]
    assert acc.Scalars("eval/toy/avg@4")[0].value == 0.5


def _block_import(monkeypatch, blocked):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == blocked or name.startswith(blocked + "."):
            raise ImportError(f"No module named {blocked!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_tensorboard_required_but_missing(tmp_path, monkeypatch):
    _block_import(monkeypatch, "torch.utils.tensorboard")
    with pytest.raises(ImportError, match="needs the tensorboard package"):
        MetricsLogger(tmp_path / "a", tensorboard=True)
    with MetricsLogger(tmp_path / "b", tensorboard="auto") as log:  # auto: JSONL only
        log.log(1, {"x": 1.0})
    assert not (tmp_path / "b" / "tensorboard").exists()
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[0]["x"] == 1.0


def test_wandb_missing_is_clear(tmp_path, monkeypatch):
    _block_import(monkeypatch, "wandb")
    with pytest.raises(ImportError, match="wandb is not installed"):
        MetricsLogger(tmp_path, tensorboard=False, wandb={"project": "oar"})


def test_wandb_receives_scalars(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            calls.append(("init", kwargs))
            return FakeRun()

    monkeypatch.setattr(logger_mod, "_import_wandb", lambda: FakeWandb)
    with MetricsLogger(tmp_path, tensorboard=False, wandb={"project": "oar", "name": "t"}) as log:
        log.log(3, {"reward/mean": 0.5, "note": "x", "bad": math.nan})
        log.log(3, {"toy/pass@4": 1.0}, phase="eval")
    assert calls[0] == ("init", {"project": "oar", "name": "t"})
    assert calls[1][0] == "log" and calls[1][2] == 3 and calls[1][1]["reward/mean"] == 0.5
    assert set(calls[1][1]) == {"reward/mean", "bad"}
    assert calls[2] == ("log", {"eval/toy/pass@4": 1.0}, 3)
    assert calls[3] == ("finish",)


def test_flush_every_and_closed(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, flush_every=3)
    log.log(1, {"a": 1.0})
    log.log(2, {"a": 2.0})
    log.log(3, {"a": 3.0})
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3  # flushed on the third call
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        log.log(4, {"a": 4.0})
    with pytest.raises(ValueError, match="flush_every"):
        MetricsLogger(tmp_path, flush_every=0)
    with pytest.raises(ValueError, match="tensorboard must be"):
        MetricsLogger(tmp_path, tensorboard="yes")


def test_tensorboard_resume_purges_later_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as log:
        for s in range(1, 5):
            log.log(s, {"reward/mean": float(s)})
    with MetricsLogger(tmp_path, tensorboard=True, resume_step=2) as log:
        for s in range(3, 5):
            log.log(s, {"reward/mean": 10.0 * s})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
