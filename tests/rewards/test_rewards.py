import pytest

from oar_megatron.rewards import RewardRunner, get_reward, overlong_penalty, register_reward, reward_names


# ------------------------------------------------------------------------------------------------------ built-ins


@pytest.mark.parametrize("response,answer,expected", [
    ("\\boxed{1/2}", "0.5", 1.0),
    ("so the answer is \\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("first \\boxed{3}, no wait: \\boxed{2}", "2", 1.0),   # the last box counts
    ("\\boxed{3}", "2", 0.0),
    ("\\boxed{-2}", "2", 0.0),
    ("I do not know", "2", 0.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
    ("\\boxed{__import__('os').system('echo hacked')}", "0", 0.0),  # parsed, never evaluated
])
def test_math_reward_hand_cases(response, answer, expected):
    assert get_reward("math")(response, answer) == expected


def test_math_gold_already_boxed():
    assert get_reward("math")("\\boxed{4}", "\\boxed{4}") == 1.0


def test_synthetic_and_exact():
    f = get_reward("synthetic_modsum")
    assert f("ab#1", "1") == 1.0
    assert f("a#2b#1 ", "1") == 1.0          # text after the LAST '#', stripped
    assert f("a#1b#2", "1") == 0.0
    assert f("ab1", "1") == 0.0              # no '#'
    assert f("ab#1<eos>", "1") == 1.0
    assert f("ab#11", "1") == 0.0
    g = get_reward("exact")
    assert (g(" 42\n", "42"), g("42.0", "42")) == (1.0, 0.0)


# ------------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_import_paths():
    assert {"math", "exact", "synthetic_modsum"} <= set(reward_names())
    f = get_reward("tests.rewards.helpers:length_reward")
    assert f("abc", "x") == 3.0

    @register_reward("test_always_half")
    def half(response, answer, **meta):
        return 0.5

    assert get_reward("test_always_half") is half
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_always_half")(lambda r, a, **m: 0.0)


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown name 'nope'.*'math'"),
    ("tests.rewards.no_such_module:f", "cannot import module"),
    ("tests.rewards.helpers:missing", "has no attribute"),
    ("tests.rewards.helpers:NOT_CALLABLE", "not callable"),
    ("tests.rewards.helpers:", "package.module:function"),
    ("", "registered name"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        get_reward(spec)


# --------------------------------------------------------------------------------------------------------- runner


def test_runner_in_process_meta_dict_scores_and_errors():
    with RewardRunner("tests.rewards.helpers:length_reward") as run:
        assert not run.isolated
        scores, stats = run(["ab", "abcd"], ["", ""], [{"bonus": 0.5}, {"dataset": "d", "row": 3}])
        assert scores == [2.5, 4.0]
        assert stats["reward/score_mean"] == 3.25 and stats["reward/errors"] == 0.0
    scores, _ = RewardRunner("tests.rewards.helpers:dict_reward")(["x", "y"], ["x", "x"])
    assert scores == [0.25, 0.0]
    run = RewardRunner("tests.rewards.helpers:raising_reward")
    scores, stats = run(["ok", "boom", "boom"], ["", "", ""])
    assert scores == [1.0, 0.0, 0.0] and stats["reward/errors"] == 2.0
    assert run.last_errors[0] == "RuntimeError: kaboom" and run.total_errors == 2
    scores, stats = RewardRunner("tests.rewards.helpers:nan_reward")(["x"], ["y"])
    assert scores == [0.0] and stats["reward/errors"] == 1.0


def test_runner_isolated_math_matches_in_process():
    responses = ["\\boxed{1/2}", "\\boxed{3}", "x = 7", "\\boxed{\\frac{2}{4}}"]
    answers = ["0.5", "2", "7", "1/2"]
    with RewardRunner("math", timeout_s=20.0) as run:
        assert run.isolated
        scores, stats = run(responses, answers)
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert stats["reward/pass_rate"] == 0.75 and stats["reward/timeouts"] == 0.0


def test_isolated_timeout_scores_zero_and_next_call_works():
    with RewardRunner("tests.rewards.helpers:sleepy_reward", timeout_s=1.0, isolated=True, num_workers=2) as run:
        scores, stats = run(["0", "30", "0", "0.1"], ["", "", "", ""])
        assert scores == [1.0, 0.0, 1.0, 1.0]
        assert stats["reward/timeouts"] == 1.0 and stats["reward/errors"] == 0.0
        assert stats["reward/time_s"] < 10
        scores, stats = run(["0", "0"], ["", ""])  # a fresh pool took over
        assert scores == [1.0, 1.0] and stats["reward/timeouts"] == 0.0
        assert run.total_timeouts == 1


# -------------------------------------------------------------------------------------------------------- overlong


def test_overlong_penalty_hand_values():
    # L_max = 20, L_cache = 4: free up to 16, linear to -1 at 20, -1 beyond
    kw = dict(max_len=20, cache_len=4)
    assert [overlong_penalty(L, **kw) for L in (1, 16, 17, 18, 19, 20, 21, 100)] == \
        [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert overlong_penalty(18, max_len=20, cache_len=4, factor=0.5) == -0.25


def test_runner_adds_overlong_penalty():
    run = RewardRunner("exact", overlong={"max_len": 20, "cache_len": 4})
    scores, stats = run(["a", "a", "b", "a"], ["a"] * 4, response_lengths=[10, 17, 18, 20])
    assert scores == [1.0, 0.75, -0.5, 0.0]
    assert stats["reward/verifier_mean"] == 0.75 and run.last_verifier_scores == [1.0, 1.0, 0.0, 1.0]
    assert stats["reward/overlong_frac"] == 0.75
    assert stats["reward/overlong_penalty_mean"] == pytest.approx(-(0.25 + 0.5 + 1.0) / 4)
    with pytest.raises(ValueError, match="response_lengths"):
        run(["a"], ["a"])


@pytest.mark.parametrize("overlong", [{"max_len": 10, "cache_len": 11}, {"max_len": 10}, {"max_len": 10,
                                      "cache_len": 2, "factr": 1.0}, {"max_len": 10, "cache_len": 2, "factor": -1}])
def test_bad_overlong_config(overlong):
    with pytest.raises(ValueError, match="overlong"):
        RewardRunner("exact", overlong=overlong)


def test_runner_bad_args():
    with pytest.raises(ValueError, match="timeout_s"):
        RewardRunner("exact", timeout_s=0)
    with pytest.raises(ValueError, match="answers"):
        RewardRunner("exact")(["a"], [])


@pytest.mark.parametrize("text", ["no box", "\\boxed{1}", "a \\boxed{1} b \\boxed{x^{2}} c", "\\boxed{\\frac{1}{2}",
                                  "\\boxed{}", "\\boxed{{a}{b}}}"])
def test_last_boxed_agrees_with_segment(text):
    from oar_megatron.algorithms.segment import extract_boxed
    from oar_megatron.rewards.math import last_boxed

    assert last_boxed(text) == extract_boxed(text)


def test_rewards_package_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, oar_megatron.rewards as r\n"
            "assert r.get_reward('math')('\\\\boxed{1}', '1') == 1.0\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_isolated_errors_and_a_dying_worker_are_counted():
    with RewardRunner("tests.rewards.helpers:raising_reward", isolated=True, num_workers=1) as run:
        scores, stats = run(["boom", "ok"], ["", ""])
        assert scores == [0.0, 1.0] and stats["reward/errors"] == 1.0
        assert run.last_errors == ["RuntimeError: kaboom"]
    with RewardRunner("tests.rewards.helpers:crashing_reward", isolated=True, num_workers=2) as run:
        scores, stats = run(["ok", "crash", "ok"], ["", "", ""])
        assert scores[1] == 0.0 and stats["reward/errors"] >= 1.0
        scores, stats = run(["ok", "ok"], ["", ""])  # a fresh pool replaced the broken one
        assert scores == [1.0, 1.0] and stats["reward/errors"] == 0.0
