"""oar-demo: a complete RL run of the numerics API on a tiny policy, on one CPU, in about a minute.

What it does (one step = rollout → reward → advantage → saliency → reshape → loss → update):
  1. samples G responses per prompt from a tiny pure-torch causal LM on a verifiable task: the prompt is
     ``a + b =``, the response is R free "reasoning" tokens, the answer marker, one answer digit and EOS; the reward
     is 1 when the digit is (a + b) mod 5;
  2. turns rewards into GRPO advantages (``group_advantages``, optional ``filter_groups``);
  3. for OAR algorithms, scores every reasoning token with OAR-G (gradient × input) or OAR-P (counterfactual
     perturbation) under π_old and reshapes the advantages with ``oar_weights``;
  4. runs ``updates_per_batch`` Adam steps on ``policy_loss`` (any registered loss), logging clip fractions,
     ESS-ratio and top-10% advantage mass (``credit_metrics``).

This is the embedded demonstration until the Megatron RL loop (``oar-train``) exists. It is deliberately small:
the sampler applies a per-position allowed-token mask (a logits processor), and the trainer re-applies the same mask
when recomputing log-probs, exactly as a trainer must match its rollout engine's sampling.

Run:  ``oar-demo``                      (OAR-G, the default)
      ``oar-demo algorithm=grpo steps=150 seed=1``
      ``oar-demo algorithm=gspo_token_oar_g``     (any name in configs/algorithm/)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .algorithms import compute_advantages, filter_groups, kl_penalty, policy_loss
from .algorithms.oar import credit_metrics, shape_advantages
from .algorithms.saliency import oar_g_saliency, oar_p_saliency
from .algorithms.segment import build_scoring_batch
from .config import AlgorithmConfig, load_algorithm

# ------------------------------------------------------------------------------------------------ the task


@dataclass(frozen=True)
class Vocab:
    pad: int = 0
    bos: int = 1
    eos: int = 2
    answer: int = 3  # the answer marker (the role of "\boxed{")
    plus: int = 4
    equals: int = 5
    digit0: int = 6  # digits 0..9 → ids 6..15
    scratch0: int = 16  # 8 free scratch tokens → ids 16..23
    size: int = 24

    def digit(self, d: int | torch.Tensor):
        return d + self.digit0


V = Vocab()
REASONING_LEN = 4


BASE = 3  # operands and answers are digits 0..BASE-1: chance accuracy 1/BASE


def make_prompts(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 5] prompts ``BOS a + b =`` and their answers (a + b) mod BASE, a, b uniform in 0..BASE-1."""
    a = torch.randint(0, BASE, (n,), generator=gen)
    b = torch.randint(0, BASE, (n,), generator=gen)
    ids = torch.stack([torch.full_like(a, V.bos), V.digit(a), torch.full_like(a, V.plus), V.digit(b), torch.full_like(a, V.equals)], 1)
    return ids, (a + b) % BASE


def allowed_tokens(position: int) -> torch.Tensor:
    """[V] bool: the tokens the sampler may emit at response ``position`` (reasoning: digits and scratch; then the
    answer marker; then a digit; then EOS)."""
    allowed = torch.zeros(V.size, dtype=torch.bool)
    if position < REASONING_LEN:
        allowed[V.digit0 : V.size] = True
    elif position == REASONING_LEN:
        allowed[V.answer] = True
    elif position == REASONING_LEN + 1:
        allowed[V.digit0 : V.digit0 + BASE] = True
    else:
        allowed[V.eos] = True
    return allowed


RESPONSE_LEN = REASONING_LEN + 3
ALLOWED = torch.stack([allowed_tokens(p) for p in range(RESPONSE_LEN)])  # [T, V]
# Forced positions (one allowed token) carry no decision and are left out of the loss.
SAMPLED = ALLOWED.sum(-1) > 1  # [T]

# ------------------------------------------------------------------------------------------------ the policy


class TinyCausalLM(nn.Module):
    """A 2-layer pre-norm causal transformer: ``embed(ids) -> [B, L, H]``, ``forward_embeds(e, attn) -> logits``."""

    def __init__(self, vocab: int = V.size, hidden: int = 64, layers: int = 2, heads: int = 4, max_len: int = 32):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids)

    def forward_embeds(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        L = embeds.shape[1]
        x = embeds + self.pos(torch.arange(L, device=embeds.device))
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=embeds.device), 1)  # True = not attended
        pad = None if attention_mask is None else ~attention_mask.bool()
        x = self.blocks(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
        return self.head(self.norm(x))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_embeds(self.embed(ids))


def masked_logits(logits: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Apply the sampler's allowed-token mask to logits [B, T, V] of response positions start..start+T-1."""
    return logits.masked_fill(~ALLOWED[start : start + logits.shape[1]], float("-inf"))


def response_logp(model: TinyCausalLM, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log π(y_t | x, y_<t) of every response token, [B, T], under the sampler's mask."""
    seq = torch.cat([prompts, responses], 1)
    P = prompts.shape[1]
    logits = model(seq[:, :-1])[:, P - 1 :]  # rows predicting the response tokens
    return torch.log_softmax(masked_logits(logits).float(), -1).gather(-1, responses[..., None]).squeeze(-1)


@torch.no_grad()
def sample(model: TinyCausalLM, prompts: torch.Tensor, gen: torch.Generator, temperature: float = 1.0):
    """Sample one response per prompt row; returns (responses [B, T], rollout log-probs [B, T])."""
    seq, logps = prompts, []
    for t in range(RESPONSE_LEN):
        logits = masked_logits(model(seq)[:, -1:] / temperature, t)[:, 0]
        probs = torch.softmax(logits.float(), -1)
        tok = torch.multinomial(probs, 1, generator=gen)
        logps.append(probs.gather(-1, tok).log())
        seq = torch.cat([seq, tok], 1)
    return seq[:, prompts.shape[1] :], torch.cat(logps, 1)


# ------------------------------------------------------------------------------------------------ one RL step


@dataclass
class DemoConfig:
    algorithm: str = "oar_g"
    steps: int = 300
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    eval_prompts: int = 200
    log_every: int = 10


def saliency_scores(model, prompts, responses, cfg: AlgorithmConfig, seed: int):
    """Raw OAR saliency [B, T] of the reasoning tokens under π_old, and the scored mask [B, T].

    Scoring sequences are ``prompt | reasoning | conclude | answer`` (ALGORITHMS.md §1.2): here the conclude string
    is the answer marker itself and the answer is the sampled digit, so the sequences are the rollouts themselves.
    """
    r = REASONING_LEN
    batch = build_scoring_batch(
        prompts.tolist(), responses[:, :r].tolist(), [V.answer], responses[:, r + 1 : r + 2].tolist(), pad_id=V.pad
    )
    prompt_len = prompts.shape[1]

    def forward(embeds, attention_mask):
        return masked_tail(model.forward_embeds(embeds, attention_mask), prompt_len)

    s = cfg.shaper
    if s.saliency == "oar_g":
        sal = oar_g_saliency(model.embed, forward, batch, mode=cfg.pfinal_mode, noise_std=s.noise_std,
                             seed=seed, width=RESPONSE_LEN)
    else:
        sal = oar_p_saliency(model.embed, forward, batch, mode=cfg.pfinal_mode, chunk_size=s.chunk_size,
                             width=RESPONSE_LEN)
    return sal.scores, sal.mask


def masked_tail(logits: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Apply the sampler mask to the response part of full-sequence logits [B, L, V] (prompt rows untouched)."""
    out = logits.clone()
    resp = out[:, prompt_len - 1 :]
    out[:, prompt_len - 1 :] = resp.masked_fill(~ALLOWED[: resp.shape[1]], -1e9)
    return out


def rl_step(model, opt, ref_model, cfg: AlgorithmConfig, demo: DemoConfig, gen: torch.Generator, step: int) -> dict:
    t0 = time.perf_counter()
    prompts, answers = make_prompts(demo.prompts_per_step, gen)
    prompts = prompts.repeat_interleave(demo.group_size, 0)
    answers = answers.repeat_interleave(demo.group_size, 0)
    model.eval()
    responses, rollout_logp = sample(model, prompts, gen)
    rewards = (responses[:, REASONING_LEN + 1] == V.digit(answers)).float()
    t_rollout = time.perf_counter() - t0

    adv = compute_advantages(cfg.advantage.estimator, rewards, demo.group_size)
    keep = torch.ones_like(rewards, dtype=torch.bool)
    if cfg.advantage.filter_groups:
        keep = filter_groups(rewards, demo.group_size).keep
    mask = SAMPLED.expand(len(rewards), -1) & keep[:, None]
    metrics = {"reward": float(rewards.mean()), "kept": float(keep.float().mean())}
    if not bool(mask.any()):
        return {**metrics, "loss": 0.0, "skipped": 1.0, "time": time.perf_counter() - t0}

    with torch.no_grad():
        old_logp = response_logp(model, prompts, responses)
        ref_logp = response_logp(ref_model, prompts, responses) if cfg.kl.coef > 0 else None
    t1 = time.perf_counter()
    if cfg.shaper.name == "oar":
        scores, score_mask = saliency_scores(model, prompts, responses, cfg, seed=demo.seed * 100003 + step)
        s = cfg.shaper
        tok_adv = shape_advantages("oar", adv, mask, scores=scores, score_mask=score_mask & mask,
                                   quantile=s.quantile, beta=s.beta, floor=s.floor)
    else:
        tok_adv = shape_advantages("none", adv, mask)
    t_saliency = time.perf_counter() - t1
    credit = credit_metrics(tok_adv, mask)
    nz = (adv != 0) & keep

    model.train()
    loss_opts = {k: v for k, v in vars(cfg.loss.build()).items() if k != "name"}
    perm = torch.randperm(len(rewards), generator=gen)
    minis = perm.chunk(cfg.updates_per_batch)
    for rows in minis:
        logp = response_logp(model, prompts[rows], responses[rows])
        loss, lm = policy_loss(cfg.loss.name, logp, old_logp[rows], tok_adv[rows], mask[rows], **loss_opts)
        if cfg.kl.coef > 0:
            kl = kl_penalty(logp, ref_logp[rows], cfg.kl.kind)
            loss = loss + cfg.kl.coef * (kl * mask[rows]).sum() / mask[rows].sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {
        **metrics,
        "loss": float(loss.detach()),
        "clip_frac": lm["clip_frac"],
        "ratio_mean": lm["ratio_mean"],
        "grad_norm": float(gnorm),
        **({"ess_ratio": float(credit["ess_ratio"][nz].mean()), "top10_mass": float(credit["top10_mass"][nz].mean())}
           if bool(nz.any()) else {}),
        "rollout_train_dlogp": float(((old_logp - rollout_logp).abs() * mask).sum() / mask.sum()),
        "t_rollout": t_rollout,
        "t_saliency": t_saliency,
        "time": time.perf_counter() - t0,
    }


@torch.no_grad()
def evaluate(model: TinyCausalLM, n: int, seed: int) -> float:
    """Greedy accuracy on ``n`` fixed prompts (temperature → 0 via argmax sampling)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    prompts, answers = make_prompts(n, gen)
    model.eval()
    seq = prompts
    for t in range(RESPONSE_LEN):
        logits = masked_logits(model(seq)[:, -1:], t)[:, 0]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return float((seq[:, prompts.shape[1] + REASONING_LEN + 1] == V.digit(answers)).float().mean())


def run(demo: DemoConfig, overrides: dict | None = None, *, quiet: bool = False) -> list[dict]:
    """Train for ``demo.steps`` steps; returns the per-step metrics (with ``eval_acc`` at the first and last)."""
    cfg = load_algorithm(demo.algorithm, **(overrides or {}))
    torch.manual_seed(demo.seed)
    gen = torch.Generator().manual_seed(demo.seed)
    model = TinyCausalLM()
    ref_model = TinyCausalLM()
    ref_model.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=demo.lr)
    history = []
    acc0 = evaluate(model, demo.eval_prompts, demo.seed)
    say = (lambda *a: None) if quiet else print
    say(f"oar-demo: algorithm={cfg.name} loss={cfg.loss.name} shaper={cfg.shaper.name}"
        f"{'/' + cfg.shaper.saliency if cfg.shaper.name == 'oar' else ''} steps={demo.steps} "
        f"batch={demo.prompts_per_step}x{demo.group_size} updates/batch={cfg.updates_per_batch}")
    say(f"step    0  greedy accuracy {acc0:.3f}")
    window: list[dict] = []
    for step in range(1, demo.steps + 1):
        m = rl_step(model, opt, ref_model, cfg, demo, gen, step)
        history.append(m)
        window.append(m)
        if step % demo.log_every == 0 or step == demo.steps:
            keys = ("reward", "loss", "clip_frac", "ess_ratio", "top10_mass", "rollout_train_dlogp", "time")
            avg = {k: _mean([w[k] for w in window if k in w]) for k in keys}
            window.clear()
            say(f"step {step:4d}  reward {avg['reward']:.3f}  loss {avg['loss']:+.4f}  clip {avg['clip_frac']:.3f}  "
                f"ess {avg['ess_ratio']:.3f}  top10 {avg['top10_mass']:.3f}  |dlogp| {avg['rollout_train_dlogp']:.1e}  "
                f"{1000 * avg['time']:.0f} ms/step")
    acc1 = evaluate(model, demo.eval_prompts, demo.seed)
    history[0]["eval_acc"], history[-1]["eval_acc"] = acc0, acc1
    say(f"done: greedy accuracy {acc0:.3f} -> {acc1:.3f}")
    return history


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _parse(argv: list[str]) -> tuple[DemoConfig, dict]:
    """``key=value`` arguments (Hydra style): DemoConfig fields, plus dotted algorithm overrides, e.g.
    ``loss.eps_high=0.28`` or ``shaper.beta=2``."""
    demo, over = DemoConfig(), {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"oar-demo: expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        if hasattr(demo, key):
            typ = type(getattr(demo, key))
            try:
                setattr(demo, key, typ(value))
            except ValueError:
                raise SystemExit(f"oar-demo: {key}: expected {typ.__name__}, got {value!r}") from None
        else:
            node = over
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = _literal(value)
    return demo, over


def _literal(value: str):
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return {"null": None, "true": True, "false": False}.get(value.lower(), value)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    demo, over = _parse(sys.argv[1:] if argv is None else argv)
    try:
        run(demo, over)
    except ValueError as exc:
        print(f"oar-demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
