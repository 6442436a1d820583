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
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config.model import ModelConfig

__all__ = ["SyncDir", "gather_hf_state", "hf_config_for"]

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

