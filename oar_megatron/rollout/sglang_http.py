"""The HTTP layer of the SGLang client: a pool of servers (workers, or one router URL) spoken to with async ``httpx``.

* Balancing: each request goes to the live server with the fewest requests in flight (ties: round robin), so a slow
  or loaded server gets less work. A router URL is just a one-server pool (the router balances behind it).
* Concurrency: at most ``max_concurrency`` requests in flight over the whole pool (an ``asyncio.Semaphore``).
* Failures: a transport error, a timeout, an HTTP 5xx / 429 or a body that is not JSON is a :class:`Attempt`
  failure with a short ``reason`` (``http_500``, ``timeout``, ``connect``, ``json``, ...). The caller decides whether
  to retry; :meth:`ServerPool.backoff` gives the exponential delay with full jitter, and a server that failed is
  avoided (``cooldown_s``) while another is live — failover.
* Auth: ``Authorization: Bearer <api_key>`` on every request when a key is given; a 401/403 is never retried (a
  wrong key does not heal) and fails at once, naming the server.

Pure Python + httpx: no torch, no megatron.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["Attempt", "AuthError", "ServerPool", "normalize_url"]


class AuthError(RuntimeError):
    """The server refused the API key (401/403): never retried."""


def normalize_url(url: str) -> str:
    url = str(url).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"rollout.server_urls: {url!r} is not an http(s) URL")
    return url


@dataclass
class Attempt:
    """One request's outcome: ``data`` (the decoded JSON) when ``ok``, else a short ``reason``."""

    server: str
    ok: bool
    data: Any = None
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    failures: int = 0
    down_until: float = 0.0
    requests: int = 0


@dataclass
class ServerPool:
    """A list of server base URLs (see the module docstring). Create one per event loop (``client()`` binds to it)."""

    urls: Sequence[str]
    api_key: str | None = None
    timeout_s: float = 600.0
    max_concurrency: int = 64
    backoff_s: float = 0.5  # first retry delay; doubles each retry, capped at backoff_max_s, full jitter
    backoff_max_s: float = 8.0
    cooldown_s: float = 5.0  # a failed server is avoided this long while another is live
    seed: int = 0
    servers: list[_Server] = field(init=False)

    def __post_init__(self) -> None:
        urls = [normalize_url(u) for u in self.urls]
        if not urls:
            raise ValueError("rollout.server_urls: no server given")
        if len(set(urls)) != len(urls):
            raise ValueError(f"rollout.server_urls: duplicate URL in {urls}")
        self.servers = [_Server(u) for u in urls]
        self._rr = 0
        self._rng = random.Random(self.seed)
        self._sem: asyncio.Semaphore | None = None
        self.peak_in_flight = 0
        self._in_flight = 0

    # ------------------------------------------------------------------------------------------ choice

    def pick(self, avoid: set[str] | frozenset[str] = frozenset()) -> _Server:
        """The live server with the fewest requests in flight, not in ``avoid`` when another is left."""
        now = time.monotonic()
        pool = [s for s in self.servers if s.url not in avoid] or list(self.servers)
        live = [s for s in pool if s.down_until <= now] or pool
        self._rr += 1
        order = sorted(range(len(live)), key=lambda i: (live[i].in_flight, (i - self._rr) % len(live)))
        return live[order[0]]

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): uniform in [0, min(cap, base·2^(attempt-1))]."""
        return self._rng.uniform(0, min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` sized for the pool (call inside the event loop that uses it)."""
        self._sem = asyncio.Semaphore(self.max_concurrency)
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        return httpx.AsyncClient(headers=self.headers(), limits=limits, timeout=httpx.Timeout(self.timeout_s),
                                 trust_env=False)

    # ------------------------------------------------------------------------------------------ requests

    async def call(self, client: httpx.AsyncClient, server: _Server | str, method: str, path: str,
                   payload: Any = None, *, timeout_s: float | None = None, text_ok: bool = False) -> Attempt:
        """One request to ``server`` (bounded by the pool's semaphore); never raises except :class:`AuthError`.
        ``text_ok``: a successful answer that is not JSON is returned as its text (control endpoints such as
        ``/flush_cache`` answer plain text) instead of failing with ``json``."""
        srv = server if isinstance(server, _Server) else self._server(server)
        assert self._sem is not None, "ServerPool.client() must be created first"
        async with self._sem:
            srv.in_flight += 1
            srv.requests += 1
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            t0 = time.perf_counter()
            try:
                att = await self._send(client, srv, method, path, payload, timeout_s, text_ok)
            finally:
                srv.in_flight -= 1
                self._in_flight -= 1
            att.seconds = time.perf_counter() - t0
        if att.ok:
            srv.failures = 0
        elif att.reason in ("timeout", "connect", "transport", "json") or att.reason.startswith("http_5"):
            srv.failures += 1
            srv.down_until = time.monotonic() + self.cooldown_s
        return att

    async def _send(self, client: httpx.AsyncClient, srv: _Server, method: str, path: str, payload: Any,
                    timeout_s: float | None, text_ok: bool = False) -> Attempt:
        url = srv.url + path
        timeout = httpx.Timeout(timeout_s if timeout_s is not None else self.timeout_s)
        try:
            if method == "GET":
                resp = await client.get(url, timeout=timeout)
            else:
                resp = await client.post(url, json=payload, timeout=timeout)
        except httpx.TimeoutException as exc:
            return Attempt(srv.url, False, reason="timeout", detail=f"{type(exc).__name__} after "
                                                                     f"{timeout.read or timeout.connect}s")
        except httpx.ConnectError as exc:
            return Attempt(srv.url, False, reason="connect", detail=str(exc) or type(exc).__name__)
        except httpx.TransportError as exc:  # the server died mid-request, a reset, a protocol error
            return Attempt(srv.url, False, reason="transport", detail=str(exc) or type(exc).__name__)
        if resp.status_code in (401, 403):
            raise AuthError(f"{srv.url}{path}: HTTP {resp.status_code} (API key refused: set rollout.api_key / "
                            f"the server's --api-key to the same value)")
        if resp.status_code >= 400:
            return Attempt(srv.url, False, reason=f"http_{resp.status_code}", detail=resp.text[:200])
        if not resp.content:
            return Attempt(srv.url, True, data=None)
        try:
            data = json.loads(resp.content)
        except ValueError:
            if text_ok:
                return Attempt(srv.url, True, data=resp.text)
            return Attempt(srv.url, False, reason="json", detail=f"not JSON: {resp.text[:80]!r}")
        return Attempt(srv.url, True, data=data)

    def _server(self, url: str) -> _Server:
        url = normalize_url(url)
        for s in self.servers:
            if s.url == url:
                return s
        raise ValueError(f"{url}: not a server of this pool")

    def stats(self) -> dict[str, Any]:
        return {"peak_in_flight": self.peak_in_flight,
                "requests": {s.url: s.requests for s in self.servers}}
