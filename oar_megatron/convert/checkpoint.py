"""Megatron distributed checkpoints in and out (``oar-convert hf-to-mcore`` / ``mcore-to-hf``; docs/convert.md).

**hf-to-mcore** (:func:`hf_to_mcore_checkpoint`): N = tp·pp·ep local ranks (``convert.launch.run_local``; gloo
on CPU, NCCL on GPU) each build their megatron model chunks (``policy.build_model``, no random init), stream their
shard of the HF safetensors into them one tensor at a time (``mapping.iter_hf_to_mcore``) and save the chunks'
``sharded_state_dict`` with dist-checkpointing (``CheckpointManager.save_weights``). The result, the **converted
checkpoint**, is a trainer-format checkpoint root::

    OUT_DIR/latest                 "step_00000000"
    OUT_DIR/step_00000000/         dist/ (model weights only), state.pt (common: step 0, converted: True), rank_*.pt
    OUT_DIR/hf/                    the HF config.json + generation_config.json and tokenizer files (``cli.CARRIED``)

written into a temporary directory next to OUT_DIR and renamed at the end.

**mcore-to-hf** (:func:`mcore_to_hf_checkpoint`): any megatron checkpoint (converted or a trainer run's, any
TP/PP/EP it was saved with) → sharded safetensors, without building a model: dist-checkpointing's metadata gives
every global tensor (the TP=1 layout: ``linear_fc1`` = ``[gate; up]``, the grouped QKV; layers — and experts — a
prepended axis; the vocabulary padded for the saved TP), and single layer slices are read with partial sharded state
dicts (``ShardedTensor.from_rank_offsets`` with the layer / expert axes as size-1 axes, ``replica_id=0``), in
batches of ``read_budget`` bytes in the order the export consumes them. ``mapping.mcore_to_hf`` maps them at TP=1
(first a dry run on ``meta`` tensors: every name, shape and dtype checked and the output shards planned before a
byte is written); the safetensors files are written tensor by tensor (header first, then the data in order), so peak memory is one read batch plus one HF tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config.model import ModelConfig
from .config import (ARCHITECTURES, architecture, check_pretrained, compare_architecture, hf_model_config,
                     read_hf_config)
from .mapping import ConversionError
from .source import ModelSource, arch_of_model

__all__ = ["HF_SUBDIR", "check_pretrained_checkpoint", "hf_config_from_model",
           "hf_to_mcore_checkpoint", "is_megatron_checkpoint", "mcore_to_hf_checkpoint", "megatron_source",
           "parse_size"]

HF_SUBDIR = "hf"  # the converted checkpoint's HF config.json and carried files
CONVERTED_STEP = 0
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
_HF_CLASS = {table: cls for cls, table in ARCHITECTURES.items()}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def parse_size(size: str | int) -> int:
    """``"5GB"`` (10⁹), ``"500MiB"`` (2²⁰), ``"123"`` bytes → bytes; one-line ``ValueError`` otherwise."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"--max-shard-size: cannot read {size!r} (e.g. 5GB, 500MB, 2GiB)")
        unit = (m.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"--max-shard-size: must be positive, got {size!r}")
    return value


# ---------------------------------------------------------------------------------------------- HF config.json


def hf_config_from_model(cfg: ModelConfig, arch: str | None = None, *, dtype: str = "float32") -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg`` (``arch`` default: ``source.arch_of_model``; the inverse of
    :func:`convert.config.hf_model_config`: ``hf_model_config(hf_config_from_model(cfg))`` equals ``cfg`` up to the
    name, dtype and vocabulary padding)."""
    arch = arch or arch_of_model(cfg)
    if arch not in _MODEL_TYPE:
        raise ValueError(f"config.json: cannot generate a config for architecture {arch!r}; name the HF directory "
                         f"(--hf-config)")
    if cfg.normalization != "RMSNorm" or not cfg.swiglu or cfg.add_bias_linear:
        raise ValueError("config.json: only RMSNorm / SwiGLU / bias-free models map to an HF architecture")
    hf: dict[str, Any] = {
        "architectures": [_HF_CLASS[arch]], "model_type": _MODEL_TYPE[arch],
        "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_size, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
        "hidden_act": "silu", "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "rope_theta": cfg.rotary_base, "torch_dtype": dtype, "use_cache": True,
    }
    if arch in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if arch == "llama":
        hf["mlp_bias"] = False
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return hf


def _default_dtype(hf: dict[str, Any]) -> str:
    """``params_dtype`` for a converted checkpoint: the HF checkpoint's own dtype when float32 / bfloat16, else
    float32 (lossless)."""
    got = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    return got if got in ("float32", "bfloat16") else "float32"


# ---------------------------------------------------------------------------------------------- sources


def is_megatron_checkpoint(path: str | Path) -> bool:
    """A checkpoint root (``latest``) or a ``step_*`` directory (``state.pt``): no megatron import, no reading."""
    from ..checkpoint.manager import LATEST, STATE_FILE

    path = Path(path)
    return path.is_dir() and ((path / LATEST).is_file() or (path / STATE_FILE).is_file())


def check_pretrained_checkpoint(model: ModelConfig) -> str | None:
    """``model.pretrained`` naming a megatron checkpoint must hold the composed preset's architecture: with an HF
    ``config.json`` known (a converted checkpoint's ``hf/``, or the HF directory a trainer run started from) that file
    is checked as for an HF directory (``convert.config.check_pretrained``); otherwise the run's ``config.yaml`` model
    is compared field by field. Returns the mapping table name (None: a MoE run without an HF config). One line."""
    from .source import resolve_model_source

    try:
        src = resolve_model_source(model.pretrained)
    except ValueError as exc:
        raise ValueError(f"model.pretrained: {model.pretrained}: {exc}") from None
    if src.hf_dir is not None:
        return check_pretrained(dataclasses.replace(model, pretrained=str(src.hf_dir)))
    compare_architecture(model, src.model, f"{model.pretrained} (its run's config.yaml)")
    return src.arch


def megatron_source(path: str | Path, *, config: str | Path | None = None,
                    hf_config: str | Path | None = None) -> ModelSource:
    """Resolve a megatron checkpoint (root: its latest step, or a step directory) to a ``convert.source.ModelSource``
    (kind "megatron"): ``resolve_model_source`` (converted: the model from ``ROOT/hf/config.json``; trainer: from the
    run's ``config.yaml``, the HF directory from its ``model.pretrained``), with ``mcore-to-hf``'s overrides: the
    run config ``config`` instead of the root's parent's; the HF directory ``hf_config`` (checked against the model).
    The checkpoint must be complete (``dist/metadata.json``). One-line ``ValueError`` (``CKPT_DIR: …``) otherwise."""
    from ..checkpoint.manager import CheckpointError, resolve_checkpoint
    from .source import ModelSource, _run_model, resolve_model_source

    try:
        step_dir = resolve_checkpoint(path)
        if config is None:
            src = resolve_model_source(step_dir)
            if src.kind != "megatron":
                raise ValueError(f"{path} is an HF directory, not a megatron checkpoint")
        else:
            if not Path(config).is_file():
                raise ValueError(f"--config: no run config at {config} (the run directory's config.yaml)")
            model = _run_model(Path(config))
            hf_dir = None
            if model.pretrained and Path(model.pretrained).is_dir():
                hf_dir = resolve_model_source(model.pretrained).hf_dir
            src = ModelSource(kind="megatron", model=model, arch=arch_of_model(model), hf_dir=hf_dir,
                              step_dir=step_dir, path=Path(path))
            if hf_dir is not None:
                src = dataclasses.replace(src, arch=architecture(read_hf_config(hf_dir)))
                compare_architecture(model, hf_model_config(hf_dir), f"{hf_dir}/config.json", key="--config")
    except CheckpointError as exc:
        raise ValueError(f"CKPT_DIR: {exc}") from None
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith("--") else f"CKPT_DIR: {msg}") from None
    if hf_config:  # config.json and the carried files from there: it must describe the same model
        hf = read_hf_config(hf_config)
        compare_architecture(src.model, hf_model_config(hf), f"{hf_config}/config.json", key="--hf-config")
        src = dataclasses.replace(src, hf_dir=Path(hf_config), arch=architecture(hf))
    if src.arch is None:
        raise ValueError(f"CKPT_DIR: {path}: the HF architecture of a MoE model without an HF config.json cannot be "
                         f"told; name the HF directory (--hf-config)")
    return src


# ---------------------------------------------------------------------------------------------- HF → megatron


def _hf_to_mcore_rank(hf_dir: str, root: str, parallel, cfg: ModelConfig, arch: str, quiet: bool) -> int:
    """One rank of :func:`hf_to_mcore_checkpoint`; returns the number of tensors it copied."""
    from ..checkpoint import CheckpointManager
    from ..metrics.progress import Progress
    from ..policy import build_model, destroy_parallel, init_parallel
    from .io import SafetensorsReader
    from .mapping import load_hf_chunks

    warnings.filterwarnings("ignore")
    groups = init_parallel(parallel, cfg, seed=0)
    try:
        built = build_model(cfg, groups, config_overrides={"perform_initialization": False})
        chunks = built if isinstance(built, list) else [built]
        progress = Progress(enabled=groups.rank == 0 and not quiet)
        total = sum(1 for c in chunks for _ in c.parameters())
        with SafetensorsReader(hf_dir) as src, progress.phase("hf→mcore", total=total) as advance:
            copied = load_hf_chunks(src, cfg, arch, chunks, groups, advance=advance)
        common = {"step": CONVERTED_STEP, "converted": True, "warmed_up": True, "source": str(hf_dir), "arch": arch}
        CheckpointManager(root, keep_last=0, groups=groups).save_weights(CONVERTED_STEP, chunks, common=common)
        return copied
    finally:
        destroy_parallel()


class _HeadersOnly:
    """A safetensors source that answers names and shapes (file headers) and stops at the first tensor read."""

    class Stop(Exception):
        pass

    def __init__(self, src):
        self.src = src

    def names(self):
        return self.src.names()

    def shape(self, name):
        return self.src.shape(name)

    def get(self, name):
        raise self.Stop


def _check_hf_tensors(hf_dir: Path, cfg: ModelConfig, arch: str) -> None:
    """``iter_hf_to_mcore``'s checks (missing / extra / mis-shaped tensors, unreadable files) on the headers only."""
    from .io import SafetensorsReader
    from .mapping import iter_hf_to_mcore

    with SafetensorsReader(hf_dir) as src:
        try:
            next(iter_hf_to_mcore(_HeadersOnly(src), cfg, arch), None)
        except _HeadersOnly.Stop:
            pass


def _tmp_next_to(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def hf_to_mcore_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
                           dtype: str | None = None, make_vocab_size_divisible_by: int = 128,
                           quiet: bool = False) -> Path:
    """Convert the HF directory ``hf_dir`` to the converted-checkpoint root ``out_dir`` (module docstring), saved
    under the layout tp × pp × ep (ep ranks are data-parallel ranks too); ``dtype`` fp32 | bf16 (default: the HF
    checkpoint's). Returns ``out_dir``. Bad input: one-line ``ValueError``, nothing left at ``out_dir``."""
    from ..config import ParallelConfig
    from .cli import CARRIED
    from .launch import check_world_size, run_local

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if out.exists():
        raise ValueError(f"OUT_DIR: {out} exists")
    if not hf_dir.is_dir():
        raise ValueError(f"HF_DIR: {hf_dir} is not a directory")
    hf = read_hf_config(hf_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of fp32, bf16")
    params_dtype = DTYPES[dtype] if dtype else _default_dtype(hf)
    cfg = hf_model_config(hf, params_dtype=params_dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    arch = architecture(hf)
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep)
    world = tp * pp * ep
    parallel.validate(world, cfg)  # heads / groups / layers / experts against the layout: one line
    check_world_size(world)  # one GPU per rank when CUDA is available
    _check_hf_tensors(hf_dir, cfg, arch)  # before any rank starts: names, shapes, readable files
    tmp = _tmp_next_to(out)
    try:
        run_local(_hf_to_mcore_rank, world, str(hf_dir), str(tmp), parallel, cfg, arch, quiet, timeout=7 * 24 * 3600.0)
        (tmp / HF_SUBDIR).mkdir()
        shutil.copy2(hf_dir / "config.json", tmp / HF_SUBDIR / "config.json")
        for name in CARRIED:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / HF_SUBDIR / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------- megatron → HF

_NORM_KEYS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
              "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
              "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
              "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class _Slice:
    key: str  # dist-checkpointing key (global)
    index: tuple[int, ...]  # position on the prepended axes (layer, expert)
    shape: tuple[int, ...]  # the slice's shape (global shape without the prepended axes)
    dtype: torch.dtype


def _dist_slices(metadata: Mapping[str, Any], cfg: ModelConfig) -> dict[str, _Slice]:
    """TP=1 / PP=1 / EP=1 module names (the local spec's, as ``mapping`` uses) → the global slice holding them.
    Layers are prepended axis 0 of every ``decoder.layers.*`` key; experts axis 1 of
    ``decoder.layers.mlp.experts.experts.*`` (megatron's ``SequentialMLP`` / ``TEGroupedMLP`` keys → the local spec's
    ``mlp.experts.local_experts.{e}.*``); the fused-norm keys (``…linear_qkv.layer_norm_weight``) are the local spec's
    ``input_layernorm`` / ``pre_mlp_layernorm``."""
    out: dict[str, _Slice] = {}
    for key, meta in metadata.items():
        if not key.startswith(("embedding.", "decoder.", "output_layer.")):
            continue  # optimizer state, the KL reference ("reference." keys)
        shape = tuple(meta.global_shape)
        if not key.startswith("decoder.layers."):
            out[key] = _Slice(key, (), shape, meta.dtype)
            continue
        rest = key[len("decoder.layers."):]
        if rest.startswith("mlp.experts.experts."):  # SequentialMLP and TEGroupedMLP alike
            sub = rest[len("mlp.experts.experts."):]
            if len(shape) < 3:
                raise ConversionError(f"convert: dist checkpoint tensor {key!r} has shape {list(shape)}, expected "
                                      f"[layers, experts, ...]")
            for i in range(shape[0]):
                for e in range(shape[1]):
                    out[f"decoder.layers.{i}.mlp.experts.local_experts.{e}.{sub}"] = _Slice(key, (i, e), shape[2:],
                                                                                         meta.dtype)
            continue
        name = _NORM_KEYS.get(rest, rest)
        for i in range(shape[0]):
            out[f"decoder.layers.{i}.{name}"] = _Slice(key, (i,), shape[1:], meta.dtype)
    for k in _VOCAB_KEYS:
        if k in out and out[k].shape[0] < cfg.vocab_size:
            raise ConversionError(f"convert: dist checkpoint tensor {k!r} has {out[k].shape[0]} rows, fewer than the "
                                  f"vocabulary ({cfg.vocab_size})")
    return out


def _read_errors() -> tuple[type[BaseException], ...]:
    # torch DCP's CheckpointException derives from BaseException; a corrupt file raises many types
    try:
        from torch.distributed.checkpoint import CheckpointException
    except ImportError:  # pragma: no cover
        return (Exception,)
    return (Exception, CheckpointException)


_READ_ERRORS = _read_errors()


def _why(exc: BaseException) -> str:
    """One line for a read failure: DCP's ``CheckpointException`` wraps each rank's error in ``failures``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
        exc = getattr(exc, "exc", exc) if not isinstance(exc, BaseException) else exc
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class _DistReader:
    """Reads global slices from a dist checkpoint directory: one ``dist_checkpointing.load`` per batch of slices
    (consecutive in ``order``, up to ``budget`` bytes), each slice handed out once."""

    def __init__(self, directory: Path, slices: dict[str, _Slice], order: list[str], budget: int,
                 global_shapes: dict[str, tuple[int, ...]]):
        self.dir, self.slices, self.order, self.budget = directory, slices, order, budget
        self.global_shapes = global_shapes
        self.pos = {n: i for i, n in enumerate(order)}
        self.cache: dict[str, torch.Tensor] = {}
        self.read: set[str] = set()

    def _load(self, names: list[str]) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        sd = {}
        for n in names:
            s = self.slices[n]
            # the layer (and expert) axes as real size-1 axes, not megatron's prepend_axis_num: with prepended axes
            # megatron builds a legacy torch ShardedTensor that assumes the other slices live on other ranks (a
            # one-rank group reading some layers of a key fails); plain offsets read any part of the global tensor
            part = torch.empty((1,) * len(s.index) + s.shape, dtype=s.dtype)
            offsets = [(axis, idx, self.global_shapes[s.key][axis]) for axis, idx in enumerate(s.index)]
            sd[n] = ShardedTensor.from_rank_offsets(s.key, part, *offsets, replica_id=0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # a batch is a deliberate part of the checkpoint (some layers of a key): no whole-tensor coverage
                loaded = dist_checkpointing.load(sd, str(self.dir), validate_access_integrity=False)
        except _READ_ERRORS as exc:
            raise ConversionError(f"convert: dist checkpoint {self.dir}: cannot read {self.slices[names[0]].key!r}"
                                  f"{f' (and {len(names) - 1} more)' if len(names) > 1 else ''}: {_why(exc)}") from None
        self.cache.update({n: loaded[n].reshape(self.slices[n].shape) for n in names})
        self.read.update(names)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            start = self.pos.get(name)
            batch, size = [], 0
            for n in ([name] if start is None else self.order[start:]):
                s = self.slices[n]
                nbytes = math.prod(s.shape) * s.dtype.itemsize
                if batch and size + nbytes > self.budget:
                    break
                if n not in self.read:
                    batch.append(n)
                    size += nbytes
            self._load(batch)
        return self.cache.pop(name)


class _LazyState(Mapping):
    """The TP=1 megatron state of a dist checkpoint as a mapping read on access (``meta`` tensors in a dry run);
    records the access order; vocabulary rows trimmed to the real vocabulary and zero-padded to ``padded_rows``."""

    def __init__(self, slices: dict[str, _Slice], reader: _DistReader | None, vocab: int, padded_rows: int):
        self.slices, self.reader, self.vocab, self.padded = slices, reader, vocab, padded_rows
        self.accessed: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return iter(self.slices)

    def __len__(self) -> int:
        return len(self.slices)

    def __contains__(self, name: object) -> bool:
        return name in self.slices

    def __getitem__(self, name: str) -> torch.Tensor:
        s = self.slices[name]
        self.accessed.append(name)
        vocab = name in _VOCAB_KEYS
        shape = (self.padded, *s.shape[1:]) if vocab else s.shape
        if self.reader is None:
            return torch.empty(shape, dtype=s.dtype, device="meta")
        t = self.reader.get(name)
        if vocab:
            out = t.new_zeros(shape)
            out[: self.vocab] = t[: self.vocab]
            t = out
        return t


class _ShardWriter:
    """Sharded safetensors written tensor by tensor: ``plan`` = [(name, shape, dtype)] in the order the tensors
    will arrive; shards cut at ``max_bytes``; each file's header written first, then the data in order."""

    def __init__(self, directory: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int):
        self.dir = directory
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            if dtype not in _ST_DTYPES:
                raise ConversionError(f"convert: tensor {name!r} has dtype {dtype}, not writable to safetensors")
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                                           for k in range(n)]
        self.shards = shards
        self.total = sum(b for shard in shards for *_, b in shard)
        self.where = {name: (k, j) for k, shard in enumerate(shards) for j, (name, *_) in enumerate(shard)}
        self._k, self._j, self._fh = 0, 0, None

    def _open(self, k: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[k]:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.dir / self.files[k], "wb")  # noqa: SIM115 - closed in write/close
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        k, j = self.where.get(name, (-1, -1))
        if (k, j) != (self._k, self._j):
            raise ConversionError(f"convert: tensor {name!r} arrived out of the planned order")
        _, shape, dtype, _ = self.shards[k][j]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"convert: tensor {name!r} is {list(tensor.shape)} {tensor.dtype}, planned "
                                  f"{list(shape)} {dtype}")
        if self._fh is None:
            self._open(k)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._j += 1
        if self._j == len(self.shards[k]):
            self._fh.close()
            self._fh = None
            self._k, self._j = k + 1, 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._k != len(self.shards):
            raise ConversionError(f"convert: export ended after {self._k} of {len(self.shards)} safetensors files")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: self.files[k] for name, (k, _) in self.where.items()}}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def mcore_to_hf_checkpoint(ckpt: str | Path, out_dir: str | Path, *, config: str | Path | None = None,
                           hf_config: str | Path | None = None, max_shard_size: str | int = "5GB",
                           read_budget: int = 256 << 20, quiet: bool = False) -> Path:
    """Export the megatron checkpoint ``ckpt`` (converted or a trainer run's; a root: its latest step) to the HF
    directory ``out_dir``: sharded safetensors (+ index when more than one file), ``config.json`` (the HF
    directory's, or generated from the model config), ``generation_config.json`` and tokenizer files carried over.
    Single process (a one-rank gloo group for dist-checkpointing), no model built. Returns ``out_dir``."""
    import torch.distributed as dist

    from ..metrics.progress import Progress
    from .cli import CARRIED
    from .mapping import mcore_to_hf

    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"OUT_DIR: {out} exists")
    max_bytes = parse_size(max_shard_size)
    src = megatron_source(ckpt, config=config, hf_config=hf_config)
    # the dist-checkpoint keys are the same under the local and the Transformer Engine layer specs (megatron maps
    # the local names onto TE's): read them as the local spec's names
    cfg = dataclasses.replace(src.model, transformer_impl="local", moe_grouped_gemm=False)
    arch = src.arch
    dist_dir = src.step_dir / "dist"
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError("mcore_to_hf_checkpoint: runs in one process (no process group, or a one-rank one)")
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tmp = None
    try:
        with warnings.catch_warnings():  # megatron's import warns about missing Transformer Engine / Apex
            warnings.simplefilter("ignore")
            from megatron.core import dist_checkpointing

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                metadata = dist_checkpointing.load_tensors_metadata(str(dist_dir))
        except _READ_ERRORS as exc:
            raise ConversionError(f"convert: dist checkpoint {dist_dir}: cannot read its metadata: {_why(exc)}"
                                  ) from None
        slices = _dist_slices(metadata, cfg)
        padded = cfg.padded_vocab_size(1)
        dry = _LazyState(slices, None, cfg.vocab_size, padded)
        plan = [(name, tuple(t.shape), t.dtype) for name, t in mcore_to_hf(dry, cfg, arch)]  # checks every tensor
        reader = _DistReader(dist_dir, slices, list(dict.fromkeys(dry.accessed)), read_budget,
                             {s.key: tuple(metadata[s.key].global_shape) for s in slices.values()})
        tmp = _tmp_next_to(out)
        writer = _ShardWriter(tmp, plan, max_bytes)
        progress = Progress(enabled=not quiet)
        with progress.phase("mcore→hf", total=len(plan)) as advance, torch.no_grad():
            for name, tensor in mcore_to_hf(_LazyState(slices, reader, cfg.vocab_size, padded), cfg, arch):
                writer.write(name, tensor)
                advance(1)
        writer.close()
        dtype = _DTYPE_NAMES.get(plan[0][2], "float32")
        if src.hf_dir is not None:
            hf = dict(read_hf_config(src.hf_dir))
            hf["torch_dtype"] = dtype
            if "dtype" in hf:
                hf["dtype"] = dtype
        else:
            hf = hf_config_from_model(cfg, arch, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if src.hf_dir is not None:
            for name in CARRIED:
                if (src.hf_dir / name).is_file():
                    shutil.copy2(src.hf_dir / name, tmp / name)
        tmp.rename(out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if owns_group:
            dist.destroy_process_group()
    return out
