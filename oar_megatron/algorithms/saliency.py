"""OAR per-token saliency of the reasoning tokens: OAR-G (input gradient) and OAR-P (counterfactual perturbation).

ALGORITHMS.md §1.3 (what the authors' code does), §1.8 (cost), §5.2-§5.5 (decisions). Both work against any model
given as two callables:

    embed(input_ids [N, L] long) -> inputs_embeds [N, L, H]
    forward(inputs_embeds [N, L, H], attention_mask [N, L] bool) -> logits [N, L, V]

(for an HF model: ``embed = model.get_input_embeddings()``, ``forward = lambda e, m: model(inputs_embeds=e,
attention_mask=m.long()).logits``). ``forward`` must be a causal LM whose rows are independent, in eval mode (no
dropout). The sequences are a ``ScoringBatch`` (``segment.py``): ``prompt | reasoning | conclude | answer``,
right-padded.

P_final, the final-answer distribution (§1.3), per ``mode``:

- ``last``          next-token logits at answer_pos − 1, the last conclude token: the distribution of the first
                    answer token (the README's choice for OAR-P).
- ``answer_mean``   mean of the logits over the positions that predict the answer tokens (answer_pos − 1 + k,
                    k < A), then softmax (the README's choice for OAR-G).
- ``answer_joint``  φ = mean_k log p(answer_k | ·), a scalar.

Divergence: KL(P ‖ Q) = Σ_v P_v (log P_v − log Q_v) (``last``, ``answer_mean``), or φ_ref − φ (``answer_joint``,
signed). Rows without answer tokens get score 0 in the answer modes (so ``oar_weights`` gives them w = 1).

Both return ``Saliency(scores, mask)``: [B, W] float32 raw scores and bool mask, column k = reasoning token k =
response position k (the reasoning is a prefix of the response), W = ``width`` if given (pass the response length
T to get [B, T] tensors ready for ``oar_weights``) else max R. Compute them once per rollout batch with the
rollout policy π_old (§5.5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._validate import check_choice, check_int, check_positive
from .segment import ScoringBatch

PFINAL_MODES = ("last", "answer_mean", "answer_joint")

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Saliency(NamedTuple):
    """scores: [B, W] float32 raw saliency at reasoning positions (0 elsewhere); mask: [B, W] bool, True for
    k < R_b. Feed both to ``oar_weights`` / ``shape_advantages("oar", scores=..., score_mask=...)``."""

    scores: torch.Tensor
    mask: torch.Tensor


def local_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) [...] = Σ_v P_v (log P_v − log Q_v) with P = softmax(p_logits), Q = softmax(q_logits) over the
    last dim, in float32 (float64 for float64 input); differentiable. The single-rank default of ``kl_fn``; pass
    ``functools.partial(vocab_parallel_kl, tp_group=...)`` for vocab-sharded logits."""
    dt = torch.float64 if torch.float64 in (p_logits.dtype, q_logits.dtype) else torch.float32
    logp = F.log_softmax(p_logits.to(dt), dim=-1)
    logq = F.log_softmax(q_logits.to(dt), dim=-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(dim=-1)


# ------------------------------------------------------------------------------------------------- helpers


def check_scoring_batch(batch: ScoringBatch, mode: str, width: int | None) -> int:
    """Validate a scoring batch, a P_final mode and an output width; returns the width (default: the longest
    reasoning). Shared by the single-process functions here and the sharded passes in ``policy.saliency_pass``."""
    if not isinstance(batch, ScoringBatch):
        raise ValueError(f"batch: expected a ScoringBatch (segment.build_scoring_batch), got {type(batch).__name__}")
    check_choice("mode", mode, PFINAL_MODES)
    r_max = int(batch.reasoning_len.max()) if batch.batch_size else 0
    if width is None:
        return r_max
    check_int("width", width, minimum=0)
    if width < r_max:
        raise ValueError(f"width: {width} is shorter than the longest reasoning ({r_max} tokens)")
    return width


def _check_common(batch: ScoringBatch, mode: str, width: int | None, kl_fn: KLFn | None, embed, forward) -> int:
    width = check_scoring_batch(batch, mode, width)
    if not callable(embed):
        raise ValueError("embed: expected a callable ids [N, L] -> embeddings [N, L, H]")
    if not callable(forward):
        raise ValueError("forward: expected a callable (embeddings [N, L, H], attention_mask [N, L]) -> logits")
    if kl_fn is not None and not callable(kl_fn):
        raise ValueError("kl_fn: expected a callable (p_logits, q_logits) -> KL")
    return width


def _pfinal(logits: torch.Tensor, ids: torch.Tensor, answer_pos: torch.Tensor, answer_len: torch.Tensor, mode: str):
    """P_final of each row from logits [N, L, V]: logits [N, V] (last, answer_mean) or φ [N] (answer_joint),
    in float32 (float64 for float64 logits)."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n, length, _ = logits.shape
    rows = torch.arange(n, device=logits.device)
    if mode == "last":
        return logits[rows, answer_pos - 1].to(dt)
    a_max = max(int(answer_len.max()), 1) if n else 1
    k = torch.arange(a_max, device=logits.device)[None, :]  # [1, A]
    valid = k < answer_len[:, None]  # [N, A]
    pred = (answer_pos[:, None] - 1 + k).clamp(max=length - 1)  # positions predicting answer token k
    sel = logits[rows[:, None], pred].to(dt)  # [N, A, V]
    count = valid.sum(dim=-1).clamp(min=1).to(dt)  # [N]
    if mode == "answer_mean":
        return torch.where(valid[..., None], sel, 0.0).sum(dim=1) / count[:, None]
    target = ids[rows[:, None], (pred + 1).clamp(max=length - 1)]  # [N, A] the answer tokens
    tok_ll = F.log_softmax(sel, dim=-1).gather(-1, target[..., None]).squeeze(-1)  # [N, A]
    return torch.where(valid, tok_ll, 0.0).sum(dim=-1) / count


def _divergence(ref, out, mode: str, kl_fn: KLFn | None) -> torch.Tensor:
    """KL(P_ref ‖ P_out) for logits, φ_ref − φ_out for answer_joint; [N]."""
    if mode == "answer_joint":
        return ref - out
    return (kl_fn or local_kl)(ref, out).to(ref.dtype)


def _sample_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + i for i in range(batch)]
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
    if not isinstance(seed, Sequence) or len(seed) != batch:
        raise ValueError(f"seed: expected an int or {batch} ints (one per response), got {seed!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
        raise ValueError(f"seed: expected ints, got {seed!r}")
    return list(seed)


def _to_width(scores: torch.Tensor, reasoning_len: torch.Tensor, width: int) -> Saliency:
    cur = scores.shape[1]
    if cur < width:
        scores = F.pad(scores, (0, width - cur))
    scores = scores[:, :width]
    mask = torch.arange(width, device=scores.device)[None, :] < reasoning_len[:, None].to(scores.device)
    return Saliency(torch.where(mask, scores, 0.0).float(), mask)


def score_buffer(batch: ScoringBatch) -> tuple[torch.Tensor, int]:
    """Zero raw scores [B, max(R_max, 1)] float32 and N = Σ_b R_b, the number of OAR-P counterfactual copies."""
    b = batch.batch_size
    r_max = int(batch.reasoning_len.max()) if b else 0
    out = torch.zeros(b, max(r_max, 1), dtype=torch.float32, device=batch.input_ids.device)
    return out, int(batch.reasoning_len.sum()) if b else 0


def perturbation_index(batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(row [N], j [N]) of the N = Σ_b R_b OAR-P counterfactual copies, flattened over the batch: copy c
    perturbs reasoning token j_c of response row_c (§1.3 OAR-P)."""
    dev = batch.input_ids.device
    row = torch.repeat_interleave(torch.arange(batch.batch_size, device=dev), batch.reasoning_len)
    first = torch.cumsum(batch.reasoning_len, 0) - batch.reasoning_len  # [B] first copy of each response
    return row, torch.arange(row.numel(), device=dev) - first[row]


def perturbed_ids(ids: torch.Tensor, batch: ScoringBatch, row: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """ids[row] [n, L] with reasoning token j of each copy replaced by ``batch.pad_id``, kept attended (§5.3)."""
    x = ids[row].clone()
    x[torch.arange(x.shape[0], device=x.device), batch.reasoning_start[row] + j] = batch.pad_id
    return x


def _chunks(n: int, size: int | None) -> list[slice]:
    size = n if not size else size
    return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


# --------------------------------------------------------------------------------------------------- OAR-G


def oar_g_saliency(
    embed: EmbedFn,
    forward: ForwardFn,
    batch: ScoringBatch,
    *,
    mode: str = "answer_mean",
    noise_std: float = 1e-3,
    seed: int | Sequence[int] = 0,
    width: int | None = None,
    chunk_size: int | None = None,
    kl_fn: KLFn | None = None,
) -> Saliency:
    """OAR-G: noisy-KL input-gradient saliency (ALGORITHMS.md §1.3 OAR-G, §5.4).

    Per response, on ``prompt | reasoning | conclude | answer``:

        1. target: clean forward under no_grad → P0 (``last``/``answer_mean`` logits) or φ0 (``answer_joint``);
        2. e = embed(ids).detach().requires_grad_(): a leaf, so no parameter enters the gradient;
        3. ξ ~ N(0, σ²) at the reasoning positions only, σ = ``noise_std`` (1e-3; 0 allowed for answer_joint,
           whose gradient is non-zero without noise). Sample b draws ξ_b = σ·randn(R_b, H) from
           ``torch.Generator().manual_seed(seed_b)`` on CPU, so its noise does not depend on batch composition;
        4. J = Σ_b KL(P0_b ‖ P_b(e + ξ)) or Σ_b (φ0_b − φ_b(e + ξ)); rows are independent, so ∂J/∂e_b is the
           gradient of sample b's own J_b;
        5. g = torch.autograd.grad(J, e): the gradient at the noisy point e + ξ, with respect to the clean leaf e.
           ``.grad`` of the parameters is never read or written (unlike the authors' ``zero_grad(); backward()``);
        6. s_t = |Σ_h g_{t,h} · e_{t,h}| (gradient × input, not an L2 norm), e the CLEAN embedding, as in the
           authors' code (their leaf ``inputs_embeds`` is clean and the noise is added after it). The noisy
           embedding would differ by O(σ/|e|).

    Why the noise: KL(P0 ‖ P(e)) is minimal at e, so its gradient there is exactly 0; at e + ξ it is about
    Hessian·ξ, tiny, which the min-max normalisation of ``oar_weights`` makes irrelevant (§1.3 [I]). ``last`` reads
    the distribution of the first answer token (answer_pos − 1) as §1.3 defines it and OAR-P does, even when
    answer tokens follow (the authors' OAR-G reads the sequence's literal last position, after the answer).

    Args:
        embed, forward: the model (module docstring).
        batch: ScoringBatch (with answers for ``answer_mean`` / ``answer_joint``).
        mode: P_final mode; default ``answer_mean`` (README).
        noise_std: σ ≥ 0.
        seed: int (sample b uses seed + b) or B ints (e.g. derived from rollout ids, for reproducible scores).
        width: output columns (≥ max R), e.g. the response length T; default max R.
        chunk_size: responses per forward/backward (memory bound); None = all at once. Results do not depend on it.
        kl_fn: (p_logits [N, V], q_logits [N, V]) -> KL [N], differentiable in q; default ``local_kl``.
    Returns:
        Saliency(scores [B, W] ≥ 0, mask [B, W]).
    """
    width = _check_common(batch, mode, width, kl_fn, embed, forward)
    noise_std = check_positive("noise_std", noise_std, allow_zero=True)
    if noise_std == 0 and mode != "answer_joint":
        raise ValueError(f"noise_std: must be > 0 in mode {mode!r} (the KL gradient is exactly 0 at the clean point)")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    b, length = batch.input_ids.shape
    dev = batch.input_ids.device
    seeds = _sample_seeds(seed, b)
    r_max = int(batch.reasoning_len.max()) if b else 0
    out = torch.zeros(b, max(r_max, 1), dtype=torch.float32, device=dev)
    has_answer = batch.answer_len > 0

    for rows in _chunks(b, chunk_size):
        ids = batch.input_ids[rows]
        att = batch.attention_mask[rows]
        apos, alen = batch.answer_pos[rows], batch.answer_len[rows]
        start, rlen = batch.reasoning_start[rows], batch.reasoning_len[rows]
        with torch.no_grad():
            ref = _pfinal(forward(embed(ids), att), ids, apos, alen, mode).detach()

        with torch.enable_grad():
            e = embed(ids).detach().requires_grad_(True)  # [n, L, H] clean leaf
            noise = torch.zeros_like(e)
            if noise_std > 0:
                for i, s in enumerate(seeds[rows]):
                    r, p0 = int(rlen[i]), int(start[i])
                    if r:
                        gen = torch.Generator().manual_seed(s)
                        xi = torch.randn(r, e.shape[-1], generator=gen, dtype=torch.float32) * noise_std
                        noise[i, p0 : p0 + r] = xi.to(dtype=e.dtype, device=e.device)
            cur = _pfinal(forward(e + noise, att), ids, apos, alen, mode)
            j = _divergence(ref, cur, mode, kl_fn)  # [n]
            (grad,) = torch.autograd.grad(j.sum(), e)  # never touches parameter .grad

        sal = (grad.float() * e.detach().float()).sum(dim=-1).abs()  # [n, L]
        k = torch.arange(max(r_max, 1), device=dev)[None, :]
        pos = (start[:, None] + k).clamp(max=length - 1)
        picked = sal.gather(1, pos)  # [n, R_max]: column k = reasoning token k
        if mode != "last":
            picked = torch.where(has_answer[rows][:, None], picked, 0.0)
        out[rows] = picked
    return _to_width(out, batch.reasoning_len, width)


# --------------------------------------------------------------------------------------------------- OAR-P


def oar_p_saliency(
    embed: EmbedFn,
    forward: ForwardFn,
    batch: ScoringBatch,
    *,
    mode: str = "last",
    chunk_size: int = 32,
    width: int | None = None,
    kl_fn: KLFn | None = None,
) -> Saliency:
    """OAR-P: pad-replacement counterfactual saliency (ALGORITHMS.md §1.3 OAR-P, §5.3, §5.9).

    For response b and each reasoning position j < R_b, the copy with reasoning token j replaced by ``pad_id``
    (kept attended, §5.3) is scored against the unperturbed sequence:

        I_j = KL(P ‖ Q_j)            (``last``, ``answer_mean``; ≥ 0)
        I_j = φ_orig − φ_masked_j    (``answer_joint``; signed)

    In ``last`` mode the copies are ``prompt | reasoning(j → pad) | conclude`` (answer tokens cut off and
    unattended, as in the authors' code); the answer modes keep the answer tokens, which they read. All Σ_b R_b
    copies of the batch are flattened and run under no_grad in chunks of ``chunk_size``, every chunk padded to the
    same length, so the scores do not depend on the chunk size. Cost: Σ_b R_b forwards of length ≤ L (§1.8).

    Args:
        embed, forward: the model (module docstring).
        batch: ScoringBatch.
        mode: P_final mode; default ``last`` (README).
        chunk_size: perturbed copies per forward (§5.9: 32-64).
        width: output columns (≥ max R), e.g. the response length T; default max R.
        kl_fn: (p_logits [N, V], q_logits [N, V]) -> KL [N]; default ``local_kl``.
    Returns:
        Saliency(scores [B, W], mask [B, W]).
    """
    width = _check_common(batch, mode, width, kl_fn, embed, forward)
    check_int("chunk_size", chunk_size, minimum=1)
    dev = batch.input_ids.device
    out, total = score_buffer(batch)
    if total == 0:
        return _to_width(out, batch.reasoning_len, width)

    if mode == "last":  # only the prefix up to the last conclude token matters
        length = int(batch.answer_pos.max())
        col = torch.arange(length, device=dev)[None, :]
        ids = batch.input_ids[:, :length]
        att = batch.attention_mask[:, :length] & (col < batch.answer_pos[:, None])
    else:
        ids, att = batch.input_ids, batch.attention_mask

    with torch.no_grad():
        ref = _pfinal(forward(embed(ids), att), ids, batch.answer_pos, batch.answer_len, mode)

        row, j = perturbation_index(batch)  # [N] each
        scores = torch.empty(total, dtype=ref.dtype, device=dev)
        for c in _chunks(total, chunk_size):
            r = row[c]
            x = perturbed_ids(ids, batch, r, j[c])  # [n, L]
            cur = _pfinal(forward(embed(x), att[r]), x, batch.answer_pos[r], batch.answer_len[r], mode)
            scores[c] = _divergence(ref[r], cur, mode, kl_fn)
        if mode != "last":
            scores = torch.where(batch.answer_len[row] > 0, scores, 0.0)
        out[row, j] = scores.float()
    return _to_width(out, batch.reasoning_len, width)
