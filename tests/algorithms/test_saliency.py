"""OAR-G / OAR-P saliency (ALGORITHMS.md §1.3, §5.2-5.5, §5.9) on tiny pure-torch causal LMs defined here."""

import functools
import math

import pytest
import torch
import torch.nn as nn

from oar_megatron.algorithms.oar import oar_weights
from oar_megatron.algorithms.saliency import Saliency, local_kl, oar_g_saliency, oar_p_saliency
from oar_megatron.algorithms.segment import build_scoring_batch


class BagOfWords(nn.Module):
    """logits_t = (Σ_{u ≤ t, attended} e_u) @ W: a causal linear model whose answer can be worked out by hand."""

    def __init__(self, emb, w_out):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(torch.tensor(emb, dtype=torch.float64), freeze=False)
        self.w_out = nn.Parameter(torch.tensor(w_out, dtype=torch.float64))

    def embed(self, ids):
        return self.emb(ids)

    def forward(self, e, attention_mask):
        return torch.cumsum(e * attention_mask[..., None], dim=1) @ self.w_out


class TinyLM(nn.Module):
    """Embedding + positional embedding + 2 pre-norm causal attention/MLP blocks + LM head (float64)."""

    def __init__(self, vocab=16, hidden=8, layers=2, max_len=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(n1=nn.LayerNorm(hidden), qkv=nn.Linear(hidden, 3 * hidden), o=nn.Linear(hidden, hidden),
                               n2=nn.LayerNorm(hidden), mlp=nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                                                         nn.Linear(2 * hidden, hidden))))
            for _ in range(layers)
        )
        self.head = nn.Linear(hidden, vocab)
        self.double()

    def embed(self, ids):
        return self.tok(ids)

    def forward(self, e, attention_mask):
        n, length, _ = e.shape
        x = e + self.pos(torch.arange(length))[None]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal[None] & attention_mask[:, None, :]  # [N, L(query), L(key)]
        allowed = allowed | torch.eye(length, dtype=torch.bool)[None]  # padded queries attend to themselves
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](x)).chunk(3, dim=-1)
            att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
            att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
            x = x + blk["o"](att @ v)
            x = x + blk["mlp"](blk["n2"](x))
        return self.head(x)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------- hand-checkable linear model
# Input vocabulary: 0 = pad (e = 0), 1 → 1, 2 → 2, 3 → 0 (prompt/conclude filler), 4 → −1. H = 1, V = 2,
# W = [[0, 1]]: logits = [0, h], so p(class 1) = σ(h) with h the running sum of embeddings.


@pytest.fixture
def bow():
    return BagOfWords([[0.0], [1.0], [2.0], [0.0], [-1.0]], [[0.0, 1.0]])


@pytest.fixture
def bow_batch():
    # prompt [3] | reasoning [1, 2, 4] | conclude [3] | answer [1]: h at the conclude = 0 + 1 + 2 − 1 + 0 = 2.
    return build_scoring_batch([[3]], [[1, 2, 4]], [3], [[1]], pad_id=0)


def test_oar_p_last_equals_hand_kl(bow, bow_batch):
    # P = Bern(σ(2)); replacing reasoning token j by pad (e = 0) gives h = 1, 0, 3 → Q_j = Bern(σ(h)).
    # KL(Bern(p) ‖ Bern(q)) = p ln(p/q) + (1 − p) ln((1 − p)/(1 − q)):
    #   h = 1: 0.0671307545,  h = 0: 0.3278133255,  h = 3: 0.0408622626.
    sal = oar_p_saliency(bow.embed, bow, bow_batch, mode="last")
    assert isinstance(sal, Saliency) and sal.scores.dtype == torch.float32
    torch.testing.assert_close(sal.scores, torch.tensor([[0.0671307545, 0.3278133255, 0.0408622626]]))
    assert sal.mask.tolist() == [[True, True, True]]
    # One answer token: answer_mean reads the same single position as last.
    torch.testing.assert_close(oar_p_saliency(bow.embed, bow, bow_batch, mode="answer_mean").scores, sal.scores)


def test_oar_p_answer_joint_sign(bow, bow_batch):
    # φ = log σ(h) of answer token 1; I_j = log σ(2) − log σ(h_j):
    #   h = 1: 0.1863336765 (> 0),  h = 0: 0.5662191695,  h = 3: −0.0783406595 (the −1 token helped: negative).
    sal = oar_p_saliency(bow.embed, bow, bow_batch, mode="answer_joint")
    torch.testing.assert_close(sal.scores, torch.tensor([[0.1863336765, 0.5662191695, -0.0783406595]]))
    w = oar_weights(sal.scores, sal.mask)  # negative scores clamp to 0 → the smallest weight
    assert w[0, 2] == w[0].min()


def test_oar_g_answer_joint_hand_gradient(bow, bow_batch):
    # J = φ0 − log σ(h(e)); ∂J/∂e_t = −(1 − σ(2)) for every token before the conclude position (noise 0), so
    # s_t = (1 − σ(2))·|e_t| = 0.1192029220 · [1, 2, 1].
    sal = oar_g_saliency(bow.embed, bow, bow_batch, mode="answer_joint", noise_std=0.0)
    c = 1 - _sigmoid(2)
    torch.testing.assert_close(sal.scores, torch.tensor([[c, 2 * c, c]], dtype=torch.float32))


@pytest.mark.parametrize("mode", ["last", "answer_mean"])
def test_oar_g_noisy_kl_hand_gradient(bow, bow_batch, mode):
    # ξ_t = σ·randn(R, H) from Generator(seed): h' = 2 + Σ ξ. ∂KL(p0 ‖ Bern(σ(h')))/∂h' = σ(h') − σ(2), so
    # s_t = |σ(2 + Σξ) − σ(2)|·|e_t| (the clean e multiplies), i.e. proportional to |e| = [1, 2, 1].
    seed, std = 7, 1e-3
    xi = torch.randn(3, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * std
    eps = float(xi.double().sum())
    expected = abs(_sigmoid(2 + eps) - _sigmoid(2)) * torch.tensor([[1.0, 2.0, 1.0]])
    sal = oar_g_saliency(bow.embed, bow, bow_batch, mode=mode, noise_std=std, seed=seed)
    torch.testing.assert_close(sal.scores, expected, rtol=1e-6, atol=0)
    assert 1e-7 < sal.scores.max() < 1e-3  # tiny, as §1.3 [I] expects


def test_single_influential_token_gets_largest_saliency():
    # H = 2: only embedding dimension 0 reaches the logits. Token 5 (the "key") has e = [1, 0]; every other token
    # has a small dim-0 component, so the answer depends almost only on the key.
    emb = [[0.0, 1.0], [0.01, 1.0], [-0.02, 0.5], [0.0, 0.3], [0.015, -1.0], [1.0, 0.0]]
    model = BagOfWords(emb, [[1.5, -1.0, 0.0], [0.0, 0.0, 0.0]])
    batch = build_scoring_batch([[3, 3], [3]], [[1, 2, 5, 4, 1], [4, 1, 2, 2, 5, 1]], [3], [[0], [0]], pad_id=0)
    for sal in (
        oar_p_saliency(model.embed, model, batch, mode="last"),
        oar_p_saliency(model.embed, model, batch, mode="answer_joint"),
        oar_g_saliency(model.embed, model, batch, mode="answer_mean"),
        oar_g_saliency(model.embed, model, batch, mode="last"),
        oar_g_saliency(model.embed, model, batch, mode="answer_joint", noise_std=0.0),
    ):
        assert sal.scores.abs().argmax(-1).tolist() == [2, 4]
        w = oar_weights(sal.scores, sal.mask)
        assert w.argmax(-1).tolist() == [2, 4]


# -------------------------------------------------------------------------------------------- tiny transformer


@pytest.fixture
def lm():
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def lm_batch():
    return build_scoring_batch(
        [[3, 4, 5], [6], [7, 8]],
        [[9, 10, 11, 12, 13], [14, 15], [9, 9, 10, 11, 12, 13, 14]],
        [2, 3],
        [[4, 5], [6], [7, 8, 9]],
        pad_id=1,
    )


@pytest.mark.parametrize("mode", ["last", "answer_mean", "answer_joint"])
def test_oar_p_chunk_invariance(lm, lm_batch, mode):
    runs = [oar_p_saliency(lm.embed, lm, lm_batch, mode=mode, chunk_size=c) for c in (1, 3, 7, 32)]
    for sal in runs[1:]:
        assert torch.equal(sal.scores, runs[0].scores)
        assert torch.equal(sal.mask, runs[0].mask)
    assert runs[0].mask.sum(-1).tolist() == [5, 2, 7]
    assert (runs[0].scores[~runs[0].mask] == 0).all()
    if mode != "answer_joint":
        assert (runs[0].scores[runs[0].mask] > 0).all()


@pytest.mark.parametrize("fn", ["p", "g"])
def test_batched_equals_one_at_a_time(lm, lm_batch, fn):
    # Right padding and the attention mask: scoring responses together equals scoring each alone.
    prompts, reasonings = [[3, 4, 5], [6], [7, 8]], [[9, 10, 11, 12, 13], [14, 15], [9, 9, 10, 11, 12, 13, 14]]
    answers = [[4, 5], [6], [7, 8, 9]]
    run = (lambda b, **kw: oar_p_saliency(lm.embed, lm, b, mode="answer_mean", **kw)) if fn == "p" else (
        lambda b, **kw: oar_g_saliency(lm.embed, lm, b, **kw))
    together = run(lm_batch, width=9, **({} if fn == "p" else dict(seed=[11, 12, 13])))
    assert together.scores.shape == (3, 9)
    for i in range(3):
        alone = run(build_scoring_batch([prompts[i]], [reasonings[i]], [2, 3], [answers[i]], pad_id=1),
                    width=9, **({} if fn == "p" else dict(seed=[11 + i])))
        torch.testing.assert_close(alone.scores[0], together.scores[i], rtol=1e-9, atol=1e-15)


def test_oar_p_last_ignores_answer_tokens(lm, lm_batch):
    no_answer = build_scoring_batch(
        [[3, 4, 5], [6], [7, 8]], [[9, 10, 11, 12, 13], [14, 15], [9, 9, 10, 11, 12, 13, 14]], [2, 3], pad_id=1
    )
    torch.testing.assert_close(
        oar_p_saliency(lm.embed, lm, lm_batch).scores, oar_p_saliency(lm.embed, lm, no_answer).scores,
        rtol=1e-12, atol=1e-15,
    )


def test_oar_g_noise_only_on_reasoning_positions(lm, lm_batch):
    seen = []

    def forward(e, m):
        seen.append(e.detach().clone())
        return lm(e, m)

    oar_g_saliency(lm.embed, forward, lm_batch, noise_std=1e-3, seed=0)
    clean, noisy = seen
    assert torch.equal(clean, lm.embed(lm_batch.input_ids))
    moved = (noisy - clean).abs().amax(-1) > 0  # [B, L]
    assert torch.equal(moved, lm_batch.reasoning_mask())
    # Per-sample seeds: the same seed gives the same noise (and scores); another seed does not.
    a = oar_g_saliency(lm.embed, lm, lm_batch, seed=[5, 6, 7])
    b = oar_g_saliency(lm.embed, lm, lm_batch, seed=5)  # sample b uses seed + b
    c = oar_g_saliency(lm.embed, lm, lm_batch, seed=[5, 6, 8])
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.scores[:2], c.scores[:2]) and not torch.equal(a.scores[2], c.scores[2])


def test_oar_g_chunks_and_parameter_grads_untouched(lm, lm_batch):
    sentinel = torch.full_like(lm.head.weight, 0.5)
    lm.head.weight.grad = sentinel.clone()
    with torch.no_grad():  # works inside a caller's no_grad too
        full = oar_g_saliency(lm.embed, lm, lm_batch, mode="answer_mean")
    one = oar_g_saliency(lm.embed, lm, lm_batch, mode="answer_mean", chunk_size=1)
    torch.testing.assert_close(one.scores, full.scores, rtol=1e-9, atol=1e-15)
    assert torch.equal(lm.head.weight.grad, sentinel)
    assert all(p.grad is None for n, p in lm.named_parameters() if n != "head.weight")
    assert (full.scores[full.mask] > 0).all()


def test_kl_fn_plugs_in(lm, lm_batch):
    base = oar_p_saliency(lm.embed, lm, lm_batch)
    doubled = oar_p_saliency(lm.embed, lm, lm_batch, kl_fn=lambda p, q: 2 * local_kl(p, q))
    torch.testing.assert_close(doubled.scores, 2 * base.scores)
    g = oar_g_saliency(lm.embed, lm, lm_batch)
    g2 = oar_g_saliency(lm.embed, lm, lm_batch, kl_fn=lambda p, q: 2 * local_kl(p, q))
    torch.testing.assert_close(g2.scores, 2 * g.scores)
    try:
        from oar_megatron.algorithms.logprob import vocab_parallel_kl
    except ImportError:
        return
    vp = functools.partial(vocab_parallel_kl, tp_group=None)
    torch.testing.assert_close(oar_p_saliency(lm.embed, lm, lm_batch, kl_fn=vp).scores, base.scores)
    torch.testing.assert_close(oar_g_saliency(lm.embed, lm, lm_batch, kl_fn=vp).scores, g.scores, rtol=1e-4, atol=0)


def test_local_kl():
    p = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    q = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    # P = [1/4, 3/4], Q = [1/2, 1/2]: KL = ¼ ln ½ + ¾ ln (3/2); identical distributions: 0.
    expected = torch.tensor([0.25 * math.log(0.5) + 0.75 * math.log(1.5), 0.0])
    torch.testing.assert_close(local_kl(p, q), expected)
    # A zero-probability class of P contributes 0 (not NaN): P = [1, 0] → KL = −log Q_0 = log(1 + e³).
    kl = local_kl(torch.tensor([0.0, float("-inf")]), torch.tensor([0.0, 3.0]))
    assert kl.item() == pytest.approx(math.log1p(math.exp(3.0)), rel=1e-6)


def test_rows_without_answer_score_zero_in_answer_modes(lm):
    batch = build_scoring_batch([[3], [4]], [[9, 10, 11], [12, 13]], [2], [[5], []], pad_id=1)
    for sal in (oar_p_saliency(lm.embed, lm, batch, mode="answer_mean"),
                oar_g_saliency(lm.embed, lm, batch, mode="answer_joint", noise_std=0.0)):
        assert (sal.scores[1] == 0).all() and (sal.scores[0, :3] != 0).all()
        assert torch.equal(oar_weights(sal.scores, sal.mask)[1], torch.ones(3))


def test_empty_reasoning(lm):
    batch = build_scoring_batch([[3], [4]], [[], []], [2], pad_id=1)
    for sal in (oar_p_saliency(lm.embed, lm, batch), oar_g_saliency(lm.embed, lm, batch, width=4)):
        assert not sal.mask.any() and (sal.scores == 0).all()


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, b: oar_p_saliency(m.embed, m, "batch"), "batch"),
        (lambda m, b: oar_p_saliency(m.embed, m, b, mode="mean"), "mode"),
        (lambda m, b: oar_g_saliency(m.embed, m, b, mode="first"), "mode"),
        (lambda m, b: oar_p_saliency(m.embed, m, b, chunk_size=0), "chunk_size"),
        (lambda m, b: oar_g_saliency(m.embed, m, b, chunk_size=0), "chunk_size"),
        (lambda m, b: oar_p_saliency(m.embed, m, b, width=2), "width"),
        (lambda m, b: oar_g_saliency(m.embed, m, b, width=-1), "width"),
        (lambda m, b: oar_g_saliency(m.embed, m, b, noise_std=-1e-3), "noise_std"),
        (lambda m, b: oar_g_saliency(m.embed, m, b, noise_std=0.0, mode="last"), "noise_std"),
        (lambda m, b: oar_g_saliency(m.embed, m, b, seed=[1, 2]), "seed"),
        (lambda m, b: oar_g_saliency(m.embed, m, b, seed="x"), "seed"),
        (lambda m, b: oar_p_saliency("embed", m, b), "embed"),
        (lambda m, b: oar_g_saliency(m.embed, None, b), "forward"),
        (lambda m, b: oar_p_saliency(m.embed, m, b, kl_fn=3), "kl_fn"),
    ],
)
def test_saliency_bad_input(lm, lm_batch, call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call(lm, lm_batch)
