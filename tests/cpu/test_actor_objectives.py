"""Two objectives of ``PolicyActor`` checked by hand on the tiny Megatron policy (one spawn, single rank):

- Dr.GRPO's ``seq-mean-token-sum-norm`` divides by the configured constant ``loss.norm_len``, never by the padded
  width of the batch: at ratio 1 the GRPO surrogate is −A per token, so the loss of S responses with lengths n_b
  is exactly −Σ_b A_b·n_b / (S·norm_len), the same for the same rows padded to two different widths; without a
  constant the actor refuses the configuration.
- The format warm-up's ``sft_update`` is one supervised step on the mean token NLL of the responses: its loss is
  the mean NLL a plain forward of the model computes, and the gradient it applies is autograd of that NLL on a
  single-process reference (the DDP main grads after the step, gradient clipping off).
"""

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

PROMPT, LENGTHS, NORM_LEN = 4, (8, 5, 3, 6), 10
ADV = (1.0, -1.0, 0.5, -0.25)


def _rows(vocab):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, vocab, (PROMPT,), generator=g).tolist() for _ in LENGTHS]
    responses = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    return prompts, responses


def _reference_nll(gpt, batch, vocab):
    """Mean over response tokens of −log softmax(logits)[y_t] by a plain forward (no schedule, no DDP), and the
    autograd gradient of it w.r.t. every parameter (torch.autograd.grad: DDP's grad hooks do not fire)."""
    ids, mask = batch.input_ids, batch.response_mask
    logits = gpt(ids, batch.position_ids, None)[..., :vocab]  # [B, L, V] (TP = 1: the full, real vocabulary)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:]
    nll = -(logp * m).sum() / m.sum()
    names, params = zip(*[(n, p) for n, p in gpt.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(nll, params, allow_unused=True)
    return float(nll), {n: (torch.zeros_like(p) if g is None else g.detach().clone())
                        for n, p, g in zip(names, params, grads)}


def _cases(rank, world_size):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor

    model = model_preset("tiny")
    prompts, responses = _rows(model.vocab_size)
    out = {}

    # --- Dr.GRPO: the constant normaliser
    groups = init_parallel(ParallelConfig(distributed_optimizer=False), model, seed=5)
    try:
        PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(), algorithm=load_algorithm("dr_grpo"),
                    groups=groups, micro_batch_size=2)
    except ValueError as exc:
        out["unset"] = str(exc)
    alg = load_algorithm("dr_grpo", loss={"norm_len": NORM_LEN})
    actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=1e-3), algorithm=alg, groups=groups,
                        micro_batch_size=2)
    losses = []
    for width in (None, 24):  # the longest row (12) and the same rows padded to 24
        batch = actor.pack(prompts, responses, torch.tensor(ADV), length=width)
        actor.compute_old_logprobs(batch)
        actor.compute_token_advantages(batch)
        losses.append((batch.input_ids.shape[1], actor.update(batch)["loss"][0]))
    out["dr_grpo"] = losses
    destroy_parallel()

    # --- the supervised warm-up step
    groups = init_parallel(ParallelConfig(distributed_optimizer=False), model, seed=5)
    actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=1e-3, clip_grad=0.0, weight_decay=0.0),
                        algorithm=load_algorithm("grpo"), groups=groups, micro_batch_size=2, temperature=0.7)
    batch = actor.pack(prompts, responses, torch.zeros(len(LENGTHS)))
    gpt = actor.models[0]
    nll, ref_grads = _reference_nll(gpt, batch, model.vocab_size)
    res = actor.sft_update(batch)
    got = {n: p.main_grad.detach().clone() for n, p in gpt.named_parameters() if p.requires_grad}
    out["sft"] = dict(nll=nll, res=res, ref=ref_grads, got=got)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    (res,) = run_ranks(_cases, 1)
    return res


def test_dr_grpo_divides_by_the_configured_constant_not_the_padded_width(results):
    assert "algorithm.loss.norm_len" in results["unset"]
    expected = -sum(a * n for a, n in zip(ADV, LENGTHS)) / (len(LENGTHS) * NORM_LEN)  # -(8-5+1.5-1.5)/40 = -0.075
    (w1, l1), (w2, l2) = results["dr_grpo"]
    assert (w1, w2) == (PROMPT + max(LENGTHS), 24)
    assert l1 == pytest.approx(expected, abs=1e-6)
    assert l2 == pytest.approx(expected, abs=1e-6)


def test_sft_update_is_the_mean_token_nll_and_its_gradient(results):
    sft = results["sft"]
    res = sft["res"]
    assert res["updated"] == [1.0] and len(res["loss"]) == 1
    # the loss is the mean NLL of the batch (at temperature 1: the sampling temperature plays no part)
    assert res["loss"][0] == pytest.approx(sft["nll"], rel=1e-6)
    assert sft["nll"] > 0
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in sft["ref"].values()))
    assert res["grad_norm"][0] == pytest.approx(float(norm), rel=1e-5)
    assert sft["got"].keys() == sft["ref"].keys()
    for name, g in sft["ref"].items():
        torch.testing.assert_close(sft["got"][name], g, rtol=1e-4, atol=1e-7, msg=name)
