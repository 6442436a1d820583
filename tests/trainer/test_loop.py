"""End-to-end runs of the RL loop on the tiny Megatron policy (CPU, gloo): every algorithm runs a few steps with
finite losses and the metrics the issue lists; a resumed run reproduces the uninterrupted run's metrics exactly;
bad data rows are skipped and named; a hanging reward times out and is counted. Each test is one spawn (megatron is
imported once per spawn)."""

import json

import pytest

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=4", "rollout.max_new_tokens=7",
         "data.synthetic.format_warmup_steps=2", "eval.at_start=false", "eval.at_end=false", "checkpoint.every=0",
         "checkpoint.save_final=false", "trainer.progress=false", "logging.step_line=false",
         "logging.tensorboard=false"]
ALGORITHMS = ["grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "aspo", "cispo", "oar_g", "oar_p", "gspo_token_oar_g"]
TIME_KEYS = ("time", "time/", "throughput/", "rollout/tokens_per_s", "reward/time_s")


def _run(overrides, steps):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(SMALL + [f"trainer.steps={steps}"] + list(overrides))
    trainer = Trainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    return history


def _every_algorithm(rank, world, tmp):
    out = {}
    for name in ALGORITHMS:
        hist = _run([f"algorithm={name}", f"logging.run_dir={tmp}/{name}",
                     "reward.fn=tests.trainer.slow_reward:by_length"], steps=2)
        out[name] = [{k: v for k, v in m.items() if isinstance(v, float)} for m in hist]
    return out


def test_every_algorithm_runs_the_loop(tmp_path):
    (res,) = run_ranks(_every_algorithm, 1, str(tmp_path), timeout=900)
    for name, hist in res.items():
        assert len(hist) == 2, name
        for m in hist:
            for key in ("reward/mean", "reward/pass_rate", "response/length_mean", "loss/total", "grad_norm",
                        "entropy/mean", "rollout/logp_diff_abs_mean", "time/rollout_s", "time/update_s",
                        "throughput/total_tokens_per_s", "policy/clip_frac"):
                assert key in m and m[key] == m[key], (name, key)  # present and not NaN
            assert 0.0 <= m["reward/pass_rate"] <= 1.0
            # the engine's log-probs are the trainer's π_old before the first update of the step
            assert m["rollout/logp_diff_abs_mean"] < 1e-4, (name, m["rollout/logp_diff_abs_mean"])
        if "oar" in name:
            assert all("oar/ess_ratio" in m and 0 < m["oar/ess_ratio"] <= 1 for m in hist), name
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines if x["phase"] == "train"] == [1, 2], name
    # ASPO runs several updates per rollout batch: later updates are off-policy, so ratios leave 1
    assert res["aspo"][1]["policy/ratio_mean"] != 1.0


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


def _resume(rank, world, tmp):
    full = _run([f"logging.run_dir={tmp}/full", "checkpoint.every=2"], steps=4)
    _run([f"logging.run_dir={tmp}/part", "checkpoint.every=2"], steps=2)
    resumed = _run([f"logging.run_dir={tmp}/part", "checkpoint.every=2"], steps=4)
    return {"full": _floats(full), "resumed": _floats(resumed)}


def _floats(hist):
    return [{k: v for k, v in m.items() if isinstance(v, float)} for m in hist]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    (res,) = run_ranks(_resume, 1, str(tmp_path), timeout=900)
    assert len(res["resumed"]) == 2  # steps 3 and 4 only
    assert _strip(res["resumed"]) == _strip(res["full"][2:])
    lines = lambda d: _strip(json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
    assert lines("part") == lines("full")


def _make_tokenizer_dir(path):
    """A character-level Hugging Face tokenizer with a chat template (no network)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-=*/ .,?#abcdefghijklmnopqrstuvwxyz{}\\")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    tok.save_pretrained(path)
    return len(vocab)


def _file_data_and_timeouts(rank, world, tmp):
    import os

    vocab = _make_tokenizer_dir(f"{tmp}/tok")
    rows = [{"question": f"what is {a}+{b}?", "answer": f"so #### {a + b}"} for a in range(3) for b in range(3)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")
    lines.insert(5, json.dumps({"question": "no answer here"}))
    with open(f"{tmp}/gsm.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    common = ["data=gsm8k", f"data.path={tmp}/gsm.jsonl", f"data.tokenizer={tmp}/tok", "data.prompt_template=null",
              f"model.vocab_size={vocab}", "algorithm=grpo"]
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    cfg = compose_config(SMALL + common + ["reward=math", "trainer.steps=1", f"logging.run_dir={tmp}/math"])
    trainer = Trainer(cfg)
    try:
        skipped = list(trainer.dataset.skipped)
        hist = trainer.fit()
    finally:
        trainer.close()
    os.environ["OAR_TEST_SLEEP_S"] = "5"
    hang = _run(common + ["reward.fn=tests.trainer.slow_reward:sleepy", "reward.isolated=true", "reward.timeout_s=0.5",
                          "rollout.prompts_per_step=2", "rollout.n_samples=2", f"logging.run_dir={tmp}/hang"], steps=1)
    return {"skipped": skipped, "math": _floats(hist), "hang": _floats(hang)}


def test_file_dataset_bad_rows_and_reward_timeouts(tmp_path, capfd):
    (res,) = run_ranks(_file_data_and_timeouts, 1, str(tmp_path), timeout=900)
    assert [n for n, _ in res["skipped"]] == [3, 6]  # file row numbers of the broken JSON and the missing answer
    assert "answer" in res["skipped"][1][1]
    out = capfd.readouterr().out
    assert "2 rows skipped (row 3:" in out
    assert res["math"][0]["reward/timeouts"] == 0.0
    hang = res["hang"][0]
    assert hang["reward/timeouts"] == 4.0  # every response: the reward sleeps past the timeout, scored 0
    assert hang["reward/mean"] == 0.0
