"""Rollout engines: the :class:`RolloutEngine` interface (``base``) and the in-process engine sampling from the
policy being trained (``local.LocalEngine``). Importing this package does not import megatron-core."""

from .base import FINISH_REASONS, RolloutEngine, Sample, SamplingParams  # noqa: F401
from .local import LocalEngine  # noqa: F401

__all__ = ["FINISH_REASONS", "LocalEngine", "RolloutEngine", "Sample", "SamplingParams"]
