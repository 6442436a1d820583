"""Typed configuration dataclasses (the schema behind the YAML files in ``configs/``)."""

from .algorithm import AdvantageConfig, AlgorithmConfig, KLConfig, LossConfig, RolloutCorrectionConfig, ShaperConfig, load_algorithm  # noqa: F401
from .model import MODEL_PRESETS, ModelConfig, load_model, model_preset  # noqa: F401
from .parallel import ParallelConfig, ParallelLayout, load_parallel  # noqa: F401
