"""Per-token log-probs and entropy of response tokens from a megatron-core ``GPTModel``, tensor-parallel aware.

The model runs embedding → decoder → final norm (``final_hidden_states``); then only the hidden rows that predict
a response token go through the output layer (``ColumnParallelLinear`` → vocab-parallel logits [N, V/TP], tied
embedding weight when embeddings are shared), and ``algorithms.vocab_parallel_logprob_entropy`` turns them into
log-probs without gathering the vocabulary. Full [B, L, V] logits never exist (``full_logits_logprobs`` is the
naive reference that does build them, for tests and benchmarks).

Layouts. Inputs are right-padded [B, L] (padded batches with the causal mask of the local/TE spec), or one packed
THD row [1, T] from ``policy.packing`` with its ``packed_seq_params`` (Transformer Engine attention only; refused
for local attention; TE's kernels not executed in this project, see docs/scaling.md). Hidden states are [L, B, H], or
[L/TP, B, H] under sequence parallel (rank r holds positions [r·L/TP, (r+1)·L/TP)). Under context parallelism a rank
holds the hidden states of its own chunks only: ``next_token_logprobs`` takes labels shifted before the split.

Padded vocabulary. megatron allocates ``ModelConfig.padded_vocab_size(tp)`` output rows (a multiple of
``make_vocab_size_divisible_by · TP``); rows ≥ the tokenizer's ``vocab_size`` are not tokens. The rollout engine
(SGLang, the local engine) samples from and reports log-probs over the real vocabulary only, so every logits path
here goes through ``mask_padded_vocab``: the padded columns of each rank's [.., V/TP] slice are set to
``PADDED_LOGIT`` (−1e4, finite: entropy and KL stay finite, e^(−1e4 − max) is exactly 0 in fp32/bf16) before any
softmax — the response log-probs and entropy, OAR-P's KL and OAR-G's P_final alike. The real size comes from the
``vocab_size`` argument, or (None) from ``model.oar_vocab_size``, which ``policy.model.build_model`` records on each
``GPTModel``; a model without that attribute (built directly with megatron) is not masked.

``response_mask[b, t]`` is True where ``input_ids[b, t]`` is a response token (a token the policy generated). Its
log-prob is read from the logits at position t − 1, so ``response_mask[:, 0]`` must be False.

Pipeline parallel: not handled here. On a PP > 1 model only the last stage has the output layer; the schedule's
forward step will call ``logprobs_from_hidden`` there on the hidden states it receives, and results travel to
where they are needed (a later step). These functions refuse a model without both ``pre_process`` and
``post_process``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel

from ..algorithms._validate import as_mask, check_tensor
from ..algorithms.context_parallel import zigzag_indices, zigzag_split
from ..algorithms.logprob import reference_logprob_entropy, vocab_parallel_logprob_entropy
from ..algorithms.reduce import ProcessGroup, group_rank, group_size

__all__ = [
    "CPView",
    "cp_feed",
    "cp_logprobs",
    "cp_view",
    "final_hidden_states",
    "PADDED_LOGIT",
    "full_logits_logprobs",
    "logprobs_from_hidden",
    "mask_padded_vocab",
    "next_token_logprobs",
    "pad_to_tp_multiple",
    "real_vocab_size",
    "response_logprobs",
    "sequence_parallel",
    "unwrap_model",
    "vocab_parallel_logits",
]


# -------------------------------------------------------------------------------------------------- the model


def unwrap_model(model: torch.nn.Module) -> GPTModel:
    """The ``GPTModel`` inside megatron wrappers (DDP, Float16Module: anything exposing ``.module``)."""
    inner = model
    while not isinstance(inner, GPTModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, GPTModel):
        raise ValueError(f"model: expected a megatron GPTModel (possibly wrapped), got {type(model).__name__}")
    return inner


def _check_single_stage(model: GPTModel) -> None:
    if not (model.pre_process and model.post_process):
        raise ValueError(
            "model: this pass needs the embedding and the output layer on one stage (pipeline parallel size 1); "
            "under PP use policy.pipeline (pipeline_logprobs, pipeline_oar_g, pipeline_oar_p)"
        )
    if model.config.mtp_num_layers:
        raise ValueError("model: multi-token prediction layers are not supported by the log-prob pass")


def sequence_parallel(model: GPTModel) -> bool:
    """Whether the decoder's hidden states are scattered along the sequence across TP (SP on, TP > 1)."""
    return bool(getattr(model.output_layer, "sequence_parallel", False))


def _check_tp_group(model: GPTModel, tp_group: ProcessGroup | None) -> None:
    tp = model.config.tensor_model_parallel_size
    if group_size(tp_group) != tp:
        raise ValueError(f"tp_group: has {group_size(tp_group)} ranks, the model was built for TP={tp}")


@contextlib.contextmanager
def _hidden_states_only(model: GPTModel) -> Iterator[None]:
    """Make ``model(...)`` return the decoder output (after the final norm) instead of logits.

    ``GPTModel._postprocess`` returns the hidden states when ``post_process`` is False, which is what a non-last
    pipeline stage does; the decoder keeps its own ``post_process`` and so its final norm. Flipped back on exit.
    """
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


def final_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    *,
    attention_mask: torch.Tensor | None = None,
    decoder_input: torch.Tensor | None = None,
    packed_seq_params=None,
) -> torch.Tensor:
    """Decoder output after the final norm: [L, B, H], or [L/TP, B, H] under sequence parallel.

    input_ids, position_ids [B, L]; or ``decoder_input`` [L, B, H] ([L/TP, B, H] under SP), the embeddings to
    feed the decoder instead (``model.embedding`` output, e.g. perturbed by OAR-G). ``attention_mask`` and
    ``packed_seq_params`` go to megatron unchanged (None: causal).
    """
    gpt = unwrap_model(model)
    _check_single_stage(gpt)
    _check_packing(gpt, packed_seq_params)
    with _hidden_states_only(gpt):
        return gpt(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, packed_seq_params=packed_seq_params
        )


def _check_packing(gpt: GPTModel, packed_seq_params) -> None:
    """THD packing (``policy.packing``) needs Transformer Engine attention; local attention would ignore
    ``cu_seqlens`` and attend across rows."""
    if packed_seq_params is None:
        return
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    # The attention modules built, not config.transformer_impl (whose default says TE even with the local spec).
    local = [m for m in gpt.modules() if isinstance(m, DotProductAttention)]
    if local:
        raise ValueError("packed_seq_params: packed THD batches need Transformer Engine attention "
                         "(transformer_impl 'transformer_engine'); this model uses megatron's local "
                         "DotProductAttention (padded batches only)")


def pad_to_tp_multiple(model: torch.nn.Module, length: int) -> int:
    """The sequence length ≥ ``length`` the model is fed: a multiple of TP under sequence parallel, times the FP8
    token multiple and 2·CP (``policy.padding.padded_length``)."""
    from .padding import padded_length

    return padded_length(model, length)


# ------------------------------------------------------------------------------------------ padded vocabulary

PADDED_LOGIT = -1.0e4  # the logit of a padded vocabulary row (module docstring); finite in fp16/bf16/fp32


def real_vocab_size(model: torch.nn.Module, vocab_size: int | None = None) -> int | None:
    """The real vocabulary size for masking: ``vocab_size`` if given, else ``model.oar_vocab_size`` (set by
    ``build_model``), else None (no masking). Checked against the model's padded size (``GPTModel.vocab_size``)."""
    gpt = unwrap_model(model)
    if vocab_size is None:
        vocab_size = getattr(gpt, "oar_vocab_size", None)
    if vocab_size is None:
        return None
    padded = gpt.vocab_size
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size: expected an int in [1, {padded}] (the model's padded vocabulary), "
                         f"got {vocab_size!r}")
    return vocab_size


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None, *,
                      tp_group: ProcessGroup | None = None) -> torch.Tensor:
    """Vocab-parallel logits [..., V_pad/TP] with the columns of padded vocabulary rows (global id ≥ ``vocab_size``)
    set to ``PADDED_LOGIT``; the input itself when this rank's slice has none (or ``vocab_size`` is None).

    Rank r of ``tp_group`` holds global ids [r·V_pad/TP, (r+1)·V_pad/TP). Out of place (one copy of this rank's
    slice, only on ranks holding padding): the output layer's backward does not need its output, but callers may
    keep the unmasked tensor. The gradient w.r.t. the masked columns is zero.
    """
    if vocab_size is None:
        return logits
    local = logits.shape[-1]
    start = group_rank(tp_group) * local
    keep = vocab_size - start  # columns of this slice that are real tokens
    if keep >= local:
        return logits
    col = torch.arange(local, device=logits.device)
    return logits.masked_fill(col >= max(keep, 0), PADDED_LOGIT)


# ---------------------------------------------------------------------------------------- response-only logits


def vocab_parallel_logits(
    model: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor, *, tp_group: ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Output-layer logits [M, V/TP] (this rank's vocab slice) of the hidden rows ``rows`` only, padded vocabulary
    columns masked (``mask_padded_vocab``; ``vocab_size`` None: ``model.oar_vocab_size`` or no masking).

    hidden: [L, B, H] ([L/TP, B, H] under SP), from ``final_hidden_states``. rows: [M, 2] long (position s, batch
    b) into the full [L, B] grid, identical on every TP rank. Differentiable w.r.t. ``hidden`` and the weights.

    Without SP the rows are picked from the replicated hidden states and go through the output layer, whose
    backward all-reduces their gradient over TP. Under SP each rank picks the requested rows of its own sequence
    slice, padded to the largest count n_max over ranks; the output layer all-gathers them ([TP·n_max, V/TP],
    reduce-scatter in backward) and the result is put back into the requested order. Only rows cross the wire, never
    [L, B, H]. Tied embeddings use the shared weight, as ``GPTModel`` does.
    """
    gpt = unwrap_model(model)
    _check_tp_group(gpt, tp_group)
    vocab_size = real_vocab_size(gpt, vocab_size)
    check_tensor("rows", rows, ndim=2)
    if rows.shape[1] != 2:
        raise ValueError(f"rows: expected shape [M, 2] (position, batch), got {tuple(rows.shape)}")
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    s, b = rows[:, 0], rows[:, 1]
    if not sequence_parallel(gpt):
        picked = hidden[s, b]  # [M, H]
        logits, _ = gpt.output_layer(picked.unsqueeze(1), weight=weight, runtime_gather_output=False)
        return mask_padded_vocab(logits.squeeze(1), vocab_size, tp_group=tp_group)  # [M, V/TP]

    tp, rank = group_size(tp_group), group_rank(tp_group)
    local_len = hidden.shape[0]
    owner = torch.div(s, local_len, rounding_mode="floor")  # [M] the TP rank holding row i
    counts = torch.bincount(owner, minlength=tp)  # [TP]
    n_max = int(counts.max()) if rows.numel() else 0  # same on every rank: rows are replicated
    if n_max == 0:
        return hidden.new_zeros(0, gpt.output_layer.output_size_per_partition)
    order = torch.argsort(owner, stable=True)  # rows grouped by owner, requested order within an owner
    first = torch.cumsum(counts, 0) - counts  # [TP] start of each owner's group in `order`
    slot = torch.empty_like(owner)
    slot[order] = torch.arange(owner.numel(), device=owner.device) - first[owner[order]]  # index within owner
    mine = order[owner[order] == rank]  # this rank's rows, in requested order
    pad = n_max - mine.numel()
    local_s = F.pad(s[mine] - rank * local_len, (0, pad))  # padding rows read row (0, 0): finite, discarded
    local_b = F.pad(b[mine], (0, pad))
    picked = hidden[local_s, local_b]  # [n_max, H]
    logits, _ = gpt.output_layer(picked.unsqueeze(1), weight=weight, runtime_gather_output=False)
    logits = logits.squeeze(1)[owner * n_max + slot]  # [TP·n_max, V/TP] → [M, V/TP]
    return mask_padded_vocab(logits, vocab_size, tp_group=tp_group)


def _response_rows(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t) of every response token, row-major, and the hidden rows [M, 2] = (t − 1, b) predicting them."""
    b, t = response_mask.nonzero(as_tuple=True)
    return torch.stack([b, t], 1), torch.stack([t - 1, b], 1)


def logprobs_from_hidden(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response log-probs from decoder hidden states (the part of ``response_logprobs`` after the decoder; on a
    PP > 1 model the last stage calls this). hidden [L, B, H] / [L/TP, B, H]; input_ids, response_mask [B, L]
    (L may be shorter than the hidden's sequence, which may carry right padding). Returns as ``response_logprobs``.
    """
    bt, rows = _response_rows(response_mask)
    vocab_size = real_vocab_size(model, vocab_size)
    logits = vocab_parallel_logits(model, hidden, rows, tp_group=tp_group, vocab_size=vocab_size)  # [N, V/TP]
    target = input_ids[bt[:, 0], bt[:, 1]]  # [N]
    if vocab_size is not None and target.numel() and int(target.max()) >= vocab_size:
        raise ValueError(f"input_ids: response token id {int(target.max())} is a padded vocabulary row "
                         f"(real vocab_size {vocab_size})")
    logp, ent = vocab_parallel_logprob_entropy(
        logits, target, tp_group=tp_group, temperature=temperature, chunk_size=chunk_size,
        compute_entropy=compute_entropy,
    )
    shape = response_mask.shape
    out = logp.new_zeros(shape).index_put((bt[:, 0], bt[:, 1]), logp)  # [B, L], 0 off the response
    ent_out = None if ent is None else ent.new_zeros(shape).index_put((bt[:, 0], bt[:, 1]), ent)
    return out, ent_out


def next_token_logprobs(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor,
    *,
    tp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``labels`` read at the SAME position: out[b, s] = log π(labels[b, s] | hidden row s) where
    ``label_mask[b, s]``, 0 elsewhere ([B, S] fp32; entropy likewise or None).

    The context-parallel form of ``logprobs_from_hidden``: under CP a rank holds the hidden states of its two zigzag
    chunks only, and the token a hidden row predicts may live on another rank, so the caller shifts the labels
    (labels[:, t] = input_ids[:, t + 1], label_mask[:, t] = response_mask[:, t + 1]) on the full row *before* the
    zigzag split, as megatron's ``get_batch_on_this_cp_rank`` does. hidden [S, B, H] ([S/TP, B, H] under SP) with S
    this rank's sequence length; labels, label_mask [B, S].
    """
    check_tensor("labels", labels, ndim=2)
    mask = as_mask("label_mask", label_mask, labels.shape, "labels")
    b, s = mask.nonzero(as_tuple=True)
    vocab_size = real_vocab_size(model, vocab_size)
    logits = vocab_parallel_logits(model, hidden, torch.stack([s, b], 1), tp_group=tp_group,
                                   vocab_size=vocab_size)  # [M, V/TP]
    target = labels[b, s]  # [M]
    if vocab_size is not None and target.numel() and int(target.max()) >= vocab_size:
        raise ValueError(f"labels: token id {int(target.max())} is a padded vocabulary row (real vocab_size "
                         f"{vocab_size})")
    logp, ent = vocab_parallel_logprob_entropy(logits, target, tp_group=tp_group, temperature=temperature,
                                               chunk_size=chunk_size, compute_entropy=compute_entropy)
    out = logp.new_zeros(labels.shape).index_put((b, s), logp)
    ent_out = None if ent is None else ent.new_zeros(labels.shape).index_put((b, s), ent)
    return out, ent_out


# ------------------------------------------------------------------------------------- context-parallel rows


@dataclass
class CPView:
    """This CP rank's share of [b, L] rows (``cp_view``): the rows right-padded to ``width`` (a multiple of 2·cp,
    × TP under SP, × the FP8 multiple), then the zigzag chunks r and 2·cp−1−r of every per-token tensor.
    input_ids, position_ids (global positions of the chunks), labels (the NEXT token, shifted before the split),
    label_mask (next token is a response token): [b, width/cp]. Used by the actor's training / π_old / reference
    passes and by the OAR clean pass (``pipeline.pipeline_clean_pass``)."""

    width: int
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor


def cp_view(input_ids: torch.Tensor, response_mask: torch.Tensor, width: int, cp_size: int, cp_rank: int,
            index: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> CPView:
    """``CPView`` of rows [b, L] padded to ``width`` ≥ L (pad id 0, never a response token): the labels are
    shifted on the full row, then every tensor keeps the positions ``index`` [width/cp] (default: the zigzag
    chunks of ``cp_rank``); position ids are ``index`` itself, or ``position_ids[:, index]`` when given (THD rows
    whose positions restart per row)."""
    length = input_ids.shape[1]
    ids = F.pad(input_ids, (0, width - length))  # [b, W]
    mask = F.pad(response_mask, (0, width - length))
    labels = F.pad(ids[:, 1:], (0, 1))  # [b, W] labels[:, t] = ids[:, t + 1]
    label_mask = F.pad(mask[:, 1:], (0, 1))
    if index is None:
        index = zigzag_indices(width, cp_size, cp_rank, device=ids.device)
    pos = index.expand(ids.shape[0], -1) if position_ids is None else position_ids[:, index]
    return CPView(width, ids[:, index], pos, labels[:, index], label_mask[:, index])


def cp_logprobs(model: torch.nn.Module, hidden: torch.Tensor, view: CPView,
                gather: Callable[[torch.Tensor], torch.Tensor], length: int, **opts):
    """Full-row response log-probs (and entropy or None) [b, length] from this CP rank's hidden rows of ``view``:
    ``next_token_logprobs`` on the local chunks, ``gather`` (``gather_zigzag`` over the CP group, or the THD
    gather) back to full rows, identical on every CP rank, then shifted by one (gathered[:, t] = log π(x_{t+1})
    goes to position t + 1, the token's own). Differentiable: the gather's backward hands each rank the gradient
    of its own chunks. ``opts``: ``next_token_logprobs``'s keyword arguments."""
    logp, ent = next_token_logprobs(model, hidden, view.labels, view.label_mask, **opts)  # [b, W/cp]
    return tuple(None if x is None else F.pad(gather(x), (1, 0))[:, :length] for x in (logp, ent))


def cp_feed(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
            cp_group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What this CP rank feeds for rows [b, W] (W a multiple of 2·cp): their zigzag chunks and the chunks' global
    positions (megatron splits the rotary table the same way); the rows themselves without CP. Checks that
    ``cp_group`` matches the model's context-parallel size."""
    gpt = unwrap_model(model)
    cp = gpt.config.context_parallel_size or 1
    if group_size(cp_group) != cp:
        raise ValueError(f"cp_group: has {group_size(cp_group)} ranks, the model was built for CP={cp}")
    if cp == 1:
        return input_ids, position_ids
    rank = group_rank(cp_group)
    return zigzag_split(input_ids, cp, rank, dim=1), zigzag_split(position_ids, cp, rank, dim=1)


def _check_inputs(input_ids, position_ids, response_mask) -> torch.Tensor:
    check_tensor("input_ids", input_ids, ndim=2)
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids: expected integer token ids, got dtype {input_ids.dtype}")
    check_tensor("position_ids", position_ids, ndim=2)
    if tuple(position_ids.shape) != tuple(input_ids.shape):
        raise ValueError(f"position_ids: shape {tuple(position_ids.shape)} does not match input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = as_mask("response_mask", response_mask, input_ids.shape, "input_ids")
    if mask.shape[1] and bool(mask[:, 0].any()):
        raise ValueError("response_mask: position 0 cannot be a response token (nothing precedes it to predict it)")
    return mask


def _padded_inputs(gpt, input_ids, position_ids, attention_mask, packed_seq_params):
    """Right-pad ids/positions to the model's sequence multiple (TP under SP, FP8, CP: ``policy.padding``; only
    without an explicit mask or packing)."""
    length = input_ids.shape[1]
    target = pad_to_tp_multiple(gpt, length)
    if target == length:
        return input_ids, position_ids
    if attention_mask is not None or packed_seq_params is not None:
        raise ValueError(f"input_ids: sequence length {length} must be a multiple of TP under sequence parallel "
                         "(times the FP8 token multiple and 2·CP: policy.padding) when an attention mask or packed "
                         "parameters are given")
    extra = target - length
    ids = F.pad(input_ids, (0, extra))
    pos = torch.cat([position_ids, position_ids[:, -1:] + torch.arange(1, extra + 1, device=position_ids.device)], 1)
    return ids, pos


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    packed_seq_params=None,
    tp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | y_<t) / T-tempered, and optionally the entropy, at every response token; nothing of size [B, L, V].

    input_ids, position_ids [B, L] (right-padded: prompt | response | pad); response_mask [B, L] bool, True where
    input_ids[b, t] is a response token (module docstring; position 0 never). attention_mask / packed_seq_params:
    passed to megatron (None: causal). tp_group: the model's tensor-parallel group (None for TP=1). temperature: the
    sampler's (logits / T before the softmax). chunk_size: rows per block inside the fused log-prob (bounds its
    scratch to [k, V/TP]). vocab_size: the real vocabulary (softmax over it only; None: ``model.oar_vocab_size``
    or the whole padded output).

    Returns (logp [B, L], entropy [B, L] or None), fp32, 0 off the response; the same on every TP rank.
    Differentiable w.r.t. the model parameters. Under SP a sequence length not divisible by TP is right-padded here
    (without a mask or packing). Peak logits memory: [N, V/TP] with N = response tokens (the full-logits path holds
    [B, L, V/TP] and more).
    """
    mask = _check_inputs(input_ids, position_ids, response_mask)
    gpt = unwrap_model(model)
    _check_tp_group(gpt, tp_group)
    _check_packing(gpt, packed_seq_params)
    ids, pos = _padded_inputs(gpt, input_ids, position_ids, attention_mask, packed_seq_params)
    hidden = final_hidden_states(gpt, ids, pos, attention_mask=attention_mask, packed_seq_params=packed_seq_params)
    return logprobs_from_hidden(
        gpt, hidden, input_ids, mask, tp_group=tp_group, temperature=temperature,
        compute_entropy=compute_entropy, chunk_size=chunk_size, vocab_size=vocab_size,
    )


def full_logits_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive reference of ``response_logprobs``: the model's logits at every position, all-gathered over the
    vocabulary ([B, L, V] on every TP rank), then log_softmax and gather (autograd backward). For tests and as the
    benchmark baseline; it holds several [B, L, V] fp32 tensors. The softmax runs over the first ``vocab_size``
    columns (None: ``model.oar_vocab_size`` or all; sliced, not masked: the plain reference). Returns
    (logp [B, L], entropy [B, L]), 0 off the response."""
    mask = _check_inputs(input_ids, position_ids, response_mask)
    gpt = unwrap_model(model)
    _check_single_stage(gpt)
    length = input_ids.shape[1]
    ids, pos = _padded_inputs(gpt, input_ids, position_ids, attention_mask, None)
    vocab_size = real_vocab_size(gpt, vocab_size)
    logits = gpt(ids, pos, attention_mask, runtime_gather_output=True)[:, :length]  # [B, L, V_pad]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]  # [B, L, V]
    logp, ent = reference_logprob_entropy(logits[:, :-1], input_ids[:, 1:], temperature)  # [B, L-1]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = F.pad(torch.where(mask[:, 1:], logp, zero), (1, 0))
    ent = F.pad(torch.where(mask[:, 1:], ent, zero), (1, 0))
    return logp, ent
