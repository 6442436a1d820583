"""MoE routing replay on a real megatron-core GPTModel (CPU, gloo): record / replay / external routes (R3).

The megatron checks run in two spawns (megatron import ≈ 6 s each): one single-rank child runs every EP=1 scenario
in sequence and returns its measurements (the ``single`` fixture, shared by the tests below), and one EP=2 run.
Shims are applied only inside the children (see tests/cpu/test_megatron_cpu.py).

The "forced" reference never goes through oar_megatron: a second model with the same parameters gets its routers'
``routing`` replaced by a hand-written top-k-at-given-experts function (softmax over the gathered logits, as megatron's
default softmax router does), so replay is compared with an independent construction of "route to these experts".
"""

import pytest
import torch

from oar_megatron.policy.routing_replay import routes_to_router_order, sequence_parallel_shard
from tests.dist_harness import run_ranks

SEED = 1234
B, S, V, H = 2, 8, 64, 32  # batch, sequence, vocabulary, hidden
E, K, LAYERS = 4, 2, 2  # experts, top-k, transformer layers (all MoE)
T = S * B  # tokens the router sees per micro-batch


# ----------------------------------------------------------------------------------------------- child helpers


def _build(ep=1, **extra):
    """Tiny MoE GPT: local spec, 4 experts, top-2, softmax router, no aux loss, bias-free experts, fp32."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    model_parallel_cuda_manual_seed(SEED)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=4, ffn_hidden_size=2 * H,
                            num_moe_experts=E, moe_router_topk=K, moe_token_dispatcher_type="alltoall",
                            expert_model_parallel_size=ep, add_bias_linear=False, use_cpu_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, **extra)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=E), vocab_size=V,
                    max_sequence_length=S, position_embedding_type="rope")


def _routers(model):
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def _forward(model, ids):
    """Logits [B, S, V] and the mean next-token loss against the shifted ids.

    The causal mask is passed explicitly: with ``None`` megatron builds it with ``device="cuda"``, which fails when
    activation recompute reruns the forward inside ``backward()`` (the CPU shims' mode is off there).
    """
    s = ids.shape[1]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    logits = model(ids, torch.arange(s).expand(ids.shape[0], s), attention_mask=causal)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    return logits, loss


def _force_routes(model, state, table):
    """Replace each router's ``routing`` by "these experts": ``table[mb][layer]`` = (ids [T, k], weights or None).

    ids rows of -1: the router's own top-k. weights None: softmax over the current logits at the ids (megatron's
    softmax router, topk-then-softmax); given: those values. ``state["mb"]`` names the micro-batch being run.
    """
    for layer, router in enumerate(_routers(model)):
        def routing(logits, padding_mask=None, layer=layer):
            logits = logits.view(-1, E)
            ids, weights = table[state["mb"]][layer]
            own = torch.topk(logits, k=K, dim=1).indices
            none = ids[:, :1] < 0
            idx = torch.where(none, own, ids.long())
            w = torch.softmax(logits.gather(1, idx), dim=-1, dtype=torch.float32)
            if weights is not None:
                w = torch.where(none, w, weights)
            probs = torch.zeros_like(logits).scatter(1, idx, w)
            return probs, torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        router.routing = routing


def _own_topk_recorder(model, sink):
    """Forward pre-hooks recomputing each router's own top-k from its input (independent of the replay code)."""
    handles = []
    for layer, router in enumerate(_routers(model)):
        def hook(module, args, layer=layer):
            logits = args[0].reshape(-1, H) @ module.weight.t()
            sink.append((layer, torch.topk(logits, k=K, dim=1).indices.sort(dim=1).values))
        handles.append(router.register_forward_pre_hook(hook))
    return handles


def _catch(fn):
    from oar_megatron.policy.routing_replay import RoutingReplayError

    try:
        fn()
    except RoutingReplayError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _max_err(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- EP=1 child


def _single_rank(rank, world_size):
    from megatron.core import parallel_state

    from oar_megatron.compat.megatron_cpu import apply_cpu_shims
    from oar_megatron.policy.routing_replay import RoutingReplay

    assert apply_cpu_shims()
    parallel_state.initialize_model_parallel()
    out = {}
    g = torch.Generator().manual_seed(7)
    data = {mb: torch.randint(0, V, (B, S), generator=g) for mb in (0, 1)}
    gpt = _build()
    gpt.train()
    before = {k: v.clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}

    # (1) record (π_old, no grad) then replay with unchanged weights: identical logits and losses, zero drift.
    replay = RoutingReplay(gpt)
    out["layer_numbers"] = replay.layer_numbers
    own = []
    handles = _own_topk_recorder(gpt, own)
    replay.begin_record()
    rec_logits, rec_loss = {}, {}
    with torch.no_grad():
        for mb in (0, 1):
            with replay.micro_batch(mb):
                rec_logits[mb], rec_loss[mb] = _forward(gpt, data[mb])
    for h in handles:
        h.remove()
    out["record_metrics"] = replay.end_pass()
    recs = {mb: replay.records(mb) for mb in (0, 1)}
    out["recorded_ids_match_own_topk"] = all(
        torch.equal(recs[mb][layer].indices.long().sort(dim=1).values, ids)
        for (layer, ids), mb in zip(own, (0, 0, 1, 1)))
    out["recorded_weights_sum"] = max(_max_err(r.weights.sum(dim=1), torch.ones(T)) for v in recs.values() for r in v)
    out["record_shapes"] = [tuple(recs[0][0].indices.shape), tuple(recs[0][0].weights.shape)]
    with torch.no_grad():
        off_logits = _forward(gpt, data[0])[0]
    out["record_equals_off"] = torch.equal(off_logits, rec_logits[0])
    out["unchanged"] = {}
    for weights in ("recomputed", "recorded"):
        replay.weights = weights
        replay.begin_replay_pass()
        same = True
        for mb in (1, 0):  # a different order than the record pass
            with replay.micro_batch(mb):
                logits, loss = _forward(gpt, data[mb])
            loss.backward()
            same &= torch.equal(logits, rec_logits[mb]) and torch.equal(loss, rec_loss[mb])
        out["unchanged"][weights] = (same, replay.end_pass()["routing_replay/drift"])
    replay.weights = "recomputed"

    # (2) one Adam step that moves the router: replay == forced-to-recorded experts; drift > 0; plain routing differs.
    for p in gpt.parameters():
        p.grad = None
    replay.begin_replay_pass()
    for mb in (0, 1):
        with replay.micro_batch(mb):
            loss = _forward(gpt, data[mb])[1]
        loss.backward()
    replay.end_pass()
    opt = torch.optim.Adam(gpt.parameters(), lr=0.05)
    opt.step()
    for p in gpt.parameters():
        p.grad = None
    after = {k: v.clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}

    state = {"mb": None}
    ref = _build()
    ref.load_state_dict(gpt.state_dict())
    table = {mb: [(r.indices, None) for r in recs[mb]] for mb in (0, 1)}
    _force_routes(ref, state, table)

    replay.begin_replay_pass()
    rep = {}
    for mb in (0, 1):
        with replay.micro_batch(mb):
            rep[mb] = _forward(gpt, data[mb])
        rep[mb][1].backward()
    out["drift_metrics"] = replay.end_pass()
    forced = {}
    for mb in (0, 1):
        state["mb"] = mb
        forced[mb] = _forward(ref, data[mb])
        forced[mb][1].backward()
    with torch.no_grad():
        plain = {mb: _forward(gpt, data[mb])[0] for mb in (0, 1)}
    out["replay_vs_forced_logits"] = max(_max_err(rep[mb][0], forced[mb][0]) for mb in (0, 1))
    out["replay_vs_forced_loss"] = max(_max_err(rep[mb][1], forced[mb][1]) for mb in (0, 1))
    out["plain_vs_replay_logits"] = max(_max_err(plain[mb], rep[mb][0]) for mb in (0, 1))

    # (3) the router learns under replay: its gradient is non-zero and equals the forced reference's.
    router_grads = [r.weight.grad.clone() for r in _routers(gpt)]
    out["router_grad_norm"] = min(gr.norm().item() for gr in router_grads)
    out["router_grad_vs_forced"] = max(_max_err(a, r.weight.grad) for a, r in zip(router_grads, _routers(ref)))
    out["grad_vs_forced"] = max(_max_err(p.grad, q.grad) for p, q in zip(gpt.parameters(), ref.parameters())
                                if p.grad is not None)

    # weights="recorded": forward uses the recorded weight values exactly; the router still gets a gradient.
    for p in gpt.parameters():
        p.grad = None
    table_w = {mb: [(r.indices, r.weights) for r in recs[mb]] for mb in (0, 1)}
    _force_routes(ref, state, table_w)
    replay.weights = "recorded"
    replay.begin_replay_pass()
    errs = []
    for mb in (0, 1):
        with replay.micro_batch(mb):
            logits, loss = _forward(gpt, data[mb])
        loss.backward()
        state["mb"] = mb
        with torch.no_grad():
            errs.append(_max_err(logits, _forward(ref, data[mb])[0]))
    replay.end_pass()
    replay.weights = "recomputed"
    out["recorded_weights_vs_forced"] = max(errs)
    out["recorded_weights_router_grad"] = min(r.weight.grad.norm().item() for r in _routers(gpt))

    # Activation recompute (full, 1 layer per checkpoint): the router reruns in backward on the same records.
    rc = _build(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    rc.train()
    rc.load_state_dict(before, strict=False)
    rc_replay = RoutingReplay(rc)
    rc_replay.begin_record()
    with torch.no_grad():
        for mb in (0, 1):
            with rc_replay.micro_batch(mb):
                _forward(rc, data[mb])
    rc_replay.end_pass()
    out["recompute_same_records"] = all(torch.equal(a.indices, b.indices) for mb in (0, 1)
                                        for a, b in zip(rc_replay.records(mb), recs[mb]))
    rc.load_state_dict(after, strict=False)
    rc_replay.begin_replay_pass()
    for mb in (0, 1):
        with rc_replay.micro_batch(mb):
            loss = _forward(rc, data[mb])[1]
        loss.backward()
    rc_metrics = rc_replay.end_pass()
    out["recompute_drift"] = (rc_metrics["routing_replay/drift"], out["drift_metrics"]["routing_replay/drift"])
    out["recompute_grad_vs_forced"] = max(_max_err(p.grad, q.grad) for p, q in zip(rc.parameters(), ref.parameters())
                                          if p.grad is not None)
    # (weights="recorded" left the reference's grads alone: its forward ran under no_grad.)

    # Token dropping (capacity factor 0.5: 4 slots per expert for 32 assignments): replay keeps the recorded map.
    cap = _build(moe_expert_capacity_factor=0.5)
    cap.train()
    cap.load_state_dict(before, strict=False)
    cap_replay = RoutingReplay(cap)
    seen = []
    for router in _routers(cap):
        router.register_forward_hook(lambda mod, args, output: seen.append(output))
    cap_replay.begin_record()
    with torch.no_grad():
        for mb in (0, 1):
            with cap_replay.micro_batch(mb):
                _forward(cap, data[mb])
    cap_replay.end_pass()
    cap_recs = [r for mb in (0, 1) for r in cap_replay.records(mb)]
    out["capacity_dropped"] = min(int((r.routing_map.sum(dim=1) < K).sum()) for r in cap_recs)
    cap.load_state_dict(after, strict=False)
    seen.clear()
    cap_replay.begin_replay_pass()
    for mb in (0, 1):
        with cap_replay.micro_batch(mb):
            _forward(cap, data[mb])[1].backward()
    out["capacity_drift"] = cap_replay.end_pass()["routing_replay/drift"]
    out["capacity_map_kept"] = all(torch.equal(m, r.routing_map) for (_, m), r in zip(seen, cap_recs))
    out["capacity_probs_off_map"] = max((p * ~m).abs().max().item() for p, m in seen)

    # (4) exactly-once and shape errors.
    errors = {}

    def run(mb, ids=None):
        with replay.micro_batch(mb):
            _forward(gpt, data[mb] if ids is None else ids)

    replay.begin_replay_pass()
    errors["missing"] = _catch(lambda: run(99, data[0]))
    errors["missing_end"] = _catch(replay.end_pass)  # end_pass closes the pass even when it raises
    replay.begin_replay_pass()
    run(0)
    errors["unconsumed"] = _catch(replay.end_pass)
    replay.begin_replay_pass()
    errors["token_count"] = _catch(lambda: run(0, data[0][:, :6]))
    errors["token_count_end"] = _catch(replay.end_pass)  # the failed call consumed nothing
    replay.begin_record()
    with torch.no_grad():
        run(0)
        errors["record_twice"] = _catch(lambda: run(0))
        run(1)
    replay.end_pass()
    replay.begin_replay_pass()
    with torch.no_grad():
        run(0)
        errors["replay_twice"] = _catch(lambda: run(0))
        errors["no_micro_batch"] = _catch(lambda: _forward(gpt, data[1]))
        run(1)
    errors["complete_pass"] = _catch(replay.end_pass)
    errors["end_without_pass"] = _catch(replay.end_pass)
    replay.begin_replay_pass([1])  # one mini-batch of the two: only micro-batch 1 is due
    with torch.no_grad():
        errors["outside_subset"] = _catch(lambda: run(0))
        run(1)
    errors["subset_pass"] = _catch(replay.end_pass)
    errors["subset_unknown"] = _catch(lambda: replay.begin_replay_pass([1, 5]))
    errors["second_replay"] = _catch(lambda: RoutingReplay(gpt))
    api = _build()
    del _routers(api)[0].router_replay  # what a megatron version without the replay slot would look like
    errors["api_drift"] = _catch(lambda: RoutingReplay(api))
    out["errors"] = errors

    # (5) external routes (R3): arbitrary experts, the last position of each sequence without a route.
    gx = torch.Generator().manual_seed(11)
    ext = {}
    for mb in (0, 1):
        ids = torch.stack([torch.randperm(E, generator=gx)[:K] for _ in range(LAYERS * T)]).view(LAYERS, T, K)
        ids[:, (S - 1) * B:] = -1  # router order s*B + b: the last B tokens are position S-1
        w = torch.rand(LAYERS, T, K, generator=gx)
        ext[mb] = (ids, w / w.sum(dim=-1, keepdim=True))
    replay.clear()
    for mb in (0, 1):
        replay.set_external_routes(mb, ext[mb][0])
    out["external_mode"] = None
    for weights in ("recomputed", "recorded"):
        replay.weights = weights
        if weights == "recorded":
            replay.clear()
            for mb in (0, 1):
                replay.set_external_routes(mb, *ext[mb])
        table_x = {mb: [(ext[mb][0][layer], ext[mb][1][layer] if weights == "recorded" else None)
                        for layer in range(LAYERS)] for mb in (0, 1)}
        _force_routes(ref, state, table_x)
        replay.begin_replay_pass()
        out["external_mode"] = out["external_mode"] or replay.mode
        errs = []
        with torch.no_grad():
            for mb in (1, 0):
                with replay.micro_batch(mb):
                    got = _forward(gpt, data[mb])[0]
                state["mb"] = mb
                errs.append(_max_err(got, _forward(ref, data[mb])[0]))
        out[f"external_{weights}"] = (max(errs), replay.end_pass())
    # the external routes really change the output relative to the router's own choice
    out["external_vs_plain"] = _max_err(got, _forward(gpt, data[0])[0].detach())
    replay.clear()
    replay.weights = "recomputed"
    errors_x = {}
    bad = ext[0][0].clone()
    bad[0, 0] = torch.tensor([1, 1])
    errors_x["duplicate"] = _value_error(lambda: replay.set_external_routes(0, bad))
    errors_x["layers"] = _value_error(lambda: replay.set_external_routes(0, ext[0][0][:1].expand(3, T, K)))
    replay.weights = "recorded"
    errors_x["needs_weights"] = _catch(lambda: replay.set_external_routes(0, ext[0][0]))
    out["external_errors"] = errors_x

    replay.detach()
    out["detached"] = all("routing" not in r.__dict__ and r.router_replay is None for r in _routers(gpt))
    parallel_state.destroy_model_parallel()
    return out


def _value_error(fn):
    try:
        fn()
    except ValueError as err:
        return f"ValueError: {err}"
    return "no error"


@pytest.fixture(scope="module")
def single():
    return run_ranks(_single_rank, 1)[0]


# ----------------------------------------------------------------------------------------------- EP=1 tests


@pytest.mark.megatron
@pytest.mark.dist
def test_record_then_replay_unchanged_weights_is_identical(single):
    assert single["layer_numbers"] == [1, 2]
    assert single["record_metrics"]["routing_replay/recorded_micro_batches"] == 2
    assert single["record_shapes"] == [(T, K), (T, K)]
    assert single["recorded_ids_match_own_topk"]  # records hold the π_old router's own top-k ...
    assert single["recorded_weights_sum"] < 1e-6  # ... and its softmax-over-top-k weights
    assert single["record_equals_off"]  # recording does not change the forward
    for weights, (same, drift) in single["unchanged"].items():
        assert same, weights  # bitwise identical logits and losses, replayed in another micro-batch order
        assert drift == 0.0, weights


@pytest.mark.megatron
@pytest.mark.dist
def test_replay_after_update_routes_to_recorded_experts(single):
    m = single["drift_metrics"]
    assert m["routing_replay/tokens"] == 2 * LAYERS * T
    assert 0.0 < m["routing_replay/drift"] < 1.0  # the update moved the router ...
    assert m["routing_replay/drift"] == pytest.approx(
        (m["routing_replay/drift_layer1"] + m["routing_replay/drift_layer2"]) / 2)
    assert single["replay_vs_forced_logits"] < 1e-6  # ... yet replay routes exactly to the recorded experts
    assert single["replay_vs_forced_loss"] < 1e-6
    assert single["plain_vs_replay_logits"] > 1e-3  # and plain routing does not
    assert single["recorded_weights_vs_forced"] < 1e-6  # weights="recorded": the recorded values, exactly


@pytest.mark.megatron
@pytest.mark.dist
def test_router_still_learns_under_replay(single):
    assert single["router_grad_norm"] > 1e-6
    assert single["router_grad_vs_forced"] < 1e-6  # the gradient through the recorded selection
    assert single["grad_vs_forced"] < 1e-6
    assert single["recorded_weights_router_grad"] > 1e-6  # straight-through gradient with recorded weight values


@pytest.mark.megatron
@pytest.mark.dist
def test_replay_under_activation_recompute(single):
    assert single["recompute_same_records"]
    drift, drift_no_recompute = single["recompute_drift"]
    assert drift == pytest.approx(drift_no_recompute)  # recompute calls do not count twice
    assert single["recompute_grad_vs_forced"] < 1e-6  # recompute in backward replays the same routes


@pytest.mark.megatron
@pytest.mark.dist
def test_replay_keeps_recorded_map_under_token_dropping(single):
    assert single["capacity_dropped"] > 0  # every record has dropped assignments: the map is not the top-k map
    assert single["capacity_drift"] > 0.0
    assert single["capacity_map_kept"]  # the dispatcher gets π_old's post-dropping map, not a re-dropped one
    assert single["capacity_probs_off_map"] == 0.0


@pytest.mark.megatron
@pytest.mark.dist
def test_exactly_once_errors(single):
    e = single["errors"]
    assert "no record for micro-batch id 99" in e["missing"]
    assert "not consumed" in e["missing_end"] and "mb 0" in e["missing_end"]
    assert "2 record(s) not consumed" in e["unconsumed"] and "mb 1" in e["unconsumed"]  # both layers of mb 1
    assert "16 tokens" in e["token_count"] and "12 tokens" in e["token_count"]
    assert "4 record(s) not consumed" in e["token_count_end"]
    assert "recorded twice" in e["record_twice"]
    assert "replayed twice" in e["replay_twice"]
    assert "outside `with replay.micro_batch" in e["no_micro_batch"]
    assert e["complete_pass"] == "no error"  # the failed calls above consumed nothing
    assert "without begin_record" in e["end_without_pass"]
    assert "not one of this pass's micro_batches" in e["outside_subset"]
    assert e["subset_pass"] == "no error"  # micro-batch 0 is not due in a pass over [1]
    assert "without records: 5" in e["subset_unknown"]
    assert "already has a RoutingReplay" in e["second_replay"]
    assert e["api_drift"].startswith("RouterAPIError") and "megatron-core 0.16" in e["api_drift"]


@pytest.mark.megatron
@pytest.mark.dist
def test_external_routes_force_the_given_assignment(single):
    assert single["external_mode"] == "external"
    for weights in ("recomputed", "recorded"):
        err, m = single[f"external_{weights}"]
        assert err < 1e-6, weights  # == the hand-forced model routed to the given experts
        assert m["routing_replay/no_route_tokens"] == 2 * LAYERS * B  # last position: the router chose
        assert m["routing_replay/tokens"] == 2 * LAYERS * (T - B)
        assert m["routing_replay/drift"] > 0.3  # random experts mostly differ from the router's own top-2
    assert single["external_vs_plain"] > 1e-3
    x = single["external_errors"]
    assert "twice" in x["duplicate"]
    assert "expected config.num_layers" in x["layers"]
    assert 'weights="recorded" needs' in x["needs_weights"]
    assert single["detached"]


# ----------------------------------------------------------------------------------------------- EP=2


def _ep2(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from oar_megatron.compat.megatron_cpu import apply_cpu_shims
    from oar_megatron.policy.routing_replay import RoutingReplay

    assert apply_cpu_shims()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank routes its own tokens
    data = {mb: torch.randint(0, V, (B, S), generator=g) for mb in ("a", "b")}
    gpt, ref = _build(ep=world_size), _build(ep=world_size)
    gpt.train()
    replay = RoutingReplay(gpt)
    replay.begin_record()
    rec = {}
    with torch.no_grad():
        for mb in data:
            with replay.micro_batch(mb):
                rec[mb] = _forward(gpt, data[mb])[0]
    replay.end_pass()
    out = {"ids_seen": sorted({int(i) for mb in data for r in replay.records(mb) for i in r.indices.unique()})}
    replay.begin_replay_pass()
    same = True
    for mb in ("b", "a"):
        with replay.micro_batch(mb):
            logits, loss = _forward(gpt, data[mb])
        loss.backward()
        same &= torch.equal(logits, rec[mb])
    out["unchanged"] = (same, replay.end_pass()["routing_replay/drift"])

    # Move every router the same way on both ranks (router weights are replicated across EP).
    gr = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for r in _routers(gpt):
            r.weight.add_(0.5 * torch.randn(r.weight.shape, generator=gr))
    ref.load_state_dict(gpt.state_dict())
    state = {"mb": None}
    _force_routes(ref, state, {mb: [(r.indices, None) for r in replay.records(mb)] for mb in data})
    replay.begin_replay_pass()
    errs, replayed = [], {}
    for mb in data:
        with replay.micro_batch(mb):
            replayed[mb] = _forward(gpt, data[mb])[0]
        state["mb"] = mb
        errs.append(_max_err(replayed[mb], _forward(ref, data[mb])[0]))
    drift = replay.end_pass()["routing_replay/drift"]
    with torch.no_grad():  # mode off again: the router's own choice
        plain_diff = max(_max_err(_forward(gpt, data[mb])[0], replayed[mb]) for mb in data)
    out["moved"] = (max(errs), drift, plain_diff)
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.megatron
@pytest.mark.dist
def test_expert_parallel_record_replay():
    for out in run_ranks(_ep2, 2):
        assert out["ids_seen"] == list(range(E))  # local records hold global ids, experts of both EP ranks
        same, drift = out["unchanged"]
        assert same and drift == 0.0
        err, drift, plain_diff = out["moved"]
        assert err < 1e-6  # replay through the all-to-all == forced to the recorded experts
        assert drift > 0.0 and plain_diff > 1e-3


# ----------------------------------------------------------------------------------------------- layout helpers


def test_routes_to_router_order_is_sequence_major():
    routes = torch.arange(B * S * LAYERS * K).view(B, S, LAYERS, K)
    flat = routes_to_router_order(routes)
    assert flat.shape == (LAYERS, S * B, K)
    for b in range(B):
        for s in range(S):
            assert torch.equal(flat[:, s * B + b], routes[b, s])
    tp = 2
    shards = [sequence_parallel_shard(flat, batch_size=B, tp_rank=r, tp_size=tp) for r in range(tp)]
    assert torch.equal(torch.cat(shards, dim=1), flat)
    # rank 1 sees positions S/2..S-1 of every sample: its first token is (s=S/2, b=0)
    assert torch.equal(shards[1][:, 0], routes[0, S // 2])
    with pytest.raises(ValueError):
        sequence_parallel_shard(flat[:, :-1], batch_size=B, tp_rank=0, tp_size=tp)
