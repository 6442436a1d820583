"""Reward functions for the RL loop: a registry (names or import paths) and a runner with timeouts.

Pure Python: no torch, Megatron or Hydra imports (reward worker processes start in a fraction of a second).
Built-ins: ``math`` (math-verify), ``synthetic_modsum``, ``exact``.
"""

from .registry import RewardRunner, get_reward, overlong_penalty, register_reward, reward_names  # noqa: F401
from . import math as _math, synthetic as _synthetic  # noqa: F401,E402  (register the built-ins)
