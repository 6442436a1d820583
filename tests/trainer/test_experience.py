"""DAPO dynamic sampling (trainer/experience.py) keeps groups by the verifier's accuracy, not by the shaped scores:
a group whose verdicts all agree carries no accuracy signal even when the overlong penalty makes its scores differ."""

from oar_megatron.config.algorithm import load_algorithm
from oar_megatron.trainer.experience import Group, filter_stats, group_advantages_of, select_groups


def _group(scores, passed, index):
    n = len(scores)
    return Group([1, 2], [[3] * (i + 1) for i in range(n)], [[0.0] * (i + 1) for i in range(n)], ["stop"] * n,
                 list(scores), list(passed), index, "0")


def test_a_group_differing_only_by_the_overlong_penalty_is_uninformative():
    # every sample failed the verifier; two of them were too long and penalised (shaped scores 0, -0.25, -1, 0)
    overlong_only = _group([0.0, -0.25, -1.0, 0.0], [False] * 4, 0)
    # every sample passed; one penalised: still all correct
    all_correct = _group([1.0, 0.5, 1.0, 1.0], [True] * 4, 1)
    mixed = _group([1.0, 0.0, 0.0, 1.0], [True, False, False, True], 2)
    # verdicts differ although the shaped scores tie (a passing but penalised sample next to a failing one)
    tie = _group([0.0, 0.0, 1.0, 0.0], [True, False, True, False], 3)
    assert not overlong_only.informative and not all_correct.informative
    assert mixed.informative and tie.informative

    chosen, filled = select_groups([overlong_only, mixed, all_correct, tie], 2, dynamic=True)
    assert [g.record_index for g in chosen] == [2, 3] and filled == 0
    chosen, filled = select_groups([overlong_only, mixed, all_correct], 2, dynamic=True)
    assert [g.record_index for g in chosen] == [2, 0] and filled == 1

    stats = filter_stats([overlong_only, all_correct, mixed, tie])
    assert stats == {"rollout/groups_all_correct": 1.0, "rollout/groups_all_wrong": 1.0,
                     "rollout/groups_uninformative": 2.0}
    # every group all correct: counted as such (not relative to the other groups' rewards)
    assert filter_stats([all_correct, all_correct])["rollout/groups_all_correct"] == 2.0


def test_advantages_still_use_the_shaped_scores():
    # the kept group's advantages come from the shaped scores (the overlong penalty shapes credit within a group)
    g = _group([1.0, 0.5, 0.0, 0.0], [True, True, False, False], 0)
    adv = group_advantages_of([g], load_algorithm("dr_grpo"))
    assert adv.tolist() == [0.625, 0.125, -0.375, -0.375]
