"""Reward functions for the tests, importable by path (and so by spawned worker processes)."""

import time


def length_reward(response: str, answer: str, **meta) -> float:
    return float(len(response)) + meta.get("bonus", 0.0)


def dict_reward(response: str, answer: str, **meta) -> dict:
    return {"score": 0.25 if response == answer else 0.0, "extra": 1}


def sleepy_reward(response: str, answer: str, **meta) -> float:
    """Sleeps ``float(response)`` seconds, then scores 1."""
    time.sleep(float(response))
    return 1.0


def raising_reward(response: str, answer: str, **meta) -> float:
    if response == "boom":
        raise RuntimeError("kaboom")
    return 1.0


def nan_reward(response: str, answer: str, **meta) -> float:
    return float("nan")


NOT_CALLABLE = 3


def crashing_reward(response: str, answer: str, **meta) -> float:
    """Kills its own (worker) process on 'crash'."""
    if response == "crash":
        import os

        os._exit(3)
    return 1.0
