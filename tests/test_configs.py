"""Every YAML in configs/algorithm/ loads into a valid AlgorithmConfig; bad settings fail with the key named."""

from pathlib import Path

import pytest

from oar_megatron.config import load_algorithm

ALGO_DIR = Path(__file__).resolve().parents[1] / "configs" / "algorithm"


@pytest.mark.parametrize("path", sorted(ALGO_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_algorithm_config_is_valid(path):
    cfg = load_algorithm(path)
    assert cfg.name == path.stem
    built = cfg.loss.build()
    assert built.name == cfg.loss.name


def test_paper_settings_are_what_the_configs_say():
    aspo = load_algorithm("aspo")
    assert (aspo.loss.build().dual_clip, aspo.kl.coef, aspo.kl.kind, aspo.loss.build().agg) == (3.0, 0.001, "k3", "token-mean")
    gspo = load_algorithm("gspo").loss.build()
    assert (gspo.eps_low, gspo.eps_high, gspo.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    oar = load_algorithm("oar_g")
    assert (oar.shaper.quantile, oar.shaper.beta, oar.shaper.floor, oar.pfinal_mode) == (0.25, 1.0, 0.1, "answer_mean")
    assert load_algorithm("oar_p").pfinal_mode == "last"
    dapo = load_algorithm("dapo")
    assert dapo.advantage.filter_groups and dapo.loss.build().eps_high == 0.28


@pytest.mark.parametrize(
    "override,match",
    [
        ({"loss": {"name": "ppo"}}, "algorithm.loss.name: unknown value 'ppo'"),
        ({"loss": {"eps_low": -1.0}}, "algorithm.loss.eps_low"),
        ({"loss": {"name": "gspo", "dual_clip": 3.0}}, "algorithm.loss.dual_clip: not supported"),
        ({"advantage": {"estimator": "gae"}}, "algorithm.advantage.estimator: unknown 'gae'"),
        ({"shaper": {"name": "oar", "saliency": "lime"}}, "algorithm.shaper.saliency: unknown 'lime'"),
        ({"shaper": {"name": "oar"}, "loss": {"name": "gspo"}}, "combine OAR with 'gspo_token'"),
        ({"kl": {"kind": "k5"}}, "algorithm.kl.kind: unknown 'k5'"),
        ({"rollout_correction": {"mode": "clip"}}, "algorithm.rollout_correction.mode: unknown 'clip'"),
        ({"updates_per_batch": 0}, "algorithm.updates_per_batch: must be >= 1"),
        ({"loss": {"eps_lo": 0.1}}, "algorithm config: Key 'eps_lo' not in 'LossConfig'"),
        ({"updates_per_batch": "many"}, "algorithm config: Value 'many' of type 'str' could not be converted to Integer"),
    ],
)
def test_bad_algorithm_settings(override, match):
    with pytest.raises(ValueError, match=match):
        load_algorithm("grpo", **override)


def test_missing_config_file():
    with pytest.raises(ValueError, match="source: no algorithm config"):
        load_algorithm("no_such_algorithm")
