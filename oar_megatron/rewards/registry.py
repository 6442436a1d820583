"""Reward functions by name or import path, and the runner that scores a batch of responses safely.

A reward function has one signature:

    fn(response: str, answer: str, **meta) -> float        (a dict with a "score" entry is accepted too)

``response`` is the decoded response (``Tokenizer.response_text``: up to the first EOS, special tokens dropped),
``answer`` the dataset's reference answer, ``meta`` the record's meta dict (``dataset``, ``row``, ...); functions
must accept and ignore meta keys they do not use.

``RewardRunner`` scores a batch. Verifiers that parse model output (math) run ISOLATED: in a spawned process pool
with a per-item timeout. A timed-out item scores 0.0 and is counted; the pool (whose worker is stuck) is killed and
a fresh one started, so a pathological response never blocks training. An exception in a reward function scores
0.0 and is counted. Cheap functions (exact match, the synthetic task) run in-process.

DAPO overlong penalty (ALGORITHMS.md §3 Archer2.0 settings; DAPO, arXiv 2503.14476, eq. 13), added to the score:

    R_len(y) = 0                                  |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
             = -1                                 |y| > L_max
    score = verifier score + factor * R_len(y)
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
_REWARDS: dict[str, RewardFn] = {}
# Built-ins that parse free-form model output and so default to isolated execution.
_ISOLATED_BY_DEFAULT = {"math"}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn(response, answer, **meta)`` under ``name``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_reward: expected a non-empty name without ':', got {name!r}")

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name] is not fn:
            raise ValueError(f"register_reward: {name!r} is already registered to {_REWARDS[name].__qualname__}")
        _REWARDS[name] = fn
        return fn

    return deco


def reward_names() -> list[str]:
    return sorted(_REWARDS)


def get_reward(spec: str | RewardFn) -> RewardFn:
    """A registered name (``math``, ``exact``, ``synthetic_modsum``) or ``"package.module:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"reward: expected a registered name or 'package.module:function', got {spec!r}")
    if ":" not in spec:
        if spec not in _REWARDS:
            raise ValueError(f"reward: unknown name {spec!r}; registered: {reward_names()}, "
                             f"or give an import path 'package.module:function'")
        return _REWARDS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward: {spec!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"reward: cannot import module {module_name!r} for {spec!r}: {type(e).__name__}: {e}") from e
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward: {spec!r} is a {type(fn).__name__}, not callable")
    return fn


def overlong_penalty(length: int, *, max_len: int, cache_len: int, factor: float = 1.0) -> float:
    """``factor * R_len`` of DAPO eq. 13 (module docstring) for a response of ``length`` tokens."""
    threshold = max_len - cache_len
    if length <= threshold:
        return 0.0
    if length <= max_len:
        return factor * (threshold - length) / cache_len
    return -factor


def _check_overlong(overlong: dict | None) -> dict | None:
    if overlong is None:
        return None
    if not isinstance(overlong, dict) or set(overlong) - {"max_len", "cache_len", "factor"}:
        raise ValueError(f"overlong: expected {{'max_len', 'cache_len', 'factor'}}, got {overlong!r}")
    max_len, cache_len = overlong.get("max_len"), overlong.get("cache_len")
    factor = overlong.get("factor", 1.0)
    if not (isinstance(max_len, int) and isinstance(cache_len, int) and 0 < cache_len <= max_len):
        raise ValueError(f"overlong: need ints 0 < cache_len <= max_len, got max_len={max_len!r} "
                         f"cache_len={cache_len!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
        raise ValueError(f"overlong.factor: expected a non-negative number, got {factor!r}")
    return {"max_len": max_len, "cache_len": cache_len, "factor": float(factor)}


def _score_of(out: Any) -> float:
    if isinstance(out, dict):
        if "score" not in out:
            raise ValueError(f"reward returned a dict without 'score': keys {sorted(out)}")
        out = out["score"]
    if isinstance(out, bool):
        return float(out)
    if not isinstance(out, (int, float)):
        raise ValueError(f"reward returned a {type(out).__name__}, expected a number")
    out = float(out)
    if not math.isfinite(out):
        raise ValueError(f"reward returned {out}")
    return out


def _call(fn: RewardFn, response: str, answer: str, meta: dict) -> tuple[float, str | None]:
    """Score one item: (score, None) or (0.0, error message). Runs in the worker process when isolated."""
    try:
        return _score_of(fn(response, answer, **meta)), None
    except Exception as e:  # a reward function must never take the trainer down
        return 0.0, f"{type(e).__name__}: {e}"


def _warm(fn: RewardFn) -> bool:
    """Run in each new worker: unpickling ``fn`` imports its module; ``fn.warmup()`` loads lazy heavy imports."""
    hook = getattr(fn, "warmup", None)
    if callable(hook):
        hook()
    return True


class RewardRunner:
    """Scores batches of responses with one reward function.

    Args:
        spec: a registered name or ``"package.module:function"``.
        timeout_s: per-item limit in isolated mode (from the moment a worker takes the item).
        isolated: run in a spawned process pool; default True for ``math``, False otherwise.
        num_workers: pool processes (isolated mode).
        overlong: ``{"max_len", "cache_len", "factor"=1.0}`` enables the DAPO overlong penalty.
    """

    def __init__(self, spec: str | RewardFn, *, timeout_s: float = 10.0, isolated: bool | None = None,
                 num_workers: int = 2, overlong: dict | None = None):
        self.spec = spec
        self.fn = get_reward(spec)
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"timeout_s: expected a positive number, got {timeout_s!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: expected a positive int, got {num_workers!r}")
        self.timeout_s = float(timeout_s)
        self.isolated = (spec in _ISOLATED_BY_DEFAULT) if isolated is None else bool(isolated)
        self.num_workers = num_workers
        self.overlong = _check_overlong(overlong)
        self._pool: cf.ProcessPoolExecutor | None = None
        self.last_errors: list[str] = []  # error messages of the last call (first one also logged)
        self.last_verifier_scores: list[float] = []  # the last call's scores before the overlong penalty
        self.total_timeouts = 0
        self.total_errors = 0

    # -------------------------------------------------------------------------------------------------- pool

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        pool = cf.ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        # Start every worker and import the reward's module before any per-item clock starts.
        warm = [pool.submit(_warm, self.fn) for _ in range(self.num_workers)]
        try:
            for f in warm:
                f.result(timeout=max(120.0, self.timeout_s))
        except Exception as e:
            self._kill(pool)
            raise RuntimeError(f"reward {self.spec!r}: the worker pool failed to start: {type(e).__name__}: {e}")
        return pool

    @staticmethod
    def _kill(pool: cf.ProcessPoolExecutor) -> None:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self._pool is not None:
                self._kill(self._pool)
        except Exception:
            pass

    def _run_isolated(self, items: list[tuple[str, str, dict]]) -> tuple[list[float], list[str | None], list[bool]]:
        """At most ``num_workers`` items in flight, so each one's clock starts when a worker takes it."""
        n = len(items)
        scores, errors, timed_out = [0.0] * n, [None] * n, [False] * n
        todo = list(range(n))[::-1]  # a stack, popped from the end
        inflight: dict[cf.Future, tuple[int, float]] = {}
        while todo or inflight:
            if self._pool is None:
                self._pool = self._new_pool()
            while todo and len(inflight) < self.num_workers:
                i = todo.pop()
                inflight[self._pool.submit(_call, self.fn, *items[i])] = (i, time.monotonic())
            earliest = min(t for _, t in inflight.values())
            wait_s = max(0.0, earliest + self.timeout_s - time.monotonic())
            done, _ = cf.wait(list(inflight), timeout=wait_s, return_when=cf.FIRST_COMPLETED)
            for f in done:
                i, _ = inflight.pop(f)
                try:
                    scores[i], errors[i] = f.result()
                except Exception as e:  # the worker died (e.g. killed by the OS): score 0, count as an error
                    scores[i], errors[i] = 0.0, f"worker failed: {type(e).__name__}: {e}"
            now = time.monotonic()
            expired = [f for f, (_, t) in inflight.items() if now - t >= self.timeout_s and not f.done()]
            if expired or self._broken():
                for f in expired:
                    i, _ = inflight.pop(f)
                    timed_out[i] = True
                # The stuck worker cannot be interrupted: kill the pool, retry the other in-flight items fresh.
                todo += [i for i, _ in inflight.values()][::-1]
                inflight.clear()
                self._kill(self._pool)
                self._pool = None
        return scores, errors, timed_out

    def _broken(self) -> bool:
        return bool(getattr(self._pool, "_broken", False))

    # ------------------------------------------------------------------------------------------------ scoring

    def __call__(self, responses: Sequence[str], answers: Sequence[str], metas: Sequence[dict] | None = None,
                 response_lengths: Sequence[int] | None = None) -> tuple[list[float], dict[str, float]]:
        """Score a batch.

        Args:
            responses: [N] decoded responses.
            answers: [N] reference answers.
            metas: [N] meta dicts passed as keyword arguments (None: none).
            response_lengths: [N] response lengths in tokens (EOS included); required with ``overlong``.
        Returns:
            scores: [N] floats, verifier score plus the overlong penalty.
            stats: ``reward/score_mean``, ``reward/verifier_mean``, ``reward/pass_rate`` (verifier score > 0),
                ``reward/timeouts``, ``reward/errors``, ``reward/overlong_frac``, ``reward/overlong_penalty_mean``
                (with overlong), ``reward/time_s``; all floats.
        """
        n = len(responses)
        if len(answers) != n:
            raise ValueError(f"answers: {len(answers)} for {n} responses")
        metas = [{} for _ in range(n)] if metas is None else list(metas)
        if len(metas) != n:
            raise ValueError(f"metas: {len(metas)} for {n} responses")
        if self.overlong is not None and (response_lengths is None or len(response_lengths) != n):
            raise ValueError(f"response_lengths: needed for the overlong penalty, one per response ({n})")
        t0 = time.perf_counter()
        items = [(str(r), str(a), {k: v for k, v in dict(m).items() if k not in ("response", "answer")})
                 for r, a, m in zip(responses, answers, metas)]
        if self.isolated and n:
            raw, errors, timed_out = self._run_isolated(items)
        else:
            out = [_call(self.fn, *it) for it in items]
            raw, errors, timed_out = [s for s, _ in out], [e for _, e in out], [False] * n
        self.last_errors = [e for e in errors if e is not None]
        if self.last_errors:
            log.warning("reward %r: %d of %d items raised; first: %s", self.spec, len(self.last_errors), n,
                        self.last_errors[0])
        n_timeouts = sum(timed_out)
        if n_timeouts:
            log.warning("reward %r: %d of %d items timed out after %.1fs (scored 0)", self.spec, n_timeouts, n,
                        self.timeout_s)
        self.total_errors += len(self.last_errors)
        self.total_timeouts += n_timeouts
        penalties = [0.0] * n
        if self.overlong is not None:
            penalties = [overlong_penalty(int(L), **self.overlong) for L in response_lengths]
        scores = [s + p for s, p in zip(raw, penalties)]
        self.last_verifier_scores = list(raw)
        denom = max(n, 1)
        stats = {
            "reward/score_mean": sum(scores) / denom,
            "reward/verifier_mean": sum(raw) / denom,
            "reward/pass_rate": sum(s > 0 for s in raw) / denom,
            "reward/timeouts": float(n_timeouts),
            "reward/errors": float(len(self.last_errors)),
            "reward/time_s": time.perf_counter() - t0,
        }
        if self.overlong is not None:
            stats["reward/overlong_frac"] = sum(p < 0 for p in penalties) / denom
            stats["reward/overlong_penalty_mean"] = sum(penalties) / denom
        return scores, stats
