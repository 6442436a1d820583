"""Weight sync from disk: the trainer's weights → an HF directory that SGLang workers load
(``/update_weights_from_disk``).

* :func:`gather_hf_state` — every rank's model chunks (any TP / PP / EP layout; megatron names, stage-local layers,
  EP-local experts) gathered to global rank 0 and exported with ``convert.mapping.mcore_to_hf`` (HF names, full
  shapes, vocabulary padding trimmed, tied embeddings written once). Collective: every rank calls it; rank 0 gets the
  tensors, the others None. The gather goes through ``collectives.all_gather_object`` like ``oar-convert verify``'s
  export check: simple and layout-agnostic, but every rank holds the whole model on the host for a moment — fine up to
  a few B parameters; the distributed (NCCL, bucketed) sync is the path for large models.
* :func:`hf_config_for` — an HF ``config.json`` for a model config (dense llama / qwen2 / qwen3 tables), used when the
  run has no ``model.pretrained`` directory to copy one from; ``convert.config.hf_model_config`` reads it back to the
  same architecture (tested).
* :class:`SyncDir` — versioned directories ``<root>/v{N}``: written as ``v{N}.tmp`` (safetensors + config.json +
  carried tokenizer files), renamed to ``v{N}`` when complete (an atomic directory swap: a server never sees a
  partial version; a version directory left by a crash or a failed update is replaced), then every older version
  removed except the previous one (a server that has not finished loading it may still read it).
* :func:`run_update` / :func:`flush_caches` — SGLang's update protocol around every sync (pause, session, update,
  flush retried while requests drain, continue; docs/sglang_client.md).
* :func:`plan_buckets` / :func:`pack_bucket` / :func:`unpack_bucket` and :class:`DistributedSync` — the distributed
  sync: flattened buckets broadcast from rank 0 over a process group shared with the workers.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config.model import ModelConfig

__all__ = ["DistributedSync", "SyncDir", "bucket_nbytes", "flush_caches", "gather_hf_state", "hf_config_for",
           "pack_bucket", "plan_buckets", "run_update", "unpack_bucket"]

# files carried over from the HF directory the run started from (config.json is rewritten)
CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_for(model: ModelConfig, arch: str) -> dict[str, Any]:
    """An HF ``config.json`` dict describing ``model`` under the dense table ``arch`` (module docstring)."""
    if arch not in _HF_CLASS:
        raise ValueError(f"rollout.sync: no HF config writer for {arch!r} (dense llama / qwen2 / qwen3); start the run "
                         f"from an HF directory (model.pretrained) so its config.json is carried over")
    if model.rope_scaling != "none" or model.position_embedding_type != "rope":
        raise ValueError("rollout.sync: writing config.json for a RoPE-scaled model needs model.pretrained's own "
                         "config.json (set model.pretrained)")
    cfg: dict[str, Any] = {
        "architectures": [_HF_CLASS[arch]], "model_type": arch, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads, "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim, "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings, "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rotary_base, "hidden_act": "silu",
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights, "attention_dropout": 0.0,
        "use_sliding_window": False, "torch_dtype": model.params_dtype,
    }
    if arch == "qwen2":
        cfg["attention_bias"] = True
    elif arch in ("llama", "qwen3"):
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    return cfg


def gather_hf_state(actor: Any, groups: Any, model: ModelConfig, arch: str) -> dict[str, torch.Tensor] | None:
    """HF tensors of the actor's current weights on global rank 0 (None elsewhere); collective (module docstring)."""
    from .. import collectives
    from ..convert.mapping import mcore_to_hf

    mine = {(groups.pp_rank, None if groups.vpp is None else v, groups.tp_rank, groups.ep_rank):
            {n: p.detach().cpu() for n, p in chunk.named_parameters()} for v, chunk in enumerate(actor.models)}
    if groups.world_size > 1:
        # replicas (data / context parallel; under EP the ranks of one expert-data-parallel group) hold the same
        # (pp, vp, tp, ep) chunks: only the lowest rank holding a key sends it
        keys = collectives.all_gather_object(sorted(mine, key=str))
        first = {}
        for r, ks in enumerate(keys):
            for k in ks:
                first.setdefault(k, r)
        parts = collectives.all_gather_object({k: v for k, v in mine.items() if first[k] == groups.rank})
    else:
        parts = [mine]
    if groups.rank != 0:
        return None
    shards: dict = {}
    for part in parts:
        shards.update(part)
    return dict(mcore_to_hf(shards, model, arch, etp=groups.etp))


_VERSION_DIR = re.compile(r"^v(\d+)$")


class SyncDir:
    """Versioned weight directories under ``root`` (module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_DIR.match(p.name)) and p.is_dir())

    def write(self, version: int, tensors: dict[str, torch.Tensor], hf_config: dict[str, Any],
              carried_from: str | Path | None = None) -> tuple[Path, int]:
        """Write version ``version`` atomically; returns (its directory, bytes of safetensors written)."""
        from safetensors.torch import save_file

        final = self.path(version)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"v{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir()
        try:
            dtypes = {t.dtype for t in tensors.values()}
            contiguous = {n: t.contiguous() for n, t in tensors.items()}
            save_file(contiguous, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            nbytes = (tmp / "model.safetensors").stat().st_size
            cfg = dict(hf_config)
            cfg.pop("dtype", None)
            if len(dtypes) == 1 and next(iter(dtypes)) in _DTYPE_NAME:
                cfg["torch_dtype"] = _DTYPE_NAME[next(iter(dtypes))]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            if carried_from is not None:
                for name in CARRIED:
                    if (Path(carried_from) / name).is_file():
                        shutil.copy2(Path(carried_from) / name, tmp / name)
            if final.exists():  # written before a crash or a failed update (a resumed run pushes it again)
                stale = self.root / f"v{version}.tmp-stale"
                shutil.rmtree(stale, ignore_errors=True)
                final.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, nbytes

    def prune(self, keep: int) -> list[int]:
        """Remove every version older than ``keep - 1`` (the newest and the one before it stay). Returns removed."""
        gone = [v for v in self.versions() if v < keep - 1]
        for v in gone:
            shutil.rmtree(self.path(v), ignore_errors=True)
        for p in [*self.root.glob("v*.tmp"), *self.root.glob("v*.tmp-stale")]:  # a crash's leftovers
            shutil.rmtree(p, ignore_errors=True)
        return gone



# ------------------------------------------------------------------------------------------ update protocol


def run_update(engine: Any, update: Any, *, session: bool, what: str) -> None:
    """``update()`` wrapped in SGLang's update protocol on every worker of ``engine`` (an ``SGLangEngine``):
    ``/pause_generation`` {mode} → (``session``: ``/begin_weight_update``) → ``update()`` → (``/end_weight_update``)
    → ``/flush_cache`` retried while requests drain (every ``flush_interval_s`` until ``flush_timeout_s``) →
    ``/continue_generation``. Every call has a timeout (``engine.update_timeout_s``; the control calls 60 s at most).
    On any failure the session is closed and generation continued best-effort (short timeouts, errors ignored) and
    the first error is raised as one line naming the server and the step (``what``): the caller marks the engine
    unusable until a later sync succeeds (the servers may hold a partially updated model)."""
    from .sglang import RolloutError

    short = min(60.0, engine.update_timeout_s)
    engine._control("/pause_generation", {"mode": engine.pause_mode}, timeout_s=short)
    opened = False
    try:
        if session:
            engine._control("/begin_weight_update", {}, timeout_s=short)
            opened = True
        update()
        if session:
            opened = False
            engine._control("/end_weight_update", {}, timeout_s=engine.update_timeout_s)
        flush_caches(engine)
    except BaseException as exc:
        for path in (["/end_weight_update"] if opened else []) + ["/continue_generation"]:
            try:
                engine._control(path, {}, timeout_s=min(10.0, short))
            except Exception:  # noqa: BLE001 - the first error is the one reported
                pass
        if isinstance(exc, RolloutError):
            raise RolloutError(f"{str(exc).splitlines()[0]} (during {what})") from None
        raise
    engine._control("/continue_generation", {}, timeout_s=short)


def flush_caches(engine: Any) -> None:
    """``/flush_cache`` on every worker until it is accepted: SGLang refuses (HTTP 400) while requests are still
    running or queued, so a refusal is retried every ``engine.flush_interval_s`` until ``engine.flush_timeout_s``;
    then one :class:`RolloutError` naming the worker (its cache still holds the old weights' KV)."""
    from .sglang import RolloutError

    deadline = time.monotonic() + engine.flush_timeout_s
    pending = list(engine.workers)
    while True:
        attempts = engine._attempts("/flush_cache", dict.fromkeys(pending),
                                    timeout_s=min(60.0, engine.update_timeout_s))
        refused = []
        for att in attempts:
            if att.ok:
                continue
            if att.reason != "http_400":
                raise RolloutError(f"sglang: {att.server}/flush_cache failed: {att.reason} {att.detail}".rstrip())
            refused.append(att)
        if not refused:
            return
        if time.monotonic() >= deadline:
            att = refused[0]
            raise RolloutError(f"sglang: {att.server}/flush_cache still refused after {engine.flush_timeout_s:g}s "
                               f"(requests did not drain): {att.detail.strip()[:120]}")
        pending = [a.server for a in refused]
        time.sleep(engine.flush_interval_s)


# ------------------------------------------------------------------------------------------ flattened buckets

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8",
               torch.int8: "int8", torch.bool: "bool"}


def plan_buckets(tensors: Any, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """``(name, tensor)`` pairs packed into buckets of at most ``bucket_bytes`` (a tensor larger than that is a
    bucket of its own). SGLang's ``FlattenedTensorBucket`` views each tensor at its byte offset in one ``uint8``
    buffer without padding and refuses an offset that is not a multiple of the dtype's size, so the tensors are
    ordered by element size, largest first (stable otherwise): every offset is then aligned, mixed dtypes
    included."""
    if bucket_bytes < 1:
        raise ValueError(f"rollout.sync_bucket_mb: need a positive bucket size, got {bucket_bytes} bytes")
    items = list(tensors.items() if hasattr(tensors, "items") else tensors)
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"weight sync: tensor {name!r} has dtype {t.dtype}, which SGLang cannot receive")
    items.sort(key=lambda nt: -nt[1].element_size())
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    cur: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


def pack_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, list]]:
    """One bucket → (its flat ``uint8`` tensor, {names, dtypes, shapes}): each tensor's bytes in order, as SGLang's
    ``FlattenedTensorBucket`` lays them out (``flatten().view(uint8)``, concatenated)."""
    flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])
    meta = {"names": [n for n, _ in bucket], "dtypes": [DTYPE_NAMES[t.dtype] for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}
    return flat, meta


def bucket_nbytes(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> int:
    """Bytes of the flat buffer a receiver allocates for this announcement; ValueError on an unaligned tensor."""
    offset = 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        dt = getattr(torch, dtype)
        if offset % dt.itemsize:
            raise ValueError(f"weight sync: tensor {name!r} would sit at unaligned byte offset {offset} ({dtype})")
        offset += math.prod(shape) * dt.itemsize
    return offset


def unpack_bucket(flat: torch.Tensor, names: list[str], dtypes: list[str],
                  shapes: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
    """The receiving side (what SGLang's ``FlattenedTensorBucket.empty`` + ``reconstruct_tensors`` does): views of
    ``flat`` at each tensor's byte offset. Used by the tests' fake receiver."""
    if bucket_nbytes(names, dtypes, shapes) != flat.numel():
        raise ValueError(f"weight sync: bucket of {flat.numel()} bytes, the announcement describes "
                         f"{bucket_nbytes(names, dtypes, shapes)}")
    out, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        dt = getattr(torch, dtype)
        n = math.prod(shape) * dt.itemsize
        out.append((name, flat[offset:offset + n].view(dt).reshape(shape)))
        offset += n
    return out


# ------------------------------------------------------------------------------------------ distributed sync


class DistributedSync:
    """Weights pushed over a process group shared with the SGLang workers (``/init_weights_update_group`` +
    ``/update_weights_from_distributed``), driven by global rank 0 of the trainer, which holds the exported HF
    tensors (:func:`gather_hf_state`) and is rank 0 of the group; worker ``i``'s TP ranks follow at
    ``rank_offset = 1 + Σ tp_size`` of the workers before it.

    * :meth:`connect` (once, lazily): every worker's ``/init_weights_update_group`` {master_address, master_port,
      rank_offset, world_size, group_name, backend} posted concurrently while this process joins the same TCP
      rendezvous as rank 0 (``collectives.init_external_group``); a worker that fails or times out is one line
      naming it.
    * :meth:`push`: the tensors in buckets of ``bucket_bytes`` (:func:`plan_buckets`), each announced to every
      worker with ``/update_weights_from_distributed`` {names, dtypes, shapes, group_name, flush_cache: false,
      load_format: "flattened_bucket"} (``weight_version`` only on the last bucket, so a partial update never
      claims the new version) while the flat ``uint8`` tensor is broadcast from rank 0 over the group
      (``collectives.broadcast``). The HTTP calls run in a helper thread with ``update_timeout_s``; the group has
      the same timeout, so a worker that dies or stalls mid-sync is an error, never a hang. After a failure the
      group is dropped (the next sync connects again)."""

    def __init__(self, engine: Any, *, bucket_bytes: int, backend: str = "nccl", master_address: str = "127.0.0.1",
                 master_port: int | None = None, group_name: str = "oar_weight_sync", device: Any = "cpu"):
        self.engine = engine
        self.bucket_bytes = int(bucket_bytes)
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.prefix = group_name
        self.group_name = group_name
        self.connections = 0
        self.device = torch.device(device)
        self.group: Any = None
        self.world_size = 0
        self.buckets = 0

    def _tp_sizes(self) -> dict[str, int]:
        from .sglang import needs_for_version

        paths = needs_for_version(self.engine.read_server_version()).server_info_paths
        out = {}
        for url in self.engine.workers:
            info = self.engine._control(paths[0], urls=[url], method="GET", timeout_s=30.0)[url]
            tp = info.get("tp_size", 1) if isinstance(info, dict) else 1
            dp = info.get("dp_size", 1) if isinstance(info, dict) else 1
            if int(dp or 1) != 1:
                raise ValueError(f"sglang: {url} runs dp_size={dp}; distributed weight updates need dp_size 1 "
                                 "(start one server per replica)")
            out[url] = int(tp or 1)
        return out

    def connect(self) -> None:
        from .. import collectives

        import os
        import uuid

        if self.group is not None:
            return
        # torch refuses a group name used before in a process (also after destroy on the workers' side): one name
        # per connection
        self.connections += 1
        self.group_name = f"{self.prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{self.connections}"
        tps = self._tp_sizes()
        self.world_size = 1 + sum(tps.values())
        port = self.master_port or _free_port(self.master_address)
        offsets, nxt = {}, 1
        for url in self.engine.workers:
            offsets[url] = nxt
            nxt += tps[url]
        bodies = {url: {"master_address": self.master_address, "master_port": port, "rank_offset": offsets[url],
                        "world_size": self.world_size, "group_name": self.group_name, "backend": self.backend}
                  for url in self.engine.workers}
        with _Background(self.engine, "/init_weights_update_group", bodies) as http:
            try:
                self.group = collectives.init_external_group(
                    backend=self.backend, master_address=self.master_address, master_port=port,
                    world_size=self.world_size, rank=0, group_name=self.group_name,
                    timeout_s=self.engine.update_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the workers' answers name the culprit better
                http.wait()
                raise RuntimeError(f"sglang: weight-update group {self.group_name} at {self.master_address}:{port}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            http.wait()

    def push(self, tensors: dict[str, torch.Tensor], version: int) -> int:
        """Every tensor to every worker (class docstring); returns the bytes broadcast."""
        from .. import collectives

        self.connect()
        buckets = plan_buckets(tensors, self.bucket_bytes)
        sent = 0
        try:
            for i, bucket in enumerate(buckets):
                flat, meta = pack_bucket(bucket)
                flat = flat.to(self.device)
                body = {**meta, "group_name": self.group_name, "flush_cache": False,
                        "load_format": "flattened_bucket"}
                if i == len(buckets) - 1:
                    body["weight_version"] = str(version)
                with _Background(self.engine, "/update_weights_from_distributed",
                                 dict.fromkeys(self.engine.workers, body)) as http:
                    try:
                        collectives.broadcast(flat, src=0, group=self.group)
                    except Exception as exc:  # noqa: BLE001 - a worker's own answer names it better
                        http.wait()
                        raise RuntimeError(f"sglang: broadcast of weight bucket {i + 1}/{len(buckets)} over "
                                           f"{self.group_name} failed: "
                                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
                    http.wait()
                sent += flat.numel()
        except BaseException:
            self.close()
            raise
        self.buckets = len(buckets)
        return sent

    def close(self) -> None:
        from .. import collectives

        if self.group is not None:
            group, self.group = self.group, None
            collectives.destroy_external_group(group)
            for url in self.engine.workers:  # the workers forget it too (best-effort: one may be dead)
                try:
                    self.engine._control("/destroy_weights_update_group", {"group_name": self.group_name},
                                         urls=[url], timeout_s=5.0)
                except Exception:  # noqa: BLE001
                    pass


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Background:
    """POST ``bodies[url]`` to each worker concurrently in a helper thread (the trainer joins the collective
    meanwhile); :meth:`wait` joins it and raises the engine's one-line ``RolloutError`` for a failed worker."""

    def __init__(self, engine: Any, path: str, bodies: dict[str, Any]):
        import threading

        self.engine, self.path, self.bodies = engine, path, bodies
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"sglang{path}")
        self.done = False

    def _run(self) -> None:
        try:
            self.engine._control_each(self.path, self.bodies, timeout_s=self.engine.update_timeout_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self.error = exc

    def __enter__(self) -> _Background:
        self.thread.start()
        return self

    def wait(self) -> None:
        if not self.done:
            self.done = True
            self.thread.join()
            if self.error is not None:
                raise self.error

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.wait()
        else:
            self.thread.join()
