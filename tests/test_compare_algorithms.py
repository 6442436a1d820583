"""tools/compare_algorithms.py: the statistics (hand-computed), each task's command, and a tiny pivot study end to
end — two methods, two seeds in parallel; an interrupted study resumed (the unfinished run continues from its checkpoint);
tables, results and plots from what ran."""

import json
import math

import pytest

from tests.tool_loader import load_tool

study = load_tool("compare_algorithms")


def test_task_commands(tmp_path):
    ns = study.argparse.Namespace(out=tmp_path, steps=5, ckpt_every=2, probe_every=3, override=["x.y=1"])
    modsum, pivot = study.command("modsum", "grpo", 1, ns), study.command("pivot", "oar_p", 2, ns)
    assert "+experiment=pivot" not in modsum and not any("saliency_probe" in a for a in modsum)
    assert pivot[3:5] == ["+experiment=pivot", "algorithm=oar_p"] and "eval.saliency_probe_every=3" in pivot
    assert f"logging.run_dir={tmp_path}/pivot/oar_p-seed2" in pivot and pivot[-1] == "x.y=1"
    assert "checkpoint.resume=auto" in pivot and "checkpoint.every=2" in pivot


def test_statistics_by_hand():
    assert study.sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)  # only all-plus and all-minus are as extreme
    assert study.sign_flip_p([0.0, 0.0]) == 1.0 and math.isnan(study.sign_flip_p([]))
    assert study.sign_flip_p([3.0, -1.0]) == pytest.approx(1.0)  # |mean| 1: every pattern is as extreme
    lo, hi = study.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0 and study.bootstrap_ci([1.0, 2.0, 3.0, 4.0]) == (lo, hi)  # seeded
    assert study.first_reach([0.1, 0.5, 0.9, 0.9], target=0.9, window=2) == 4.0
    assert study.first_reach([0.1, 0.2], target=0.9, window=1) is None
    runs = {"grpo": {0: {"steps_to_target": 100.0, "reached": True}, 1: {"steps_to_target": 120.0, "reached": True}},
            "oar_g": {0: {"steps_to_target": 80.0, "reached": True}, 1: {"steps_to_target": 90.0, "reached": False}}}
    for r in runs.values():
        for v in r.values():
            v.update({m: math.nan for m in study.METRICS if m != "steps_to_target"})
    agg = study.aggregate(runs)
    assert agg["oar_g"]["steps_to_target"]["mean"] == 85.0 and agg["oar_g"]["reached"] == 1
    assert agg["oar_g"]["steps_to_target"]["diff"] == -25.0 and agg["oar_g"]["steps_to_target"]["p"] == 0.5
    assert "p" not in agg["grpo"]["steps_to_target"] and "reward_last" not in agg["grpo"]


TINY = ["data.synthetic.filler_len=8", "data.synthetic.format_warmup_steps=2", "rollout.prompts_per_step=4",
        "rollout.n_samples=4", "trainer.micro_batch_size=8", "rollout.max_new_tokens=16", "eval.k=1", "eval.ks=[1]"]


@pytest.mark.dist
@pytest.mark.megatron
def test_a_tiny_study_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--out", str(out), "--algorithms", "grpo", "oar_g", "--seeds", "0", "1", "--steps", "2", "--window",
            "1", "--probe-every", "1", "--ckpt-every", "1", "--jobs", "2", "--filler-len", "8", "--tasks", "pivot"]
    args += [a for o in TINY for a in ("--override", o)]
    assert study.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    for task in ("pivot",):
        agg = res["tasks"][task]["aggregate"]
        assert set(agg) == {"grpo", "oar_g"} and agg["oar_g"]["seeds"] == [0, 1]
        assert agg["oar_g"]["reward_last"]["n"] == 2 and "p" in agg["oar_g"]["reward_last"]
        table = (out / task / "table.md").read_text().splitlines()
        assert sum(line.startswith("oar_g ") for line in table) == 1 and (out / task / "reward.png").exists()
    per = res["tasks"]["pivot"]["per_seed"]["oar_g"]["0"]
    assert 0.0 <= per["precision"] <= 1.0 and 0.0 <= per["precision_oar_p"] <= 1.0  # the probe ran
    assert (out / "pivot" / "saliency_precision.png").exists()

    # resume: a longer study reuses nothing that is short of the new last step and continues it from its checkpoint
    capsys.readouterr()
    again = [a if a != "2" else "3" for a in args]
    again[again.index("--algorithms") + 1:again.index("--seeds")] = ["oar_g"]
    again[again.index("--seeds") + 1:again.index("--steps")] = ["0"]
    assert study.main(again) == 0
    steps = [json.loads(x)["step"] for x in (out / "pivot" / "oar_g-seed0" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["phase"] == "train"]
    assert steps == [1, 2, 3]
    assert "resumed from" in (out / "pivot" / "oar_g-seed0" / "run.log").read_text()
    assert study.main(again) == 0
    assert "pivot/oar_g/seed0: done before" in capsys.readouterr().out
