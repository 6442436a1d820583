"""Pipeline-parallel (PP > 1) counterparts of the log-prob and saliency passes, driven by megatron-core's schedules.

Every function here takes the model chunks of this rank (one ``GPTModel``, or its virtual-PP chunks; megatron
wrappers are unwrapped) and runs ``get_forward_backward_func()`` on micro-batches that every PP rank holds (each
stage reads the ids it needs: the first for the embedding, the last for the targets / answer positions). At PP=1
the same code goes through megatron's no-pipelining schedule, so one API serves every layout. Virtual PP: pass the
list of chunks; the interleaved schedule's micro-batch count is padded with dummy micro-batches as it requires
(tested at PP=2 × 2 chunks). Tested on CPU/gloo at PP=2 with TP=1; TP/SP inside a stage use the same sharded
code as ``saliency_pass`` (TP×PP not run here: 4 ranks).

- ``pipeline_logprobs``: π_old response log-probs (and entropy). Forward-only schedule; on the last stage the
  forward step runs the chunk with ``post_process`` switched off (``forward._hidden_states_only``: decoder output
  after the final norm) and the schedule's loss function calls ``forward.logprobs_from_hidden``, whose result is
  what megatron's ``forward_data_store`` collects. The per-micro-batch [b, L] results exist on the last stage.
- ``pipeline_oar_g``: OAR-G with J as the schedule's "loss" (forward and backward, parameters frozen as in
  ``saliency_pass``): the first stage feeds ``decoder_input = e + ξ`` with e a leaf requiring grad, the last
  stage computes J = Σ_b KL(P0_b ‖ P_b) from vocab-parallel logits (or Σ (φ0 − φ)), megatron's backward carries
  ∂J/∂hidden back through the pipeline, and after the schedule the first stage holds e.grad and reduces it to
  s_t = |Σ_h g·e| (all-gathered along the sequence under SP). Equal to ``saliency_pass.oar_g_sharded``.
- ``pipeline_oar_p``: the counterfactual copies through the forward-only schedule, KL on the last stage. Equal to
  ``saliency_pass.oar_p_sharded``.
- ``pipeline_clean_pass``: the pipeline counterpart of ``saliency_pass.clean_pass``: ONE forward-only schedule over
  the rollout micro-batches (π_old response log-probs) followed by the scoring rows (clean P_final of each requested
  mode), all padded to one sequence length; the reference then goes to ``pipeline_oar_g`` / ``pipeline_oar_p``
  (``reference=``), which skip their own clean schedule. ``PolicyActor.compute_old_logprobs`` uses it when OAR
  shaping follows, so π_old and OAR's clean pass cost one forward schedule instead of two. Under context
  parallelism (pp = 1) it feeds zigzag chunks (its docstring); ``pipeline_oar_g`` / ``pipeline_oar_p`` refuse CP.

``SCHEDULE_RUNS`` counts the schedules run here and by the actor's forward-only passes (keys ``forward_only``,
``forward_backward``; training steps not counted), for tests and profiling.

Delivery (``broadcast``). The policy loss is computed on the last stage, so only the last stage needs π_old
log-probs and saliency; the log-probs and OAR-P scores are born there, OAR-G scores on the first stage. With
``broadcast=True`` (default) the result is broadcast over the PP group from the stage that has it, so every PP
rank returns the same tensors: advantage shaping / logging code that runs on every rank then needs no stage
logic, at the cost of one [B, L] (or [B, W]) float tensor per PP rank. With ``broadcast=False`` the result is
returned only where it is born (log-probs, OAR-P: last stage; OAR-G: the first stage *sends* its scores to the
last stage, point-to-point, since that is where the loss consumes them) and the other stages get None.

Shapes. Megatron's p2p sends fixed [seq_length, micro_batch_size, H] ([seq_length/TP, ...] under sequence
parallel) tensors, so every micro-batch is right-padded here to ``seq_length`` (a multiple of TP under SP, of the
FP8 token multiple and of 2·CP: ``policy.padding``), and
the saliency passes pad their last micro-batch with repeated rows whose results are dropped (they never enter J).
Put the chunks in eval mode: the passes assume a deterministic forward, and megatron's MoE router attaches its
aux / z losses only in training mode (they would otherwise add their own gradient to e.grad in OAR-G). The model
must have no multi-token-prediction layers.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .. import collectives
from ..algorithms._validate import check_choice, check_int, check_positive
from ..algorithms.reduce import ProcessGroup, group_rank, group_size
from ..algorithms.saliency import (
    PFINAL_MODES,
    Saliency,
    _divergence,
    _sample_seeds,
    _to_width,
    perturbation_index,
    perturbed_ids,
    score_buffer,
)
from ..algorithms.segment import ScoringBatch
from ..algorithms.context_parallel import gather_zigzag
from .forward import (_check_inputs, _hidden_states_only, cp_feed, cp_logprobs, cp_view, logprobs_from_hidden,
                      unwrap_model)
from .padding import padded_length, sequence_multiple
from .saliency_pass import (
    _check_batch,
    _check_reference,
    _divergence_fn,
    _frozen_parameters,
    grad_times_input,
    pfinal_from_hidden,
    reasoning_noise,
)

__all__ = ["SCHEDULE_RUNS", "PipelineCleanPass", "pipeline_clean_pass", "pipeline_logprobs", "pipeline_oar_g",
           "pipeline_oar_p"]

SCHEDULE_RUNS: collections.Counter = collections.Counter()  # module docstring


def count_schedule(forward_only: bool) -> None:
    """Count one megatron schedule run (``SCHEDULE_RUNS``)."""
    SCHEDULE_RUNS["forward_only" if forward_only else "forward_backward"] += 1


# ---------------------------------------------------------------------------------------------------- helpers


def _chunk_list(chunks) -> list[torch.nn.Module]:
    out = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
    if not out:
        raise ValueError("chunks: expected this rank's model chunk(s), got an empty sequence")
    return out


def _resolve_groups(groups, tp_group, pp_group):
    if groups is not None:
        return groups.tp_group, groups.pp_group
    return tp_group, pp_group


def _refuse_cp(gpt, what: str) -> None:
    if (gpt.config.context_parallel_size or 1) > 1:
        raise ValueError(f"model: {what} feeds full rows and is not wired under context parallelism (PP > 1); at "
                         "PP = 1 the actor runs saliency_pass.oar_g_sharded / oar_p_sharded with cp_group")


def _sp_tp(gpt) -> tuple[bool, int]:
    """(sequence parallel on with TP > 1, TP) from the config (a non-last stage has no output layer to ask)."""
    tp = gpt.config.tensor_model_parallel_size
    return bool(gpt.config.sequence_parallel) and tp > 1, tp


def _pad_len(gpt, length: int) -> int:
    return padded_length(gpt, length)  # TP under SP × the FP8 token multiple × 2·CP


def _pad_ids(ids: torch.Tensor, pos: torch.Tensor, length: int, pad_id: int = 0):
    """Right-pad ids with ``pad_id`` and continue the positions up to ``length``."""
    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, pos
    ids = F.pad(ids, (0, extra), value=pad_id)
    pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, extra + 1, device=pos.device)], 1)
    return ids, pos


def _row_micro_batches(n: int, size: int, device) -> list[tuple[torch.Tensor, int]]:
    """Rows 0..n−1 in micro-batches of exactly ``size`` (the last padded by repeating its last row): (rows, real)."""
    out = []
    for start in range(0, n, size):
        rows = torch.arange(start, min(start + size, n), device=device)
        real = rows.numel()
        out.append((F.pad(rows, (0, size - real), value=int(rows[-1])), real))
    return out


@contextlib.contextmanager
def _schedule_config(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """No grad scaling and no finalize_model_grads while a saliency pass drives the training schedule (the
    parameters are frozen, there are no gradients to scale or reduce); restored on exit."""
    configs = {id(c): c for c in (unwrap_model(m).config for m in chunks)}.values()
    saved = [(c, c.grad_scale_func, c.finalize_model_grads_func) for c in configs]
    for c, _, _ in saved:
        c.grad_scale_func = None
        c.finalize_model_grads_func = None
    try:
        yield
    finally:
        for c, scale, fin in saved:
            c.grad_scale_func = scale
            c.finalize_model_grads_func = fin


def _schedule_size(chunks, n: int) -> int:
    """How many micro-batches the schedule runs for ``n`` real ones: the interleaved (virtual-PP) schedule needs a
    multiple of ``microbatch_group_size_per_vp_stage`` (default PP); otherwise ``n``."""
    if len(chunks) == 1:
        return n
    cfg = unwrap_model(chunks[0]).config
    group = cfg.microbatch_group_size_per_vp_stage or cfg.pipeline_model_parallel_size
    return -(-n // group) * group


def _run_schedule(chunks, micro_batches: list, forward_step, *, forward_only: bool, seq_length: int,
                  micro_batch_size: int) -> list:
    """Megatron's schedule for this layout; returns the last stage's ``forward_data_store`` for ``micro_batches``.

    The interleaved (virtual-PP) schedule needs the micro-batch count to be a multiple of its group size
    (``microbatch_group_size_per_vp_stage``, default PP): the list is then padded with dummy copies of the last
    micro-batch (``real=0``, ``k`` < 0: they add nothing to J and their results are dropped).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n = len(micro_batches)
    mbs = list(micro_batches)
    mbs += [dict(mbs[-1], real=0, k=-1 - i) for i in range(_schedule_size(chunks, n) - n)]
    data = iter(mbs) if len(chunks) == 1 else [iter(mbs) for _ in chunks]
    count_schedule(forward_only)
    ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    with ctx:
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=len(mbs),
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)
    return store[:n]


def _call_chunk(model, ids, pos, decoder_input=None) -> torch.Tensor:
    """One chunk's forward; the last chunk returns final-norm hidden states instead of logits."""
    gpt = unwrap_model(model)
    ctx = _hidden_states_only(gpt) if gpt.post_process else contextlib.nullcontext()
    with ctx:
        return gpt(ids, pos, None, decoder_input=decoder_input)


def _forward_only(chunks, micro_batches: list[dict], on_last: Callable[[Any, torch.Tensor, dict], dict], *,
                  seq_length: int, micro_batch_size: int) -> list[dict]:
    """Forward-only schedule; ``on_last(gpt, hidden, mb)`` runs on the last stage per micro-batch and its dicts
    are returned there, in micro-batch order ([] on other stages)."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        hidden = _call_chunk(model, mb["ids"], mb["pos"])
        gpt = unwrap_model(model)

        def loss_func(output):
            return output.new_zeros(()), on_last(gpt, output, mb)

        return hidden, loss_func

    return _run_schedule(chunks, micro_batches, forward_step, forward_only=True, seq_length=seq_length,
                         micro_batch_size=micro_batch_size)


def _pp_info(pp_group) -> tuple[int, int]:
    return group_rank(pp_group), group_size(pp_group)


def _deliver(value: torch.Tensor | None, shape, dtype, device, *, src: int, pp_group, broadcast: bool,
             dst: int | None = None) -> torch.Tensor | None:
    """The stage-``src`` tensor on every PP rank (broadcast) or only on ``dst`` (p2p; None: stays on src)."""
    rank, size = _pp_info(pp_group)
    if size == 1:
        return value
    if broadcast:
        buf = value.contiguous() if rank == src else torch.empty(shape, dtype=dtype, device=device)
        return collectives.broadcast(buf, src=src, group=pp_group)
    if dst is None or dst == src:
        return value if rank == src else None
    if rank == src:
        collectives.send(value, dst=dst, group=pp_group)
        return None
    if rank == dst:
        return collectives.recv(torch.empty(shape, dtype=dtype, device=device), src=src, group=pp_group)
    return None


# --------------------------------------------------------------------------------------------- π_old log-probs


def pipeline_logprobs(
    chunks,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    groups=None,
    tp_group: ProcessGroup | None = None,
    pp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    seq_length: int,
    micro_batch_size: int,
    chunk_size: int | None = None,
    broadcast: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """Response log-probs (and entropy) of every micro-batch through megatron's forward-only pipeline schedule.

    chunks: this rank's model chunk(s). micro_batches: (input_ids, position_ids, response_mask) [b, L] each, as for
    ``forward.response_logprobs``, with b == ``micro_batch_size`` and L ≤ ``seq_length`` (right-padded here to
    ``seq_length``, which must be a multiple of TP under sequence parallel); the same list on every PP rank.
    groups: a ``ParallelGroups`` (else ``tp_group`` / ``pp_group``; None = size 1).

    Returns [(logp [b, L], entropy [b, L] or None)] per micro-batch, fp32, 0 off the response, equal to
    ``response_logprobs`` on the unpipelined model: on every PP rank with ``broadcast`` (module docstring), else on
    the last stage only (None elsewhere). No gradient.
    """
    tp_group, pp_group = _resolve_groups(groups, tp_group, pp_group)
    chunks = _chunk_list(chunks)
    check_int("seq_length", seq_length, minimum=1)
    check_int("micro_batch_size", micro_batch_size, minimum=1)
    first = unwrap_model(chunks[0])
    if _pad_len(first, seq_length) != seq_length:
        raise ValueError(f"seq_length: {seq_length} must be a multiple of {sequence_multiple(first)} (TP under "
                         "sequence parallel × the FP8 token multiple × 2·CP, policy.padding)")
    mbs, shapes = [], []
    for k, (ids, pos, mask) in enumerate(micro_batches):
        mask = _check_inputs(ids, pos, mask)
        if ids.shape[0] != micro_batch_size or ids.shape[1] > seq_length:
            raise ValueError(f"micro_batches[{k}]: shape {tuple(ids.shape)}, expected [{micro_batch_size}, L ≤ "
                             f"{seq_length}]")
        p_ids, p_pos = _pad_ids(ids, pos, seq_length)
        mbs.append(dict(ids=p_ids, pos=p_pos, tgt=ids, mask=mask))
        shapes.append(tuple(ids.shape))
    if not mbs:
        raise ValueError("micro_batches: empty")

    def on_last(gpt, hidden, mb):
        logp, ent = logprobs_from_hidden(gpt, hidden, mb["tgt"], mb["mask"], tp_group=tp_group,
                                         temperature=temperature, compute_entropy=compute_entropy,
                                         chunk_size=chunk_size)
        return {"logp": logp, "ent": ent} if ent is not None else {"logp": logp}

    store = _forward_only(chunks, mbs, on_last, seq_length=seq_length, micro_batch_size=micro_batch_size)
    rank, size = _pp_info(pp_group)
    last = size - 1
    dev = mbs[0]["ids"].device
    # All micro-batches as one flat fp32 buffer: [logp | ent] of each, in order (one broadcast).
    numel = sum(b * length for b, length in shapes) * (2 if compute_entropy else 1)
    flat = None
    if rank == last:
        parts = []
        for d in store:
            parts.append(d["logp"].float().reshape(-1))
            if compute_entropy:
                parts.append(d["ent"].float().reshape(-1))
        flat = torch.cat(parts)
    flat = _deliver(flat, (numel,), torch.float32, dev, src=last, pp_group=pp_group, broadcast=broadcast)
    if flat is None:
        return None
    out, off = [], 0
    for b, length in shapes:
        n = b * length
        logp = flat[off : off + n].view(b, length)
        off += n
        ent = None
        if compute_entropy:
            ent = flat[off : off + n].view(b, length)
            off += n
        out.append((logp, ent))
    return out


# ------------------------------------------------------------------------------------------ shared clean pass


class PipelineCleanPass(NamedTuple):
    """reference: {mode: clean P_final [B, V/TP] logits or φ [B]} of every scoring row, for ``pipeline_oar_g`` /
    ``pipeline_oar_p`` (``reference=``); logprobs: [(logp [b, L], entropy [b, L] or None)] per rollout micro-batch,
    as ``pipeline_logprobs``. Both on the last pipeline stage; None on the others."""

    reference: dict[str, torch.Tensor] | None
    logprobs: list[tuple[torch.Tensor, torch.Tensor | None]] | None


@torch.no_grad()
def pipeline_clean_pass(
    chunks,
    batch: ScoringBatch,
    rollout: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    groups=None,
    tp_group: ProcessGroup | None = None,
    pp_group: ProcessGroup | None = None,
    modes: Sequence[str] = ("answer_mean",),
    micro_batch_size: int,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    cp_group: ProcessGroup | None = None,
) -> PipelineCleanPass:
    """One forward-only schedule for π_old log-probs and the clean P_final of OAR-G / OAR-P (module docstring).

    rollout: (input_ids, position_ids, response_mask) [b, L_r] micro-batches with b == ``micro_batch_size``, as for
    ``pipeline_logprobs`` (may be empty: P_final only); batch: the B scoring rows, run after them in micro-batches
    of ``micro_batch_size`` rows (the last padded with repeated rows, dropped). Every micro-batch is right-padded to
    S = max(L_r, L_scoring) (a multiple of TP under SP): right padding under the causal mask changes no row.
    temperature / compute_entropy / chunk_size apply to the log-probs; P_final uses T = 1. The same arguments on
    every PP rank; results on the last stage (``PipelineCleanPass``). Equal to ``pipeline_logprobs`` plus the clean
    schedule ``pipeline_oar_g`` / ``pipeline_oar_p`` run without ``reference``.

    Context parallel (``cp_group``, or ``groups`` with cp > 1; Transformer Engine attention, PP = 1): every
    micro-batch is fed as this rank's zigzag chunks with their positions, the rollout rows through
    ``forward.cp_view`` / ``cp_logprobs`` (labels shifted before the split, log-probs gathered with
    ``gather_zigzag``) as the actor's own passes, the scoring rows with P_final summed over the CP ranks holding
    its positions (``saliency_pass.pfinal_from_hidden``); results identical on every CP rank.
    """
    if groups is not None:
        cp_group = groups.cp_group if groups.cp > 1 else None
    tp_group, pp_group = _resolve_groups(groups, tp_group, pp_group)
    chunks = _chunk_list(chunks)
    modes = list(dict.fromkeys(modes))
    if not modes:
        raise ValueError("modes: expected at least one P_final mode")
    for m in modes:
        check_choice("modes", m, PFINAL_MODES)
    _check_batch(batch, modes[0], None)
    check_int("micro_batch_size", micro_batch_size, minimum=1)
    b, s_len = batch.input_ids.shape
    dev = batch.input_ids.device
    r_len = max((ids.shape[1] for ids, _, _ in rollout), default=0)
    first = unwrap_model(chunks[0])
    seq = _pad_len(first, max(s_len, r_len))
    cp = group_size(cp_group)
    if cp > 1 and (len(chunks) > 1 or not (first.pre_process and first.post_process)):
        raise ValueError("cp_group: the clean pass under context parallelism is wired for PP = 1")
    mbs = []
    for k, (ids, pos, mask) in enumerate(rollout):
        mask = _check_inputs(ids, pos, mask)
        if ids.shape[0] != micro_batch_size:
            raise ValueError(f"rollout[{k}]: {ids.shape[0]} rows, expected micro_batch_size={micro_batch_size}")
        if cp > 1:  # the actor's CP rows (positions 0..seq−1, as the actor's own passes feed)
            view = cp_view(ids, mask, seq, cp, group_rank(cp_group))
            mbs.append(dict(kind=0, ids=view.input_ids, pos=view.position_ids, view=view, tgt=ids, mask=mask))
            continue
        p_ids, p_pos = _pad_ids(ids, pos, seq)
        mbs.append(dict(kind=0, ids=p_ids, pos=p_pos, tgt=ids, mask=mask))
    n_roll = len(mbs)
    s_ids = F.pad(batch.input_ids, (0, seq - s_len), value=batch.pad_id)
    s_pos = torch.arange(seq, device=dev).expand(b, seq)
    s_ids, s_pos = cp_feed(first, s_ids, s_pos, cp_group)  # CP: this rank's zigzag chunks of every row
    row_mbs = _row_micro_batches(b, micro_batch_size, dev)
    mbs += [dict(kind=1, ids=s_ids[r], pos=s_pos[r], rows=r, real=real) for r, real in row_mbs]
    if not mbs:
        raise ValueError("rollout/batch: nothing to run")
    apos, alen = batch.answer_pos, batch.answer_len

    def on_last(gpt, hidden, mb):
        if mb["kind"] == 0:
            opts = dict(tp_group=tp_group, temperature=temperature, compute_entropy=compute_entropy,
                        chunk_size=chunk_size)
            if "view" in mb:
                gather = lambda x: gather_zigzag(x, cp_group, dim=1)  # noqa: E731
                logp, ent = cp_logprobs(gpt, hidden, mb["view"], gather, mb["tgt"].shape[1], **opts)
            else:
                logp, ent = logprobs_from_hidden(gpt, hidden, mb["tgt"], mb["mask"], **opts)
            return {"logp": logp, "ent": ent} if ent is not None else {"logp": logp}
        r = mb["rows"]
        return {m: pfinal_from_hidden(gpt, hidden, batch.input_ids[r], apos[r], alen[r], m, tp_group=tp_group,
                                      cp_group=cp_group)
                for m in modes}

    store = _forward_only(chunks, mbs, on_last, seq_length=seq, micro_batch_size=micro_batch_size)
    if not store:
        return PipelineCleanPass(None, None)
    logprobs = [(d["logp"], d.get("ent")) for d in store[:n_roll]]
    scoring = list(zip(store[n_roll:], mbs[n_roll:]))
    reference = {m: torch.cat([d[m][: mb["real"]] for d, mb in scoring], 0) for m in modes} if b else {}
    return PipelineCleanPass(reference, logprobs)


# ------------------------------------------------------------------------------------------------------ OAR-G


def _clean_reference(chunks, ids, pos, batch_rows, apos, alen, mode, tp_group, micro_batch_size, seq_length):
    """Clean P_final of every row through the forward-only schedule: [B, ...] on the last stage, None elsewhere."""
    mbs = [dict(ids=ids[r], pos=pos[r], rows=r, real=real) for r, real in batch_rows]

    def on_last(gpt, hidden, mb):
        r = mb["rows"]
        return {"ref": pfinal_from_hidden(gpt, hidden, ids[r], apos[r], alen[r], mode, tp_group=tp_group)}

    store = _forward_only(chunks, mbs, on_last, seq_length=seq_length, micro_batch_size=micro_batch_size)
    if not store:
        return None
    return torch.cat([d["ref"][:mb["real"]] for d, mb in zip(store, mbs)], 0)


def pipeline_oar_g(
    chunks,
    batch: ScoringBatch,
    *,
    groups=None,
    tp_group: ProcessGroup | None = None,
    pp_group: ProcessGroup | None = None,
    mode: str = "answer_mean",
    noise_std: float = 1e-3,
    seed: int | Sequence[int] = 0,
    width: int | None = None,
    micro_batch_size: int | None = None,
    reference: torch.Tensor | None = None,
    broadcast: bool = True,
) -> Saliency | None:
    """OAR-G through megatron's forward-backward pipeline schedule; equal to ``saliency_pass.oar_g_sharded`` (and
    so to ``algorithms.oar_g_saliency``) with ``chunk_size = micro_batch_size``.

    The scoring rows run in micro-batches of ``micro_batch_size`` (default: all rows in one), right-padded to one
    length. Per micro-batch: the first stage takes e = embedding(ids).detach() as a leaf requiring grad and feeds
    ``decoder_input = e + ξ`` (same seeds and noise as ``oar_g_sharded``, the local slice under SP); the last
    stage's loss function returns J · num_microbatches (cancelling the schedule's 1/num_microbatches) with J =
    Σ_{real rows} KL(P0 ‖ P) / (φ0 − φ); the parameters of every chunk are frozen for the duration, so the
    schedule's backward writes only e.grad. Then s_t = |Σ_h g·e| on the first stage.

    reference: the clean P_final [B, ...] (``clean_pass`` layout). Only the last stage reads it, but pass it (any
    non-None value on the other stages) or None on every PP rank alike: None runs one more forward-only schedule
    for it. Returns Saliency(scores [B, W], mask [B, W]) on every PP rank with ``broadcast``, else on the last
    stage only (None elsewhere; the first stage sends its scores there).
    """
    from megatron.core import parallel_state

    tp_group, pp_group = _resolve_groups(groups, tp_group, pp_group)
    chunks = _chunk_list(chunks)
    width = _check_batch(batch, mode, width)
    noise_std = check_positive("noise_std", noise_std, allow_zero=True)
    if noise_std == 0 and mode != "answer_joint":
        raise ValueError(f"noise_std: must be > 0 in mode {mode!r} (the KL gradient is exactly 0 at the clean point)")
    b, length = batch.input_ids.shape
    mbs_size = b if micro_batch_size is None else check_int("micro_batch_size", micro_batch_size, minimum=1)
    mbs_size = max(mbs_size, 1)
    rank, size = _pp_info(pp_group)
    last = size - 1
    if rank == last and reference is not None:
        _check_reference(reference, b)
    dev = batch.input_ids.device
    seeds = _sample_seeds(seed, b)
    r_max = int(batch.reasoning_len.max()) if b else 0
    out = torch.zeros(b, max(r_max, 1), dtype=torch.float32, device=dev)
    if b == 0:
        return _to_width(out, batch.reasoning_len, width)
    first_gpt = unwrap_model(chunks[0])
    _refuse_cp(first_gpt, "pipeline_oar_g")
    seq = _pad_len(first_gpt, length)
    ids = F.pad(batch.input_ids, (0, seq - length), value=batch.pad_id)
    pos = torch.arange(seq, device=dev).expand(b, seq)
    apos, alen = batch.answer_pos, batch.answer_len
    start, rlen = batch.reasoning_start, batch.reasoning_len
    has_answer = alen > 0
    sp, tp = _sp_tp(first_gpt)
    tp_rank = group_rank(tp_group)
    kl_fn = _divergence_fn(tp_group)
    row_mbs = _row_micro_batches(b, mbs_size, dev)
    if reference is None:
        reference = _clean_reference(chunks, ids, pos, row_mbs, apos, alen, mode, tp_group, mbs_size, seq)
    n_mb = _schedule_size(chunks, len(row_mbs))  # the schedule divides J by this count, dummies included
    cp = parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    leaves: dict[int, torch.Tensor] = {}
    mbs = [dict(k=k, ids=ids[r], pos=pos[r], rows=r, real=real) for k, (r, real) in enumerate(row_mbs)]

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        gpt = unwrap_model(model)
        r, real = mb["rows"], mb["real"]
        decoder_input = None
        if gpt.pre_process:
            e = gpt.embedding(input_ids=mb["ids"], position_ids=mb["pos"]).detach().requires_grad_(True)
            leaves[mb["k"]] = e
            s0 = tp_rank * e.shape[0] if sp else 0
            real_rows = r[:real]  # padding rows repeat a real one and get no noise
            noise = reasoning_noise(e, [seeds[int(x)] for x in real_rows], start[real_rows], rlen[real_rows],
                                    noise_std, s0)
            decoder_input = e + noise
        hidden = _call_chunk(model, mb["ids"], mb["pos"], decoder_input)

        def loss_func(output):
            cur = pfinal_from_hidden(gpt, output, batch.input_ids[r], apos[r], alen[r], mode, tp_group=tp_group)
            j = _divergence(reference[r], cur, mode, kl_fn)[:real].sum()
            j = j + 0.0 * output.sum()  # keep a graph even when no row reads P_final (J constant, gradient 0)
            return j * n_mb / cp, {}

        return hidden, loss_func

    with torch.enable_grad(), contextlib.ExitStack() as stack:
        for c in chunks:
            stack.enter_context(_frozen_parameters(unwrap_model(c)))
        stack.enter_context(_schedule_config(chunks))
        _run_schedule(chunks, mbs, forward_step, forward_only=False, seq_length=seq, micro_batch_size=mbs_size)

    if rank == 0:
        k_idx = torch.arange(max(r_max, 1), device=dev)[None, :]
        for mb in mbs:
            e = leaves[mb["k"]]
            grad = e.grad if e.grad is not None else torch.zeros_like(e)
            sal = grad_times_input(e, grad, sp=sp, tp_group=tp_group)  # [n, S]
            r, real = mb["rows"][: mb["real"]], mb["real"]
            picked = sal[:real].gather(1, (start[r][:, None] + k_idx).clamp(max=length - 1))
            if mode != "last":
                picked = torch.where(has_answer[r][:, None], picked, 0.0)
            out[r] = picked
    leaves.clear()
    got = _deliver(out if rank == 0 else None, tuple(out.shape), torch.float32, dev, src=0, pp_group=pp_group,
                   broadcast=broadcast, dst=last)
    if got is None:
        return None
    return _to_width(got, batch.reasoning_len, width)


# ------------------------------------------------------------------------------------------------------ OAR-P


def pipeline_oar_p(
    chunks,
    batch: ScoringBatch,
    *,
    groups=None,
    tp_group: ProcessGroup | None = None,
    pp_group: ProcessGroup | None = None,
    mode: str = "last",
    chunk_size: int = 32,
    width: int | None = None,
    reference: torch.Tensor | None = None,
    broadcast: bool = True,
) -> Saliency | None:
    """OAR-P through megatron's forward-only pipeline schedule; equal to ``saliency_pass.oar_p_sharded``.

    The Σ_b R_b pad-replacement copies run as micro-batches of ``chunk_size`` copies (the last padded with repeated
    copies, dropped), each right-padded to one length; the last stage computes KL(P ‖ Q_j) (φ − φ_j) per copy.
    ``reference`` as for ``pipeline_oar_g`` (None: one more forward-only schedule over the B clean rows, in
    micro-batches of ``chunk_size`` rows). Returns Saliency on every PP rank with ``broadcast``, else on the last
    stage only.
    """
    tp_group, pp_group = _resolve_groups(groups, tp_group, pp_group)
    chunks = _chunk_list(chunks)
    width = _check_batch(batch, mode, width)
    check_int("chunk_size", chunk_size, minimum=1)
    b = batch.batch_size
    rank, size = _pp_info(pp_group)
    last = size - 1
    if rank == last and reference is not None:
        _check_reference(reference, b)
    dev = batch.input_ids.device
    out, total = score_buffer(batch)
    if total == 0:
        return _to_width(out, batch.reasoning_len, width)
    ids = batch.input_ids[:, : int(batch.answer_pos.max())] if mode == "last" else batch.input_ids
    apos, alen = batch.answer_pos, batch.answer_len
    first_gpt = unwrap_model(chunks[0])
    _refuse_cp(first_gpt, "pipeline_oar_p")
    seq = _pad_len(first_gpt, ids.shape[1])
    p_ids = F.pad(ids, (0, seq - ids.shape[1]), value=batch.pad_id)
    pos = torch.arange(seq, device=dev).expand(b, seq)
    kl_fn = _divergence_fn(tp_group)
    if reference is None:
        reference = _clean_reference(chunks, p_ids, pos, _row_micro_batches(b, chunk_size, dev), apos, alen, mode,
                                     tp_group, chunk_size, seq)

    row, j = perturbation_index(batch)  # [N]: copy c perturbs reasoning token j_c of row_c
    x = perturbed_ids(ids, batch, row, j)  # [N, L]
    x_pad = F.pad(x, (0, seq - x.shape[1]), value=batch.pad_id)
    mbs = [dict(ids=x_pad[c], pos=pos[:1].expand(chunk_size, seq), copies=c, real=real)
           for c, real in _row_micro_batches(total, chunk_size, dev)]

    def on_last(gpt, hidden, mb):
        r = row[mb["copies"]]
        cur = pfinal_from_hidden(gpt, hidden, x[mb["copies"]], apos[r], alen[r], mode, tp_group=tp_group)
        return {"s": _divergence(reference[r], cur, mode, kl_fn)}

    store = _forward_only(chunks, mbs, on_last, seq_length=seq, micro_batch_size=chunk_size)
    scores = None
    if rank == last:
        scores = torch.cat([d["s"][: mb["real"]] for d, mb in zip(store, mbs)]).float()
        if mode != "last":
            scores = torch.where(alen[row] > 0, scores, 0.0)
    scores = _deliver(scores, (total,), torch.float32, dev, src=last, pp_group=pp_group, broadcast=broadcast)
    if scores is None:
        return None
    out[row, j] = scores
    return _to_width(out, batch.reasoning_len, width)
