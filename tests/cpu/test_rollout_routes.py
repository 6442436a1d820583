"""MoE routing replay from the rollout (R3) through ``PolicyActor``: routes given with the rollout
(``set_rollout_routes``, SGLang's ``return_routed_experts``) are what π_old's forward and every update pass route by.
One single-rank spawn (megatron imported once) runs:

* the tiny MoE preset with the model's own routes (taken from a record pass) as the rollout's: π_old is bit-identical
  to the free forward's and the π_old/rollout routing mismatch is 0;
* random rollout routes: every router call of π_old (two micro-batches) and of both update passes (one micro-batch
  each) selects exactly the supplied experts at every position that has a route, π_old differs from the free forward,
  the mismatch metric is > 0, and the update steps;
* end to end against the protocol-exact fake SGLang serving a tiny Qwen3-MoE (``transformers``, fp32) with
  ``--enable-return-routed-experts``: the routes its routers chose travel through ``SGLangEngine`` (``RouteSpec``)
  and ``Sample.routed_experts`` into the megatron policy loaded from the same weights; π_old under those routes equals
  the server's log-probs (≤ 1e-4) and the free forward, and the mismatch is 0.
"""

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

N, PROMPT, RESP = 4, 4, 6


def _capture():
    """Patch the replay hook so every replayed router call logs (micro-batch id, layer, selected experts [T, k])."""
    from oar_megatron.policy import routing_replay as rr

    log = []
    original = rr._LayerHook.get_replay_topk

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        values, idx = original(self, scores, topk, num_groups, group_topk, default_compute_topk)
        if self.action == "replay":
            log.append((self.owner._mb, self.ordinal, idx.detach().clone()))
        return values, idx

    rr._LayerHook.get_replay_topk = get_replay_topk
    return log


def _row_routes(batch, per_row):
    """Per-row routes [n_b, layers, k] (n_b = last response position) from a [N, W, layers, k] tensor."""
    col = torch.arange(batch.input_ids.shape[1])
    last = torch.where(batch.response_mask, col, torch.full_like(col, -1)).amax(1)
    return [per_row[b, : int(last[b])].clone() for b in range(batch.size)]


def _own_routes(actor, batch):
    """The routes a record pass stored, as [N, W, layers, k] (router order [T = W·b, k] per layer → rows)."""
    replay = actor.replays[0]
    mbs, width = actor.micro_batch_size, batch.input_ids.shape[1]
    out = []
    for mb in range(batch.size // mbs):
        recs = replay.records(mb)
        layers = torch.stack([r.indices.long() for r in recs])  # [L, W·b, k]
        out.append(layers.view(len(recs), width, mbs, -1).permute(2, 1, 0, 3))  # [b, W, L, k]
    return torch.cat(out)


def _check_log(log, batch, mbs, passes):
    """Every replayed call selected the supplied experts wherever a route was given; returns the calls per pass."""
    routes = batch.routed_experts.long()  # [N, W, L, k]
    width = routes.shape[1]
    seen = 0
    for mb, layer, idx in log:
        want = routes[mb * mbs:(mb + 1) * mbs, :, layer]  # [b, W, k]
        got = idx.view(width, mbs, -1).permute(1, 0, 2)
        has = want[..., 0] >= 0
        assert torch.equal(got[has], want[has]), (mb, layer)
        seen += 1
    return seen


def _ranks(rank, world_size, tmp):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor
    from tests.megatron_helpers import random_rollout

    log = _capture()
    out = {}
    model = model_preset("tiny-moe")
    prompts, responses, adv, _ = random_rollout(model.vocab_size, N, PROMPT, RESP)
    responses = [r[: RESP - b] for b, r in enumerate(responses)]  # rows of different lengths
    groups = init_parallel(ParallelConfig(distributed_optimizer=False), model, seed=5)
    actor = PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=3e-3, weight_decay=0.0),
                        algorithm=load_algorithm("grpo", updates_per_batch=2), groups=groups, micro_batch_size=2)
    batch = actor.pack(prompts, responses, adv)
    free = actor.compute_old_logprobs(batch).clone()  # records its own routes
    own = _row_routes(batch, _own_routes(actor, batch))
    # 1. the model's own routes given as the rollout's: bit-identical π_old, no mismatch
    actor.set_rollout_routes(batch, own)
    log.clear()
    same = actor.compute_old_logprobs(batch).clone()
    out["own"] = dict(equal=torch.equal(same, free), calls=_check_log(log, batch, 2, 1),
                      drift=actor.old_routing_metrics["routing_old/0/routing_replay/drift"])
    # 2. random rollout routes: π_old and both update passes route exactly so
    g = torch.Generator().manual_seed(7)
    cfg = actor.models[0].config
    rand = [torch.stack([torch.stack([torch.randperm(cfg.num_moe_experts, generator=g)[: cfg.moe_router_topk]
                                      for _ in range(cfg.num_layers)]) for _ in range(r.shape[0])]) for r in own]
    actor.set_rollout_routes(batch, rand)
    log.clear()
    old = actor.compute_old_logprobs(batch).clone()
    calls_old = _check_log(log, batch, 2, 1)
    mismatch = actor.old_routing_metrics["routing_old/0/routing_replay/drift"]
    actor.compute_token_advantages(batch)
    log.clear()
    upd = actor.update(batch)
    out["random"] = dict(diff=float((old - free).abs().max()), calls_old=calls_old, mismatch=mismatch,
                         calls_update=_check_log(log, batch, 2, 2), updated=upd["updated"],
                         update_drift=upd["routing/0/routing_replay/drift"],
                         no_route=actor.old_routing_metrics["routing_old/0/routing_replay/no_route_tokens"])
    # 3. bad input: one line each
    errors = []
    for bad in ([r[:-1] for r in own], own[:-1]):
        try:
            actor.set_rollout_routes(batch, bad)
        except ValueError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    destroy_parallel()
    out["fake"] = _fake_sglang(tmp, log)
    return out


def _fake_sglang(tmp, log):
    """End to end: the fake serves a tiny Qwen3-MoE with its real routes; the policy replays them."""
    from oar_megatron.convert import hf_model_config
    from oar_megatron.rollout.base import SamplingParams
    from oar_megatron.rollout.sglang import RouteSpec, SGLangEngine
    from tests.convert.hf_tiny import make_hf_model
    from tests.sglang_fake import FakeSGLang, HFModel

    d = f"{tmp}/qwen3_moe"
    make_hf_model("qwen3_moe", d)
    cfg = hf_model_config(d)
    spec = RouteSpec(cfg.num_layers, cfg.moe_router_topk, cfg.num_moe_experts)
    with FakeSGLang(HFModel(d), routed_experts=(spec.num_layers, spec.topk, spec.num_experts)) as fake:
        eng = SGLangEngine([fake.url], vocab_size=100, routed_experts=spec)
        eng.check_servers()
        samples = eng.generate([[5, 17, 3, 44], [9, 2, 71]], SamplingParams(temperature=1.0, max_new_tokens=6, n=2))
    return replay_samples(d, samples, log)


def replay_samples(hf_dir, samples, log=None):
    """The megatron policy loaded from ``hf_dir`` (the weights the samples came from) replays the samples' routes:
    π_old vs the engine's log-probs and vs the free forward, the π_old/rollout routing mismatch, and (``log``) the
    replayed calls checked against the routes. Needs an initialised process group (``run_ranks``)."""
    from oar_megatron.config import ParallelConfig
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.convert import SafetensorsReader, hf_model_config
    from oar_megatron.convert.config import architecture, read_hf_config
    from oar_megatron.convert.mapping import load_hf_chunks
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor

    log = _capture() if log is None else log
    cfg = hf_model_config(hf_dir)
    groups = init_parallel(ParallelConfig(distributed_optimizer=False), cfg, seed=5)
    actor = PolicyActor(model=cfg, parallel=groups.cfg, optim=OptimConfig(lr=1e-3), groups=groups,
                        algorithm=load_algorithm("grpo"), micro_batch_size=2)
    with SafetensorsReader(hf_dir) as src:
        load_hf_chunks(src, cfg, architecture(read_hf_config(hf_dir)), actor.models, groups)
    batch = actor.pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], torch.zeros(len(samples)),
                       rollout_logp=[s.logprobs for s in samples])
    free = actor.compute_old_logprobs(batch).clone()
    actor.set_rollout_routes(batch, [s.routed_experts for s in samples])
    log.clear()
    old = actor.compute_old_logprobs(batch)
    mask = batch.response_mask
    res = dict(samples=len(samples), calls=_check_log(log, batch, 2, 1),
               server_vs_old=float(((old - batch.rollout_logp).abs() * mask).max()),
               free_vs_old=float((old - free).abs().max()),
               mismatch=actor.old_routing_metrics["routing_old/0/routing_replay/drift"],
               shapes=[tuple(s.routed_experts.shape) for s in samples],
               lengths=[len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples])
    destroy_parallel()
    return res


def test_rollout_routes_are_replayed(tmp_path):
    (res,) = run_ranks(_ranks, 1, str(tmp_path), timeout=900)
    own, rnd, fake = res["own"], res["random"], res["fake"]
    assert own["equal"] and own["drift"] == 0.0 and own["calls"] == 2 * 2  # 2 micro-batches x 2 MoE layers
    assert rnd["calls_old"] == 4 and rnd["calls_update"] == 4  # π_old: 2 mbs x 2 layers; 2 updates of 1 mb x 2 layers
    assert rnd["diff"] > 1e-3 and rnd["mismatch"] > 0.3 and min(rnd["update_drift"]) > 0.3
    assert rnd["no_route"] > 0 and all(rnd["updated"])
    assert len(res["errors"]) == 2 and all("rollout routes:" in e and "\n" not in e for e in res["errors"])
    assert fake["samples"] == 4 and fake["calls"] == 4
    assert fake["shapes"] == [(n, 2, 2) for n in fake["lengths"]]
    assert fake["server_vs_old"] <= 1e-4 and fake["free_vs_old"] <= 1e-6 and fake["mismatch"] == 0.0, fake
