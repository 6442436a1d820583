"""Hydra's compose API for programs and tests: the same config ``oar-train`` sees for the same overrides."""

from __future__ import annotations

from collections.abc import Sequence

from ..config.train import TrainConfig, train_config_from


def compose_config(overrides: Sequence[str] = ()) -> TrainConfig:
    """``configs/config.yaml`` with command-line style ``overrides`` → a typed :class:`TrainConfig` (not yet
    validated against a world size; ``TrainConfig.validate`` does that)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .app import CONFIG_DIR, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose(config_name="config", overrides=list(overrides))
    return train_config_from(raw)
