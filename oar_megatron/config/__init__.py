"""Typed configuration dataclasses (the schema behind the YAML files in ``configs/``)."""

from .algorithm import AdvantageConfig, AlgorithmConfig, KLConfig, LossConfig, RolloutCorrectionConfig, ShaperConfig, load_algorithm  # noqa: F401
