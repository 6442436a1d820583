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
* :func:`plan_buckets` / :func:`pack_bucket` / :func:`unpack_bucket`, :class:`SyncLayout`, :func:`export_stage` and
  :class:`DistributedSync` — the distributed sync: each pipeline stage's first rank streams its own stage's HF
  tensors into flattened buckets broadcast over its own process group shared with the workers.
* :class:`SGLangChecksums` / :func:`verify_checksums` — ``rollout.verify_sync``: the workers' ``/weights_checker``
  checksums against those of the tensors sent.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from ..config.model import ModelConfig

__all__ = ["DistributedSync", "GpuTensorHash", "SGLangChecksums", "SyncDir", "SyncLayout", "UpdateProtocol",
           "bucket_nbytes", "export_stage", "flush_caches", "gather_hf_state", "hf_config_for", "pack_bucket",
           "plan_buckets", "run_update", "server_dtype_device", "sglang_param", "unpack_bucket", "verify_checksums"]

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
    proto = UpdateProtocol(engine, session=session, what=what)
    proto.open()
    try:
        update()
        proto.finish()
    except BaseException as exc:
        proto.abort(exc)
    proto.resume()


class UpdateProtocol:
    """:func:`run_update`'s steps one by one, for callers whose update is spread over several ranks (the
    distributed sync: global rank 0 opens and closes, each pipeline stage's sender sends its buckets in between):
    :meth:`open` (pause, begin), :meth:`finish` (end, flush), :meth:`resume` (continue), :meth:`abort` (end if
    opened, continue, both best-effort; re-raises ``exc`` as one line naming the step)."""

    def __init__(self, engine: Any, *, session: bool, what: str):
        self.engine, self.session, self.what = engine, session, what
        self.short = min(60.0, engine.update_timeout_s)
        self.opened = False

    def open(self) -> None:
        self.engine._control("/pause_generation", {"mode": self.engine.pause_mode}, timeout_s=self.short)
        if self.session:
            try:
                self.engine._control("/begin_weight_update", {}, timeout_s=self.short)
            except BaseException as exc:
                self.abort(exc)
            self.opened = True

    def finish(self) -> None:
        if self.session:
            self.opened = False
            self.engine._control("/end_weight_update", {}, timeout_s=self.engine.update_timeout_s)
        flush_caches(self.engine)

    def resume(self) -> None:
        self.engine._control("/continue_generation", {}, timeout_s=self.short)

    def abort(self, exc: BaseException) -> None:
        from .sglang import RolloutError

        for path in (["/end_weight_update"] if self.opened else []) + ["/continue_generation"]:
            try:
                self.engine._control(path, {}, timeout_s=min(10.0, self.short))
            except Exception:  # noqa: BLE001 - the first error is the one reported
                pass
        self.opened = False
        if isinstance(exc, RolloutError):
            raise RolloutError(f"{str(exc).splitlines()[0]} (during {self.what})") from None
        raise exc


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
    if len(bucket) == 1:  # a view of the tensor's own bytes: no copy
        flat = bucket[0][1].contiguous().reshape(-1).view(torch.uint8)
    else:
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


class SyncLayout:
    """Who holds which model chunk, for the distributed sync (built once, collectively: every rank's chunk keys
    ``(pp_rank, vp_stage, tp_rank, ep_rank)`` with their parameter names, shapes and dtypes are all-gathered — no
    tensor moves). A key's *owner* is the lowest global rank holding it (replicas — data / context parallel, the
    other ranks of an expert-data-parallel group — hold the same chunk); stage ``s``'s *sender* is the owner of its
    first chunk at TP rank 0 / EP rank 0, i.e. the stage's rank with tp = cp = dp = ep rank 0 (global rank 0 for
    stage 0). Every chunk's names are checked against the conversion table and the whole export is dry-run on
    ``meta`` tensors here, on every rank alike, so a layout error is raised before any transfer (never a rank left
    waiting in a send)."""

    def __init__(self, actor: Any, groups: Any, model: ModelConfig, arch: str):
        from .. import collectives
        from ..convert.mapping import ConversionError, chunk_state_names, iter_chunk_to_hf

        mine = {key: {n: (list(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in chunk.named_parameters()}
                for key, chunk in _chunk_keys(actor, groups).items()}
        parts = collectives.all_gather_object(mine) if groups.world_size > 1 else [mine]
        self.owner: dict[tuple, int] = {}
        self.meta: dict[tuple, dict[str, tuple[list[int], str]]] = {}
        for r, part in enumerate(parts):
            for key, names in sorted(part.items(), key=str):
                if key not in self.owner:
                    self.owner[key], self.meta[key] = r, names
        keys = list(self.owner)
        self.pp = 1 + max(k[0] for k in keys)
        vps = {k[1] for k in keys}
        self.vpp = None if vps == {None} else 1 + max(v for v in vps if v is not None)
        self.tp, self.ep = 1 + max(k[2] for k in keys), 1 + max(k[3] for k in keys)
        self.etp = getattr(groups, "etp", None) or self.tp
        self.rank, self.stage = groups.rank, groups.pp_rank
        vs = [None] if self.vpp is None else list(range(self.vpp))
        for p in range(self.pp):
            for v in vs:
                for t in range(self.tp):
                    for e in range(self.ep):
                        if (p, v, t, e) not in self.owner:
                            raise ConversionError(f"weight sync: no rank holds model chunk (pp_rank, vp_stage, "
                                                  f"tp_rank, ep_rank)={(p, v, t, e)}")
        self.sender = {p: self.owner[(p, vs[0], 0, 0)] for p in range(self.pp)}
        for p in range(self.pp):
            for v in vs:
                kw = self.chunk_layout(p, v)
                for t in range(self.tp):
                    for e in range(self.ep):
                        want = chunk_state_names(model, arch, ep_rank=e, **kw)
                        got = set(self.meta[(p, v, t, e)])
                        where = f"(pp_rank, vp_stage, tp_rank, ep_rank)={(p, v, t, e)}"
                        if want - got:
                            raise ConversionError(f"weight sync: megatron tensor {sorted(want - got)[0]!r} missing "
                                                  f"on {where}")
                        if got - want:
                            raise ConversionError(f"weight sync: unexpected megatron tensor {sorted(got - want)[0]!r} "
                                                  f"for {arch} on {where}")

                def dry(name, t, e, p=p, v=v):
                    shape, dtype = self.meta[(p, v, t, e)][name]
                    return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")

                for _ in iter_chunk_to_hf(dry, model, arch, **kw):  # every shape / vocabulary check, no data
                    pass

    def chunks(self, p: int) -> list[int | None]:
        """Stage ``p``'s model chunks in export order (``vp_stage`` ascending; None without virtual stages)."""
        return [None] if self.vpp is None else list(range(self.vpp))

    def chunk_layout(self, p: int, v: int | None) -> dict[str, Any]:
        return dict(tp=self.tp, pp=self.pp, pp_rank=p, vpp=self.vpp, vp_stage=v, ep=self.ep, etp=self.etp)

    def contributes(self, rank: int, p: int) -> bool:
        """Whether ``rank`` takes part in stage ``p``'s export (its sender, or the owner of one of its shards)."""
        return rank == self.sender[p] or any(k[0] == p and r == rank for k, r in self.owner.items())


def _chunk_keys(actor: Any, groups: Any) -> dict[tuple, Any]:
    return {(groups.pp_rank, None if groups.vpp is None else v, groups.tp_rank, groups.ep_rank): chunk
            for v, chunk in enumerate(actor.models)}


def export_stage(actor: Any, groups: Any, layout: SyncLayout, model: ModelConfig,
                 arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's pipeline stage exported to HF tensors one megatron tensor at a time (``convert.mapping.
    iter_chunk_to_hf``: the stage's layers, the embedding on the first stage, the final norm and an untied output
    layer on the last; a tied embedding once). On the stage's sender: yields ``(HF name, tensor)``, each built from
    its TP / EP shards at the moment it is needed — its own, or received from their owner
    (``collectives.recv``); nothing else of the model is materialised. On another owner of the stage's shards:
    sends them to the sender in the same order (``collectives.send``) and yields nothing. Every contributor must run
    it to the end (the sender drains it even after a failed send, so no owner is left blocked)."""
    from .. import collectives
    from ..convert.mapping import chunk_export_plan, iter_chunk_to_hf

    p = groups.pp_rank
    me = groups.rank
    local = {key: {n: t.detach() for n, t in chunk.named_parameters()}
             for key, chunk in _chunk_keys(actor, groups).items() if layout.owner.get(key) == me}
    device = next((t.device for state in local.values() for t in state.values()), torch.device("cpu"))
    sender = layout.sender[p]
    for v in layout.chunks(p):
        kw = layout.chunk_layout(p, v)
        if me == sender:
            def get(name, t, e, v=v):
                key = (p, v, t, e)
                if layout.owner[key] == me:
                    return local[key][name]
                shape, dtype = layout.meta[key][name]
                return collectives.recv(torch.empty(shape, dtype=getattr(torch, dtype), device=device),
                                        src=layout.owner[key])

            yield from iter_chunk_to_hf(get, model, arch, **kw)
        else:
            for _, _, _, reads in chunk_export_plan(model, arch, **kw):
                for name, t, e in reads:
                    if layout.owner[(p, v, t, e)] == me:
                        collectives.send(local[(p, v, t, e)][name], dst=sender)


# ------------------------------------------------------------------------------------------ /weights_checker

SGLANG_VOCAB_PADDING = 64  # sglang's VocabParallelEmbedding / ParallelLMHead pad their rows to a multiple of this
_FUSED = (re.compile(r"^(model\.layers\.\d+\.self_attn\.)([qkv])_proj\.(weight|bias)$"),
          re.compile(r"^(model\.layers\.\d+\.mlp\.)(gate|up)_proj\.(weight)$"))


def sglang_param(name: str) -> tuple[str, int, int]:
    """(SGLang's parameter name, part index, parts) of HF tensor ``name`` in a dense llama / qwen2 / qwen3 SGLang
    model at tp_size 1: q / k / v are rows of ``self_attn.qkv_proj``, gate / up of ``mlp.gate_up_proj``; everything
    else keeps its name (checked against a real 0.5.23 server's ``/weights_checker``)."""
    m = _FUSED[0].match(name)
    if m:
        return f"{m.group(1)}qkv_proj.{m.group(3)}", "qkv".index(m.group(2)), 3
    m = _FUSED[1].match(name)
    if m:
        return f"{m.group(1)}gate_up_proj.{m.group(3)}", ("gate", "up").index(m.group(2)), 2
    return name, 0, 1


_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 tensors of uint32 values, without int64 overflow (16-bit halves of ``c``)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) & _M32) | (x >> (32 - r))


class GpuTensorHash:
    """SGLang's ``gpu_tensor_hash`` (``sglang/kernels/ops/memory/gpu_tensor_hash.py``, 0.5.23: what a CUDA server's
    ``/weights_checker`` reports), transcribed to CPU torch and streamed: the tensor's bytes as little-endian
    uint32 words (zero-padded to 4 bytes), each word mixed with its global index (two murmur3 ``fmix32`` lanes),
    summed per tile of ``tile_words`` words, each tile's two sums xor-ed with the total byte count and mixed again,
    the tiles' 64-bit values summed and finished with splitmix64. :meth:`update` takes bytes in order (the parts of
    a fused tensor one after the other); memory stays near one chunk of tiles. Not yet compared with the kernel on
    a GPU (tests/rollout/test_sglang_stage_sync.py compares it with a word-by-word transcription)."""

    POS_A, POS_B = 0x27D4EB2D, 0x165667B1

    def __init__(self, seed: int = 0x243F6A88, tile_words: int = 8192, chunk_tiles: int = 64):
        self.s1 = seed & _M32
        self.s2 = ((seed * 0x9E3779B1) ^ 0xDEADBEEF) & _M32
        self.tile = tile_words
        self.chunk = tile_words * chunk_tiles * 4  # bytes per processing step: whole tiles
        self.words = 0
        self.carry = torch.empty(0, dtype=torch.uint8)
        self.sums: list[torch.Tensor] = []

    def update(self, data: torch.Tensor) -> None:
        buf = torch.cat([self.carry, data.reshape(-1).view(torch.uint8)]) if self.carry.numel() else \
            data.reshape(-1).view(torch.uint8)
        start = 0
        while buf.numel() - start >= self.chunk:
            self._words(buf[start:start + self.chunk])
            start += self.chunk
        self.carry = buf[start:].clone()

    def _words(self, u8: torch.Tensor) -> None:
        w = u8.contiguous().view(torch.int32).to(torch.int64) & _M32
        i = torch.arange(self.words, self.words + w.numel(), dtype=torch.int64) & _M32  # the kernel's uint32 index
        k1 = _fmix32(w ^ (((_mul32(i, self.POS_A) + self.s1) & _M32) ^ _rotl32(i, 15)))
        k2 = _fmix32(w ^ (((_mul32(i, self.POS_B) + self.s2) & _M32) ^ _rotl32(i, 13)))
        pad = -w.numel() % self.tile
        k = torch.stack([k1, k2])
        if pad:
            k = torch.cat([k, k.new_zeros(2, pad)], dim=1)
        self.sums.append(k.reshape(2, -1, self.tile).sum(-1) & _M32)
        self.words += w.numel()

    def digest(self) -> int:
        if self.carry.numel():
            tail = self.carry
            if tail.numel() % 4:
                tail = torch.cat([tail, tail.new_zeros(-tail.numel() % 4)])
            self._words(tail)
            self.carry = torch.empty(0, dtype=torch.uint8)
        if self.words == 0:
            return 0
        h = torch.cat(self.sums, dim=1) ^ ((self.words * 4) & _M32)
        h = _fmix32(h)
        total = sum((a << 32) | b for a, b in zip(h[0].tolist(), h[1].tolist(), strict=True)) & _M64
        total ^= total >> 30
        total = (total * 0xBF58476D1CE4E5B9) & _M64
        total ^= total >> 27
        total = (total * 0x94D049BB133111EB) & _M64
        return total ^ (total >> 31)


class _Sha8:
    """The CPU server's hash (``mm_utils.tensor_hash``): the first 8 bytes of the SHA-256, big-endian."""

    def __init__(self):
        import hashlib

        self.sha = hashlib.sha256()

    def update(self, data: torch.Tensor) -> None:
        self.sha.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))

    def digest(self) -> int:
        return int.from_bytes(self.sha.digest()[:8], "big")


class SGLangChecksums:
    """The per-tensor checksums SGLang's ``/weights_checker`` {action: checksum} reports (``weight_checker.
    _hash_tensor``: ``mm_utils.tensor_hash`` as 16 hex digits — on a CPU server the first 8 bytes of the SHA-256 of
    the tensor's bytes, on a CUDA server its Triton hash, :class:`GpuTensorHash`), computed from the HF tensors the
    trainer sends, in the server's layout (:func:`sglang_param`; the embedding and an untied ``lm_head`` padded
    with zero rows to a multiple of 64; cast to the server's dtype). Streaming: :meth:`add` takes the tensors in
    export order (a fused tensor's parts arrive one after the other) and hashes incrementally. ``device``: the
    server's (``/server_info``); ``cuda`` (or unknown: SGLang's default) selects the GPU hash."""

    def __init__(self, dtype: str | None = None, device: str | None = "cpu"):
        self.dtype = getattr(torch, dtype) if dtype in ("float32", "bfloat16", "float16") else None
        self.gpu = device in (None, "", "cuda")
        self.done: dict[str, str] = {}
        self._open: dict[str, tuple[Any, int]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        target, part, parts = sglang_param(name)
        hasher, nxt = self._open.pop(target, (None, 0))
        if part != nxt:
            raise ValueError(f"weight sync checksum: HF tensor {name!r} arrived as part {part} of {target!r}, "
                             f"expected part {nxt}")
        if hasher is None:
            hasher = GpuTensorHash() if self.gpu else _Sha8()
        t = tensor.detach()
        if self.dtype is not None and t.dtype != self.dtype:
            t = t.to(self.dtype)
        t = t.cpu().contiguous()
        hasher.update(t)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            pad = -t.shape[0] % SGLANG_VOCAB_PADDING
            if pad:
                hasher.update(t.new_zeros(pad, *t.shape[1:]))
        if part + 1 < parts:
            self._open[target] = (hasher, part + 1)
        else:
            self.done[target] = f"{hasher.digest():016x}"

    def result(self) -> dict[str, str]:
        if self._open:
            raise ValueError(f"weight sync checksum: {sorted(self._open)[0]!r} is missing some of its parts")
        return dict(self.done)


def server_dtype_device(engine: Any) -> tuple[str | None, str | None]:
    """(dtype, device) of ``engine``'s first worker from ``/server_info``."""
    from .sglang import needs_for_version

    paths = needs_for_version(engine.read_server_version()).server_info_paths
    url = engine.workers[0]
    info = engine._control(paths[0], urls=[url], method="GET", timeout_s=30.0)[url]
    if not isinstance(info, dict):
        return None, None
    return info.get("dtype"), info.get("device")


def verify_checksums(engine: Any, expected: dict[str, str]) -> None:
    """``/weights_checker`` {action: checksum} on every worker; each must report exactly ``expected`` (one
    TP rank). One-line :class:`RolloutError` naming the server (and the first differing tensor) otherwise."""
    from .sglang import RolloutError

    answers = engine._control("/weights_checker", {"action": "checksum"}, timeout_s=min(120.0, engine.update_timeout_s))
    for url in engine.workers:
        data = answers[url]
        ranks = data.get("ranks") if isinstance(data, dict) else None
        if not isinstance(ranks, list) or not ranks or not isinstance(ranks[0], dict):
            raise RolloutError(f"sglang: {url}/weights_checker: no checksums in the answer")
        if len(ranks) != 1:
            raise RolloutError(f"sglang: {url}/weights_checker: {len(ranks)} TP ranks; rollout.verify_sync "
                               "reproduces the checksums of tp_size 1 servers only")
        got = ranks[0].get("checksums") or {}
        for name in sorted(set(expected) | set(got)):
            if name not in got:
                raise RolloutError(f"sglang: {url} verification failed: it holds no tensor {name!r} (the trainer "
                                   "sent it)")
            if name not in expected:
                raise RolloutError(f"sglang: {url} verification failed: it holds tensor {name!r}, which the trainer "
                                   "did not send")
            if got[name] != expected[name]:
                raise RolloutError(f"sglang: {url} verification failed: tensor {name!r} has checksum {got[name]}, "
                                   f"the trainer sent {expected[name]}")


# ------------------------------------------------------------------------------------------ distributed sync


class DistributedSync:
    """Weights pushed over process groups shared with the SGLang workers (``/init_weights_update_group`` +
    ``/update_weights_from_distributed``), one group per pipeline stage, each driven by its stage's *sender*
    (:class:`SyncLayout`: the stage's tp = cp = dp = ep rank 0), which is rank 0 of its group; worker ``i``'s TP
    ranks follow at ``rank_offset = 1 + Σ tp_size`` of the workers before it, in every group.

    :meth:`sync` (collective over the trainer's ranks; docs/sglang_client.md):

    * global rank 0 reads the workers' version and TP sizes and, when not connected, names the groups; then stage
      by stage, each sender posts ``/init_weights_update_group`` {master_address, master_port, rank_offset,
      world_size, group_name, backend} to every worker while joining the same TCP rendezvous as rank 0
      (``collectives.init_external_group``);
    * global rank 0 opens SGLang's update protocol on every worker (pause, begin; :class:`UpdateProtocol`);
    * stage by stage (0, 1, …), the stage exports its own tensors (:func:`export_stage`: streamed, TP / EP shards
      gathered to the sender one tensor at a time) into buckets of ``bucket_bytes``, each sent as soon as it is full:
      announced with ``/update_weights_from_distributed`` {names, dtypes, shapes, group_name: the stage's group,
      flush_cache: false, load_format: "flattened_bucket"} while the sender broadcasts the flat ``uint8`` tensor
      over its group (``collectives.broadcast``). Only the last stage's last bucket carries ``weight_version``. The
      stages take turns (an SGLang worker handles one request at a time, so stages broadcasting at once into groups
      that span several workers could each hold a worker the other needs); the outcome of each stage is broadcast
      to every rank before the next begins;
    * global rank 0 closes the protocol (end, flush, [``verify``: ``/weights_checker``], continue).

    A failure in stage ``s`` (a worker refusing, dying or timing out) is one line naming the server and the stage.
    Defined outcome: stages before ``s`` were loaded on every worker, stage ``s`` maybe in part, later stages are
    not sent; no bucket claimed the new version; every sender drops its group (the next sync reconnects every stage
    under new names and resends everything) and the engine refuses to generate until a sync succeeds.
    Memory: a sender holds at most one bucket's tensors plus the flat bucket being sent (``peak_staged_bytes``);
    ``on_flush(stage, bucket_index, nbytes)``, when set, is called after each bucket is sent (tests)."""

    def __init__(self, engine: Any, *, bucket_bytes: int, backend: str = "nccl", master_address: str = "127.0.0.1",
                 master_port: int | None = None, group_name: str = "oar_weight_sync", device: Any = "cpu",
                 verify: bool = False):
        self.engine = engine
        self.bucket_bytes = int(bucket_bytes)
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.prefix = group_name
        self.group_name = group_name  # this rank's stage group (a sender), else the last one named
        self.connections = 0
        self.device = torch.device(device)
        self.verify = verify
        self.group: Any = None  # this rank's stage group (senders only)
        self.connected = False
        self.layout: SyncLayout | None = None
        self.world_size = 0
        self.buckets = 0
        self.peak_staged_bytes = 0
        self.on_flush: Any = None
        self.stats: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------- the collective sync

    def sync(self, actor: Any, groups: Any, version: int, model: ModelConfig, arch: str) -> None:
        """Push the actor's weights as ``version`` (class docstring). Collective; raises the same one-line
        :class:`RolloutError` on every rank on failure. ``self.stats``: ``sync/prepare_s`` (layout, connect, pause),
        ``sync/update_s`` (every stage's buckets, end, flush, verification, continue), bytes, buckets, stages, the
        largest ``peak_staged_bytes`` of the senders."""
        from .. import collectives
        from .sglang import RolloutError, needs_for_version

        def bcast(obj: Any, src: int) -> Any:
            return collectives.broadcast_object(obj, src=src) if groups.world_size > 1 else obj

        t0 = time.perf_counter()
        if self.layout is None:
            self.layout = SyncLayout(actor, groups, model, arch)
        lay, me = self.layout, groups.rank
        start: dict[str, Any] = {}
        if me == 0:
            try:
                needs = needs_for_version(self.engine.read_server_version())
                start = {"session": needs.weight_update_session, "dtype": None, "device": None}
                if not self.connected:
                    import os
                    import uuid

                    # torch refuses a group name used before in a process (also after destroy on the workers'
                    # side): new names per connection
                    self.connections += 1
                    base = f"{self.prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{self.connections}"
                    start["names"] = {s: f"{base}-pp{s}" for s in range(lay.pp)}
                    start["tps"] = self._tp_sizes()
                if self.verify:
                    start["dtype"], start["device"] = self._server_dtype()
            except (RolloutError, ValueError) as exc:
                start = {"error": _line(exc)}
        start = bcast(start, 0)
        if "error" in start:
            raise RolloutError(start["error"])
        if "names" in start:
            self._connect_stages(groups, start["names"], start["tps"], bcast)
        proto = UpdateProtocol(self.engine, session=start["session"], what=f"distributed sync of version {version}")
        self._on_rank0(me, bcast, proto.open)
        t1 = time.perf_counter()
        failure, outcomes = None, []
        for s in range(lay.pp):
            out = None
            if s == groups.pp_rank and lay.contributes(me, s):
                out = self._push_stage(actor, groups, s, version if s == lay.pp - 1 else None, model, arch,
                                       start["dtype"], start["device"])
            out = bcast(out, lay.sender[s])
            outcomes.append(out)
            if out["error"] is not None:
                failure = out["error"]
                break
        def close() -> None:
            if failure is not None:
                proto.abort(RolloutError(failure))
            proto.finish()
            if self.verify:
                expected: dict[str, str] = {}
                for out in outcomes:
                    expected.update(out["checksums"])
                try:
                    verify_checksums(self.engine, expected)
                except RolloutError as exc:
                    proto.abort(exc)
            proto.resume()

        self._on_rank0(me, bcast, close)
        t2 = time.perf_counter()
        nbytes = sum(o["bytes"] for o in outcomes)
        self.buckets = sum(o["buckets"] for o in outcomes)
        self.peak_staged_bytes = max(o["peak"] for o in outcomes)
        self.stats = {"sync/prepare_s": t1 - t0, "sync/update_s": t2 - t1, "sync/bytes": float(nbytes),
                      "sync/buckets": float(self.buckets), "sync/stages": float(lay.pp),
                      "sync/peak_staged_bytes": float(self.peak_staged_bytes),
                      "sync/gb_per_s": nbytes / 1e9 / max(t2 - t1, 1e-9)}

    def _on_rank0(self, me: int, bcast: Any, step: Any) -> None:
        """``step()`` on global rank 0 (the protocol's calls); its one-line error broadcast and raised on every rank
        after the sync groups are dropped (the next sync reconnects)."""
        from .sglang import RolloutError

        error = None
        if me == 0:
            try:
                step()
            except (RolloutError, RuntimeError, ValueError, OSError) as exc:
                error = _line(exc)
        error = bcast(error, 0)
        if error is not None:
            self._drop()
            raise RolloutError(error)

    def _connect_stages(self, groups: Any, names: dict[int, str], tps: dict[str, int], bcast: Any) -> None:
        from .sglang import RolloutError

        lay = self.layout
        self.world_size = 1 + sum(tps.values())
        for s in range(lay.pp):
            err = None
            if groups.rank == lay.sender[s]:
                try:
                    self.connect(names[s], tps)
                except (RolloutError, RuntimeError, ValueError, OSError) as exc:
                    err = f"{_line(exc)} (connecting pipeline stage {s} of {lay.pp})"
            err = bcast(err, lay.sender[s])
            if err is not None:
                self._drop()
                raise RolloutError(err)
        self.connected = True

    def _push_stage(self, actor: Any, groups: Any, s: int, version: int | None, model: ModelConfig, arch: str,
                    server_dtype: str | None, server_device: str | None) -> dict[str, Any] | None:
        """Run this rank's part of stage ``s``'s export; on the sender, stream it into buckets (class docstring) and
        return the stage's outcome {error, bytes, buckets, peak, checksums}."""
        from .sglang import RolloutError

        lay = self.layout
        export = export_stage(actor, groups, lay, model, arch)
        if groups.rank != lay.sender[s]:
            for _ in export:  # sends this rank's shards to the sender
                pass
            return None
        sums = SGLangChecksums(server_dtype, server_device) if self.verify else None
        state = {"error": None, "bytes": 0, "buckets": 0, "peak": 0}
        pending: list[tuple[str, torch.Tensor]] = []
        size = 0

        def flush(last: bool) -> None:
            nonlocal pending, size
            bucket, pending = sorted(pending, key=lambda nt: -nt[1].element_size()), []  # aligned (plan_buckets)
            if state["error"] is not None:
                size = 0
                return
            flat, meta = pack_bucket(bucket)
            state["peak"] = max(state["peak"], size + (flat.numel() if len(bucket) > 1 else 0))
            del bucket
            size = 0
            index = state["buckets"] + 1
            body = {**meta, "group_name": self.group_name, "flush_cache": False, "load_format": "flattened_bucket"}
            if last and version is not None:
                body["weight_version"] = str(version)
            try:
                self._send_bucket(flat.to(self.device), body, f"bucket {index}")
            except (RolloutError, RuntimeError, ValueError, OSError) as exc:
                state["error"] = f"{_line(exc)} (pipeline stage {s} of {lay.pp}, bucket {index})"
                return
            state["buckets"] = index
            state["bytes"] += flat.numel()
            if self.on_flush is not None:
                self.on_flush(s, index, flat.numel())

        try:
            for name, tensor in export:  # drained to the end, also after a failed bucket (module docstring)
                if sums is not None:
                    sums.add(name, tensor)
                nbytes = tensor.numel() * tensor.element_size()
                if pending and size + nbytes > self.bucket_bytes:
                    flush(last=False)
                pending.append((name, tensor))
                size += nbytes
                state["peak"] = max(state["peak"], size)
            if pending:
                flush(last=True)
        except (ValueError, RuntimeError) as exc:  # a checksum / conversion / shard-transfer error of this stage
            state["error"] = f"{_line(exc)} (pipeline stage {s} of {lay.pp})"
        state["checksums"] = sums.done if sums is not None else {}
        return state

    def _send_bucket(self, flat: torch.Tensor, body: dict[str, Any], what: str) -> None:
        from .. import collectives

        with _Background(self.engine, "/update_weights_from_distributed",
                         dict.fromkeys(self.engine.workers, body)) as http:
            try:  # a worker that answered with an error will not receive: stop waiting for it at once
                collectives.broadcast(flat, src=0, group=self.group, cancel=http.failed)
            except Exception as exc:  # noqa: BLE001 - a worker's own answer names it better
                http.wait()
                raise RuntimeError(f"sglang: broadcast of weight {what} over {self.group_name} failed: "
                                   f"{_line(exc)}") from None
            http.wait()

    # ---------------------------------------------------------------------------------------- one stage's group

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

    def _server_dtype(self) -> tuple[str | None, str | None]:
        """(dtype, device) of the first worker (``/server_info``): how its ``/weights_checker`` hashes."""
        return server_dtype_device(self.engine)

    def connect(self, group_name: str, tps: dict[str, int]) -> None:
        """Make this sender's group ``group_name`` with every worker (``/init_weights_update_group`` posted to each
        while this process joins the rendezvous as rank 0); one line naming a worker that fails."""
        from .. import collectives

        self.close()
        self.group_name = group_name
        self.world_size = 1 + sum(tps.values())
        port = self.master_port or _free_port(self.master_address)
        offsets, nxt = {}, 1
        for url in self.engine.workers:
            offsets[url] = nxt
            nxt += tps[url]
        bodies = {url: {"master_address": self.master_address, "master_port": port, "rank_offset": offsets[url],
                        "world_size": self.world_size, "group_name": group_name, "backend": self.backend}
                  for url in self.engine.workers}
        with _Background(self.engine, "/init_weights_update_group", bodies) as http:
            try:
                self.group = collectives.init_external_group(
                    backend=self.backend, master_address=self.master_address, master_port=port,
                    world_size=self.world_size, rank=0, group_name=group_name,
                    timeout_s=self.engine.update_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the workers' answers name the culprit better
                http.wait()
                raise RuntimeError(f"sglang: weight-update group {group_name} at {self.master_address}:{port}: "
                                   f"{_line(exc)}") from None
            http.wait()

    def _drop(self) -> None:
        """After a failure: this rank's group (if any) dropped on both sides; every stage reconnects next time."""
        self.connected = False
        self.close()

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


def _line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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

    def failed(self) -> bool:
        """Whether the requests already ended with an error (polled while the collective is in flight)."""
        return self.error is not None

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
