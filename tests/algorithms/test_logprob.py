"""Fused log-prob / entropy / KL on one process: fp64 reference values and gradients, gradcheck, fp32 and bf16
tolerances, temperature, chunking, the entropy gradient switched on and off, padding, saved tensors, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oar_megatron.algorithms import reference_logprob_entropy, vocab_parallel_kl, vocab_parallel_logprob_entropy

D = torch.float64


def _case(shape=(3, 5), v=11, scale=4.0, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g, dtype=D) * scale).to(dtype)
    target = torch.randint(0, v, shape, generator=g)
    w_lp = torch.randn(shape, generator=g, dtype=D)
    w_h = torch.randn(shape, generator=g, dtype=D)
    return logits, target, w_lp, w_h


def _fused(logits, target, w_lp, w_h, **kw):
    x = logits.clone().requires_grad_(True)
    lp, h = vocab_parallel_logprob_entropy(x, target, **kw)
    loss = (lp * w_lp.to(lp.dtype)).sum() + (0 if h is None or w_h is None else (h * w_h.to(h.dtype)).sum())
    loss.backward()
    return lp.detach(), None if h is None else h.detach(), x.grad


def _reference(logits, target, w_lp, w_h, temperature=1.0):
    x = logits.to(D).clone().requires_grad_(True)
    lp, h = reference_logprob_entropy(x, target, temperature)
    loss = (lp * w_lp).sum() + (0 if w_h is None else (h * w_h).sum())
    loss.backward()
    return lp.detach(), h.detach(), x.grad


def _ref_kl(p, q, temperature=1.0):
    lp = torch.log_softmax(p.to(D) / temperature, -1)
    lq = torch.log_softmax(q.to(D) / temperature, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_fp64_matches_reference(temperature, chunk_size):
    logits, target, w_lp, w_h = _case()
    lp, h, grad = _fused(logits, target, w_lp, w_h, temperature=temperature, chunk_size=chunk_size)
    rlp, rh, rgrad = _reference(logits, target, w_lp, w_h, temperature)
    assert lp.dtype == h.dtype == grad.dtype == D and lp.shape == h.shape == target.shape
    torch.testing.assert_close(lp, rlp, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, rh, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, rgrad, atol=1e-12, rtol=0)


def test_gradcheck_logprob_entropy_and_kl():
    logits, target, _, _ = _case(shape=(2, 3), v=6)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_logprob_entropy(z, target, temperature=0.8, chunk_size=2), (x,)
    )
    p, q = logits.clone().requires_grad_(True), (logits.flip(-1) * 0.5).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: vocab_parallel_kl(a, b, temperature=1.3, chunk_size=4), (p, q))
    # One side only (the usual case: a detached reference policy).
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_kl(a, q.detach(), chunk_size=1), (p,))
    assert torch.autograd.gradcheck(lambda b: vocab_parallel_kl(p.detach(), b), (q,))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_fp32_tolerances(chunk_size):
    logits, target, w_lp, w_h = _case(shape=(4, 16), v=1000, scale=5.0, dtype=torch.float32, seed=1)
    lp, h, grad = _fused(logits, target, w_lp, w_h, temperature=0.7, chunk_size=chunk_size)
    rlp, rh, rgrad = _reference(logits, target, w_lp, w_h, 0.7)
    assert lp.dtype == h.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(lp.to(D), rlp, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(h.to(D), rh, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad.to(D), rgrad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(dtype):
    logits, target, w_lp, w_h = _case(shape=(37,), v=300, scale=3.0, dtype=dtype, seed=2)
    full = _fused(logits, target, w_lp, w_h, temperature=0.9)
    for k in (1, 8, 36, 100):
        part = _fused(logits, target, w_lp, w_h, temperature=0.9, chunk_size=k)
        for a, b in zip(full, part):
            torch.testing.assert_close(a, b, atol=2e-7, rtol=2e-7)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_bf16_input(chunk_size):
    logits, target, w_lp, w_h = _case(shape=(2, 6), v=257, scale=3.0, dtype=torch.bfloat16, seed=3)
    for wh in (w_h, None):  # with and without the entropy gradient (two backward paths)
        lp, h, grad = _fused(logits, target, w_lp, wh, temperature=0.8, chunk_size=chunk_size)
        rlp, rh, rgrad = _reference(logits, target, w_lp, wh, 0.8)  # fp64 of the same bf16 values
        assert lp.dtype == h.dtype == torch.float32 and grad.dtype == torch.bfloat16
        torch.testing.assert_close(lp.to(D), rlp, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(h.to(D), rh, atol=1e-5, rtol=1e-6)
        # One bf16 rounding of the fp32 gradient: relative 2^-8 at most.
        torch.testing.assert_close(grad.to(D), rgrad, atol=1e-7, rtol=2**-8)


def test_entropy_gradient_on_and_off():
    logits, target, w_lp, w_h = _case(shape=(3, 4), v=9, seed=4)
    _, _, ref_lp_only = _reference(logits, target, w_lp, None)
    _, _, no_h = _fused(logits, target, w_lp, None)  # entropy computed, not in the loss: its grad is None
    _, h_off, off = _fused(logits, target, w_lp, None, compute_entropy=False)
    _, _, zero_coef = _fused(logits, target, w_lp, torch.zeros_like(w_h))  # in the loss with coefficient 0
    assert h_off is None
    for g in (no_h, off, zero_coef):
        torch.testing.assert_close(g, ref_lp_only, atol=1e-12, rtol=0)
    # Entropy alone (log-prob unused).
    x = logits.clone().requires_grad_(True)
    _, h = vocab_parallel_logprob_entropy(x, target, temperature=1.2)
    (h * w_h).sum().backward()
    y = logits.clone().requires_grad_(True)
    (reference_logprob_entropy(y, target, 1.2)[1] * w_h).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=0)
    # The entropy gradient is not the log-prob gradient: switching it on changes the result.
    _, _, both = _fused(logits, target, w_lp, w_h)
    assert (both - ref_lp_only).abs().max() > 1e-3


def test_padded_positions_are_irrelevant():
    logits, target, w_lp, w_h = _case(shape=(3, 6), v=13, seed=5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    outs = []
    for garbage in (1e4, -3e3):
        x = torch.where(mask[..., None], logits, torch.full_like(logits, garbage))
        x[..., 0] = torch.where(mask, x[..., 0], torch.full_like(x[..., 0], -garbage))
        t = torch.where(mask, target, torch.zeros_like(target))  # padding uses a valid id
        outs.append(_fused(x, t, torch.where(mask, w_lp, 0), torch.where(mask, w_h, 0), chunk_size=4))
    (lp1, h1, g1), (lp2, h2, g2) = outs
    assert torch.equal(lp1[mask], lp2[mask]) and torch.equal(h1[mask], h2[mask])
    assert torch.equal(g1, g2)
    assert torch.isfinite(lp1).all() and torch.isfinite(h1).all()
    assert torch.equal(g1[~mask], torch.zeros_like(g1[~mask]))
    rlp, rh, rgrad = _reference(logits, target, torch.where(mask, w_lp, 0), torch.where(mask, w_h, 0))
    torch.testing.assert_close(lp1[mask], rlp[mask], atol=1e-12, rtol=0)
    torch.testing.assert_close(h1[mask], rh[mask], atol=1e-12, rtol=0)
    torch.testing.assert_close(g1[mask], rgrad[mask], atol=1e-12, rtol=0)


def test_extreme_logits_underflow_and_masked_vocab():
    # Scale 200: most e^u underflow in fp32. A -inf vocab entry (masked token) must give p = 0, finite H.
    logits, target, w_lp, w_h = _case(shape=(8,), v=50, scale=200.0, dtype=torch.float32, seed=6)
    lp, h, grad = _fused(logits, target, w_lp, w_h, chunk_size=3)
    rlp, rh, rgrad = _reference(logits, target, w_lp, w_h)
    torch.testing.assert_close(lp.to(D), rlp, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(h.to(D), rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.to(D), rgrad, atol=1e-6, rtol=1e-5)
    masked = logits.clone()
    masked[:, 7] = float("-inf")
    t = torch.where(target == 7, torch.zeros_like(target), target)
    keep = torch.arange(50) != 7
    w_h[0] = 0.0  # a row whose entropy weight is 0 must not turn 0·(−inf) into NaN either
    x = masked.clone().requires_grad_(True)
    lp, h = vocab_parallel_logprob_entropy(x, t, chunk_size=3)
    ((lp * w_lp).sum() + (h * w_h).sum()).backward()
    rlp, rh, rgrad = _reference(logits[:, keep], torch.where(t > 7, t - 1, t), w_lp, w_h)
    torch.testing.assert_close(lp.to(D), rlp, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(h.to(D), rh, atol=1e-5, rtol=1e-5)
    assert torch.equal(x.grad[:, 7], torch.zeros(8))
    torch.testing.assert_close(x.grad[:, keep].to(D), rgrad, atol=1e-6, rtol=1e-5)


def test_nothing_vocab_sized_is_saved_for_backward():
    logits, target, w_lp, w_h = _case(shape=(4, 5), v=64, dtype=torch.float32)
    x, q = logits.clone().requires_grad_(True), logits.flip(-1)
    lp, _ = vocab_parallel_logprob_entropy(x, target)
    kl = vocab_parallel_kl(x, q)
    for fn in (lp.grad_fn.next_functions[0][0], kl.grad_fn.next_functions[0][0]):
        big = [t for t in fn.saved_tensors if t.dim() > 1 and t.shape[-1] == 64]
        assert big and all(t.data_ptr() in (x.data_ptr(), q.data_ptr()) for t in big)  # the inputs, not copies
        small = [t for t in fn.saved_tensors if not (t.dim() > 1 and t.shape[-1] == 64)]
        assert all(t.numel() <= 20 for t in small)  # [N] (or [N, 1]) row statistics only, N = 20
    # Forward only (π_old, reference policy): no graph needed.
    with torch.no_grad():
        lp2, h2 = vocab_parallel_logprob_entropy(logits, target)
    torch.testing.assert_close(lp2, lp.detach())


def test_kl_matches_reference():
    p, _, w, _ = _case(shape=(3, 7), v=20, seed=7)
    q = p + torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=D)
    for temperature in (1.0, 0.6):
        for k in (None, 2):
            a, b = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
            kl = vocab_parallel_kl(a, b, temperature=temperature, chunk_size=k)
            (kl * w).sum().backward()
            ra, rb = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
            ref = _ref_kl(ra, rb, temperature)
            (ref * w).sum().backward()
            assert kl.shape == (3, 7) and kl.dtype == D
            torch.testing.assert_close(kl, ref, atol=1e-12, rtol=0)
            torch.testing.assert_close(a.grad, ra.grad, atol=1e-12, rtol=0)
            torch.testing.assert_close(b.grad, rb.grad, atol=1e-12, rtol=0)
    assert vocab_parallel_kl(p, p).abs().max() < 1e-12
    # A token masked (−inf) in both P and Q contributes nothing: KL and gradients of the remaining vocabulary.
    keep = torch.arange(20) != 3
    a, b = p.clone(), q.clone()
    a[..., 3] = b[..., 3] = float("-inf")
    a.requires_grad_(True), b.requires_grad_(True)
    kl = vocab_parallel_kl(a, b, chunk_size=4)
    (kl * w).sum().backward()
    ra, rb = p[..., keep].clone().requires_grad_(True), q[..., keep].clone().requires_grad_(True)
    ref = _ref_kl(ra, rb)
    (ref * w).sum().backward()
    torch.testing.assert_close(kl, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.grad[..., keep], ra.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(b.grad[..., keep], rb.grad, atol=1e-12, rtol=0)
    assert not a.grad[..., 3].any() and not b.grad[..., 3].any()
    assert (vocab_parallel_kl(p, q) > 0).all()
    # bf16 inputs: fp32 KL, bf16 gradients for each side alone and both.
    pb, qb = p.to(torch.bfloat16), q.to(torch.bfloat16)
    ref = _ref_kl(pb, qb)
    for need in ((True, True), (True, False), (False, True)):
        a, b = pb.clone().requires_grad_(need[0]), qb.clone().requires_grad_(need[1])
        kl = vocab_parallel_kl(a, b, chunk_size=5)
        assert kl.dtype == torch.float32
        torch.testing.assert_close(kl.to(D), ref, atol=1e-5, rtol=1e-5)
        (kl * w.float()).sum().backward()
        ra, rb = pb.to(D).requires_grad_(True), qb.to(D).requires_grad_(True)
        (_ref_kl(ra, rb) * w).sum().backward()
        for got, want, on in ((a.grad, ra.grad, need[0]), (b.grad, rb.grad, need[1])):
            if on:
                assert got.dtype == torch.bfloat16
                torch.testing.assert_close(got.to(D), want, atol=1e-6, rtol=2**-8)
            else:
                assert got is None


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(0, 9),
    v=st.integers(1, 40),
    temperature=st.floats(0.2, 3.0),
    chunk=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(rows, v, temperature, chunk, seed):
    logits, target, w_lp, w_h = _case(shape=(rows,), v=v, scale=3.0, seed=seed)
    lp, h, grad = _fused(logits, target, w_lp, w_h, temperature=temperature, chunk_size=chunk)
    rlp, rh, rgrad = _reference(logits, target, w_lp, w_h, temperature)
    torch.testing.assert_close(lp, rlp, atol=1e-11, rtol=0)
    torch.testing.assert_close(h, rh, atol=1e-11, rtol=0)
    torch.testing.assert_close(grad, rgrad, atol=1e-11, rtol=0)


LOGITS = torch.zeros(2, 3, 5)
TARGET = torch.zeros(2, 3, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(logits=LOGITS.long(), target=TARGET), "logits"),
        (dict(logits=[[0.0]], target=TARGET), "logits"),
        (dict(logits=torch.zeros(2, 0), target=torch.zeros(2, dtype=torch.long)), "logits"),
        (dict(logits=LOGITS, target=TARGET.float()), "target"),
        (dict(logits=LOGITS, target=TARGET.bool()), "target"),
        (dict(logits=LOGITS, target=TARGET[:, :2]), "target"),
        (dict(logits=LOGITS, target=TARGET + 5), "target"),
        (dict(logits=LOGITS, target=TARGET - 1), "target"),
        (dict(logits=LOGITS, target=TARGET, temperature=0.0), "temperature"),
        (dict(logits=LOGITS, target=TARGET, temperature=-1.0), "temperature"),
        (dict(logits=LOGITS, target=TARGET, temperature=float("nan")), "temperature"),
        (dict(logits=LOGITS, target=TARGET, chunk_size=0), "chunk_size"),
        (dict(logits=LOGITS, target=TARGET, chunk_size=2.0), "chunk_size"),
        (dict(logits=LOGITS, target=TARGET, chunk_size=True), "chunk_size"),
        (dict(logits=LOGITS, target=TARGET, compute_entropy=1), "compute_entropy"),
    ],
)
def test_bad_input_logprob(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        vocab_parallel_logprob_entropy(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(p_logits=LOGITS.long(), q_logits=LOGITS), "p_logits"),
        (dict(p_logits=LOGITS, q_logits=LOGITS.int()), "q_logits"),
        (dict(p_logits=LOGITS, q_logits=LOGITS[..., :4]), "q_logits"),
        (dict(p_logits=LOGITS, q_logits=LOGITS, temperature=0), "temperature"),
        (dict(p_logits=LOGITS, q_logits=LOGITS, chunk_size=-3), "chunk_size"),
    ],
)
def test_bad_input_kl(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        vocab_parallel_kl(**kwargs)


def test_bad_input_reference():
    with pytest.raises(ValueError, match="^target"):
        reference_logprob_entropy(LOGITS, TARGET[:1])
    with pytest.raises(ValueError, match="^temperature"):
        reference_logprob_entropy(LOGITS, TARGET, 0.0)
