"""A protocol-exact fake SGLang server for tests: a real HTTP server on loopback (``http.server`` in a thread) that
speaks sglang 0.5.23's native JSON, generates from a tiny deterministic model and injects faults on demand.

Endpoints (as sglang 0.5.23 with ``--skip-tokenizer-init``): ``POST /generate`` (``input_ids`` one list or a batch,
``sampling_params`` with ``n``, ``return_logprob``) answering ``{"output_ids", "meta_info": {"id", "finish_reason":
{"type": "stop", "matched": id} | {"type": "length", "length": n}, "prompt_tokens", "completion_tokens",
"cached_tokens", "output_token_logprobs": [[logprob, token_id, null], ...], "weight_version", "weight_versions":
[{"version", "start", "end"}], "e2e_latency", ...}}`` (field for field what a real 0.5.23 server answers; a list for
a batch or n > 1); ``GET /health``, ``/get_model_info``, ``/server_info`` and ``/get_server_info`` (with
``version``); ``POST /update_weights_from_disk`` (loads ``model_path``, sets ``weight_version``), ``/flush_cache``,
``/pause_generation``, ``/continue_generation``. With an API key every path but ``/health`` needs ``Authorization:
Bearer <key>`` (401 otherwise), as sglang's middleware does.

Models: :class:`TableModel` (logits = a fixed random table indexed by the last token: instant) or :class:`HFModel`
(an HF directory run with ``transformers`` in fp32: the trainer's exported weights, so the log-probs equal the
trainer's π_old). ``update_weights_from_disk`` loads an HF directory when it holds ``config.json``.

Log-probs follow the engine convention: log softmax(logits / T) of the drawn token before top-k / top-p.

Weight-update protocol (0.5.23, read from its source): ``/pause_generation`` {mode}: ``abort`` (default) ends the
requests in flight with ``finish_reason: abort`` at their next token, ``retract`` / ``in_place`` park them (they go on
after ``/continue_generation``, their later tokens reported under the new version in ``weight_versions``); new requests
wait while paused. ``/flush_cache`` answers HTTP 400 while a request is running (or parked in place), and
``flush_refusals`` more times on demand. ``/begin_weight_update`` / ``/end_weight_update`` (404 before 0.5.21; a
second begin, an end without begin, and a tensor/distributed update outside a session are ``success: false``, as in
0.5.23). ``/init_weights_update_group`` joins a real process group (``collectives.init_external_group``, rank =
rank_offset) and ``/update_weights_from_distributed`` receives each announced bucket over it exactly as SGLang's
``FlattenedTensorBucket`` does (one ``uint8`` buffer, byte offsets, dtype views) into ``received`` (``POST
/fake_dump`` {path} writes it as safetensors, with the calls, bodies and groups joined; ``dist_fault``: ``"fail"``
refuses the next bucket without receiving, ``("fail", n)`` bucket ``n`` (1-based), ``("die", n)`` exits the process
when bucket ``n`` is announced, ``("corrupt", name)`` perturbs HF tensor ``name`` after receiving it). Weight-update
requests run one at a time, as sglang's scheduler runs them; a worker joins one group per trainer pipeline stage.
``hf_config_dir`` (``--hf-config``): after the bucket carrying ``weight_version`` the fake generates with
``transformers`` from the received tensors. ``/weights_checker`` {action: checksum} answers as sglang 0.5.23 on a CPU
server with tp_size 1 (per parameter of its model — q/k/v fused, gate/up fused, the embedding padded to 64 rows —
the first 8 bytes of the SHA-256 as hex; ``ranks`` of ``ChecksumInfo``). ``python -m tests.sglang_fake
--url-file F`` serves one in its own process (a group member must be another process).

Routed experts (MoE routing replay, R3): ``FakeSGLang(routed_experts=(layers, top_k, experts))`` is a server started
with ``--enable-return-routed-experts`` (``/server_info`` says so); a ``/generate`` with ``return_routed_experts``
then answers ``meta_info.routed_experts`` as sglang 0.5.23 does: base64 of int32 ``[tokens, layers, top_k]`` for the
positions ``[routed_experts_start_len, prompt + output − 1)``. The routes are the model's: :class:`HFModel` of an MoE
checkpoint reports the experts its ``transformers`` routers chose (forward hooks on the ``*TopKRouter`` modules), the
table model k distinct experts drawn from a generator seeded by (seed, position, token, layer): deterministic.
Without ``routed_experts`` the key is absent (a real server without the flag).

Faults: ``server.faults`` is a list consumed one per ``/generate`` request: ``"http_500"``, ``"json"`` (malformed
body), ``"short_logprobs"``, ``"oov"`` (a token id = vocab size), ``"nan"``, ``"wrong_version"``, ``"abort"``,
``"empty"``, ``"die"`` (the connection is closed without an answer), ``("delay", seconds)``, ``"routes_short"`` (one
token's routes missing), ``"routes_oov"`` (an expert id = experts), ``"routes_missing"`` (no ``routed_experts``).
``update_fault``: ``"fail"`` (``success: false``) or ``"http_500"`` for the next weight update; ``flush_refusals``: the next that many
``POST /flush_cache`` answer 400 (a real 0.5.23 server does so while a finishing request holds the radix cache).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

SGLANG_VERSION = "0.5.23"
_RECORDED = ("/init_weights_update_group", "/update_weights_from_distributed", "/destroy_weights_update_group",
             "/weights_checker")


class TableModel:
    """Next-token logits from a fixed random table of the last token (seeded): deterministic and instant."""

    def __init__(self, vocab_size: int, seed: int = 0, scale: float = 2.0):
        self.vocab_size = vocab_size
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, vocab_size, generator=g, dtype=torch.float64) * scale

    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.table[ids[-1] % self.vocab_size]


class HFModel:
    """An HF causal LM directory run with ``transformers`` in fp32 (whole prefix each step: tiny models only)."""

    _import_lock = threading.Lock()  # transformers' lazy imports are not thread-safe (two workers load at once)

    def __init__(self, path: str | Path):
        with HFModel._import_lock:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.vocab_size = self.model.config.vocab_size
        self._run_lock = threading.Lock()  # routes() hooks the routers: no other forward may run meanwhile

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        with self._run_lock:
            out = self.model(torch.tensor([ids]))
        return out.logits[0, -1].double()

    @torch.no_grad()
    def routes(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), layers, top_k] experts the MoE routers chose for each position (their forward outputs'
        ``router_indices``)."""
        routers = [m for m in self.model.modules() if type(m).__name__.endswith("TopKRouter")]
        if not routers:
            raise ValueError("fake sglang: routed_experts asked of a model without *TopKRouter modules")
        got: list[torch.Tensor] = []
        with self._run_lock:
            handles = [r.register_forward_hook(lambda _m, _i, out: got.append(out[2].reshape(len(ids), -1)))
                       for r in routers]
            try:
                self.model(torch.tensor([ids]))
            finally:
                for h in handles:
                    h.remove()
        return torch.stack(got, 1)


def _draw(logits: torch.Tensor, sp: dict[str, Any], gen: torch.Generator) -> tuple[int, float]:
    """(token, log-prob) under sglang's sampling params; the log-prob is before top-k / top-p (module docstring)."""
    t = float(sp.get("temperature", 1.0))
    scaled = logits / (t if t > 0 else 1.0)
    logp = torch.log_softmax(scaled, -1)
    if t <= 0:
        tok = int(torch.argmax(logp))
        return tok, float(logp[tok])
    probs = logp.exp()
    top_k = int(sp.get("top_k", -1))
    if 0 < top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    top_p = float(sp.get("top_p", 1.0))
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p * sorted_p.sum()
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[idx[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
    tok = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
    return tok, float(logp[tok])


class FakeSGLang:
    """See the module docstring. ``start()`` → base URL; ``stop()``; ``kill()`` closes the socket at once."""

    def __init__(self, model: Any = None, *, vocab_size: int = 24, api_key: str | None = None,
                 weight_version: str = "default", version: str = SGLANG_VERSION, model_path: str = "fake-model",
                 seed: int = 0, delay_per_token_s: float = 0.0, load_weights: bool = True,
                 routed_experts: tuple[int, int, int] | None = None):
        self.model = model if model is not None else TableModel(vocab_size, seed)
        self.routed_experts = routed_experts  # (layers, top_k, experts): --enable-return-routed-experts
        self.api_key = api_key
        self.weight_version = weight_version
        self.version = version
        self.model_path = model_path
        self.seed = seed
        self.delay_per_token_s = delay_per_token_s
        self.load_weights = load_weights  # False: updates are checked and versioned, the table model stays
        self.faults: list[Any] = []
        self.update_fault: str | None = None
        self.flush_refusals = 0
        self.flushes = 0  # POST /flush_cache requests received
        self.requests: list[dict[str, Any]] = []  # every /generate payload received
        self.answers: list[dict[str, Any]] = []  # every /generate sample answered (the JSON object, before faults)
        self.headers: list[dict[str, str]] = []  # every request's headers
        self.updates: list[dict[str, Any]] = []  # every /update_weights_from_disk payload received
        self.calls: list[str] = []  # every path hit, in order
        self.paused = False
        self.pause_mode: str | None = None
        self.pause_epoch = 0  # bumped by every pause: an abort-mode pause ends the requests started before it
        self.active = 0  # requests generating (not parked)
        self.parked = 0  # requests parked by an in_place pause
        self.flush_refusals = 0
        self.session = False
        self.groups: dict[str, Any] = {}
        self.group_info: dict[str, dict[str, int]] = {}  # the groups it is in
        self.joined: list[dict[str, Any]] = []  # every group it joined, in order
        self.bodies: list[tuple[str, Any]] = []  # the bodies of the distributed-update / checker requests
        self.received: dict[str, torch.Tensor] = {}
        self.dist_updates: list[dict[str, Any]] = []
        self.dist_fault: Any = None
        self.hf_config_dir: str | None = None  # distributed updates: rebuild the HF model from what was received
        self._scheduler = threading.Lock()  # sglang's scheduler runs one weight-update request at a time
        self.tp_size = 1
        self.dp_size = 1
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.dead = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (default: loopback, a free port) in a thread; returns the base URL."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # http.server's 5 drops connections under a burst of concurrent requests

        self._host = host
        self._httpd = Server((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="fake-sglang")
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://{self._host}:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        if self._httpd is not None and not self.dead:
            self.dead = True
            self._httpd.shutdown()
            self._httpd.server_close()

    kill = stop

    def __enter__(self) -> FakeSGLang:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ HTTP

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?")[0]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        with self._lock:
            self.calls.append(path)
            self.headers.append({k.lower(): v for k, v in h.headers.items()})
        if self.dead:
            return self._close(h)
        if self.api_key and not path.startswith("/health") and \
                h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(h, 401, {"error": "Unauthorized"})
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return self._send(h, 400, {"error": {"message": "invalid JSON body"}})
        if path in _RECORDED:
            with self._lock:
                self.bodies.append((path, body))
        routes = {("GET", "/health"): lambda: (200, None), ("GET", "/health_generate"): lambda: (200, None),
                  ("GET", "/get_model_info"): self._model_info, ("GET", "/model_info"): self._model_info,
                  ("GET", "/server_info"): self._server_info, ("GET", "/get_server_info"): self._server_info,
                  ("POST", "/generate"): lambda: self._generate(body, h),
                  ("POST", "/update_weights_from_disk"): lambda: self._update(body),
                  ("POST", "/flush_cache"): self._flush,
                  ("GET", "/flush_cache"): lambda: (200, "Cache flushed.\n"),
                  ("POST", "/pause_generation"): lambda: self._pause(True, body.get("mode", "abort")),
                  ("POST", "/continue_generation"): lambda: self._pause(False, None),
                  ("POST", "/init_weights_update_group"): lambda: self._init_group(body),
                  ("POST", "/destroy_weights_update_group"): lambda: self._destroy_group(body),
                  ("POST", "/update_weights_from_distributed"): lambda: self._update_distributed(body),
                  ("POST", "/weights_checker"): lambda: self._check_weights(body),
                  ("GET", "/weights_checker"): lambda: self._check_weights(body),
                  ("POST", "/fake_dump"): lambda: self._dump(body)}
        if tuple(int(x) for x in self.version.split(".")[:3]) >= (0, 5, 21):
            routes[("POST", "/begin_weight_update")] = lambda: self._session(True)
            routes[("POST", "/end_weight_update")] = lambda: self._session(False)
        routes[("POST", "/flush_cache")] = self._flush
        fn = routes.get((method, path))
        if fn is None:
            return self._send(h, 404, {"detail": "Not Found"})
        result = fn()
        if result is None:  # the handler answered (or closed) itself
            return None
        status, payload = result
        return self._send(h, status, payload)

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: Any, raw: bytes | None = None) -> None:
        if raw is None:
            if payload is None:
                raw = b""
            elif isinstance(payload, str):
                raw = payload.encode()
            else:
                raw = json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _close(self, h: BaseHTTPRequestHandler) -> None:
        import socket

        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ------------------------------------------------------------------------------------------ endpoints

    def _model_info(self):
        return 200, {"model_path": self.model_path, "served_model_name": self.model_path,
                     "tokenizer_path": self.model_path, "is_generation": True, "preferred_sampling_params": None,
                     "weight_version": self.weight_version, "load_format": "auto", "reasoning_parser": None,
                     "tool_call_parser": None, "disaggregation_mode": "null", "has_image_understanding": False,
                     "has_audio_understanding": False, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}

    def _server_info(self):
        return 200, {"model_path": self.model_path, "skip_tokenizer_init": True, "dtype": "float32", "device": "cpu",
                     "tp_size": self.tp_size, "dp_size": self.dp_size,
                     "weight_version": self.weight_version, "internal_states": [{}], "version": self.version,
                     "enable_return_routed_experts": self.routed_experts is not None}

    def _pause(self, paused: bool, mode: str | None):
        with self._lock:
            if paused:
                self.pause_epoch += 1
            self.paused, self.pause_mode = paused, mode
        return 200, {"message": f"Generation {'paused' if paused else 'continued'} successfully.", "status": "ok"}

    def _flush(self):
        with self._lock:
            self.flushes += 1
            busy = self.active + self.parked
            forced = self.flush_refusals > 0
            if forced:
                self.flush_refusals -= 1
        if busy or forced:
            return 400, "Flush cache failed.\n"
        return 200, ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
                     "requests, the operation will not be performed.)\n")

    def _session(self, begin: bool):
        if begin and self.session:
            return 400, {"success": False, "message": "a weight-update session is already open; call "
                                                      "end_weight_update() first"}
        if not begin and not self.session:
            return 400, {"success": False, "message": "no weight-update session is open; call "
                                                      "begin_weight_update() first"}
        self.session = begin
        return 200, {"success": True, "message": "Success"}

    def _init_group(self, body: dict[str, Any]):
        with self._scheduler:
            return self._init_group_locked(body)

    def _init_group_locked(self, body: dict[str, Any]):
        from oar_megatron import collectives

        try:
            self.groups[body.get("group_name", "weight_update_group")] = collectives.init_external_group(
                backend=body.get("backend", "nccl"), master_address=body["master_address"],
                master_port=int(body["master_port"]), world_size=int(body["world_size"]),
                rank=int(body["rank_offset"]), group_name=body.get("group_name", "weight_update_group"),
                timeout_s=60.0)
        except Exception as exc:  # noqa: BLE001 - sglang answers a failed init with success: false
            return 400, {"success": False, "message": f"Failed to initialize custom process group: {exc}."}
        self.group_info[body.get("group_name", "weight_update_group")] = {"rank_offset": int(body["rank_offset"]),
                                                                          "world_size": int(body["world_size"])}
        self.joined.append({"group_name": body.get("group_name", "weight_update_group"),
                            **self.group_info[body.get("group_name", "weight_update_group")]})
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def _destroy_group(self, body: dict[str, Any]):
        from oar_megatron import collectives

        self.group_info.pop(body.get("group_name", "weight_update_group"), None)
        pg = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if pg is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        collectives.destroy_external_group(pg)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def _update_distributed(self, body: dict[str, Any]):
        with self._scheduler:
            return self._update_distributed_locked(body)

    def _update_distributed_locked(self, body: dict[str, Any]):
        import os

        import torch.distributed as dist

        from oar_megatron.rollout.weight_sync import bucket_nbytes, unpack_bucket

        with self._lock:
            self.dist_updates.append({k: v for k, v in body.items() if k not in ("names", "dtypes", "shapes")}
                                     | {"n": len(body.get("names", []))})
            n = len(self.dist_updates)
        fault = self.dist_fault
        if isinstance(fault, tuple) and fault[0] == "die" and n == fault[1]:
            os._exit(3)  # the whole server process dies mid-sync
        if fault == "fail" or (isinstance(fault, tuple) and fault[0] == "fail" and n == fault[1]):
            self.dist_fault = None
            return 400, {"success": False, "message": "Failed to update parameter online: fake refusal."}
        session_needed = tuple(int(x) for x in self.version.split(".")[:3]) >= (0, 5, 21)
        if session_needed and not self.session:
            return 400, {"success": False, "message": "update_weights_from_distributed must run between "
                                                      "begin_weight_update() and end_weight_update()"}
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return 400, {"success": False, "message": f"Group {name} not in {list(self.groups)}."}
        if body.get("load_format") != "flattened_bucket":
            return 400, {"success": False, "message": f"fake: load_format {body.get('load_format')!r} unsupported"}
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        try:
            flat = torch.empty(bucket_nbytes(names, dtypes, shapes), dtype=torch.uint8)
            dist.broadcast(flat, src=0, group=self.groups[name])  # as sglang's receiver (not project code)
            tensors = unpack_bucket(flat, names, dtypes, shapes)
        except Exception as exc:  # noqa: BLE001
            return 400, {"success": False, "message": f"Failed to receive weights: {exc}"}
        with self._lock:
            for n_, t in tensors:
                self.received[n_] = t.clone()
                if isinstance(fault, tuple) and fault[0] == "corrupt" and n_ == fault[1]:
                    self.received[n_].view(-1)[0] += 1  # a silently wrong tensor (what /weights_checker catches)
        if body.get("weight_version") is not None:
            if self.hf_config_dir is not None:  # the whole model arrived: generate from it (transformers, fp32)
                self.model = self._model_from_received()
            self.weight_version = str(body["weight_version"])
        if body.get("flush_cache", True) and self.active + self.parked:
            return 400, {"success": False, "message": "Weights were updated, but the cache was not flushed because "
                                                      "requests are still running or queued."}
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def _model_from_received(self) -> HFModel:
        import shutil
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(Path(self.hf_config_dir) / "config.json", Path(tmp) / "config.json")
            save_file({k: v.contiguous() for k, v in self.received.items()}, str(Path(tmp) / "model.safetensors"))
            return HFModel(tmp)

    def _check_weights(self, body: dict[str, Any]):
        """``/weights_checker`` as sglang 0.5.23 answers {action: checksum} on a CPU server with tp_size 1: per
        parameter of its own model (q/k/v fused into ``qkv_proj``, gate/up into ``gate_up_proj``, the embedding
        padded with zero rows to a multiple of 64) the first 8 bytes of the SHA-256 of its bytes as 16 hex digits,
        here over the tensors received by distributed updates."""
        import hashlib

        from oar_megatron.rollout.weight_sync import SGLANG_VOCAB_PADDING, sglang_param

        with self._scheduler:
            if body.get("action", "checksum") != "checksum":
                return 400, {"success": False, "message": f"fake: action {body.get('action')!r} unsupported"}
            parts: dict[str, dict[int, torch.Tensor]] = {}
            for name, t in self.received.items():
                if name in ("model.embed_tokens.weight", "lm_head.weight") and t.shape[0] % SGLANG_VOCAB_PADDING:
                    t = torch.cat([t, t.new_zeros(-t.shape[0] % SGLANG_VOCAB_PADDING, *t.shape[1:])])
                target, part, _ = sglang_param(name)
                parts.setdefault(target, {})[part] = t
            sums = {}
            for target, ps in parts.items():
                flat = torch.cat([ps[i].contiguous().reshape(-1) for i in sorted(ps)])
                digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).digest()
                sums[target] = f"{int.from_bytes(digest[:8], 'big'):016x}"
            overall = hashlib.sha256()
            for name in sorted(sums):
                overall.update(name.encode())
                overall.update(sums[name].encode())
            info = {"checksums": sums, "per_gpu_checksum": overall.hexdigest(),
                    "parallelism_info": [{"role": "target", "tp_rank": 0, "tp_size": 1, "dp_rank": 0, "dp_size": 1,
                                          "pp_rank": 0, "pp_size": 1, "rank": 0, "size": 1}]}
            engine = hashlib.sha256(info["per_gpu_checksum"].encode()).hexdigest()
            return 200, {"success": True, "message": "Success.", "ranks": [info], "per_engine_checksum": engine}

    def _dump(self, body: dict[str, Any]):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.received.items()}, body["path"])
        return 200, {"success": True, "tensors": len(self.received), "calls": list(self.calls),
                     "dist_updates": list(self.dist_updates), "weight_version": self.weight_version,
                     "groups": dict(self.group_info), "joined": list(self.joined), "bodies": list(self.bodies)}

    def _update(self, body: dict[str, Any]):
        with self._lock:
            self.updates.append(dict(body))
        fault, self.update_fault = self.update_fault, None
        if fault == "http_500":
            return 500, {"error": {"message": "Internal Server Error"}}
        path = body.get("model_path")
        if fault == "fail" or not path:
            return 400, {"success": False, "message": f"Failed to get weights iterator: {path} (fake refusal)",
                         "num_paused_requests": 0}
        if self.load_weights and (Path(path) / "config.json").is_file():
            try:
                self.model = HFModel(path)
            except Exception as exc:  # noqa: BLE001 - sglang answers a failed load with success: false
                return 400, {"success": False, "message": f"Failed to load {path}: {exc}", "num_paused_requests": 0}
        self.model_path = path
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        if body.get("flush_cache", True) and self.active + self.parked:  # 0.5.23: a refused flush fails the update
            return 400, {"success": False, "message": "Weights were updated, but the cache was not flushed because "
                                                      "requests are still running or queued.",
                         "num_paused_requests": 0}
        return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def _generate(self, body: dict[str, Any], h: BaseHTTPRequestHandler):
        with self._lock:
            self.requests.append(body)
            fault = self.faults.pop(0) if self.faults else None
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            while self.paused:
                time.sleep(0.01)
            if isinstance(fault, tuple) and fault[0] == "delay":
                time.sleep(fault[1])
                fault = None
            if fault == "die":
                self._close(h)
                return None
            if fault == "http_500":
                return 500, {"error": {"message": "Internal Server Error", "type": "InternalServerError"}}
            if fault == "json":
                self._send(h, 200, None, raw=b'{"output_ids": [1, 2, ')
                return None
            ids = body.get("input_ids")
            sp = dict(body.get("sampling_params") or {})
            n = int(sp.get("n", 1))
            batch = ids if ids and isinstance(ids[0], list) else [ids]
            outs = [self._one(p, sp, body, fault) for p in batch for _ in range(n)]
            return 200, outs if (len(outs) > 1 or isinstance(ids[0], list)) else outs[0]
        finally:
            with self._lock:
                self.in_flight -= 1

    def _routes(self, seq: list[int], start: int, fault: Any) -> str:
        """``meta_info.routed_experts`` of a finished sequence (module docstring): positions [start, len − 1)."""
        import base64

        layers, topk, experts = self.routed_experts
        ran = seq[:-1]  # the last sampled token never went through a forward
        if hasattr(self.model, "routes"):
            ids = self.model.routes(ran).to(torch.int32) if ran else torch.zeros(0, layers, topk, dtype=torch.int32)
        else:
            ids = _table_routes(ran, layers, topk, experts, self.seed)
        ids = ids[start:].contiguous()
        if fault == "routes_short":
            ids = ids[:-1]
        if fault == "routes_oov":
            ids[-1, 0, 0] = experts
        return base64.b64encode(ids.numpy().astype("<i4").tobytes()).decode("utf-8")

    def _park(self, in_place: bool) -> None:
        """Wait while paused; a request parked in place still counts as running (flush refused), a retracted one
        does not."""
        with self._lock:
            self.active -= 1
            self.parked += in_place
        try:
            while self.paused:
                time.sleep(0.01)
        finally:
            with self._lock:
                self.active += 1
                self.parked -= in_place

    def _one(self, prompt: list[int], sp: dict[str, Any], body: dict[str, Any], fault: Any) -> dict[str, Any]:
        with self._lock:
            self._counter += 1
            count = self._counter
        seed = sp.get("sampling_seed")  # a real server honours it under --enable-deterministic-inference
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else self.seed * 1_000_003 + count)
        stops = set(sp.get("stop_token_ids") or [])
        max_new = int(sp.get("max_new_tokens", 128))
        seq = list(prompt)
        out: list[int] = []
        lps: list[float] = []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        t0 = time.perf_counter()
        with self._lock:
            epoch = self.pause_epoch
            self.active += 1
        versions: list[str] = []
        try:
            for _ in range(max_new):
                if self.paused and self.pause_mode == "abort" and self.pause_epoch != epoch:
                    finish = {"type": "abort", "message": "Abort before the weight update (pause_generation)"}
                    break
                if self.paused:
                    self._park(self.pause_mode == "in_place")
                tok, lp = _draw(self.model.logits(seq), sp, gen)
                versions.append(self.weight_version)
                if self.delay_per_token_s:
                    time.sleep(self.delay_per_token_s)
                out.append(tok)
                lps.append(lp)
                seq.append(tok)
                if tok in stops:
                    finish = {"type": "stop", "matched": tok}
                    break
        finally:
            with self._lock:
                self.active -= 1
        version = self.weight_version
        spans = []
        for i, v in enumerate(versions):
            if spans and spans[-1]["version"] == v:
                spans[-1]["end"] = i + 1
            else:
                spans.append({"version": v, "start": i, "end": i + 1})
        spans = spans or [{"version": version, "start": 0, "end": 0}]
        if fault == "short_logprobs":
            lps = lps[:-1]
            out_lp_ids = out[:-1]
        else:
            out_lp_ids = out
        if fault == "oov":
            out[-1] = self.model.vocab_size
            out_lp_ids = out
        if fault == "nan":
            lps[0] = math.nan
        if fault == "wrong_version":
            version = "stale"
        if fault == "abort":
            finish = {"type": "abort", "message": "Abort in waiting queue"}
        if fault == "empty":
            out, lps, out_lp_ids = [], [], []
        output_ids = out if sp.get("no_stop_trim") or finish["type"] != "stop" else out[:-1]
        # field order and extras as a real 0.5.23 server answers (recorded from one with --skip-tokenizer-init)
        meta: dict[str, Any] = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                                "weight_version": version, "num_retractions": 0}
        if body.get("return_logprob"):
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out_lp_ids, strict=False)]
            meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
        if body.get("return_routed_experts") and self.routed_experts is not None and fault != "routes_missing":
            meta["routed_experts"] = self._routes(list(prompt) + out, int(body.get("routed_experts_start_len", 0)),
                                                  fault)
        meta.update({"reasoning_tokens": 0, "completion_tokens": len(out), "cached_tokens": 0,
                     "weight_versions": spans if fault != "wrong_version" else [{"version": version, "start": 0,
                                                                                                 "end": len(out)}],
                     "cached_tokens_details": None, "dp_rank": None, "e2e_latency": time.perf_counter() - t0,
                     "response_sent_to_client_ts": time.time()})
        answer = {"output_ids": output_ids, "meta_info": meta}
        with self._lock:
            self.answers.append(answer)
        return answer


def _table_routes(seq: list[int], layers: int, topk: int, experts: int, seed: int) -> torch.Tensor:
    out = torch.empty(len(seq), layers, topk, dtype=torch.int32)
    for t, tok in enumerate(seq):
        for layer in range(layers):
            g = torch.Generator().manual_seed(((seed * 1_000_003 + t) * 1_000_003 + tok) * 101 + layer)
            out[t, layer] = torch.randperm(experts, generator=g)[:topk].to(torch.int32)
    return out


def main() -> None:
    """Serve one fake in this process (table model) until killed; its URL is written to ``--url-file``."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--url-file", required=True)
    ap.add_argument("--vocab-size", type=int, default=24)
    ap.add_argument("--version", default=SGLANG_VERSION)
    ap.add_argument("--dist-fault", default=None, help="fail | fail:N | die:N | corrupt:NAME")
    ap.add_argument("--hf-config", default=None, help="a directory with config.json: generate from the received model")
    ap.add_argument("--delay-per-token", type=float, default=0.0, help="seconds slept per generated token")
    ap.add_argument("--table-only", action="store_true", help="keep sampling from the table model after updates")
    args = ap.parse_args()
    fake = FakeSGLang(vocab_size=args.vocab_size, version=args.version, delay_per_token_s=args.delay_per_token,
                      load_weights=not args.table_only)
    fake.hf_config_dir = args.hf_config
    if args.dist_fault:
        kind, _, arg = args.dist_fault.partition(":")
        fake.dist_fault = (kind, arg if kind == "corrupt" else int(arg)) if arg else kind
    url = fake.start()
    tmp = Path(args.url_file + ".tmp")
    tmp.write_text(url)
    tmp.rename(args.url_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
