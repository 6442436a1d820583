"""``parallel.overlap_param_gather`` reaches megatron and changes nothing but when the parameters are gathered.

On 2 gloo ranks (DP2, distributed optimizer), the same rollout batch twice through ``PolicyActor`` with the overlap
off and on: the flag must be set in megatron's ``DistributedDataParallelConfig`` and ``OptimizerConfig`` (it was
accepted and ignored before), and two rounds (reference swap, π_old, two updates per batch: the second update's
forward gathers the first one's parameters through DDP's pre-hooks) must give the same losses, grad norms and
log-probs, including the reference/π_old passes after the last update (``policy.optim.sync_params``)."""

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]


def _rounds(rank, world_size):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor

    model = model_preset("tiny")
    g = torch.Generator().manual_seed(11)
    prompts = torch.randint(1, 250, (4, 3), generator=g).tolist()
    responses = torch.randint(1, 250, (4, 6), generator=g).tolist()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    out = {}
    for overlap in (False, True):
        groups = init_parallel(ParallelConfig(distributed_optimizer=True, overlap_param_gather=overlap), model,
                               seed=3)
        try:
            alg = load_algorithm("grpo", updates_per_batch=2, kl={"coef": 0.05, "kind": "k3"})
            actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=1e-2, weight_decay=0.0),
                                algorithm=alg, groups=groups, micro_batch_size=1)
            opts = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
            res = {"ddp": [c.ddp_config.overlap_param_gather for c in actor.chunks],
                   "optim": [o.config.overlap_param_gather for o in opts]}
            rows = torch.arange(rank * 2, rank * 2 + 2)
            batch = actor.pack(prompts, responses, adv).rows(rows)
            for r in range(2):
                res[f"ref{r}"] = actor.compute_ref_logprobs(batch)
                res[f"old{r}"] = actor.compute_old_logprobs(batch)
                actor.compute_token_advantages(batch)
                m = actor.update(batch)
                res[f"loss{r}"] = torch.tensor(m["loss"])
                res[f"grad_norm{r}"] = torch.tensor(m["grad_norm"])
            res["params"] = torch.cat([p.detach().reshape(-1) for p in actor.models[0].parameters()])
            out[overlap] = res
        finally:
            destroy_parallel()
    return out


def test_overlap_param_gather_reaches_megatron_and_keeps_the_updates():
    for res in run_ranks(_rounds, 2):
        off, on = res[False], res[True]
        assert off["ddp"] == [False] and set(off["optim"]) == {False}
        assert on["ddp"] == [True] and set(on["optim"]) == {True}
        assert float((off["old1"] - off["old0"]).abs().max()) > 1e-3  # the first batch's updates moved π
        for key in ("ref0", "old0", "ref1", "old1", "loss0", "loss1", "grad_norm0", "grad_norm1", "params"):
            torch.testing.assert_close(on[key], off[key], atol=1e-6, rtol=1e-6, msg=key)
