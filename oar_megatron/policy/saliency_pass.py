"""OAR-G and OAR-P saliency on a megatron-core ``GPTModel`` under tensor parallelism (with or without sequence
parallel): the sharded counterpart of ``algorithms.saliency.oar_g_saliency`` / ``oar_p_saliency``.

Same definitions, seeds and output layout as those functions (read their docstrings for the method); what changes
is where the tensors live:

- P_final from vocab-parallel logits [n, V/TP], computed only for the rows that P_final reads (``last``: position
  answer_pos − 1; answer modes: the answer-predicting positions) through ``forward.vocab_parallel_logits``.
  ``answer_mean`` averages the logit shards (the mean commutes with the vocab split); ``answer_joint`` uses the
  fused vocab-parallel log-prob; KL(P‖Q) is ``algorithms.vocab_parallel_kl`` over the TP group.
- OAR-G differentiates J with respect to e = ``model.embedding(ids)`` [L, n, H] ([L/TP, n, H] under SP), a detached
  leaf fed to the decoder as ``decoder_input = e + ξ``. Under SP each rank gets ∂J/∂e for its own sequence slice,
  reduces it to s_t = |Σ_h g·e| [L/TP, n] and the slices are all-gathered along the sequence (a few floats per
  token). Without SP the gradient is replicated and no communication is needed.
- The parameters are frozen (``requires_grad=False``) while OAR-G runs and restored after: ``.grad`` and megatron's
  ``main_grad`` (written directly by fused weight-gradient accumulation on GPU) stay untouched, and the linear layers
  take megatron's frozen-weight path, which saves no input activations for a weight gradient.

Sharing (ALGORITHMS.md §5.5: saliency is computed once per rollout batch under π_old). ``clean_pass`` runs ONE
no-grad forward over the rollout sequences ``prompt | response`` and the scoring sequences ``prompt | reasoning |
conclude | answer`` stacked along the batch, and returns π_old's response log-probs together with the clean P_final
of every requested mode; ``oar_g_sharded``/``oar_p_sharded`` take that P_final as ``reference`` and then skip
their own clean forward. What cannot be shared: the scoring sequences differ from the rollout ones after the
reasoning, so the π_old log-probs of the answer span need the rollout rows; and OAR-G's noisy pass must be a
separate forward (it needs a graph, the clean pass does not).

Inputs are right-padded (a ``ScoringBatch``); megatron applies its causal mask, so padding after a row's last real
token does not change that row. The sequence is right-padded to the model's sequence multiple (TP under SP, the FP8
token multiple, 2·CP: ``policy.padding``); padded positions are never scored. Put the model in eval
mode (or use zero dropout): the method assumes a deterministic forward.

Context parallel (``cp_group``: Transformer Engine attention, pp = 1). Every scoring row, clean or noisy, and every
OAR-P copy is padded to W (the sequence multiple above includes 2·cp) and fed as this CP rank's zigzag chunks r
and 2·cp−1−r with their global positions (``forward.cp_feed``, the split of the actor's training rows). P_final
reads a few positions of the full row, each held by one CP rank: that rank computes their logits (``answer_joint``:
their token log-probs) and ``algorithms.context_parallel.sum_over_cp`` adds the ranks' terms, so every CP rank has
the full P_final; its backward hands each rank the gradient of the positions it holds, and TE's CP attention
carries the rest back to the other ranks' chunks, so OAR-G's ∂J/∂e on each rank is exact for its own chunks (every
CP rank runs the backward, also one that holds no P_final position). OAR-G's noise is drawn per row as without CP
and applied at the positions this rank holds (``reasoning_noise(positions=)``); s_t of the local chunks is gathered
to full rows with ``gather_zigzag`` (after the SP gather over TP), identical on every CP rank. ``clean_pass`` here
refuses CP (it feeds full rows); the actor's shared clean pass is ``pipeline.pipeline_clean_pass``, which handles
it. Run on CPU with a test-only CP attention (``tests/cpu/test_oar_context_parallel.py``; docs/scaling.md).

Pipeline parallel (refused here; ``pipeline.pipeline_oar_g``, ``pipeline_oar_p`` run it): the embedding leaf and the
reduction to s_t belong to the first stage, J to the last; the gradient w.r.t. the first stage's input travels
back through the pipeline's backward, and the scores are then sent from the first stage to the last, where the loss
consumes them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import collectives
from ..algorithms._validate import check_choice, check_int, check_positive
from ..algorithms.context_parallel import gather_zigzag, sum_over_cp, zigzag_indices
from ..algorithms.logprob import vocab_parallel_kl, vocab_parallel_logprob_entropy
from ..algorithms.reduce import ProcessGroup, group_rank, group_size
from ..algorithms.saliency import (
    PFINAL_MODES,
    Saliency,
    _chunks,
    _divergence,
    _sample_seeds,
    _to_width,
    check_scoring_batch,
    perturbation_index,
    perturbed_ids,
    score_buffer,
)
from ..algorithms.segment import ScoringBatch
from .forward import (
    _check_inputs,
    _check_single_stage,
    _check_tp_group,
    cp_feed,
    final_hidden_states,
    logprobs_from_hidden,
    pad_to_tp_multiple,
    sequence_parallel,
    unwrap_model,
    vocab_parallel_logits,
)

__all__ = ["CleanPass", "clean_pass", "oar_g_sharded", "oar_p_sharded", "pfinal_from_hidden"]


# ---------------------------------------------------------------------------------------------------- helpers


def _check_batch(batch: ScoringBatch, mode: str, width: int | None) -> int:
    width = check_scoring_batch(batch, mode, width)
    att = batch.attention_mask
    col = torch.arange(att.shape[1], device=att.device)[None, :]
    if not torch.equal(att.bool(), col < att.sum(dim=1, keepdim=True)):
        raise ValueError("batch: attention_mask must be right padding (the megatron pass applies a causal mask only)")
    return width


def _check_reference(reference: torch.Tensor | None, batch_size: int) -> None:
    if reference is not None and (not isinstance(reference, torch.Tensor) or reference.shape[0] != batch_size):
        got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"reference: expected the clean P_final of the {batch_size} rows (clean_pass), got {got}")


def _scoring_inputs(gpt, ids: torch.Tensor, pad_id: int, length: int | None = None):
    """ids [n, L] right-padded with ``pad_id`` to ``length`` (≥ L; default L) rounded up to the model's sequence
    multiple (``policy.padding``), and position ids 0..L'−1. Returns (ids [n, L'], position_ids [n, L'])."""
    n, cur = ids.shape
    target = pad_to_tp_multiple(gpt, max(cur, length or 0))
    if target > cur:
        ids = F.pad(ids, (0, target - cur), value=pad_id)
    pos = torch.arange(target, device=ids.device).expand(n, target)
    return ids, pos


def _divergence_fn(tp_group):
    return functools.partial(vocab_parallel_kl, tp_group=tp_group)


@contextlib.contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """requires_grad=False on every trainable parameter for the duration (module docstring); restored on exit."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def pfinal_from_hidden(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    answer_pos: torch.Tensor,
    answer_len: torch.Tensor,
    mode: str,
    *,
    tp_group: ProcessGroup | None = None,
    row_offset: int = 0,
    cp_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """P_final of ``n`` scoring rows from decoder hidden states (the sharded ``saliency._pfinal``).

    hidden [L, B, H] ([L/TP, B, H] under SP) whose batch rows [row_offset, row_offset + n) are the scoring rows;
    input_ids [n, L'] (L' ≤ L), answer_pos, answer_len [n]. Returns logits [n, V/TP] (``last``, ``answer_mean``;
    this rank's vocab slice) or φ [n] (``answer_joint``, the same on every TP rank), fp32 (fp64 for fp64 models).
    Rows without answer tokens give zero logits / φ = 0 in the answer modes. Differentiable w.r.t. ``hidden``.

    Context parallel (``cp_group`` of size cp > 1): ``hidden`` holds this rank's zigzag chunks of the padded width
    W ([W/cp(/TP), B, H]) and ``input_ids`` the full rows. Each P_final position (answer_pos − 1, or the
    answer-predicting positions) lives on one CP rank: that rank computes its logits (``answer_joint``: its token
    log-probs), the others zeros, and ``sum_over_cp`` adds them up, so every CP rank returns the full P_final; its
    backward hands each rank the gradient of the positions it holds.
    """
    check_choice("mode", mode, PFINAL_MODES)
    n = input_ids.shape[0]
    dev = input_ids.device
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    batch_rows = torch.arange(n, device=dev) + row_offset
    at = functools.partial(_values_at, model, hidden, dtype=dt, tp_group=tp_group, cp_group=cp_group)
    if mode == "last":
        return at(torch.stack([answer_pos - 1, batch_rows], 1))
    a_max = max(int(answer_len.max()), 1) if n else 1
    valid = torch.arange(a_max, device=dev)[None, :] < answer_len[:, None]  # [n, A]
    i, k = valid.nonzero(as_tuple=True)  # answer token k of row i
    pred = answer_pos[i] - 1 + k  # the position predicting it
    rows = torch.stack([pred, batch_rows[i]], 1)
    count = answer_len.clamp(min=1).to(dt)  # [n]
    if mode == "answer_mean":
        logits = at(rows)
        return logits.new_zeros(n, logits.shape[1]).index_add(0, i, logits) / count[:, None]
    tok_ll = at(rows, targets=input_ids[i, pred + 1])
    return tok_ll.new_zeros(n).index_add(0, i, tok_ll) / count


def _values_at(model, hidden: torch.Tensor, rows: torch.Tensor, *, dtype, tp_group, cp_group,
               targets: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [M, V/TP] (``dtype``) at the (position, batch row) pairs ``rows`` [M, 2], or with ``targets`` [M] the
    log-probs of those tokens [M]. Under CP (``pfinal_from_hidden``) positions are global: each rank computes the
    pairs whose position it holds (at their local index), zeros for the rest, summed over the CP group."""

    def values(local_rows, tgt):
        logits = vocab_parallel_logits(model, hidden, local_rows, tp_group=tp_group).to(dtype)
        if tgt is None:
            return logits
        return vocab_parallel_logprob_entropy(logits, tgt, tp_group=tp_group, compute_entropy=False)[0]

    cp = group_size(cp_group)
    if cp == 1:
        return values(rows, targets)
    gpt = unwrap_model(model)
    sp_tp = group_size(tp_group) if sequence_parallel(gpt) else 1
    width = hidden.shape[0] * sp_tp * cp  # the padded row length W
    idx = zigzag_indices(width, cp, group_rank(cp_group), device=rows.device)  # [W/cp] global positions held here
    local_of = torch.full((width,), -1, dtype=torch.long, device=rows.device)
    local_of[idx] = torch.arange(idx.numel(), device=rows.device)
    loc = local_of[rows[:, 0]]
    held = (loc >= 0).nonzero(as_tuple=True)[0]  # the same on every TP rank of this CP rank
    got = values(torch.stack([loc[held], rows[held, 1]], 1), None if targets is None else targets[held])
    full = got.new_zeros((rows.shape[0], *got.shape[1:])).index_put((held,), got)
    return sum_over_cp(full, cp_group)


# ------------------------------------------------------------------------------------------------- clean pass


class CleanPass(NamedTuple):
    """reference: {mode: clean P_final of every scoring row} ([B, V/TP] logits or φ [B]), for the ``reference``
    argument of ``oar_g_sharded``/``oar_p_sharded``. old_logp / old_entropy: π_old response log-probs (entropy)
    [B_r, L_r] of the rollout rows, as ``response_logprobs``; None without rollout rows (entropy: unless asked)."""

    reference: dict[str, torch.Tensor]
    old_logp: torch.Tensor | None
    old_entropy: torch.Tensor | None


@torch.no_grad()
def clean_pass(
    model: torch.nn.Module,
    batch: ScoringBatch,
    *,
    modes: Sequence[str] = ("answer_mean",),
    rollout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
) -> CleanPass:
    """One no-grad forward for π_old log-probs and the clean P_final of OAR-G / OAR-P (module docstring).

    rollout: (input_ids, position_ids, response_mask) [B_r, L_r] as for ``response_logprobs``, or None (P_final
    only). The rollout rows and the B scoring rows are right-padded to one length and run as one batch of
    B_r + B rows. temperature / compute_entropy / chunk_size apply to the rollout log-probs; P_final uses T = 1.
    """
    for m in modes:
        check_choice("modes", m, PFINAL_MODES)
    _check_batch(batch, modes[0] if modes else "last", None)
    gpt = unwrap_model(model)
    _check_single_stage(gpt)
    _check_tp_group(gpt, tp_group)
    if (gpt.config.context_parallel_size or 1) > 1:
        raise ValueError("model: clean_pass feeds full rows; under context parallelism use "
                         "pipeline.pipeline_clean_pass (zigzag-split rows)")
    s_ids = batch.input_ids
    if rollout is None:
        ids, pos = _scoring_inputs(gpt, s_ids, batch.pad_id)
        n_roll = 0
    else:
        r_ids, r_pos, r_mask = rollout
        r_mask = _check_inputs(r_ids, r_pos, r_mask)
        n_roll, r_len = r_ids.shape
        ids, pos = _scoring_inputs(gpt, s_ids, batch.pad_id, r_len)
        length = ids.shape[1]
        extra = length - r_len
        r_pos = torch.cat([r_pos, r_pos[:, -1:] + torch.arange(1, extra + 1, device=r_pos.device)], 1)
        ids = torch.cat([F.pad(r_ids, (0, extra)), ids], 0)  # [B_r + B, L]
        pos = torch.cat([r_pos, pos], 0)
    hidden = final_hidden_states(gpt, ids, pos)  # [L, B_r + B, H] ([L/TP, ...] under SP)
    reference = {
        m: pfinal_from_hidden(gpt, hidden, s_ids, batch.answer_pos, batch.answer_len, m, tp_group=tp_group,
                              row_offset=n_roll)
        for m in dict.fromkeys(modes)
    }
    if rollout is None:
        return CleanPass(reference, None, None)
    mask = F.pad(r_mask, (0, ids.shape[1] - r_len, 0, batch.batch_size))  # [B_r + B, L], scoring rows all False
    logp, ent = logprobs_from_hidden(gpt, hidden, ids, mask, tp_group=tp_group, temperature=temperature,
                                     compute_entropy=compute_entropy, chunk_size=chunk_size)
    return CleanPass(reference, logp[:n_roll, :r_len], None if ent is None else ent[:n_roll, :r_len])


# ------------------------------------------------------------------------------------------------------ OAR-G


def reasoning_noise(e: torch.Tensor, seeds: Sequence[int], start: torch.Tensor, rlen: torch.Tensor,
                    noise_std: float, s0: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """OAR-G noise for embeddings e [S_local, n, H] holding sequence positions [s0, s0 + S_local) (SP slice), or
    the positions ``positions`` [S_local] (CP: this rank's zigzag chunks, their SP slice): row i gets
    σ·randn(R_i, H) from ``Generator().manual_seed(seeds[i])`` at its reasoning positions [start_i, start_i + R_i),
    the part held here — the same draw as ``algorithms.oar_g_saliency``."""
    noise = torch.zeros_like(e)
    if noise_std <= 0:
        return noise
    if positions is None:
        positions = torch.arange(s0, s0 + e.shape[0])
    positions = positions.cpu()
    for i, s in enumerate(seeds):
        r, p0 = int(rlen[i]), int(start[i])
        if r:
            gen = torch.Generator().manual_seed(s)
            xi = torch.randn(r, e.shape[-1], generator=gen, dtype=torch.float32) * noise_std  # [R_i, H]
            here = ((positions >= p0) & (positions < p0 + r)).nonzero(as_tuple=True)[0]
            if here.numel():
                noise[here.to(e.device), i] = xi[positions[here] - p0].to(dtype=e.dtype, device=e.device)
    return noise


def grad_times_input(e: torch.Tensor, grad: torch.Tensor, *, sp: bool, tp_group: ProcessGroup | None,
                     cp_group: ProcessGroup | None = None) -> torch.Tensor:
    """s = |Σ_h g·e| per position: [S_local, n] from this rank's slice, all-gathered along the sequence under SP,
    then under CP (``cp_group``) put back into full rows with ``gather_zigzag``; returns [n, S], identical on every
    TP and CP rank."""
    sal = (grad.float() * e.detach().float()).sum(dim=-1).abs()  # [S(/TP)(/cp), n]
    tp = group_size(tp_group)
    if sp and tp > 1:
        sal = torch.cat(collectives.all_gather(sal, group=tp_group), 0)  # [S(/cp), n]
    sal = gather_zigzag(sal, cp_group, dim=0)  # [S, n]
    return sal.t()


def oar_g_sharded(
    model: torch.nn.Module,
    batch: ScoringBatch,
    *,
    tp_group: ProcessGroup | None = None,
    mode: str = "answer_mean",
    noise_std: float = 1e-3,
    seed: int | Sequence[int] = 0,
    width: int | None = None,
    chunk_size: int | None = None,
    reference: torch.Tensor | None = None,
    cp_group: ProcessGroup | None = None,
) -> Saliency:
    """OAR-G (noisy-KL gradient × input) on a TP-sharded GPTModel; equal to ``algorithms.oar_g_saliency`` on the
    unsharded model (same noise from ``Generator().manual_seed(seed_b)``, same [B, W] layout).

    Per chunk of ``chunk_size`` responses: clean P_final (no grad; or ``reference[rows]`` from ``clean_pass``),
    e = embedding(ids).detach() [L, n, H] / [L/TP, n, H] as a leaf, noise ξ at the reasoning positions (the slice
    of it this rank holds under SP), decoder on e + ξ, J = Σ_b KL(P0_b ‖ P_b) (vocab-parallel) or
    Σ_b (φ0_b − φ_b), g = autograd.grad(J, e) with the parameters frozen, s_t = |Σ_h g·e| (clean e), all-gathered
    along the sequence under SP. Returns Saliency(scores [B, W] ≥ 0, mask [B, W]), identical on every TP rank.

    Context parallel (``cp_group``, Transformer Engine attention): every row is fed as this rank's zigzag chunks
    with their global positions (``forward.cp_feed``), e and ξ are the chunks' (``reasoning_noise`` by position),
    P_final is summed over the CP ranks holding its positions (``pfinal_from_hidden``), and the backward through
    TE's CP attention gives each rank ∂J/∂e of its own chunks; s_t is gathered to full rows (``gather_zigzag``),
    identical on every CP rank. Every CP rank runs the backward (J carries a 0·Σ hidden term), since the
    attention's backward communicates.
    """
    width = _check_batch(batch, mode, width)
    noise_std = check_positive("noise_std", noise_std, allow_zero=True)
    if noise_std == 0 and mode != "answer_joint":
        raise ValueError(f"noise_std: must be > 0 in mode {mode!r} (the KL gradient is exactly 0 at the clean point)")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    gpt = unwrap_model(model)
    _check_single_stage(gpt)
    _check_tp_group(gpt, tp_group)
    b, length = batch.input_ids.shape
    _check_reference(reference, b)
    dev = batch.input_ids.device
    seeds = _sample_seeds(seed, b)
    r_max = int(batch.reasoning_len.max()) if b else 0
    out = torch.zeros(b, max(r_max, 1), dtype=torch.float32, device=dev)
    has_answer = batch.answer_len > 0
    sp, rank = sequence_parallel(gpt), group_rank(tp_group)
    cp = group_size(cp_group)
    kl_fn = _divergence_fn(tp_group)
    pf = functools.partial(pfinal_from_hidden, gpt, mode=mode, tp_group=tp_group, cp_group=cp_group)

    for rows in _chunks(b, chunk_size):
        ids, pos = _scoring_inputs(gpt, batch.input_ids[rows], batch.pad_id)  # [n, L']
        feed_ids, feed_pos = cp_feed(gpt, ids, pos, cp_group)  # [n, L'/cp]: this CP rank's zigzag chunks
        apos, alen = batch.answer_pos[rows], batch.answer_len[rows]
        start, rlen = batch.reasoning_start[rows], batch.reasoning_len[rows]
        if reference is None:
            with torch.no_grad():
                ref = pf(final_hidden_states(gpt, feed_ids, feed_pos), ids, apos, alen)
        else:
            ref = reference[rows]

        with torch.enable_grad(), _frozen_parameters(gpt):
            e = gpt.embedding(input_ids=feed_ids, position_ids=feed_pos).detach().requires_grad_(True)
            held = feed_pos[0].cpu()  # [L'/cp] global positions of e's rows; its SP slice below
            if sp:
                held = held[rank * e.shape[0]: (rank + 1) * e.shape[0]]
            noise = reasoning_noise(e, seeds[rows], start, rlen, noise_std, positions=held)
            hidden = final_hidden_states(gpt, feed_ids, feed_pos, decoder_input=e + noise)
            cur = pf(hidden, ids, apos, alen)
            j = _divergence(ref, cur, mode, kl_fn)  # [n], the same on every TP (and CP) rank
            if cp > 1:  # every CP rank runs the backward, even one holding no P_final position
                j = j + 0.0 * hidden.sum()
            if j.requires_grad:
                (grad,) = torch.autograd.grad(j.sum(), e)  # ∂J/∂e of this rank's slice; no parameter gradient
            else:  # no row of the chunk reads P_final (answer modes, no answers): J is constant
                grad = torch.zeros_like(e)

        sal = grad_times_input(e, grad, sp=sp, tp_group=tp_group, cp_group=cp_group)  # [n, L']
        k = torch.arange(max(r_max, 1), device=dev)[None, :]
        picked = sal.gather(1, (start[:, None] + k).clamp(max=length - 1))  # [n, R_max]: column k = token k
        if mode != "last":
            picked = torch.where(has_answer[rows][:, None], picked, 0.0)
        out[rows] = picked
    return _to_width(out, batch.reasoning_len, width)


# ------------------------------------------------------------------------------------------------------ OAR-P


@torch.no_grad()
def oar_p_sharded(
    model: torch.nn.Module,
    batch: ScoringBatch,
    *,
    tp_group: ProcessGroup | None = None,
    mode: str = "last",
    chunk_size: int = 32,
    width: int | None = None,
    reference: torch.Tensor | None = None,
    cp_group: ProcessGroup | None = None,
) -> Saliency:
    """OAR-P (pad-replacement counterfactuals) on a TP-sharded GPTModel; equal to ``algorithms.oar_p_saliency``.

    The Σ_b R_b perturbed copies are flattened and run under no_grad in fixed chunks of ``chunk_size`` copies, each
    padded to one length (the prefix up to the last conclude token in ``last`` mode, the whole sequence otherwise),
    through the same forward as the clean pass; KL(P ‖ Q_j) over the vocab-parallel logits (``vocab_parallel_kl``),
    φ_orig − φ_j for ``answer_joint``. ``reference``: the clean P_final from ``clean_pass`` (else one clean forward
    here; in ``last`` mode either is valid, the causal mask makes later tokens irrelevant). Returns
    Saliency(scores [B, W], mask [B, W]), identical on every TP rank.

    Context parallel (``cp_group``): the clean rows and the copies are fed as this rank's zigzag chunks with their
    positions (``forward.cp_feed``) and P_final is summed over the CP ranks holding its positions
    (``pfinal_from_hidden``): the scores come out identical on every CP rank.
    """
    width = _check_batch(batch, mode, width)
    check_int("chunk_size", chunk_size, minimum=1)
    gpt = unwrap_model(model)
    _check_single_stage(gpt)
    _check_tp_group(gpt, tp_group)
    b = batch.batch_size
    _check_reference(reference, b)
    dev = batch.input_ids.device
    out, total = score_buffer(batch)
    if total == 0:
        return _to_width(out, batch.reasoning_len, width)
    ids = batch.input_ids[:, : int(batch.answer_pos.max())] if mode == "last" else batch.input_ids
    apos, alen = batch.answer_pos, batch.answer_len
    if reference is None:
        s_ids, s_pos = _scoring_inputs(gpt, ids, batch.pad_id)
        hidden = final_hidden_states(gpt, *cp_feed(gpt, s_ids, s_pos, cp_group))
        reference = pfinal_from_hidden(gpt, hidden, ids, apos, alen, mode, tp_group=tp_group, cp_group=cp_group)
    kl_fn = _divergence_fn(tp_group)

    row, j = perturbation_index(batch)  # [N]: copy c perturbs reasoning token j_c of row_c
    scores = torch.empty(total, dtype=reference.dtype, device=dev)
    for c in _chunks(total, chunk_size):
        r = row[c]
        x = perturbed_ids(ids, batch, r, j[c])  # [n, L]
        x_ids, x_pos = _scoring_inputs(gpt, x, batch.pad_id)
        hidden = final_hidden_states(gpt, *cp_feed(gpt, x_ids, x_pos, cp_group))  # CP: this rank's chunks
        cur = pfinal_from_hidden(gpt, hidden, x, apos[r], alen[r], mode, tp_group=tp_group, cp_group=cp_group)
        scores[c] = _divergence(reference[r], cur, mode, kl_fn)
    if mode != "last":
        scores = torch.where(alen[row] > 0, scores, 0.0)
    out[row, j] = scores.float()
    return _to_width(out, batch.reasoning_len, width)
