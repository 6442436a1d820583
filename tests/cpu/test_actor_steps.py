"""A few optimisation steps of ``PolicyActor`` on a tiny dense and a tiny MoE policy with each loss (grpo, gspo,
gspo_token, aspo, cispo) and with OAR-G shaping: on a fixed rollout batch the on-policy surrogate
J = −Σ_t Â_t·log π(y_t) / #tokens decreases, every update steps, losses stay finite. One spawn (single rank)
runs every case so megatron is imported once."""

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.megatron_helpers import random_rollout

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

LOSSES = ["grpo", "gspo", "gspo_token", "aspo", "cispo", "oar_g"]
N, PROMPT, RESP, ROUNDS = 4, 4, 8, 3


def _surrogate(batch, logp):
    mask = batch.response_mask
    return float(-(batch.token_advantages * logp * mask).sum() / mask.sum())


def _cases(rank, world_size):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor

    out = {}
    for preset in ("tiny", "tiny-moe"):
        model = model_preset(preset)
        prompts, responses, adv, scoring = random_rollout(model.vocab_size, N, PROMPT, RESP)
        for name in LOSSES:
            groups = init_parallel(ParallelConfig(distributed_optimizer=False), model, seed=5)
            # 2 updates per rollout batch of 2 micro-batches; lr large enough to move a tiny model in 3 rounds
            alg = load_algorithm(name, updates_per_batch=2)
            actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=3e-3, weight_decay=0.0),
                                algorithm=alg, groups=groups, micro_batch_size=2)
            batch = actor.pack(prompts, responses, adv, scoring=scoring if name == "oar_g" else None)
            js, losses = [], []
            for _ in range(ROUNDS):
                old = actor.compute_old_logprobs(batch)
                actor.compute_token_advantages(batch)
                js.append(_surrogate(batch, old))
                m = actor.update(batch)
                assert all(m["updated"]) and len(m["loss"]) == 2, m
                losses += m["loss"]
            js.append(_surrogate(batch, actor.compute_old_logprobs(batch)))
            out[f"{preset}/{name}"] = dict(j=js, losses=losses,
                                           routing=[k for k in m if k.startswith("routing/")])
            destroy_parallel()
    return out


def test_a_few_steps_decrease_the_loss_for_every_method():
    (res,) = run_ranks(_cases, 1)
    for key, r in res.items():
        j = r["j"]
        assert all(torch.isfinite(torch.tensor(r["losses"]))), key
        assert j[-1] < j[0] - 0.05, (key, j)
        assert all(b < a for a, b in zip(j, j[1:])), (key, j)
        assert bool(r["routing"]) == key.startswith("tiny-moe"), key


def _recompute(rank, world_size):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor

    out = {}
    for preset in ("tiny", "tiny-moe"):
        model = model_preset(preset)
        prompts, responses, adv, _ = random_rollout(model.vocab_size, N, PROMPT, RESP)
        for mode in (None, "selective", "full"):
            groups = init_parallel(ParallelConfig(distributed_optimizer=False), model, seed=5)
            actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=1e-3), groups=groups,
                                algorithm=load_algorithm("grpo", updates_per_batch=2), micro_batch_size=2,
                                recompute=mode)
            cfg = actor.models[0].config
            batch = actor.pack(prompts, responses, adv)
            actor.compute_old_logprobs(batch)
            batch.old_logp = batch.old_logp + 0.1 * batch.response_mask  # ratios off 1: some tokens clip
            actor.compute_token_advantages(batch)
            m = actor.update(batch)
            out[f"{preset}/{mode}"] = dict(granularity=cfg.recompute_granularity, loss=m["loss"],
                                           grad_norm=m["grad_norm"])
            destroy_parallel()
    return out


def test_activation_recompute_gives_the_same_updates():
    """No attention mask is passed (megatron's default causal mask, built with device="cuda" inside the backward
    rerun): compat.megatron_cpu re-enters its placement mode around recompute, so "full" and "selective" run on CPU
    and match no recompute."""
    (res,) = run_ranks(_recompute, 1)
    for preset in ("tiny", "tiny-moe"):
        base = res[f"{preset}/None"]
        assert base["granularity"] is None
        for mode in ("selective", "full"):
            got = res[f"{preset}/{mode}"]
            assert got["granularity"] == mode
            assert got["loss"] == pytest.approx(base["loss"], abs=1e-6)
            assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
