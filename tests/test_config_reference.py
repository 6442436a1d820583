"""docs/config_reference.md is generated from the typed schema and must match it (tools/gen_config_reference.py).

Also: every key with listed allowed values (``KEY_CHOICES``) is really refused outside its set by
``TrainConfig.validate`` with the key named, and the description convention of the generator reads comments as
documented (a trailing comment, its continuation lines, a blank line before a group's heading comment).
"""

from __future__ import annotations

import copy
import sys

import pytest

from oar_megatron.config.train import KEY_CHOICES
from tests.tool_loader import ROOT, load_tool

REGENERATE = "python tools/gen_config_reference.py"


@pytest.fixture(scope="module")
def tool():
    return load_tool("gen_config_reference")


@pytest.fixture(scope="module")
def generated(tool):
    return tool.generate()


def test_config_reference_is_up_to_date(generated):
    committed = (ROOT / "docs" / "config_reference.md").read_text()
    assert committed == generated, (f"docs/config_reference.md is stale: the schema changed. Regenerate it with "
                                    f"`{REGENERATE}` and commit the result.")


def test_reference_lists_every_key_with_type_default_and_choices(generated):
    from oar_megatron.trainer.compose import compose_config

    run = compose_config([])
    # a plain key: type, schema default, embedded-run default, description
    assert ("| `rollout.n_samples` | `int` | `8` | `8` |  | responses per prompt (the GRPO group size) |"
            in generated)
    # the embedded run differs from the schema where config.yaml's groups set it
    assert f"| `model.num_layers` | `int` | required | `{run.model.num_layers}` |" in generated
    assert "| `algorithm.shaper.name` | `str` | `none` | `oar` | `none`, `oar` |" in generated
    # nested groups and list items get their own sections
    for heading in ("### algorithm.loss", "### data.synthetic", "### reward.overlong", "### eval.datasets[]"):
        assert heading in generated
    # a registry's names are listed as validation reads them
    assert "`gspo_token`" in generated.split("| `algorithm.loss.name` |")[1].splitlines()[0]


def test_check_names_the_regenerate_command(tool, tmp_path, capsys):
    stale = tmp_path / "config_reference.md"
    stale.write_text("# old\n")
    assert tool.main(["--check", "--out", str(stale)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert tool.main(["--out", str(stale)]) == 0
    assert tool.main(["--check", "--out", str(stale)]) == 0


# keys whose check only runs in some configurations: what the config needs for validation to look at the key
CONTEXT = {
    "model.moe_router_score_function": {"model.num_moe_experts": 4},
    "model.moe_router_dtype": {"model.num_moe_experts": 4},
    "model.moe_router_load_balancing_type": {"model.num_moe_experts": 4},
    "model.moe_token_dispatcher_type": {"model.num_moe_experts": 4},
    "algorithm.rollout_correction.level": {"algorithm.rollout_correction.mode": "tis"},
    "rollout.weight_sync": {"rollout.engine": "sglang"},
}


def _set(obj, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def test_every_listed_choice_is_enforced():
    """A value outside each KEY_CHOICES set is refused by TrainConfig.validate, naming the key; the embedded run's
    config (oar_g: OAR shaping on) plus CONTEXT reaches every check."""
    from oar_megatron.trainer.compose import compose_config

    base = compose_config([])
    base.validate()
    for key, allowed in KEY_CHOICES.items():
        cfg = copy.deepcopy(base)
        for k, v in CONTEXT.get(key, {}).items():
            _set(cfg, k, v)
        cfg.validate()  # the context alone is valid
        _set(cfg, key, "not-a-choice")
        with pytest.raises(ValueError) as err:
            cfg.validate()
        assert str(err.value).startswith(key), f"{key}: refused, but by another check: {err.value}"
        assert "not-a-choice" in str(err.value), str(err.value)
        values = allowed() if callable(allowed) else allowed
        assert values and all(isinstance(v, str) for v in values), key


def test_comment_convention(tmp_path, tool, monkeypatch):
    src = tmp_path / "schema_example.py"
    src.write_text(
        "from dataclasses import dataclass\n\n\n"
        "@dataclass\nclass Example:\n"
        "    a: int = 1  # first line\n"
        "    # continued\n"
        "    b: int = 2\n"
        "    c: str = 'x'  # own comment\n"
        "\n"
        "    # a heading, not c's\n"
        "    d: float = 0.5  # d's\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("schema_example", None)
    import schema_example

    assert tool.field_comments(schema_example.Example) == {"a": "first line continued", "c": "own comment",
                                                           "d": "d's"}
