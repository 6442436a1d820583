"""The SGLang rollout engine: samples from SGLang servers over their native HTTP API (docs/sglang_client.md).

Requests. One ``POST /generate`` per sample (``input_ids``, ``sampling_params`` with ``n`` = 1, ``return_logprob``,
``logprob_start_len`` = -1: the output tokens' log-probs only). One request per sample rather than a batch or
``sampling_params.n``: each sample is balanced, retried and failed over on its own (a slow server gets fewer, a dead
server loses nothing already done), and the servers batch concurrent requests themselves (continuous batching; the
radix cache shares a prompt's prefix between its samples). ``stop_token_ids`` carries the stop tokens, ``no_stop_trim``
and ``skip_special_tokens: false`` keep a matched stop token as the last response token (the engine convention,
``rollout/base.py``).

Validation (:func:`check_response`): a dict with ``meta_info``; ``finish_reason`` stop / length (abort: retried);
a non-empty response; every id inside ``[0, vocab_size)``; exactly one finite log-prob per token, for the same token
(``output_token_logprobs`` = [[logprob, token_id, text], ...]); no more than ``max_new_tokens`` tokens; and
``meta_info.weight_version`` (plus every ``meta_info.weight_versions`` span) equal to the version this engine last
pushed. A failed attempt (HTTP error, timeout, dead server, malformed JSON, invalid response) is counted under
``rollout/invalid_<reason>`` in ``last_stats`` and retried on the least-loaded other server after an exponential
backoff with jitter, up to ``max_retries`` times per sample. A sample out of retries makes its group invalid (counted:
``rollout/invalid_groups``); valid groups are returned whole (no good sample is lost), and the call fails — one line
naming the last server and reason — only when fewer than ``min_valid_frac`` of the groups are valid.

Routed experts (MoE routing replay, R3). With ``routed_experts`` (a :class:`RouteSpec`: layers, top-k, experts)
every request also sets ``return_routed_experts`` (servers started with ``--enable-return-routed-experts``) and each
answer must carry ``meta_info.routed_experts``: base64 of little-endian int32 ``[tokens, layers, top_k]`` (sglang
0.5.23: ``tokenizer_manager`` / ``detokenizer_manager``), for the sequence positions ``[0, prompt + response − 1)``
(every token the server ran a forward on: the prompt and every response token but the last sampled one, whose
forward never ran). Checked (:func:`decode_routes`): present (``routes_missing``), that exact shape
(``routes_shape``), every id in ``[0, num_experts)`` and no expert twice for a token (``routes_value``); they land in
``Sample.routed_experts`` (a torch int16/int32 tensor) for the trainer to replay (``PolicyActor.set_rollout_routes``).

Streaming. :meth:`SGLangEngine.stream_groups` yields the finished groups ``(prompt_index, samples)`` in batches (every
group done since the consumer last asked) while the others still generate (an event loop in a helper thread);
``generate_groups`` yields them one by one and ``generate`` collects them in prompt order. The trainer's overlap
(``trainer/overlap.py``) computes its passes on each batch while the rest generate.

Weight sync (:meth:`SGLangEngine.sync_weights`): the trainer's weights exported through the conversion mapping to
``sync_dir/v{N}`` (``weight_sync.SyncDir``: atomic directory swap, old versions removed), then
``/update_weights_from_disk`` {model_path, load_format, weight_version: "N", flush_cache} on every worker URL
(``server_urls``; a router answers 404 for weight endpoints), each with a timeout. A worker that fails or answers
``success: false`` is an error naming it, raised on every trainer rank; the engine then refuses to generate until a
sync succeeds (never a silently mixed model). The server's SGLang version is read once (``/server_info`` or
``/get_server_info``) and looked up in :data:`SGLANG_VERSIONS`. Every update runs inside SGLang's protocol
(``weight_sync.run_update``: pause → [begin] → update → [end] → flush retried → continue); ``weight_sync:
distributed`` streams each pipeline stage's tensors in flattened buckets over a group of its own shared with the
workers (``weight_sync.DistributedSync``); ``verify_sync`` compares the workers' ``/weights_checker`` checksums with
those of the tensors sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import RolloutEngine, Sample, SamplingParams
from .sglang_http import Attempt, AuthError, ServerPool, normalize_url

__all__ = ["SGLANG_VERSIONS", "InvalidResponse", "RolloutError", "RouteSpec", "SGLangEngine", "VersionNeeds",
           "check_response", "decode_routes", "needs_for_version", "parse_version"]


# ------------------------------------------------------------------------------------------------ versions


@dataclass(frozen=True)
class VersionNeeds:
    """What one SGLang release line needs from the client around weight updates."""

    weight_update_session: bool  # tensor / distributed updates wrapped in /begin_weight_update ... /end_weight_update
    disk_update_fields: tuple[str, ...]  # the /update_weights_from_disk fields the client sends
    server_info_paths: tuple[str, ...]  # where the version is read, in order
    distributed_fields: tuple[str, ...] = ()  # the /update_weights_from_distributed fields the client sends
    init_group_fields: tuple[str, ...] = ()  # the /init_weights_update_group fields the client sends


_DISK_FIELDS = ("model_path", "load_format", "weight_version", "flush_cache")
# flattened buckets over the group: load_format "flattened_bucket" (sglang PR 13824, before 0.5.20)
_DIST_FIELDS = ("names", "dtypes", "shapes", "group_name", "flush_cache", "weight_version", "load_format")
_GROUP_FIELDS = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
# (first version, needs): the row with the largest first version <= the server's applies. 0.5.20: no
# begin/end_weight_update endpoints; from 0.5.21 tensor/distributed updates must be wrapped in them (a refused flush
# fails the whole update in 0.5.23). The from-disk update needs no session in either.
SGLANG_VERSIONS: tuple[tuple[tuple[int, int, int], VersionNeeds], ...] = (
    ((0, 5, 20), VersionNeeds(False, _DISK_FIELDS, ("/get_server_info", "/server_info"), _DIST_FIELDS, _GROUP_FIELDS)),
    ((0, 5, 21), VersionNeeds(True, _DISK_FIELDS, ("/server_info", "/get_server_info"), _DIST_FIELDS, _GROUP_FIELDS)),
)
MIN_VERSION = SGLANG_VERSIONS[0][0]


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.5.23"``, ``"0.5.23.post1"``, ``"v0.5.24rc0"`` → (0, 5, 23) / (0, 5, 24); one-line ValueError otherwise."""
    import re

    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", str(text).strip())
    if not m:
        raise ValueError(f"sglang version: cannot read {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def needs_for_version(text: str) -> VersionNeeds:
    version = parse_version(text)
    if version < MIN_VERSION:
        raise ValueError(f"sglang version: {text} is older than {'.'.join(map(str, MIN_VERSION))}, the oldest the "
                         "client knows the weight-update protocol of")
    return [needs for first, needs in SGLANG_VERSIONS if first <= version][-1]


# ---------------------------------------------------------------------------------------------- validation


class InvalidResponse(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RolloutError(RuntimeError):
    """The rollout cannot go on (too few valid groups, a failed weight sync, a refused API key)."""


@dataclass
class Checked:
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    routed_experts: Any = None  # [prompt + response − 1, layers, top_k] torch tensor when routes were asked for


@dataclass(frozen=True)
class RouteSpec:
    """The MoE routing the servers report (``return_routed_experts``): ``num_layers`` (every transformer layer,
    SGLang's ``num_hidden_layers``; all of them MoE in this project's models), ``topk`` and ``num_experts``."""

    num_layers: int
    topk: int
    num_experts: int

    def __post_init__(self) -> None:
        if min(self.num_layers, self.topk, self.num_experts) < 1 or self.topk > self.num_experts:
            raise ValueError(f"routed experts: need layers, top-k >= 1 and top-k <= experts, got {self}")


def decode_routes(value: Any, *, rows: int, spec: RouteSpec):
    """``meta_info.routed_experts`` (base64 of int32 ``[rows, layers, top_k]``, module docstring) → a torch tensor
    of that shape (int16 when the expert ids fit, else int32); :class:`InvalidResponse` ``routes_missing`` /
    ``routes_shape`` / ``routes_value`` otherwise."""
    import base64
    import binascii

    import numpy as np
    import torch

    if value is None:
        raise InvalidResponse("routes_missing", "meta_info.routed_experts missing (start the servers with "
                                                "--enable-return-routed-experts)")
    if not isinstance(value, str):
        raise InvalidResponse("routes_shape", f"meta_info.routed_experts is a {type(value).__name__}, expected a "
                                              "base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidResponse("routes_shape", "meta_info.routed_experts is not valid base64") from None
    per_token = spec.num_layers * spec.topk
    if len(raw) != 4 * rows * per_token:
        got = f"{len(raw) / (4 * per_token):g} tokens" if per_token else f"{len(raw)} bytes"
        raise InvalidResponse("routes_shape", f"routed_experts holds {got} x {spec.num_layers} layers x top-"
                                              f"{spec.topk}; expected {rows} tokens (prompt + response - 1)")
    ids = np.frombuffer(raw, dtype="<i4").reshape(rows, spec.num_layers, spec.topk)
    bad = (ids < 0) | (ids >= spec.num_experts)
    if bad.any():
        t, layer, _ = np.argwhere(bad)[0]
        got = int(ids[t, layer][bad[t, layer]][0])
        raise InvalidResponse("routes_value", f"token {t} layer {layer}: expert id {got} outside [0, "
                                              f"{spec.num_experts})")
    if spec.topk > 1:
        srt = np.sort(ids, axis=-1)
        dup = (srt[..., 1:] == srt[..., :-1]).any(-1)
        if dup.any():
            t, layer = np.argwhere(dup)[0]
            raise InvalidResponse("routes_value", f"token {t} layer {layer}: an expert listed twice "
                                                  f"({ids[t, layer].tolist()})")
    dtype = np.int16 if spec.num_experts <= np.iinfo(np.int16).max else np.int32
    return torch.from_numpy(ids.astype(dtype))


def check_response(data: Any, *, vocab_size: int, max_new_tokens: int, weight_version: str | None,
                   routes: RouteSpec | None = None, prompt_len: int | None = None) -> Checked:
    """One ``/generate`` reply (one sample) checked as the module docstring says; raises :class:`InvalidResponse`.
    ``routes``: also decode and check ``meta_info.routed_experts`` for a prompt of ``prompt_len`` tokens."""
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict) or not isinstance(data.get("meta_info"), dict):
        raise InvalidResponse("shape", f"expected an object with meta_info, got {type(data).__name__}")
    meta = data["meta_info"]
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind == "abort":
        msg = finish.get("message", "") if isinstance(finish, dict) else ""
        raise InvalidResponse("abort", f"request aborted by the server ({msg})" if msg else "request aborted")
    if kind not in ("stop", "length"):
        raise InvalidResponse("finish", f"finish_reason {finish!r} is not stop / length / abort")
    lps = meta.get("output_token_logprobs")
    if not isinstance(lps, list):
        raise InvalidResponse("logprob_len", "meta_info.output_token_logprobs missing (return_logprob not honoured)")
    try:
        lp_ids = [entry[1] for entry in lps]
        values = [entry[0] for entry in lps]
    except (TypeError, IndexError, KeyError):
        raise InvalidResponse("shape", "output_token_logprobs entries must be [logprob, token_id, text]") from None
    ids = data.get("output_ids", lp_ids)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidResponse("shape", "output_ids is not a list of integer token ids")
    matched = finish.get("matched") if isinstance(finish, dict) else None
    if kind == "stop" and isinstance(matched, int) and len(ids) == len(lps) - 1 and lp_ids[-1:] == [matched]:
        ids = ids + [matched]  # a server that trimmed the matched stop token from output_ids: restore it
    if not ids:
        raise InvalidResponse("empty", "no output tokens")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidResponse("vocab", f"token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    if len(lps) != len(ids):
        raise InvalidResponse("logprob_len", f"{len(lps)} log-probs for {len(ids)} tokens")
    if lp_ids != ids:
        i = next(i for i, (a, b) in enumerate(zip(lp_ids, ids, strict=True)) if a != b)
        raise InvalidResponse("logprob_len", f"log-prob {i} is for token {lp_ids[i]}, the output has {ids[i]}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 1e-6:
            raise InvalidResponse("logprob_value", f"log-prob {i} is {v!r} (need a finite value <= 0)")
    if len(ids) > max_new_tokens:
        raise InvalidResponse("length", f"{len(ids)} tokens, more than max_new_tokens={max_new_tokens}")
    if kind == "length" and len(ids) != max_new_tokens:
        raise InvalidResponse("length", f"finish 'length' after {len(ids)} of max_new_tokens={max_new_tokens} tokens")
    if weight_version is not None:
        got = meta.get("weight_version")
        if str(got) != weight_version:
            raise InvalidResponse("weight_version", f"weight_version {got!r}, the trainer pushed {weight_version!r}")
        for span in meta.get("weight_versions") or []:
            v = span.get("version") if isinstance(span, dict) else span
            if str(v) != weight_version:
                raise InvalidResponse("weight_version", f"tokens {span} were generated by weight_version {v!r}, the "
                                                        f"trainer pushed {weight_version!r}")
    checked = Checked(list(ids), [float(v) for v in values], kind)
    if routes is not None:
        if prompt_len is None:
            raise ValueError("check_response: routes need prompt_len")
        checked.routed_experts = decode_routes(meta.get("routed_experts"), rows=prompt_len + len(ids) - 1,
                                               spec=routes)
    return checked


# ---------------------------------------------------------------------------------------------- the engine


class SGLangEngine(RolloutEngine):
    """See the module docstring. ``server_urls``: the workers (generation and weight updates); ``router_url``: when
    given, generation goes through it (weight updates still go to every worker)."""

    def __init__(self, server_urls: Sequence[str], *, vocab_size: int, router_url: str | None = None,
                 api_key: str | None = None, timeout_s: float = 600.0, update_timeout_s: float = 600.0,
                 max_concurrency: int = 64, max_retries: int = 3, min_valid_frac: float = 1.0,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0, sync_dir: str | Path | None = None,
                 model: Any = None, arch: str | None = None, hf_config: dict | None = None,
                 carried_from: str | Path | None = None, load_format: str | None = None, weight_sync: str = "disk",
                 sync_bucket_mb: float = 512, sync_backend: str = "nccl", sync_master_address: str = "127.0.0.1",
                 sync_master_port: int | None = None, sync_device: Any = "cpu", pause_mode: str = "abort",
                 flush_timeout_s: float = 60.0, flush_interval_s: float = 0.2, seed: int = 0,
                 local_servers: dict[str, Any] | None = None, seeded: bool = False,
                 verify_sync: bool = False, routed_experts: RouteSpec | None = None):
        self.workers = [normalize_url(u) for u in server_urls]
        self.router_url = normalize_url(router_url) if router_url else None
        if not self.workers and not self.router_url and local_servers is None:
            raise ValueError("rollout.server_urls: the sglang engine needs worker URLs (or rollout.router_url)")
        if local_servers is not None and (self.workers or self.router_url):
            raise ValueError("rollout.server_urls: local servers are started only when no URL is given")
        self.routed_experts = routed_experts  # R3: ask for and check every sample's routes (module docstring)
        self.local_servers = local_servers  # SGLangServers settings; started by start_local_servers
        self.servers: Any = None  # the running SGLangServers (global rank 0 only)
        self.server_start_s: float | None = None
        self._starting: dict[str, Any] | None = None  # start_local_servers → wait_local_servers
        if not 0 < min_valid_frac <= 1:
            raise ValueError(f"rollout.min_valid_frac: need 0 < min_valid_frac <= 1, got {min_valid_frac}")
        if max_retries < 0 or max_concurrency < 1:
            raise ValueError("rollout.max_retries / rollout.max_concurrency: need max_retries >= 0, "
                             "max_concurrency >= 1")
        if weight_sync not in ("disk", "distributed"):
            raise ValueError(f"rollout.weight_sync: unknown {weight_sync!r}; known: disk, distributed")
        if pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause_mode: unknown {pause_mode!r}; known: abort, retract, in_place")
        if sync_bucket_mb <= 0 or flush_timeout_s <= 0:
            raise ValueError("rollout.sync_bucket_mb / flush_timeout_s: need positive values")
        self.weight_sync = weight_sync
        self.pause_mode = pause_mode
        self.flush_timeout_s, self.flush_interval_s = float(flush_timeout_s), float(flush_interval_s)
        self._dist = None
        self.verify_sync = bool(verify_sync)
        if weight_sync == "distributed":
            from .weight_sync import DistributedSync

            self._dist = DistributedSync(self, bucket_bytes=int(sync_bucket_mb * 2**20), backend=sync_backend,
                                         master_address=sync_master_address, master_port=sync_master_port,
                                         device=sync_device, verify=self.verify_sync)
        self.vocab_size = int(vocab_size)
        self.api_key = api_key
        self.timeout_s = float(timeout_s)
        self.update_timeout_s = float(update_timeout_s)
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.min_valid_frac = float(min_valid_frac)
        self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.model, self.arch, self.hf_config, self.carried_from = model, arch, hf_config, carried_from
        self.load_format = load_format
        self.seed = int(seed)
        self.seeded = bool(seeded)  # send a sampling_seed per sample (sample_seed)
        self.calls = 0
        self.weight_version = 0
        self.pushed = False  # a version was pushed to the servers: responses must carry it
        self.broken: str | None = None  # a failed sync: generation is refused until a sync succeeds
        self.server_version: str | None = None
        self.last_stats: dict[str, float] = {}
        self.last_sync_stats: dict[str, float] = {}
        self.last_pool_stats: dict[str, Any] = {}
        self._closed = False

    # ------------------------------------------------------------------------------------------ plumbing

    def _pool(self, urls: Sequence[str] | None = None) -> ServerPool:
        urls = list(urls) if urls else ([self.router_url] if self.router_url else self.workers)
        return ServerPool(urls, api_key=self.api_key, timeout_s=self.timeout_s, max_concurrency=self.max_concurrency,
                          backoff_s=self.backoff_s, backoff_max_s=self.backoff_max_s,
                          seed=self.seed * 1_000_003 + self.calls)

    @property
    def expected_version(self) -> str | None:
        return str(self.weight_version) if self.pushed else None

    def sample_seed(self, call: int, i: int, j: int, base: int | None = None) -> int:
        """The ``sampling_seed`` of sample ``j`` of prompt ``i`` in generation call ``call``: a 63-bit hash of
        (``base`` or this engine's seed, call, i, j) — the same on a retry or another server, whatever the order the
        requests run in."""
        key = f"{self.seed if base is None else base}:{call}:{i}:{j}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def _payload(self, prompt: Sequence[int], params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
        sp: dict[str, Any] = {"temperature": float(params.temperature), "top_p": float(params.top_p),
                              "top_k": int(params.top_k) if params.top_k > 0 else -1,
                              "max_new_tokens": int(params.max_new_tokens), "n": 1,
                              "stop_token_ids": list(params.stop_token_ids), "no_stop_trim": True,
                              "skip_special_tokens": False}
        if seed is not None:  # honoured by servers started with --enable-deterministic-inference
            sp["sampling_seed"] = int(seed)
        payload = {"input_ids": [int(t) for t in prompt], "sampling_params": sp, "return_logprob": True,
                   "logprob_start_len": -1, "stream": False}
        if self.routed_experts is not None:  # routes of the whole sequence (routed_experts_start_len 0, the default)
            payload["return_routed_experts"] = True
        return payload

    # ---------------------------------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        """The valid groups' samples, prompt-major; all ``len(prompts) * n`` unless groups were rejected (then
        ``last_stats["rollout/invalid_groups"]`` > 0 and the missing prompts' samples are absent)."""
        groups = dict(self.generate_groups(prompts, params))
        return [s for i in sorted(groups) for s in groups[i]]

    def generate_groups(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        on_group: Callable[[int, list[Sample]], None] | None = None
                        ) -> Iterator[tuple[int, list[Sample]]]:
        """Yield ``(prompt_index, samples)`` for each valid group as soon as its ``n`` samples are done (module
        docstring). ``on_group`` is called with the same pair first, from the consumer's thread."""
        for batch in self.stream_groups(prompts, params):
            for pair in batch:
                if on_group is not None:
                    on_group(*pair)
                yield pair

    def stream_groups(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                      ) -> Iterator[list[tuple[int, list[Sample]]]]:
        """Yield the valid groups in batches: each batch holds every group finished since the consumer last asked
        (at least one; waits for the next when none is), so a consumer slower than generation takes what piled up
        in one go (the trainer's overlapped passes). The call's statistics are in ``last_stats`` once the iterator is
        exhausted; fewer valid groups than ``min_valid_frac`` raise then."""
        if self._closed:
            raise RuntimeError("SGLangEngine: generate called after close()")
        if self.broken:
            raise RolloutError(f"sglang: the last weight sync failed ({self.broken}); refusing to sample from a "
                               f"possibly mixed model")
        params = params.validate()
        prompts = [list(p) for p in prompts]
        self.calls += 1
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        state = _CallState(len(prompts), params.n, call=self.calls)
        thread = threading.Thread(target=self._run_call, args=(prompts, params, out, stop, state), daemon=True,
                                  name="sglang-rollout")
        t0 = time.perf_counter()
        thread.start()
        end = None  # ("done", None) | ("error", exc) once the call's thread has finished
        try:
            while end is None:
                batch = []
                item = out.get()
                while True:
                    if item[0] != "group":
                        end = item
                        break
                    batch.append(item[1])
                    try:
                        item = out.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    yield batch
            if end[0] == "error":
                raise end[1]
        finally:
            if end is None:
                stop.set()
            thread.join()
            self._finish_stats(state, time.perf_counter() - t0, len(prompts))
        valid = state.valid_groups
        need = math.ceil(self.min_valid_frac * len(prompts))
        if valid < need:
            raise RolloutError(f"sglang: only {valid} of {len(prompts)} groups valid (rollout.min_valid_frac="
                               f"{self.min_valid_frac} needs {need}); last failure: {state.last_failure}")

    def _finish_stats(self, state: _CallState, seconds: float, n_prompts: int) -> None:
        tokens = state.tokens
        stats = {"samples": float(state.valid_groups * state.n), "tokens": float(tokens), "seconds": seconds,
                 "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
                 "weight_version": float(self.weight_version),
                 "rollout/invalid_groups": float(n_prompts - state.valid_groups),
                 "rollout/retries": float(state.retries), "rollout/failovers": float(state.failovers),
                 "rollout/invalid_responses": float(sum(state.invalid.values()))}
        for reason, count in sorted(state.invalid.items()):
            stats[f"rollout/invalid_{reason}"] = float(count)
        self.last_stats = stats

    def _run_call(self, prompts, params, out: queue.Queue, stop: threading.Event, state: _CallState) -> None:
        try:
            asyncio.run(self._call(prompts, params, out, stop, state))
            out.put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread
            out.put(("error", exc))

    async def _call(self, prompts, params, out: queue.Queue, stop: threading.Event, state: _CallState) -> None:
        pool = self._pool()
        n = params.n
        version = self.expected_version
        async with pool.client() as client:
            async def group(i: int) -> None:
                got = await asyncio.gather(*(self._sample(pool, client, i, j, prompts[i], params, version, state)
                                             for j in range(n)))
                if all(s is not None for s in got):
                    state.valid_groups += 1
                    state.tokens += sum(len(s.response_ids) for s in got)
                    out.put(("group", (i, list(got))))

            tasks = [asyncio.ensure_future(group(i)) for i in range(len(prompts))]
            watcher = asyncio.ensure_future(_watch(stop))
            pending = set(tasks)
            try:
                while pending and not watcher.done():  # until every group is done or the consumer stops
                    done, _ = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
                    for t in done - {watcher}:
                        pending.discard(t)
                        if t.exception() is not None:
                            raise t.exception()
            finally:
                for t in [*tasks, watcher]:
                    t.cancel()
                await asyncio.gather(*tasks, watcher, return_exceptions=True)
        self.last_pool_stats = pool.stats()

    async def _sample(self, pool: ServerPool, client, i: int, j: int, prompt: list[int], params: SamplingParams,
                      version: str | None, state: _CallState) -> Sample | None:
        seed = self.sample_seed(state.call, i, j, params.seed) if self.seeded else None
        payload = self._payload(prompt, params, seed)
        tried: set[str] = set()
        last_server = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                state.retries += 1
                await asyncio.sleep(pool.backoff(attempt))
            server = pool.pick(avoid=tried)
            if last_server is not None and server.url != last_server:
                state.failovers += 1
            try:
                att: Attempt = await pool.call(client, server, "POST", "/generate", payload)
            except AuthError as exc:
                raise RolloutError(f"sglang: {exc}") from None
            last_server = server.url
            if att.ok:
                try:
                    c = check_response(att.data, vocab_size=self.vocab_size, max_new_tokens=params.max_new_tokens,
                                       weight_version=version, routes=self.routed_experts, prompt_len=len(prompt))
                    return Sample(i, list(prompt), c.response_ids, c.logprobs, c.finish_reason,
                                  weight_version=self.weight_version, routed_experts=c.routed_experts)
                except InvalidResponse as exc:
                    reason, detail = exc.reason, exc.detail
            else:
                reason, detail = att.reason, att.detail
            state.invalid[reason] = state.invalid.get(reason, 0) + 1
            state.last_failure = f"{att.server}: {reason} ({detail})"
            tried.add(att.server)
            if len(tried) >= len(pool.servers):
                tried.clear()
        return None

    # ---------------------------------------------------------------------------------------- control

    def _control(self, path: str, payload: Any = None, *, urls: Sequence[str] | None = None, method: str = "POST",
                 timeout_s: float | None = None) -> dict[str, Any]:
        """``path`` on each of ``urls`` (default: every worker), concurrently; {url: data}. Any failure: one
        :class:`RolloutError` naming the first failing server."""
        urls = list(urls) if urls is not None else self.workers
        return self._control_each(path, dict.fromkeys(urls, payload), method=method, timeout_s=timeout_s)

    def _attempts(self, path: str, bodies: dict[str, Any], *, method: str = "POST",
                  timeout_s: float | None = None) -> list[Attempt]:
        """``path`` with ``bodies[url]`` on each URL, concurrently; the raw attempts (only a refused API key
        raises)."""
        if not bodies:
            raise RolloutError(f"sglang: {path} must go to every worker (a router answers 404 for it); set "
                               f"rollout.server_urls to the worker URLs")
        pool = self._pool(list(bodies))

        async def run() -> list[Attempt]:
            async with pool.client() as client:
                return await asyncio.gather(*(pool.call(client, u, method, path, bodies[u.url], timeout_s=timeout_s,
                                                        text_ok=True)
                                              for u in pool.servers))
        try:
            return asyncio.run(run())
        except AuthError as exc:
            raise RolloutError(f"sglang: {exc}") from None

    def _control_each(self, path: str, bodies: dict[str, Any], *, method: str = "POST",
                      timeout_s: float | None = None) -> dict[str, Any]:
        """:meth:`_control` with one body per URL."""
        attempts = self._attempts(path, {normalize_url(u): b for u, b in bodies.items()}, method=method,
                                  timeout_s=timeout_s)
        out = {}
        for att in attempts:
            if not att.ok:
                raise RolloutError(f"sglang: {att.server}{path} failed: {att.reason} {att.detail}".rstrip())
            if isinstance(att.data, dict) and att.data.get("success") is False:
                raise RolloutError(f"sglang: {att.server}{path} refused: {att.data.get('message', att.data)}")
            out[att.server] = att.data
        return out

    def health(self, timeout_s: float = 10.0) -> None:
        """GET /health on the generation URL(s) and every worker; RolloutError naming the first that fails."""
        urls = list(dict.fromkeys(([self.router_url] if self.router_url else []) + self.workers))
        self._control("/health", urls=urls, method="GET", timeout_s=timeout_s)

    def check_servers(self) -> str:
        """Before the first step: every URL healthy, the workers' SGLang version known (``SGLANG_VERSIONS``), and
        — when a worker's ``model_path`` is readable here (a shared filesystem) — its ``config.json`` vocabulary
        equal to the trainer's. One-line :class:`RolloutError` naming the server otherwise. Returns a summary line."""
        import json

        self.health()
        version = self.read_server_version()
        for url in self.workers:
            info = self._control("/get_model_info", urls=[url], method="GET", timeout_s=30.0)[url]
            path = Path(str(info.get("model_path", ""))) / "config.json" if isinstance(info, dict) else None
            if path is not None and path.is_file():
                try:
                    vocab = json.loads(path.read_text()).get("vocab_size")
                except (OSError, ValueError):
                    continue
                if vocab is not None and int(vocab) != self.vocab_size:
                    raise RolloutError(f"sglang: {url} serves {path.parent} with vocab_size {vocab}, the trainer's "
                                       f"model has {self.vocab_size}")
        if self.routed_experts is not None:
            for url in self.workers:
                info = self._server_info(url)
                if info.get("enable_return_routed_experts") is False:
                    raise RolloutError(f"sglang: {url} runs without --enable-return-routed-experts, which "
                                       "rollout.return_routed_experts needs (the routes for MoE routing replay)")
        gen = self.router_url or f"{len(self.workers)} worker(s)"
        return f"sglang {version}: {len(self.workers)} worker(s), generation via {gen}"

    def _server_info(self, url: str) -> dict[str, Any]:
        """``/server_info`` (else ``/get_server_info``) of one worker; {} when neither answers an object."""
        for path in ("/server_info", "/get_server_info"):
            try:
                data = self._control(path, urls=[url], method="GET", timeout_s=30.0)[url]
            except RolloutError:
                continue
            if isinstance(data, dict):
                return data
        return {}

    def model_info(self) -> dict[str, Any]:
        urls = [self.router_url] if self.router_url else self.workers[:1]
        return next(iter(self._control("/get_model_info", urls=urls, method="GET", timeout_s=30.0).values()))

    def read_server_version(self) -> str:
        """The workers' SGLang version (read once, cached); all workers must run the same version."""
        if self.server_version is not None:
            return self.server_version
        found: dict[str, str] = {}
        for url in self.workers:
            last = ""
            for path in ("/server_info", "/get_server_info"):
                try:
                    data = self._control(path, urls=[url], method="GET", timeout_s=30.0)[url]
                except RolloutError as exc:
                    last = str(exc)
                    continue
                if isinstance(data, dict) and data.get("version"):
                    found[url] = str(data["version"])
                    break
            else:
                raise RolloutError(f"sglang: {url}: no version in /server_info or /get_server_info ({last})")
        if len(set(found.values())) > 1:
            raise RolloutError(f"sglang: workers run different versions: {found}")
        self.server_version = next(iter(found.values()))
        needs_for_version(self.server_version)  # refuse an unknown (too old) version
        return self.server_version

    # ---------------------------------------------------------------------------------------- weight sync

    def sync_weights(self, source: Any = None) -> None:
        """Push the actor's (``source``) weights to every worker through ``sync_dir`` (module docstring). Collective
        over the trainer's ranks: every rank calls it; global rank 0 writes and pushes, the outcome is broadcast so
        every rank raises the same one-line error or bumps ``weight_version``."""
        from .. import collectives

        if source is None:
            raise ValueError("SGLangEngine.sync_weights: pass the PolicyActor whose weights to push")
        groups = source.groups
        version = self.weight_version + 1
        error = None
        try:
            self._push(source, groups, version)
        except (RolloutError, ValueError, OSError) as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if groups.world_size > 1:
            error = collectives.broadcast_object(error)
        if error is not None:
            self.broken = error
            raise RolloutError(error)
        self.weight_version = version
        self.pushed = True
        self.broken = None

    def _push(self, actor: Any, groups: Any, version: int) -> None:
        from .weight_sync import (SGLangChecksums, SyncDir, gather_hf_state, hf_config_for, run_update,
                                  server_dtype_device, verify_checksums)

        if self.model is None or self.arch is None or (self.sync_dir is None and self._dist is None):
            raise ValueError("SGLangEngine: weight sync needs model, arch and (from disk) sync_dir")
        if not self.workers:
            raise RolloutError("sglang: weight updates go to every worker (a router answers 404 for them); set "
                               "rollout.server_urls to the worker URLs")
        if self._dist is not None:  # every rank takes part: each pipeline stage sends its own tensors
            self._dist.sync(actor, groups, version, self.model, self.arch)
            self.last_sync_stats = dict(self._dist.stats) if groups.rank == 0 else {}
            return
        t0 = time.perf_counter()
        tensors = gather_hf_state(actor, groups, self.model, self.arch)
        if groups.rank != 0:
            return
        t1 = time.perf_counter()
        needs = needs_for_version(self.read_server_version())
        expected = None
        if self.verify_sync:
            sums = SGLangChecksums(*server_dtype_device(self))
            for name, t in tensors.items():
                sums.add(name, t)
            expected = sums.result()
        syncdir = SyncDir(self.sync_dir)
        hf = self.hf_config if self.hf_config is not None else hf_config_for(self.model, self.arch)
        path, nbytes = syncdir.write(version, tensors, hf, self.carried_from)
        del tensors
        t2 = time.perf_counter()
        try:  # flush_cache false: the flush is the protocol's own step, retried while requests drain
            run_update(self, lambda: self._control("/update_weights_from_disk",
                                                   self.update_payload(path, version, needs, flush_cache=False),
                                                   timeout_s=self.update_timeout_s),
                       session=False, what=f"sync of version {version} from disk")
            if expected is not None:
                verify_checksums(self, expected)
        except RolloutError:
            shutil.rmtree(path, ignore_errors=True)  # the next sync writes it again
            raise
        t3 = time.perf_counter()
        syncdir.prune(keep=version)
        self.last_sync_stats = {"sync/gather_s": t1 - t0, "sync/write_s": t2 - t1, "sync/update_s": t3 - t2,
                                "sync/bytes": float(nbytes),
                                "sync/write_gb_per_s": nbytes / 1e9 / max(t2 - t1, 1e-9)}

    def start_local_servers(self, actor: Any, *, wait: bool = True) -> None:
        """Start the run's own servers (``local_servers`` given: no URLs configured) on the actor's current weights.
        Collective over the trainer's ranks: the weights are exported as version ``weight_version`` (``sync_dir``, as
        a sync writes them; a server needs a model directory to start), then global rank 0 starts
        ``rollout.servers.SGLangServers`` on it (``--skip-tokenizer-init``: the trainer sends ``input_ids``;
        ``--weight-version``) in a background thread. ``wait=False`` returns at once (the trainer warms up while the
        servers load); :meth:`wait_local_servers` (collective) then waits and gives every rank the worker (and router)
        URLs. A no-op when there is nothing to start or it started already. :meth:`close` stops them (and
        ``SGLangServers`` at interpreter exit)."""
        from .servers import SGLangServers
        from .weight_sync import SyncDir, gather_hf_state, hf_config_for

        if self.local_servers is None or self.workers or self._starting is not None:
            return
        if self.sync_dir is None or self.model is None or self.arch is None:
            raise ValueError("SGLangEngine: local servers need sync_dir, model and arch (the export they start on)")
        groups = actor.groups
        self._starting = {"groups": groups, "version": self.weight_version, "error": None, "thread": None}
        tensors = gather_hf_state(actor, groups, self.model, self.arch)
        if groups.rank == 0:
            try:
                hf = self.hf_config if self.hf_config is not None else hf_config_for(self.model, self.arch)
                path, _ = SyncDir(self.sync_dir).write(self.weight_version, tensors, hf, self.carried_from)
                del tensors
                opts = dict(self.local_servers)
                self.servers = SGLangServers(path, opts.pop("n", 1), skip_tokenizer_init=True, api_key=self.api_key,
                                             weight_version=str(self.weight_version), **opts)
            except (OSError, ValueError) as exc:
                self._starting["error"] = str(exc)
            else:
                def run(state=self._starting, servers=self.servers):
                    try:
                        servers.start()
                    except Exception as exc:  # noqa: BLE001 - reported by wait_local_servers, on every rank
                        state["error"] = str(exc)

                self._starting["thread"] = threading.Thread(target=run, name="sglang-local-servers", daemon=True)
                self._starting["thread"].start()
        if wait:
            self.wait_local_servers()

    def wait_local_servers(self) -> None:
        """Wait for the servers :meth:`start_local_servers` started; every rank gets their URLs, or the same
        :class:`RolloutError` (with the failing server's log tail) when one did not come up. Collective."""
        from .. import collectives

        state = self._starting
        if state is None or self.workers:
            return
        outcome: Any = None
        if state["groups"].rank == 0:
            if state["thread"] is not None:
                state["thread"].join()
            if state["error"] is not None:
                outcome = ("error", f"sglang local servers: {state['error']}", None, None)
            else:
                outcome = ("ok", self.servers.urls, self.servers.router_url, self.servers.startup_seconds)
        if state["groups"].world_size > 1:
            outcome = collectives.broadcast_object(outcome)
        kind, urls, router_url, seconds = outcome
        if kind == "error":
            self.close()
            raise RolloutError(urls)
        self.workers = [normalize_url(u) for u in urls]
        self.router_url = normalize_url(router_url) if router_url else None
        self.weight_version, self.pushed, self.broken = state["version"], True, None
        self.server_start_s = float(seconds)

    def update_payload(self, path: str | Path, version: int, needs: VersionNeeds | None = None, *,
                       flush_cache: bool = True) -> dict[str, Any]:
        """The ``/update_weights_from_disk`` body for weight directory ``path`` as version ``version``."""
        needs = needs or needs_for_version(self.server_version or "0.5.23")
        payload = {"model_path": str(Path(path).resolve()), "weight_version": str(version), "flush_cache": flush_cache,
                   "load_format": self.load_format}
        return {k: v for k, v in payload.items() if k in needs.disk_update_fields and v is not None}

    # ---------------------------------------------------------------------------------------- state

    def close(self) -> None:
        """Stop the run's local servers (if it started any)."""
        self._closed = True
        if self._dist is not None:
            self._dist.close()
        if self.servers is not None:
            self.servers.stop()  # a start still in progress sees its processes die and returns
            thread = (self._starting or {}).get("thread")
            if thread is not None:
                thread.join(timeout=60)
                self.servers.stop()  # anything it launched meanwhile
            self.servers = None

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "weight_version": self.weight_version, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Counters back; the servers still hold whatever they hold, so the trainer pushes its weights again
        (``pushed`` is cleared: the next sync sets the version the responses must carry)."""
        missing = {"calls", "weight_version"} - set(state)
        if missing:
            raise ValueError(f"state: missing key {sorted(missing)[0]!r} (expected calls, weight_version)")
        self.calls = int(state["calls"])
        self.weight_version = int(state["weight_version"])
        self.pushed = False


@dataclass
class _CallState:
    n_groups: int
    n: int
    call: int = 0  # the engine's call counter for this call (sampling seeds)
    valid_groups: int = 0
    tokens: int = 0
    retries: int = 0
    failovers: int = 0
    last_failure: str = "none"

    def __post_init__(self) -> None:
        self.invalid: dict[str, int] = {}


async def _watch(stop: threading.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(0.05)
