"""One name/layout table per architecture: megatron-core (local layer spec) names ← HF names, with the layout rule
that joins the HF tensors into the megatron tensor and shards it over tensor parallelism. The export map is the
same table read backwards (``hf_names``), as torchtitan's ``StateDictAdapter`` derives ``to_hf`` from ``from_hf``.

Layout rules (``kind``):

- ``copy``: replicated on every TP rank (norms, QK-norm weights), same tensor both sides.
- ``vocab``: embedding / output rows; import pads the rows ``vocab_size..padded_vocab_size(tp)`` with zeros and
  shards rows contiguously; export concatenates the shards and drops the padding.
- ``qkv``: HF ``q [heads·d, ·]``, ``k, v [groups·d, ·]`` → megatron's grouped layout, per query group
  ``[q_g (heads/groups·d); k_g (d); v_g (d)]``, groups concatenated; TP rank r holds groups ``r·G/tp ..`` (a
  contiguous row block). Weights and (Qwen2) biases alike.
- ``gate_up``: HF ``gate, up [ffn, h]`` → ``linear_fc1 [gate; up]`` at TP=1; TP rank r holds its own
  ``[gate_r; up_r]`` halves (megatron's ``partition_stride`` 2).
- ``row``: row-parallel weights (``linear_proj``, ``linear_fc2``), sharded along the input dimension (dim 1).
- ``expert_gate_up`` / ``expert_row``: an expert's ``linear_fc1`` / ``linear_fc2`` (megatron local spec's
  ``SequentialMLP``), laid out as ``gate_up`` / ``row`` but sharded over the *expert* tensor parallel group
  (``etp``, megatron's default ``etp = tp``). ``{e}`` in a row is the expert: expert parallel rank r of ``ep``
  holds global experts ``r·E/ep .. (r+1)·E/ep − 1`` as ``local_experts.0 .. E/ep − 1`` (megatron's
  ``local_expert_indices``). The router (``mlp.router.weight``) is ``copy``: replicated over TP and EP.

Pipeline parallelism (``pp``, ``vpp``): one call converts ONE model chunk, as ``policy.build_model`` builds it
(``_chunk`` / ``_chunk_entries``, a filter over the global entries): chunk ``v`` of stage ``p`` holds global layers
``(v·pp + p)·n + [0, n)``, ``n = num_layers/(pp·vpp)``, numbered locally ``decoder.layers.0..n-1`` as megatron names
them; the embedding is on the first chunk only, ``decoder.final_layernorm`` / ``output_layer`` on the last. With
tied embeddings and more than one chunk, megatron gives the last chunk its own ``output_layer.weight`` (a copy of the
embedding it keeps in sync): import fills it with the embedding rows; export takes the embedding from the first
chunk and checks the last chunk's copy equals it.

Transformer Engine layer spec (``cfg.transformer_impl == "transformer_engine"``): the same tensors under TE's names
(``te_name``, a renaming of the local spec's names, applied after the chunk selection): the pre-attention and
pre-MLP norms are fused into the following linear (``self_attention.linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``; an MoE layer keeps its ``pre_mlp_layernorm``), and TE's grouped experts
(``TEGroupedMLP``) name expert e's weights ``mlp.experts.linear_fc1.weight{e}``.

Errors (``ConversionError``, a ``ValueError``) are one line naming the tensor: missing, extra, shape mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..config.model import ModelConfig

__all__ = ["TABLES", "ConversionError", "chunk_export_plan", "chunk_state_names", "copy_into_module", "hf_names",
           "hf_shapes", "hf_to_mcore", "iter_chunk_to_hf", "iter_hf_to_mcore", "load_hf_chunks", "mcore_to_hf",
           "pipeline_states", "rank_layout", "table_for", "te_name"]


class ConversionError(ValueError):
    """A checkpoint does not match the architecture's table (one line, naming the tensor)."""


_L, _M = "model.layers.{i}.", "decoder.layers.{i}."
# (megatron name, kind, HF names); "{i}" = layer index. Order = order of reading.
_DENSE = (
    ("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",)),
    (_M + "input_layernorm.weight", "copy", (_L + "input_layernorm.weight",)),
    (_M + "self_attention.linear_qkv.weight", "qkv",
     (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight")),
    (_M + "self_attention.linear_proj.weight", "row", (_L + "self_attn.o_proj.weight",)),
    (_M + "pre_mlp_layernorm.weight", "copy", (_L + "post_attention_layernorm.weight",)),
    (_M + "mlp.linear_fc1.weight", "gate_up", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight")),
    (_M + "mlp.linear_fc2.weight", "row", (_L + "mlp.down_proj.weight",)),
    ("decoder.final_layernorm.weight", "copy", ("model.norm.weight",)),
    ("output_layer.weight", "vocab", ("lm_head.weight",)),  # untied models only
)
_QKV_BIAS = ((_M + "self_attention.linear_qkv.bias", "qkv",
              (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias")),)
_QK_NORM = ((_M + "self_attention.q_layernorm.weight", "copy", (_L + "self_attn.q_norm.weight",)),
            (_M + "self_attention.k_layernorm.weight", "copy", (_L + "self_attn.k_norm.weight",)))

_E = _M + "mlp.experts.local_experts.{e}."
_MOE = {  # router and experts: (HF block, gate/up/down names); every layer MoE, no shared expert
    "qwen3_moe": ("mlp.", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe.", "w1", "w3", "w2"),
}


def _moe_rows(block: str, gate: str, up: str, down: str):
    return ((_M + "mlp.router.weight", "copy", (_L + block + "gate.weight",)),
            (_E + "linear_fc1.weight", "expert_gate_up",
             (_L + block + "experts.{e}." + gate + ".weight", _L + block + "experts.{e}." + up + ".weight")),
            (_E + "linear_fc2.weight", "expert_row", (_L + block + "experts.{e}." + down + ".weight",)))


TABLES: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "llama": _DENSE,  # Llama-3 / 3.1 (llama3 RoPE scaling is config) / 3.2 (tied: no output_layer / lm_head)
    "qwen2": _DENSE[:3] + _QKV_BIAS + _DENSE[3:],  # Qwen2 / 2.5: biases on q, k, v
    "qwen3": _DENSE[:3] + _QK_NORM + _DENSE[3:],  # Qwen3: per-head RMSNorm on q and k, head_dim != hidden/heads
    # Qwen3-MoE: Qwen3 attention, router mlp.gate, experts mlp.experts.{e}.{gate,up,down}_proj
    "qwen3_moe": _DENSE[:3] + _QK_NORM + _DENSE[3:5] + _moe_rows(*_MOE["qwen3_moe"]) + _DENSE[7:],
    # Mixtral: Llama attention, router block_sparse_moe.gate, experts block_sparse_moe.experts.{e}.w1 / w3 / w2
    "mixtral": _DENSE[:5] + _moe_rows(*_MOE["mixtral"]) + _DENSE[7:],
}


def table_for(arch: str):
    if arch not in TABLES:
        raise ConversionError(f"convert: unknown architecture {arch!r}; known: {', '.join(TABLES)}")
    return TABLES[arch]


def _entries(cfg: ModelConfig, arch: str, *, ep: int = 1,
             ep_rank: int = 0) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """The table expanded over layers (and over the experts EP rank ``ep_rank`` of ``ep`` holds: megatron names
    number them locally, HF names globally); ``output_layer`` only when embeddings are untied."""
    for mname, kind, hnames in table_for(arch):
        if mname == "output_layer.weight" and not cfg.untie_embeddings_and_output_weights:
            continue
        if "{i}" in mname:
            for i in range(cfg.num_layers):
                if "{e}" in mname:
                    per = cfg.num_moe_experts // ep
                    for local in range(per):
                        e = ep_rank * per + local
                        yield mname.format(i=i, e=local), kind, tuple(h.format(i=i, e=e) for h in hnames)
                else:
                    yield mname.format(i=i), kind, tuple(h.format(i=i) for h in hnames)
        else:
            yield mname, kind, hnames


def hf_names(cfg: ModelConfig, arch: str) -> dict[str, tuple[str, int, str]]:
    """The reverse map, derived from the table: HF name → (megatron name, index among its HF parts, kind)."""
    return {h: (m, k, kind) for m, kind, hs in _entries(cfg, arch) for k, h in enumerate(hs)}


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _chunk(cfg: ModelConfig, pp: int = 1, pp_rank: int = 0, vpp: int | None = None,
           vp_stage: int | None = None) -> tuple[int, int, bool, bool]:
    """(first global layer, layers, holds the embedding, holds the head) of chunk ``vp_stage`` of stage ``pp_rank``
    under ``pp`` × ``vpp`` chunks, split evenly as ``policy.build_model`` / ``ParallelConfig.validate`` require."""
    if pp < 1 or not 0 <= pp_rank < pp:
        raise ConversionError(f"convert: pp_rank={pp_rank} is outside pp={pp}")
    if vpp is not None and (pp == 1 or vpp < 1 or vp_stage is None or not 0 <= vp_stage < vpp):
        raise ConversionError(f"convert: vpp={vpp} needs pp > 1 and 0 <= vp_stage < vpp (got pp={pp}, "
                              f"vp_stage={vp_stage})")
    if vpp is None and vp_stage not in (None, 0):
        raise ConversionError(f"convert: vp_stage={vp_stage} without vpp")
    vpp, v = vpp or 1, vp_stage or 0
    if cfg.num_layers % (pp * vpp):
        raise ConversionError(f"convert: num_layers={cfg.num_layers} does not split evenly over pp*vpp = "
                              f"{pp}*{vpp} = {pp * vpp} model chunks")
    n = cfg.num_layers // (pp * vpp)
    c = v * pp + pp_rank  # global chunk index
    return c * n, n, c == 0, c == pp * vpp - 1


def _chunk_entries(entries, cfg: ModelConfig, chunk: tuple[int, int, bool, bool]):
    """The global ``entries`` this chunk holds, layers renumbered from 0 (megatron's stage-local names); with tied
    embeddings, a last chunk without the embedding gets ``output_layer.weight`` from the embedding rows."""
    first, n, pre, post = chunk
    emb = None
    for mname, kind, hnames in entries:
        m = _LAYER.match(mname)
        if m:
            g = int(m.group(1))
            if first <= g < first + n:
                yield f"decoder.layers.{g - first}.{mname[m.end():]}", kind, hnames
        elif mname.startswith("embedding."):
            emb = (kind, hnames)
            if pre:
                yield mname, kind, hnames
        elif post:
            yield mname, kind, hnames
    if post and not pre and not cfg.untie_embeddings_and_output_weights and emb is not None:
        yield "output_layer.weight", emb[0], emb[1]


# megatron's own local → TE renaming (the local spec's ``sharded_state_dict_keys_map``, megatron-core 0.16)
_TE_FUSED_NORMS = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                   ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")


def te_name(name: str, cfg: ModelConfig) -> str:
    """The Transformer Engine layer spec's name of the local spec's megatron ``name`` (module docstring)."""
    m = _LAYER.match(name)
    if not m:
        return name  # embedding, final norm (TENorm: .weight), output layer: the same module names
    head, rest = name[: m.end()], name[m.end():]
    for local, te in _TE_FUSED_NORMS:
        if rest.startswith(local) and not (cfg.is_moe and local == "pre_mlp_layernorm."):
            return head + te + rest[len(local):]
    e = _SEQ_EXPERT.match(rest) if cfg.is_moe and cfg.moe_grouped_gemm else None
    if e:  # TEGroupedMLP: one TE GroupedLinear per fc, expert e's parameters weight{e} / bias{e}
        return f"{head}mlp.experts.{e.group(2)}.{e.group(3)}{e.group(1)}"
    return name


def _model_entries(cfg: ModelConfig, arch: str, chunk: tuple[int, int, bool, bool], *, ep: int = 1,
                   ep_rank: int = 0):
    """One chunk's entries (``_chunk_entries``; the experts of EP rank ``ep_rank``) under the names of ``cfg``'s
    layer spec (local or TE)."""
    te = cfg.transformer_impl == "transformer_engine"
    for mname, kind, hnames in _chunk_entries(_entries(cfg, arch, ep=ep, ep_rank=ep_rank), cfg, chunk):
        yield (te_name(mname, cfg) if te else mname), kind, hnames


def hf_shapes(cfg: ModelConfig, arch: str) -> dict[str, tuple[int, ...]]:
    """Full HF shape of every tensor ``cfg`` has under ``arch``."""
    h, d, heads, groups = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.query_groups
    out = {}
    for name in hf_names(cfg, arch):
        leaf = name.rsplit(".", 2)[-2] if name.startswith("model.layers.") else name
        bias = name.endswith(".bias")
        ffn = cfg.moe_ffn_size if ".experts." in name else cfg.ffn_size
        shape = {
            "model.embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
            "model.norm.weight": (h,), "input_layernorm": (h,), "post_attention_layernorm": (h,),
            "q_norm": (d,), "k_norm": (d,), "q_proj": (heads * d, h), "k_proj": (groups * d, h),
            "v_proj": (groups * d, h), "o_proj": (h, heads * d), "gate_proj": (ffn, h),
            "up_proj": (ffn, h), "down_proj": (h, ffn),
            "gate": (cfg.num_moe_experts, h), "w1": (ffn, h), "w3": (ffn, h), "w2": (h, ffn),  # MoE
        }[leaf]
        out[name] = shape[:1] if bias else shape
    return out


# --------------------------------------------------------------------------------------------- layout rules


def _to_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    g, d = cfg.query_groups, cfg.head_dim
    rest = q.shape[1:]
    qg = q.reshape(g, (cfg.num_attention_heads // g) * d, *rest)
    return torch.cat([qg, k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)


def _from_grouped_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    g, d = cfg.query_groups, cfg.head_dim
    per_q = (cfg.num_attention_heads // g) * d
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(g, per_q + 2 * d, *rest).split([per_q, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _shard(full: torch.Tensor, kind: str, tp: int, rank: int) -> torch.Tensor:
    kind = kind.removeprefix("expert_")  # experts: the same layouts over the expert TP group
    if tp == 1 or kind == "copy":
        return full
    if kind == "row":
        return full.chunk(tp, dim=1)[rank]
    if kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=0)[rank]  # vocab, qkv: contiguous row blocks


def _unshard(shards: list[torch.Tensor], kind: str) -> torch.Tensor:
    kind = kind.removeprefix("expert_")
    if len(shards) == 1 or kind == "copy":
        return shards[0]
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def _check_tp(cfg: ModelConfig, tp: int, ep: int = 1, etp: int = 1) -> None:
    checks = [("tp", tp, "num_query_groups", cfg.query_groups), ("tp", tp, "num_attention_heads",
                                                                  cfg.num_attention_heads)]
    if cfg.is_moe:  # every layer MoE: the dense ffn_hidden_size is unused
        checks += [("ep", ep, "num_moe_experts", cfg.num_moe_experts), ("etp", etp, "moe_ffn_hidden_size",
                                                                          cfg.moe_ffn_size)]
    elif ep > 1 or (etp > 1 and etp != tp):
        raise ConversionError(f"convert: ep={ep} / etp={etp} given for a dense model (no experts)")
    else:
        checks.append(("tp", tp, "ffn_hidden_size", cfg.ffn_size))
    for size, n, what, count in checks:
        if count % n:
            raise ConversionError(f"convert: {size}={n} does not divide {what}={count}")


def _expert_tp(tp: int, tp_rank: int, etp: int | None, etp_rank: int | None) -> tuple[int, int]:
    """(etp, etp_rank): ``etp`` None = ``tp`` (megatron's default); ``etp_rank`` None = ``tp_rank % etp``, which is
    megatron's expert-TP rank when ``etp`` divides ``tp`` (rank order tp-cp-ep-dp-pp); otherwise it must be given."""
    etp = tp if etp is None else etp
    if etp_rank is None:
        if tp % etp:
            raise ConversionError(f"convert: etp={etp} does not divide tp={tp}; pass etp_rank (the expert TP rank)")
        etp_rank = tp_rank % etp
    if not 0 <= etp_rank < etp:
        raise ConversionError(f"convert: etp_rank={etp_rank} outside etp={etp}")
    return etp, etp_rank


# --------------------------------------------------------------------------------------------- HF → megatron


class _DictSource:
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = tensors

    def names(self):
        return list(self._t)

    def shape(self, name):
        return tuple(self._t[name].shape)

    def get(self, name):
        return self._t[name]


def _source(src: Any):
    return _DictSource(src) if isinstance(src, Mapping) else src


def iter_hf_to_mcore(src: Any, cfg: ModelConfig, arch: str, *, tp: int = 1, tp_rank: int = 0, pp: int = 1,
                     pp_rank: int = 0, vpp: int | None = None, vp_stage: int | None = None, ep: int = 1,
                     ep_rank: int = 0, etp: int | None = None,
                     etp_rank: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron (name, tensor) pairs of TP rank ``tp_rank`` of ``tp`` for the model chunk ``vp_stage`` (of ``vpp``,
    None: not interleaved) of pipeline stage ``pp_rank`` of ``pp`` (module docstring), read one tensor at a time
    from ``src`` (a :class:`~oar_megatron.convert.io.SafetensorsReader` or a name → tensor mapping of HF names): a
    rank reads only the HF tensors of its chunk (and experts). Every name and shape of the whole checkpoint is checked
    before the first tensor is read.

    MoE: ``ep`` / ``ep_rank`` select the experts this rank holds (locally numbered, module docstring); expert
    weights shard over ``etp`` (default ``tp``) at ``etp_rank`` (default ``tp_rank % etp``, see ``_expert_tp``)."""
    src = _source(src)
    etp, etp_rank = _expert_tp(tp, tp_rank, etp, etp_rank)
    _check_tp(cfg, tp, ep, etp)
    if not (0 <= tp_rank < tp and 0 <= ep_rank < ep):
        raise ConversionError(f"convert: tp_rank={tp_rank} / ep_rank={ep_rank} outside tp={tp} / ep={ep}")
    chunk = _chunk(cfg, pp, pp_rank, vpp, vp_stage)
    shapes = hf_shapes(cfg, arch)
    present = set(src.names())
    tied_head = not cfg.untie_embeddings_and_output_weights and "lm_head.weight" in present
    missing = [n for n in shapes if n not in present]
    if missing:
        raise ConversionError(f"convert: HF tensor {missing[0]!r} missing ({len(missing)} missing in all)")
    extra = sorted(present - set(shapes) - ({"lm_head.weight"} if tied_head else set()))
    if extra:
        raise ConversionError(f"convert: unexpected HF tensor {extra[0]!r} for {arch} ({len(extra)} extra in all)")
    for name, want in shapes.items():
        got = tuple(src.shape(name))
        if got != want:
            raise ConversionError(f"convert: HF tensor {name!r} has shape {list(got)}, the config gives {list(want)}")
    if tied_head and src.shape("lm_head.weight") != shapes["model.embed_tokens.weight"]:
        raise ConversionError("convert: HF tensor 'lm_head.weight' (tied) does not match the embedding's shape")
    padded = cfg.padded_vocab_size(tp)
    for mname, kind, hnames in _model_entries(cfg, arch, chunk, ep=ep, ep_rank=ep_rank):
        parts = [src.get(h) for h in hnames]
        if kind == "qkv":
            full = _to_grouped_qkv(*parts, cfg)
        elif kind in ("gate_up", "expert_gate_up"):
            full = torch.cat(parts, dim=0)
        elif kind == "vocab":
            full = torch.cat([parts[0], parts[0].new_zeros(padded - parts[0].shape[0], *parts[0].shape[1:])])
        else:
            full = parts[0]
        world, rank = (etp, etp_rank) if kind.startswith("expert_") else (tp, tp_rank)
        yield mname, _shard(full, kind, world, rank).contiguous()
    if tied_head and (chunk[2] or chunk[3]) and not torch.equal(src.get("lm_head.weight"),
                                                                src.get("model.embed_tokens.weight")):
        raise ConversionError("convert: HF tensor 'lm_head.weight' differs from the embedding, but "
                              "tie_word_embeddings is true")


def hf_to_mcore(src: Any, cfg: ModelConfig, arch: str, **layout: Any) -> dict[str, torch.Tensor]:
    """:func:`iter_hf_to_mcore` collected into a state dict (one model chunk of one rank); ``layout``: its keyword
    arguments (``tp, tp_rank, pp, pp_rank, vpp, vp_stage, ep, ep_rank, etp, etp_rank``)."""
    return dict(iter_hf_to_mcore(src, cfg, arch, **layout))


# --------------------------------------------------------------------------------------------- megatron → HF


def _rank_states(shards: Any) -> dict[tuple[int, int | None, int, int], Mapping[str, torch.Tensor]]:
    """``mcore_to_hf``'s input as ``{(pp_rank, vp_stage, tp_rank, ep_rank): state}``, every rank of the grid
    present."""
    if isinstance(shards, Mapping) and shards and all(isinstance(k, tuple) for k in shards):
        lengths = {len(k) for k in shards}
        if lengths == {2}:
            states = {(0, None, t, e): s for (t, e), s in shards.items()}
        elif lengths == {4}:
            states = dict(shards)
        else:
            raise ConversionError("convert: megatron states must be keyed (tp_rank, ep_rank) or "
                                  "(pp_rank, vp_stage, tp_rank, ep_rank)")
    elif isinstance(shards, Mapping):
        states = {(0, None, 0, 0): shards}
    else:
        states = {(0, None, t, 0): s for t, s in enumerate(shards)}
    if not states:
        raise ConversionError("convert: no megatron state given")
    pp = 1 + max(k[0] for k in states)
    stages = {k[1] for k in states}
    vpp = None if stages == {None} else 1 + max(v for v in stages if v is not None)
    tp, ep = 1 + max(k[2] for k in states), 1 + max(k[3] for k in states)
    grid = {(p, v, t, e) for p in range(pp) for v in ([None] if vpp is None else range(vpp))
            for t in range(tp) for e in range(ep)}
    if set(states) != grid:
        odd = sorted(set(states) ^ grid, key=str)[0]
        raise ConversionError(f"convert: megatron state for (pp_rank, vp_stage, tp_rank, ep_rank)={odd} is "
                              f"{'missing from' if odd in grid else 'not part of'} the layout pp={pp}, vpp={vpp}, tp={tp}, "
                              f"ep={ep}")
    return states


def pipeline_states(chunks: Mapping[tuple[int, int | None], Any]) -> dict[tuple[int, int | None, int, int], Any]:
    """``{(pp_rank, vp_stage): state | [TP rank states]}`` (EP 1) → :func:`mcore_to_hf`'s general form
    ``{(pp_rank, vp_stage, tp_rank, 0): state}``."""
    return {(p, v, t, 0): st for (p, v), c in chunks.items()
            for t, st in enumerate([c] if isinstance(c, Mapping) else list(c))}


def _expert_home(mname: str, per: int) -> tuple[int, str]:
    """(EP rank, EP-local name) of a globally numbered expert tensor name."""
    head, _, tail = mname.partition(".local_experts.")
    e, rest = tail.split(".", 1)
    return int(e) // per, f"{head}.local_experts.{int(e) % per}.{rest}"


def mcore_to_hf(shards: Any, cfg: ModelConfig, arch: str, *,
                etp: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, full tensor) pairs from megatron state, each tensor gathered by its layout rule (the vocabulary
    padding removed). ``shards``: one state dict (one rank holds everything); the list of every TP rank's, in rank
    order; ``{(tp_rank, ep_rank): state}`` for every rank of a TP × EP layout; or, in general,
    ``{(pp_rank, vp_stage, tp_rank, ep_rank): state}`` for every model chunk of every rank (``vp_stage`` None when
    not interleaved). Each state is what megatron's ``named_parameters()`` gives for that chunk: stage-local layer
    numbers, EP-local expert numbers (renamed to global here). Non-expert tensors are read from EP rank 0; expert
    tensors, sharded over ``etp`` (default ``tp``; it must divide ``tp``), from TP ranks ``0 .. etp − 1``. With tied
    embeddings under PP the last chunk's ``output_layer.weight`` copy must equal the first chunk's embedding."""
    states = _rank_states(shards)
    pp = 1 + max(k[0] for k in states)
    stages = {k[1] for k in states}
    vpp = None if stages == {None} else 1 + max(v for v in stages if v is not None)
    tp, ep = 1 + max(k[2] for k in states), 1 + max(k[3] for k in states)
    etp = tp if etp is None else etp
    if tp % etp:
        raise ConversionError(f"convert: etp={etp} does not divide tp={tp}; export takes expert shards by TP rank")
    _check_tp(cfg, tp, ep, etp)
    te = cfg.transformer_impl == "transformer_engine"
    chunks = sorted({(p, v) for p, v, _, _ in states}, key=lambda k: ((k[1] or 0) * pp + k[0]))  # v·pp + p
    for p, v in chunks:
        chunk = _chunk(cfg, pp, p, vpp, v)
        for t in range(tp):
            for e in range(ep):
                want = {m for m, _, _ in _model_entries(cfg, arch, chunk, ep=ep, ep_rank=e)}
                state = states[(p, v, t, e)]
                where = (f"TP rank {t}" + (f", EP rank {e}" if ep > 1 else "")
                         + (f" of pipeline chunk (pp_rank, vp_stage)=({p}, {v})" if pp > 1 else ""))
                missing = sorted(want - set(state))
                if missing:
                    raise ConversionError(f"convert: megatron tensor {missing[0]!r} missing on {where}")
                extra = sorted(set(state) - want)
                if extra:
                    raise ConversionError(f"convert: unexpected megatron tensor {extra[0]!r} for {arch} on {where}")
    shapes = hf_shapes(cfg, arch)
    padded = cfg.padded_vocab_size(tp)
    per = cfg.num_moe_experts // ep if cfg.is_moe else 0
    tied_copy = pp > 1 and not cfg.untie_embeddings_and_output_weights
    first = chunks[0]

    def name(n: str) -> str:
        return te_name(n, cfg) if te else n

    for p, v in chunks:
        where = "" if pp == 1 else f" of pipeline chunk (pp_rank, vp_stage)=({p}, {v})"
        for mname, kind, hnames in _chunk_entries(_entries(cfg, arch), cfg, _chunk(cfg, pp, p, vpp, v)):
            if kind.startswith("expert_"):  # global expert numbering here; megatron's is EP-local
                e, local = _expert_home(mname, per)
                full = _unshard([states[(p, v, t, e)][name(local)] for t in range(etp)], kind)
            else:
                full = _unshard([states[(p, v, t, 0)][name(mname)] for t in range(tp)], kind)
            if kind == "vocab" and full.shape[0] != padded:
                raise ConversionError(f"convert: megatron tensor {mname!r}{where} has {full.shape[0]} rows over "
                                      f"TP={tp}, the config gives {padded}")
            if tied_copy and mname == "output_layer.weight":  # the last chunk's copy of the tied embedding
                emb = _unshard([states[(*first, t, 0)]["embedding.word_embeddings.weight"] for t in range(tp)], kind)
                if not torch.equal(full, emb):
                    raise ConversionError(f"convert: megatron tensor 'output_layer.weight'{where} differs from the "
                                          "first chunk's tied 'embedding.word_embeddings.weight'")
                continue
            yield from _split_to_hf(mname, kind, hnames, full, cfg, shapes, where)


def _split_to_hf(mname: str, kind: str, hnames: tuple[str, ...], full: torch.Tensor, cfg: ModelConfig,
                 shapes: Mapping[str, tuple[int, ...]], where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """One gathered megatron tensor → its HF (name, tensor) pairs (vocabulary padding dropped, qkv and gate/up
    split), each checked against the HF shape."""
    if kind == "vocab":
        parts: tuple[torch.Tensor, ...] = (full[: cfg.vocab_size],)
    elif kind == "qkv":
        parts = _from_grouped_qkv(full, cfg) if full.shape[0] == sum(shapes[h][0] for h in hnames) else (full,)
    elif kind in ("gate_up", "expert_gate_up"):
        parts = tuple(full.chunk(2, dim=0))
    else:
        parts = (full,)
    for h, t in zip(hnames, parts, strict=False):
        if len(parts) != len(hnames) or tuple(t.shape) != shapes[h]:
            raise ConversionError(f"convert: megatron tensor {mname!r}{where} (full shape {list(full.shape)}) "
                                  f"does not give HF {h!r} of shape {list(shapes[h])}")
        yield h, t.contiguous()


def chunk_export_plan(cfg: ModelConfig, arch: str, *, tp: int = 1, pp: int = 1, pp_rank: int = 0,
                      vpp: int | None = None, vp_stage: int | None = None, ep: int = 1,
                      etp: int | None = None) -> list[tuple[str, str, tuple[str, ...], list[tuple[str, int, int]]]]:
    """The stage-local export of ONE model chunk (``vp_stage`` of stage ``pp_rank``), in the order
    :func:`iter_chunk_to_hf` produces it: ``[(megatron name, kind, HF names, reads)]``, ``reads`` the megatron shards
    it gathers, ``[(name under cfg's layer spec, tp_rank, ep_rank)]`` (experts: EP-local names on their EP rank,
    TP ranks ``0 .. etp − 1``; everything else: every TP rank at EP rank 0). With tied embeddings the last chunk's
    ``output_layer.weight`` copy is not exported (the first chunk sends the embedding once; :func:`mcore_to_hf`,
    which sees every chunk, checks the copy equals it). A rank that owns ``(tp_rank, ep_rank)`` of this chunk holds
    exactly the names the reads list for it (:func:`chunk_state_names`)."""
    etp = tp if etp is None else etp
    if tp % etp:
        raise ConversionError(f"convert: etp={etp} does not divide tp={tp}; export takes expert shards by TP rank")
    _check_tp(cfg, tp, ep, etp)
    chunk = _chunk(cfg, pp, pp_rank, vpp, vp_stage)
    te = cfg.transformer_impl == "transformer_engine"
    per = cfg.num_moe_experts // ep if cfg.is_moe else 0
    tied_copy = chunk[3] and not chunk[2] and not cfg.untie_embeddings_and_output_weights
    plan = []
    for mname, kind, hnames in _chunk_entries(_entries(cfg, arch), cfg, chunk):
        if tied_copy and mname == "output_layer.weight":
            continue
        if kind.startswith("expert_"):
            e, local = _expert_home(mname, per)
            reads = [(te_name(local, cfg) if te else local, t, e) for t in range(etp)]
        else:
            reads = [(te_name(mname, cfg) if te else mname, t, 0) for t in range(tp)]
        plan.append((mname, kind, hnames, reads))
    return plan


def chunk_state_names(cfg: ModelConfig, arch: str, *, ep_rank: int = 0, **layout: Any) -> set[str]:
    """The megatron names the state of one chunk of one rank (EP rank ``ep_rank``) holds under ``layout``
    (:func:`chunk_export_plan`'s keywords): what ``named_parameters()`` gives, the tied output copy included."""
    chunk = _chunk(cfg, layout.get("pp", 1), layout.get("pp_rank", 0), layout.get("vpp"), layout.get("vp_stage"))
    return {m for m, _, _ in _model_entries(cfg, arch, chunk, ep=layout.get("ep", 1), ep_rank=ep_rank)}


def iter_chunk_to_hf(get: Any, cfg: ModelConfig, arch: str, *, tp: int = 1, pp: int = 1, pp_rank: int = 0,
                     vpp: int | None = None, vp_stage: int | None = None, ep: int = 1,
                     etp: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, full tensor) pairs of ONE model chunk, produced one megatron tensor at a time: ``get(name,
    tp_rank, ep_rank)`` returns that rank's shard (a local parameter, or one received from its owner) when the
    export needs it, in :func:`chunk_export_plan`'s order, so a stage exports (and a weight sync streams) its own
    tensors without the other stages' or a materialised state. Same layout rules and checks per tensor as
    :func:`mcore_to_hf`; the tied output copy is skipped (:func:`chunk_export_plan`)."""
    shapes = hf_shapes(cfg, arch)
    padded = cfg.padded_vocab_size(tp)
    where = "" if pp == 1 and vpp is None else f" of pipeline chunk (pp_rank, vp_stage)=({pp_rank}, {vp_stage})"
    for mname, kind, hnames, reads in chunk_export_plan(cfg, arch, tp=tp, pp=pp, pp_rank=pp_rank, vpp=vpp,
                                                        vp_stage=vp_stage, ep=ep, etp=etp):
        full = _unshard([get(name, t, e) for name, t, e in reads], kind)
        if kind == "vocab" and full.shape[0] != padded:
            raise ConversionError(f"convert: megatron tensor {mname!r}{where} has {full.shape[0]} rows over "
                                  f"TP={tp}, the config gives {padded}")
        yield from _split_to_hf(mname, kind, hnames, full, cfg, shapes, where)


def copy_into_module(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``'s parameters by name; the names must match exactly (one-line error)."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise ConversionError(f"convert: model parameter {missing[0]!r} has no converted tensor")
    extra = sorted(set(state) - set(params))
    if extra:
        raise ConversionError(f"convert: converted tensor {extra[0]!r} is no parameter of the model")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(state[name].shape):
                raise ConversionError(f"convert: converted tensor {name!r} has shape {list(state[name].shape)}, the "
                                      f"model's is {list(p.shape)}")
            p.copy_(state[name])


def rank_layout(groups: Any, vp_stage: int | None = None) -> dict[str, Any]:
    """The layout keyword arguments of :func:`iter_hf_to_mcore` for this rank: ``groups`` is the
    ``policy.parallel.ParallelGroups`` of the run (read by attribute), ``vp_stage`` the model chunk (None without
    virtual pipeline stages)."""
    return dict(tp=groups.tp, tp_rank=groups.tp_rank, pp=groups.pp, pp_rank=groups.pp_rank, vpp=groups.vpp,
                vp_stage=vp_stage if groups.vpp is not None else None, ep=groups.ep, ep_rank=groups.ep_rank,
                etp=groups.etp, etp_rank=groups.etp_rank)


def load_hf_chunks(src: Any, cfg: ModelConfig, arch: str, chunks: list[torch.nn.Module], groups: Any, *,
                   advance: Any = None) -> int:
    """Stream this rank's shard of the HF checkpoint ``src`` into its model ``chunks`` (one per virtual stage), one
    tensor at a time, in place (so DDP buffers keep the weights): each converted tensor is copied into the parameter
    of the same name and dropped, so memory stays near the largest tensor. Every parameter must be filled exactly
    once (one-line :class:`ConversionError` otherwise). ``advance(n)``: optional progress callback. Returns the
    number of tensors copied."""
    copied = 0
    with torch.no_grad():
        for v, chunk in enumerate(chunks):
            params = dict(chunk.named_parameters())
            done: set[str] = set()
            for name, tensor in iter_hf_to_mcore(src, cfg, arch, **rank_layout(groups, v)):
                param = params.get(name)
                if param is None:
                    raise ConversionError(f"convert: converted tensor {name!r} is no parameter of the model")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ConversionError(f"convert: converted tensor {name!r} has shape {list(tensor.shape)}, the "
                                          f"model's is {list(param.shape)}")
                param.copy_(tensor)
                done.add(name)
                if advance is not None:
                    advance(1)
            missing = sorted(set(params) - done)
            if missing:
                raise ConversionError(f"convert: model parameter {missing[0]!r} has no converted tensor")
            copied += len(done)
    return copied
