"""Fused vocab-parallel log-prob, entropy and KL over a tensor-parallel group, without gathering logits.

Shapes: the logits of one rank are ``[..., V/TP]``, the contiguous vocabulary slice ``[r·Vs, (r+1)·Vs)`` of rank
``r`` in ``tp_group`` (Vs = V/TP, Megatron's vocab-parallel output layer); ``target`` ``[...]`` holds global token
ids. Below, rows are flattened to ``N`` and z = logits / T (the sampler's temperature, applied before the softmax).

Per row, with m = max_v z_v (MAX all-reduce), u = z − m, S = Σ_v e^{u_v} and D = Σ_v e^{u_v}·u_v (SUM all-reduces):

    log p(y) = u_y − log S                        (u_y: SUM all-reduce of the target logit, 0 off this rank's slice)
    H        = log S − D/S  = lse − Σ_v p_v z_v    (both terms ≥ 0: no cancellation)
    KL(P‖Q)  = D_PQ/S_P − log S_P + log S_Q,       D_PQ = Σ_v e^{u^P_v}·(u^P_v − u^Q_v)

Gradients (hand-written, checked against autograd), per row, with g the incoming gradient:

    ∂/∂logits_j [g_lp·log p(y) + g_H·H] = (g_lp·(1[j=y] − p_j) − g_H·p_j·(log p_j + H)) / T
    ∂KL/∂p_logits_j = P_j·(log P_j − log Q_j − KL) / T,     ∂KL/∂q_logits_j = (Q_j − P_j) / T

Memory (the reason this module exists: fp32 [T, V] logits are the first OOM in RL trainers). Nothing of size
[N, Vs] is saved between forward and backward: only the logits the caller already holds and a few [N] row
statistics (max, S, H). Backward recomputes the softmax from the logits. Every op is in place on scratch operands
of [rows, Vs]; when a step needs two or three at once (the entropy, KL), rows are processed in blocks of ⌈k/2⌉ or
⌈k/3⌉, so the scratch never exceeds one [k, Vs] buffer in the compute dtype, k = ``chunk_size`` or N. For fp32
logits the returned gradient's own slice serves as one operand. So the peak extra memory, beyond the inputs and
the returned gradient, is one [N, Vs] buffer (one [k, Vs] with ``chunk_size=k``). Cost: one exp pass more than
a kernel that saves the softmax (and a scratch allocation per call on CPU, where there is no caching allocator).

Compute dtype: fp32 for bf16/fp16/fp32 logits (fp64 for fp64 logits, used by the tests); outputs are in the
compute dtype and the gradient in the logits' dtype. Collectives: 2 per call in forward (one MAX, one SUM, over
all rows at once, whatever the chunking); none in backward. ``tp_group=None`` means no communication.

Host syncs: validating ``target``'s range costs one; backward checks once whether the entropy gradient is all
zero (then its term is skipped). Pass ``compute_entropy=False`` when the entropy is not needed at all.
"""

from __future__ import annotations

import torch

from ._validate import check_int, check_positive, check_shape, check_tensor
from .reduce import ProcessGroup, all_reduce, group_rank, group_size

__all__ = ["reference_logprob_entropy", "vocab_parallel_kl", "vocab_parallel_logprob_entropy"]


# ------------------------------------------------------------------------------------------------------ helpers


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _row_blocks(n: int, chunk_size: int | None, nbuf: int) -> tuple[int, list[slice]]:
    """Split n rows into blocks of ⌈k/nbuf⌉ rows (k = chunk_size or n), so that ``nbuf`` scratch operands of
    [block, Vs] together hold at most k rows. Returns (block rows, slices)."""
    k = n if chunk_size is None else min(chunk_size, n)
    step = max(1, -(-k // nbuf))
    return step, [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _load(dst: torch.Tensor, x: torch.Tensor, temperature: float, shift: torch.Tensor) -> torch.Tensor:
    """dst ← x / T − shift[:, None], in place in dst's dtype. x / T is rounded first, as ``logits.float() / T``."""
    same = x.dtype == dst.dtype
    if temperature != 1.0:
        if same:
            torch.div(x, temperature, out=dst)
        else:
            dst.copy_(x)
            dst.div_(temperature)
        dst.sub_(shift[:, None])
    elif same:
        torch.sub(x, shift[:, None], out=dst)
    else:
        dst.copy_(x)
        dst.sub_(shift[:, None])
    return dst


def _row_max(x: torch.Tensor, temperature: float, cdt: torch.dtype) -> torch.Tensor:
    """max_v (x_v / T) per row [N], from the input directly (no buffer): division by T > 0 is monotone, so
    fl(max x / T) equals max fl(x / T). Any shift near the max is correct; this one is the exact max."""
    m = x.amax(dim=-1).to(cdt)
    return m.div_(temperature) if temperature != 1.0 else m


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """[..., Vs] → [N, Vs] (a view for contiguous input; a strided input is copied once)."""
    return x.reshape(-1, x.shape[-1])


def _check_common(temperature: float, chunk_size: int | None) -> float:
    temperature = check_positive("temperature", temperature)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    return temperature


# ------------------------------------------------------------------------------------------- log-prob + entropy


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """Forward: log p(target) [N] and (optionally) H [N] from vocab-parallel logits [N, Vs].

    Buffers (compute dtype, reused for every block of rows; nothing of size [N, Vs] survives forward).
    Forward, per block:
        a ← u = z − m;  gather u_y;  then without entropy  a ← e^a, S = Σ a;
        with entropy (a second operand q, so blocks of ⌈k/2⌉ rows):  q ← e^a, S = Σ q;  a ← a·q, D = Σ a.
    Saved: the logits (the caller's tensor, not a copy) and [N] row statistics: m, S, log S, H, the local target
    index and whether this rank owns it.
    Backward, per block, a ← u = z − m (recomputed exactly as in forward; p = e^u / S), then
        no entropy term:  a ← e^a · (−g_lp / (T·S));  a[y] += g_lp/T        (1 operand)
        entropy term:     q ← e^a;  a ← α·a + β;  q ← q·a;  q[y] += g_lp/T  (2 operands)
    with α = −g_H/(T·S), β = −(g_H·(H − log S) + g_lp)/(T·S), so that q = −p·(g_H·(log p + H) + g_lp)/T off the
    target. For fp32/fp64 logits the returned gradient's own slice is the last operand (a, or q), so only the
    entropy term needs scratch; for bf16/fp16 logits every operand is scratch, and the gradient slice is a copy.
    """

    @staticmethod
    def forward(ctx, logits, target, tp_group, rank, temperature, chunk_size, compute_entropy):
        ctx.set_materialize_grads(False)
        x = _flatten(logits)
        n, vs = x.shape
        t = target.reshape(-1)
        cdt = _compute_dtype(x.dtype)
        dev = x.device

        m = all_reduce(_row_max(x, temperature, cdt), "max", tp_group)  # [N]
        local = t - rank * vs
        in_slice = (local >= 0) & (local < vs)  # [N] target lies in this rank's vocab slice
        idx = local.clamp(0, max(vs - 1, 0)).unsqueeze(1)  # [N, 1]

        stats = torch.zeros(3 if compute_entropy else 2, n, dtype=cdt, device=dev)  # S, u_y, D
        nbuf = 2 if compute_entropy else 1
        step, blocks = _row_blocks(n, chunk_size, nbuf)
        scratch = torch.empty(nbuf, step, vs, dtype=cdt, device=dev) if n else None
        zero = torch.zeros((), dtype=cdt, device=dev)
        for rows in blocks:
            r = rows.stop - rows.start
            a = _load(scratch[0, :r], x[rows], temperature, m[rows])  # u = z − m  [r, Vs]
            stats[1, rows] = torch.where(in_slice[rows], a.gather(1, idx[rows]).squeeze(1), zero)
            if compute_entropy:
                q = torch.exp(a, out=scratch[1, :r])  # e^u
                stats[0, rows] = q.sum(dim=-1)
                # Σ e^u·u. A −inf logit (a masked token) gives 0·(−inf) = NaN there: nansum drops it, as the
                # exact term is 0. A NaN logit still reaches H through S.
                stats[2, rows] = a.mul_(q).nansum(dim=-1)
            else:
                stats[0, rows] = a.exp_().sum(dim=-1)
        del scratch
        stats = all_reduce(stats, "sum", tp_group)

        s_sum = stats[0]
        log_s = s_sum.log()
        logp = stats[1] - log_s
        ent = log_s - stats[2] / s_sum if compute_entropy else None  # log S + E_p[−u], both terms ≥ 0

        ctx.save_for_backward(logits, idx, in_slice, m, s_sum, log_s, ent if compute_entropy else log_s)
        ctx.cfg = (temperature, chunk_size, compute_entropy)
        return (logp, ent) if compute_entropy else logp

    @staticmethod
    def backward(ctx, *grads):
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        temperature, chunk_size, compute_entropy = ctx.cfg
        logits, idx, in_slice, m, s_sum, log_s, ent = ctx.saved_tensors
        g_lp = grads[0]
        g_h = grads[1] if compute_entropy else None
        if g_h is not None and not bool(g_h.ne(0).any()):  # one host sync: skip an all-zero entropy term
            g_h = None
        if g_lp is None and g_h is None:
            return (torch.zeros_like(logits), *none)
        x = _flatten(logits)
        n, vs = x.shape
        cdt, dev = m.dtype, x.device
        gl = torch.zeros(n, dtype=cdt, device=dev) if g_lp is None else g_lp.reshape(-1).to(cdt) / temperature
        gl_y = torch.where(in_slice, gl, torch.zeros((), dtype=cdt, device=dev)).unsqueeze(1)  # at y, on its owner
        if g_h is None:
            coef = (-gl / s_sum).unsqueeze(1)  # [N, 1]
        else:
            gh = g_h.reshape(-1).to(cdt) / temperature
            alpha = (-gh / s_sum).unsqueeze(1)
            beta = (-(gh * (ent - log_s) + gl) / s_sum).unsqueeze(1)

        out = torch.empty(n, vs, dtype=x.dtype, device=dev)  # the returned gradient
        direct = x.dtype == cdt  # the gradient's slice can be the last operand
        nbuf = (1 if g_h is None else 2) - (1 if direct else 0)
        step, blocks = _row_blocks(n, chunk_size, max(nbuf, 1))
        scratch = torch.empty(nbuf, step, vs, dtype=cdt, device=dev) if (n and nbuf) else None
        for rows in blocks:
            r = rows.stop - rows.start
            dst = out[rows]
            if g_h is None:
                a = dst if direct else scratch[0, :r]
                _load(a, x[rows], temperature, m[rows]).exp_().mul_(coef[rows])  # −p·g_lp/T
                res = a.scatter_add_(1, idx[rows], gl_y[rows])
            else:
                a = _load(scratch[0, :r], x[rows], temperature, m[rows])  # u
                q = torch.exp(a, out=dst if direct else scratch[1, :r])  # e^u
                a.clamp_min_(-1e4)  # e^u is 0 below this anyway; keeps α·u finite for −inf logits (0·inf = NaN)
                q.mul_(a.mul_(alpha[rows]).add_(beta[rows]))  # −p·(g_H(log p + H) + g_lp)/T
                res = q.scatter_add_(1, idx[rows], gl_y[rows])
            if not direct:
                dst.copy_(res)
        return (out.view(logits.shape), *none)


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compute_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``target`` and softmax entropy from vocab-parallel logits, never gathering them.

    logits [..., V/TP] (this rank's contiguous vocab slice; any float dtype), target [...] int global ids in
    [0, V). Returns ``(logp [...], entropy [...] or None)`` in fp32 (fp64 for fp64 logits), with
    logp = log softmax(logits/T)[target] and entropy = −Σ_v p_v log p_v, p = softmax(logits/T) over the full V.
    Differentiable w.r.t. ``logits`` (hand-written backward; gradient in the logits' dtype).

    ``tp_group``: the tensor-parallel group holding the vocab shards (None: the full vocabulary is local).
    ``chunk_size``: process k rows at a time; the peak extra memory is then one [k, V/TP] compute-dtype buffer
    instead of one [N, V/TP]. Padded positions need a valid target id (e.g. 0) and are otherwise independent
    rows: mask their outputs downstream. See the module docstring for formulas, buffers and collectives.
    """
    check_tensor("logits", logits, floating=True)
    check_tensor("target", target)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V/TP] with V/TP > 0, got {tuple(logits.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target: expected an integer tensor of token ids, got dtype {target.dtype}")
    check_shape("target", target, logits.shape[:-1], "logits[..., 0]")
    temperature = _check_common(temperature, chunk_size)
    if not isinstance(compute_entropy, bool):
        raise ValueError(f"compute_entropy: expected a bool, got {type(compute_entropy).__name__}")
    rank, size = group_rank(tp_group), group_size(tp_group)
    v_total = logits.shape[-1] * size
    if target.numel():
        lo, hi = torch.aminmax(target)
        lo, hi = int(lo), int(hi)  # one host sync
        if lo < 0 or hi >= v_total:
            raise ValueError(
                f"target: token ids must lie in [0, {v_total}) (V/TP={logits.shape[-1]} × TP={size}), "
                f"got range [{lo}, {hi}]"
            )
    target = target.to(torch.int64)

    out = _VocabParallelLogProbEntropy.apply(logits, target, tp_group, rank, temperature, chunk_size, compute_entropy)
    if compute_entropy:
        logp, ent = out
        return logp.view(target.shape), ent.view(target.shape)
    return out.view(target.shape), None


# --------------------------------------------------------------------------------------------------------- KL


class _VocabParallelKL(torch.autograd.Function):
    """Forward: KL(P‖Q) [N] from vocab-parallel logits p, q [N, Vs].

    Buffers. Forward, per block of ⌈k/2⌉ rows, two scratch operands a, b [block, Vs]:
        b ← u^Q;  a ← e^b, S_Q = Σ a;  a ← u^P;  b ← b − a (= u^Q − u^P);  a ← e^a, S_P = Σ a;  a ← a·b, D = −Σ a.
    Saved: the two logits tensors and [N] statistics (m_P, log S_P, m_Q, log S_Q, KL).
    Backward, per block: a ← log P, b ← log Q (recomputed), then (both gradients)
        c ← e^b = Q;  b ← (b − a + KL)·(−g/T);  a ← e^a = P;  c ← (c − a)·g/T = ∂q;  a ← a·b = ∂p.
    With one gradient needed, c is not used (∂q alone: b ← (e^b − e^a)·g/T). a (∂p) and c or b (∂q) are the
    returned gradients' slices when those are in the compute dtype; every other operand is scratch, and rows go in
    blocks of ⌈k/#scratch⌉ so that the scratch stays within one [k, Vs] buffer.
    """

    @staticmethod
    def forward(ctx, p_logits, q_logits, tp_group, temperature, chunk_size):
        ctx.set_materialize_grads(False)
        xp, xq = _flatten(p_logits), _flatten(q_logits)
        n, vs = xp.shape
        cdt = _compute_dtype(xp.dtype, xq.dtype)
        maxes = torch.stack([_row_max(xp, temperature, cdt), _row_max(xq, temperature, cdt)])
        m_p, m_q = all_reduce(maxes, "max", tp_group)  # [N] each

        stats = torch.empty(3, n, dtype=cdt, device=xp.device)  # S_P, S_Q, D
        step, blocks = _row_blocks(n, chunk_size, 2)
        scratch = torch.empty(2, step, vs, dtype=cdt, device=xp.device) if n else None
        for rows in blocks:
            r = rows.stop - rows.start
            a, b = scratch[0, :r], scratch[1, :r]
            _load(b, xq[rows], temperature, m_q[rows])  # u^Q
            torch.exp(b, out=a)
            stats[1, rows] = a.sum(dim=-1)
            _load(a, xp[rows], temperature, m_p[rows])  # u^P
            b.sub_(a)  # u^Q − u^P
            a.exp_()
            stats[0, rows] = a.sum(dim=-1)
            stats[2, rows] = a.mul_(b).nansum(dim=-1).neg_()  # Σ e^{u^P}(u^P − u^Q); 0·inf (P_v = 0) dropped
        del scratch
        stats = all_reduce(stats, "sum", tp_group)

        log_sp, log_sq = stats[0].log(), stats[1].log()
        kl = stats[2] / stats[0] - log_sp + log_sq
        ctx.save_for_backward(p_logits, q_logits, m_p, log_sp, m_q, log_sq, kl)
        ctx.cfg = (temperature, chunk_size)
        return kl

    @staticmethod
    def backward(ctx, g):
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g is None or not (need_p or need_q):
            return None, None, None, None, None
        temperature, chunk_size = ctx.cfg
        p_logits, q_logits, m_p, log_sp, m_q, log_sq, kl = ctx.saved_tensors
        xp, xq = _flatten(p_logits), _flatten(q_logits)
        n, vs = xp.shape
        cdt = m_p.dtype
        gs = g.reshape(-1).to(cdt) / temperature  # [N]

        out_p = torch.empty(n, vs, dtype=xp.dtype, device=xp.device) if need_p else None
        out_q = torch.empty(n, vs, dtype=xq.dtype, device=xq.device) if need_q else None
        # Operands: a = log P (→ P → ∂p), b = log Q (→ ∂q alone, or → (log P − log Q − KL)·g/T), c = Q (→ ∂q).
        direct_p = need_p and xp.dtype == cdt
        direct_q = need_q and xq.dtype == cdt
        names = ["a", "b"] + (["c"] if need_p and need_q else [])
        own = {"a": direct_p, "b": (not need_p) and direct_q, "c": direct_q}
        n_scratch = sum(not own[k] for k in names)
        step, blocks = _row_blocks(n, chunk_size, max(n_scratch, 1))
        scratch = torch.empty(max(n_scratch, 1), step, vs, dtype=cdt, device=xp.device) if n else None
        for rows in blocks:
            r = rows.stop - rows.start
            bufs, j = {}, 0
            for k in names:
                if own[k]:
                    bufs[k] = out_p[rows] if k == "a" else out_q[rows]
                else:
                    bufs[k], j = scratch[j, :r], j + 1
            a, b = bufs["a"], bufs["b"]
            _load(a, xp[rows], temperature, m_p[rows]).sub_(log_sp[rows, None])  # log P
            _load(b, xq[rows], temperature, m_q[rows]).sub_(log_sq[rows, None])  # log Q
            a.clamp_min_(-1e4)  # e^{−1e4} = 0 = e^{−inf}; keeps −inf logits from making 0·inf = NaN below
            b.clamp_min_(-1e4)
            if need_p and need_q:
                c = bufs["c"]
                torch.exp(b, out=c)  # Q
                b.sub_(a).add_(kl[rows, None]).mul_(-gs[rows, None])  # (log P − log Q − KL)·g/T
                a.exp_()  # P
                c.sub_(a).mul_(gs[rows, None])  # (Q − P)·g/T
                a.mul_(b)
                grads = {"p": a, "q": c}
            elif need_p:
                b.sub_(a).add_(kl[rows, None]).mul_(-gs[rows, None])
                a.exp_().mul_(b)
                grads = {"p": a}
            else:
                b.exp_().sub_(a.exp_()).mul_(gs[rows, None])
                grads = {"q": b}
            for side, res in grads.items():
                dst = (out_p if side == "p" else out_q)[rows]
                if res.data_ptr() != dst.data_ptr():
                    dst.copy_(res)
        gp = None if out_p is None else out_p.reshape(p_logits.shape)
        gq = None if out_q is None else out_q.reshape(q_logits.shape)
        return gp, gq, None, None, None


def vocab_parallel_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    tp_group: ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL(P‖Q) per row from two vocab-parallel logits shards, never gathering them.

    p_logits, q_logits [..., V/TP] (same shape; this rank's vocab slice of both), P = softmax(p_logits/T),
    Q = softmax(q_logits/T) over the full V. Returns KL [...] = Σ_v P_v (log P_v − log Q_v) in fp32 (fp64 if
    either input is fp64). Differentiable w.r.t. both inputs (hand-written backward). Used by OAR-P (divergence
    of a counterfactually perturbed forward pass), mostly forward-only. ``chunk_size`` bounds the scratch to one
    [k, V/TP] buffer as for ``vocab_parallel_logprob_entropy``.
    """
    check_tensor("p_logits", p_logits, floating=True)
    check_tensor("q_logits", q_logits, floating=True)
    if p_logits.dim() < 1 or p_logits.shape[-1] == 0:
        raise ValueError(f"p_logits: expected shape [..., V/TP] with V/TP > 0, got {tuple(p_logits.shape)}")
    check_shape("q_logits", q_logits, p_logits.shape, "p_logits")
    temperature = _check_common(temperature, chunk_size)
    kl = _VocabParallelKL.apply(p_logits, q_logits, tp_group, temperature, chunk_size)
    return kl.view(p_logits.shape[:-1])


# ------------------------------------------------------------------------------------------------- reference


def reference_logprob_entropy(
    logits_full: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive unfused reference on the full vocabulary: ``log_softmax(logits/T).gather(target)`` and
    ``−Σ p·log p``, differentiated by autograd. The fp64 test reference and the benchmark baseline (it holds
    several [N, V] fp32 tensors for backward). logits_full [..., V], target [...] → (logp [...], entropy [...]),
    computed in fp32 (fp64 for fp64 logits)."""
    check_tensor("logits_full", logits_full, floating=True)
    check_tensor("target", target)
    check_shape("target", target, logits_full.shape[:-1], "logits_full[..., 0]")
    temperature = check_positive("temperature", temperature)
    z = logits_full.to(_compute_dtype(logits_full.dtype)) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(dim=-1)
    return logp, entropy

