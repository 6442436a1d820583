"""A custom reward (imported by path, ``reward.fn=tests.trainer.slow_reward:sleepy``) that hangs for
``OAR_TEST_SLEEP_S`` seconds before answering: a verifier stuck on a pathological response."""

import os
import time


def sleepy(response: str, answer: str, **meta) -> float:
    time.sleep(float(os.environ.get("OAR_TEST_SLEEP_S", "0")))
    return 1.0


def by_length(response: str, answer: str, **meta) -> float:
    """Longer responses score higher: a reward with spread in every group, so every step carries a signal."""
    return len(response) / 10.0


def fails(response: str, answer: str, **meta) -> float:
    """A verifier that raises on every response: scored 0 and counted as an error."""
    raise RuntimeError("verifier crashed")
