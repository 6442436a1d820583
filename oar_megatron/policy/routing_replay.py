"""MoE routing replay: record the experts (and weights) π_old routed each token to, replay them in training passes.

Why. In an MoE policy a gradient update moves the router, so the experts that the training forward picks for a token
drift away from those that produced π_old (GSPO §5.3: ~10% of activated experts per update in Qwen3-30B-A3B) or the
rollout engine's sample (R3). The token-level ratio π_θ/π_old then mixes a policy change with a routing change, and
GRPO on MoE fails to converge without Routing Replay (GSPO Fig. 3; ALGORITHMS.md §2.4, §5.13). Replay fixes the
expert *selection* to the recorded one; users report collapse when the routing *weights* are left out as well
(LANDSCAPE.md, complaint 2), so both are recorded.

Usage (one ``RoutingReplay`` per model chunk; the caller names each micro-batch)::

    replay = RoutingReplay(model_chunk)                  # hooks every TopKRouter in the chunk; mode "off"
    replay.begin_record()                                # π_old pass (forward-only)
    for mb_id, batch in enumerate(micro_batches):
        with replay.micro_batch(mb_id):
            old_logp = forward(model_chunk, batch)
    replay.end_pass()
    for epoch in range(num_epochs):                      # several passes over the same records
        for mini_batch in mini_batches:                  # one optimizer update per mini-batch
            replay.begin_replay_pass(mini_batch)         # the ids of this pass (None: all records)
            for mb_id in mini_batch:                     # any order, each id exactly once
                with replay.micro_batch(mb_id):
                    loss = forward(model_chunk, micro_batches[mb_id]); loss.backward()
            metrics = replay.end_pass()                  # raises if a record was not consumed; drift metrics
            optimizer.step()
    # R3: routes from the rollout engine instead of a recorded π_old pass
    replay.set_external_routes(mb_id, expert_ids, weights=None)   # [L, T, k] per micro-batch
    replay.begin_replay_pass(); ...; replay.end_pass()

Inside megatron's schedules, ``forward_step_func(data_iterator, model)`` finds the chunk's instance with
``RoutingReplay.of(model)`` (through DDP / Float16Module wrappers) and wraps its model call in ``micro_batch``.

Modes: ``off`` (the router is untouched), ``record`` (π_old pass), ``replay`` (records from a record pass),
``external`` (records supplied with the rollout, R3). ``mode`` says which one is active; ``end_pass`` returns to off.

How it hooks megatron (no megatron file is edited). Two per-instance attributes on each ``TopKRouter``:

* ``router.routing`` is shadowed by a wrapper (``TopKRouter.forward`` calls ``self.routing(logits, padding_mask=...)``
  after the gating GEMM). The wrapper finds the record for (micro-batch, layer), checks it and stores/post-processes.
* ``router.router_replay`` (megatron's own per-router replay slot, ``None`` unless ``moe_enable_routing_replay``)
  is set to a small object with megatron's ``get_replay_topk(scores, topk, num_groups, group_topk, default)``
  signature. ``topk_routing_with_score_function`` calls it in place of ``torch.topk`` (or group-limited top-k); it
  returns ``(scores.gather(1, idx), idx)``. Everything after the selection stays megatron's: softmax over the k
  selected logits, sigmoid normalisation, ``moe_router_topk_scaling_factor``, the scatter to ``[T, E]``, aux/z
  losses, the expert-bias token counts. This is the same seam megatron-core's RouterReplay uses (0.16 through main).
At construction every hooked attribute is looked up and checked (router class, ``routing``, ``router_replay``, the
``router_replay`` parameter of ``topk_routing_with_score_function``), and at run time each routing call must reach
the top-k hook exactly once; anything else is a ``RouterAPIError`` naming the installed megatron-core version.
Unsupported router settings fail at construction: ``moe_router_fusion`` (the TE fused top-k bypasses the hook),
sinkhorn routing, and megatron's own ``moe_enable_routing_replay`` (two replays would fight over the same slot).

Decision: replayed weights. ``weights="recomputed"`` (default) keeps the recorded expert *selection* (the routing
map is exactly the recorded one) and recomputes the weights from the current router logits at those experts,
normalised as the router would (softmax over the k selected logits, or softmax-then-gather with pre-softmax, or
sigmoid / sum). The router logits' gradient therefore flows through the recorded selection and the router keeps
learning; this is the Routing Replay of GSPO (§5.3: cache the experts, replay them) and of R3 (rollout routing masks,
training-side gating weights). With unchanged parameters the recomputed weights equal the recorded ones bit for bit.
``weights="recorded"`` replays the recorded weight *values* too (bitwise π_old combine weights) with a
straight-through gradient: ``probs = recorded + (p − sg(p))``, p the recomputed weights, so the router still gets
the gradient the recomputed weights would give and megatron's aux-loss hooks on ``probs`` stay in the graph.
External routes need ``weights=`` for this mode.

Exactly-once. A record pass stores one record per (micro-batch id, layer); recording a key twice is an error. A replay
pass must consume every record exactly once: a missing record, a second use within the pass, a different token count
or a router call outside ``micro_batch`` raise ``RoutingReplayError``; ``end_pass`` raises if any record is left.
``begin_replay_pass`` starts the next pass over the same records (epochs), or over a subset of the ids (one
mini-batch per optimizer update); the micro-batch order may differ from the record pass. Activation recompute
(megatron ``recompute_granularity``) reruns the router inside backward: such calls (detected as a router call while
autograd runs a backward) are not consumptions; they take the record that the same layer's forward consumed, first
in first out (megatron's schedules run backward in forward order per chunk), so the recomputed forward sees the
same routes.

Parallelism: records are rank-local. The router runs on each rank's own tokens *before* the token dispatcher, so
under EP a record holds the local tokens' global expert ids and is replayed on the same rank (the all-to-all then
routes exactly as recorded). With TP and no sequence parallel every TP rank routes all S·B tokens of the micro-batch
(identical records per TP rank); with sequence parallel the router sees this rank's S/TP slice, and under CP this
rank's CP chunk. Token order is the router's: the ``[S, B]`` hidden states flattened sequence-major, token
``s·B + b`` (for packed THD batches, B = 1, the packed order). External routes must be given in that local order:
``routes_to_router_order`` and ``sequence_parallel_shard`` build it from per-sequence ``[B, S, L, k]`` routes.

Metrics (computed during replay, no host sync until ``end_pass``): per layer, the fraction of tokens whose own top-k
under the current weights differs (as a set) from the replayed one, the routing drift GSPO reports at ~10% per
update. For external routes this is the train/rollout routing mismatch. Recompute calls are not counted twice.

Memory: per (micro-batch, layer) ``[T, k]`` int32 expert ids and ``[T, k]`` weights; the ``[T, E]`` routing map is
rebuilt from the ids, and stored as well only when token dropping (``moe_expert_capacity_factor``) can make it differ.
``storage_device="cpu"`` keeps records on the host (one device-to-host copy per layer and micro-batch when recording).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "MODES",
    "RouterAPIError",
    "RoutingReplay",
    "RoutingReplayError",
    "routes_to_router_order",
    "sequence_parallel_shard",
]

MODES = ("off", "record", "replay", "external")
WEIGHT_MODES = ("recomputed", "recorded")
_ATTR = "_oar_routing_replay"  # set on the model chunk, found by RoutingReplay.of
_NO_ROUTE = -1  # external expert id meaning "no route for this token: let the router choose"


class RoutingReplayError(RuntimeError):
    """A record was missing, used twice, left unconsumed, of the wrong shape, or the call sequence was wrong."""


class RouterAPIError(RoutingReplayError):
    """The installed megatron-core's router does not look like the one the hooks were written for."""


def _megatron_version() -> str:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception:  # noqa: BLE001 - only used in an error message
        return "unknown"


def _api_error(what: str) -> RouterAPIError:
    return RouterAPIError(
        f"routing replay: {what} (megatron-core {_megatron_version()}; hooks written for 0.16-0.19, where "
        "TopKRouter.forward calls self.routing(logits, padding_mask=...) and topk_routing_with_score_function "
        "calls router_replay.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk))")


def _megatron_router_api():
    """Import and check megatron's TopKRouter and the top-k function that consults ``router_replay``."""
    try:
        from megatron.core.transformer.moe import moe_utils
        from megatron.core.transformer.moe.router import TopKRouter
    except ImportError as err:
        raise _api_error(f"cannot import megatron's MoE router ({err})") from err
    fn = getattr(moe_utils, "topk_routing_with_score_function", None)
    if fn is None or "router_replay" not in inspect.signature(fn).parameters:
        raise _api_error("moe_utils.topk_routing_with_score_function has no router_replay parameter")
    routing = getattr(TopKRouter, "routing", None)
    if not callable(routing) or next(iter(list(inspect.signature(routing).parameters)[1:]), None) != "logits":
        raise _api_error("TopKRouter.routing(self, logits, ...) not found")
    return TopKRouter


def _in_backward() -> bool:
    """Whether autograd is running a backward on this thread (megatron's recompute reruns forwards there)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)  # torch >= 2.0; private but stable
    if task_id is None:
        raise RoutingReplayError(f"routing replay: torch {torch.__version__} lacks torch._C._current_graph_task_id")
    return task_id() != -1


@dataclass
class _Record:
    """One layer's routes for one micro-batch on this rank. Shapes: T local tokens, k = top-k, E experts."""

    indices: torch.Tensor  # [T, k] int32 global expert ids
    weights: torch.Tensor | None  # [T, k] routing weights at ``indices`` (probs dtype); None: external without weights
    routing_map: torch.Tensor | None  # [T, E] bool, only when token dropping may differ from the ids
    no_route: torch.Tensor | None  # [T] bool: external tokens without a route (the router chooses); None: all routed
    num_no_route: int = 0  # no_route.sum(), counted once when the routes are set
    consumed: bool = False

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]


class _LayerHook:
    """Per-router state: shadows ``router.routing`` and sits in ``router.router_replay``."""

    def __init__(self, owner: RoutingReplay, ordinal: int, router: torch.nn.Module):
        self.owner = owner
        self.ordinal = ordinal
        self.router = router
        self.layer_number = getattr(router, "layer_number", None)
        self.original_routing = router.routing  # the bound class method; restored by deleting our shadow
        # Set by routing() for the duration of one call, read by get_replay_topk.
        self.action: str | None = None
        self.target: _Record | None = None
        self.count_drift = False
        self.fired = 0
        self.recorded_indices: torch.Tensor | None = None
        self.recompute_fifo: deque[_Record] = deque()
        self.drift_tokens: torch.Tensor | None = None  # accumulated on the routing device (no host sync)
        self.routed_tokens = 0
        self.no_route_tokens = 0

    # ---------------------------------------------------------------- called by topk_routing_with_score_function
    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        """megatron's replay hook: ``scores`` [T, E] are what the router ranks (logits, softmax or biased sigmoid)."""
        self.fired += 1
        if self.action is None or self.action == "record":
            values, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            if self.action == "record":
                self.recorded_indices = indices
            return values, indices
        rec = self.target
        self._check_tokens(rec, scores.shape[0], topk)
        with torch.no_grad():  # the router's own choice: drift metric and the no-route fallback
            _, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        indices = rec.indices.to(device=scores.device, dtype=torch.long)
        if rec.no_route is not None:
            indices = torch.where(rec.no_route.to(scores.device).unsqueeze(1), own, indices)
        if self.count_drift:
            with torch.no_grad():
                differs = (own.sort(dim=1).values != indices.sort(dim=1).values).any(dim=1)
                if rec.no_route is not None:
                    differs &= ~rec.no_route.to(scores.device)
                n = differs.sum()
                self.drift_tokens = n if self.drift_tokens is None else self.drift_tokens + n
        # Gradient: scores carry the current router logits' graph; gathering at fixed ids keeps it (module docstring).
        return scores.gather(1, indices), indices

    def _check_tokens(self, rec: _Record, num_tokens: int, topk: int | None = None) -> None:
        topk = self.router.topk if topk is None else topk
        if num_tokens != rec.num_tokens or topk != rec.indices.shape[1]:
            raise RoutingReplayError(
                f"routing replay: layer {self.layer_number} micro-batch {self.owner._mb!r}: the record has "
                f"{rec.num_tokens} tokens x top-{rec.indices.shape[1]}, this forward routes {num_tokens} tokens "
                f"x top-{topk} (a different micro-batch under the same id, or a different split/padding)")

    # ---------------------------------------------------------------- shadows router.routing
    def routing(self, logits, *args, **kwargs):
        owner = self.owner
        mode = owner._mode
        if mode == "off":
            return self.original_routing(logits, *args, **kwargs)
        in_backward = _in_backward()  # activation recompute reruns the router inside backward
        if mode == "record":
            if in_backward:  # recompute of a pass that also trains: same weights, so the same routes; not recorded
                return self._call(None, None, False, logits, args, kwargs)
            key = (owner._require_mb(self), self.ordinal)
            if key in owner._records:
                raise RoutingReplayError(
                    f"routing replay: micro-batch id {key[0]!r} recorded twice for layer {self.layer_number}; "
                    "ids must be unique within a record pass")
            probs, routing_map = self._call("record", None, False, logits, args, kwargs)
            owner._store(key, self, probs, routing_map, self.recorded_indices)
            self.recorded_indices = None
            return probs, routing_map
        # replay / external
        if in_backward:
            if not self.recompute_fifo:
                raise RoutingReplayError(
                    f"routing replay: layer {self.layer_number} routed during backward (activation recompute) "
                    "but no forward of this pass consumed a record for it")
            rec = self.recompute_fifo.popleft()
            count = False
        else:
            key = (owner._require_mb(self), self.ordinal)
            rec = owner._records.get(key)
            if rec is not None and owner._expected is not None and key[0] not in owner._expected:
                raise RoutingReplayError(
                    f"routing replay: micro-batch id {key[0]!r} is not one of this pass's micro_batches")
            if rec is None:
                known = sorted({repr(k[0]) for k in owner._records})
                raise RoutingReplayError(
                    f"routing replay: no record for micro-batch id {key[0]!r}, layer {self.layer_number} "
                    f"(recorded ids: {', '.join(known[:8])}{' ...' if len(known) > 8 else ''})")
            self._check_tokens(rec, logits.numel() // logits.shape[-1])  # before consuming: a failed call uses nothing
            if rec.consumed:
                raise RoutingReplayError(
                    f"routing replay: micro-batch id {key[0]!r}, layer {self.layer_number} replayed twice in one "
                    "pass; call begin_replay_pass() before the next pass over the records")
            rec.consumed = True
            if owner._recompute:
                self.recompute_fifo.append(rec)
            count = True
        probs, routing_map = self._call("replay", rec, count, logits, args, kwargs)
        return owner._postprocess(rec, probs, routing_map)

    def _call(self, action, target, count_drift, logits, args, kwargs):
        self.action, self.target, self.count_drift, self.fired = action, target, count_drift, 0
        try:
            probs, routing_map = self.original_routing(logits, *args, **kwargs)
        finally:
            fired, self.action, self.target, self.count_drift = self.fired, None, None, False
        if fired != 1:
            raise _api_error(
                f"TopKRouter.routing consulted router.router_replay {fired} times in one call (expected once); "
                "the top-k selection is no longer where the hook sits")
        if count_drift:
            self.routed_tokens += target.num_tokens
            self.no_route_tokens += target.num_no_route
            self.routed_tokens -= target.num_no_route
        return probs, routing_map


class RoutingReplay:
    """Record / replay the top-k routing of every ``TopKRouter`` in one megatron model chunk (see module docstring).

    Args (keyword-only after ``model``):
        model: a model chunk (``GPTModel``, or one wrapped in DDP / Float16Module); all its TopKRouters are hooked.
        weights: ``"recomputed"`` (default; current router weights at the recorded experts, exact gradient) or
            ``"recorded"`` (recorded weight values, straight-through gradient).
        storage_device: where records live; None keeps them where the router ran, e.g. ``"cpu"`` to spare GPU memory.
    """

    def __init__(self, model: torch.nn.Module, *, weights: str = "recomputed",
                 storage_device: torch.device | str | None = None):
        if RoutingReplay.of(model, missing_ok=True) is not None:
            raise RoutingReplayError("routing replay: this model chunk already has a RoutingReplay; detach() it first")
        router_cls = _megatron_router_api()
        routers = [m for m in model.modules() if isinstance(m, router_cls)]
        if not routers:
            raise RoutingReplayError("routing replay: the model has no megatron TopKRouter (not an MoE model?)")
        config = routers[0].config
        for r in routers:
            self._check_router(r)
        self.weights = weights
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self.num_layers_total = config.num_layers
        self._store_map = getattr(config, "moe_expert_capacity_factor", None) is not None
        self._recompute = getattr(config, "recompute_granularity", None) is not None
        self._mode = "off"
        self._source: str | None = None  # "record" or "external": where the records came from
        self._mb: Hashable | None = None
        self._expected: set[Hashable] | None = None  # the ids of the current replay pass; None: all records
        self._records: dict[tuple[Hashable, int], _Record] = {}
        self._hooks = [_LayerHook(self, i, r) for i, r in enumerate(routers)]
        for hook in self._hooks:
            hook.router.router_replay = hook
            hook.router.routing = hook.routing
        self._model = model
        setattr(model, _ATTR, self)

    @staticmethod
    def _check_router(router) -> None:
        cfg = router.config
        if not hasattr(router, "router_replay"):
            raise _api_error("TopKRouter instances have no router_replay attribute")
        if isinstance(router.router_replay, _LayerHook):
            raise RoutingReplayError("routing replay: this router is already hooked by another RoutingReplay")
        if router.router_replay is not None:
            raise RoutingReplayError(
                "routing replay: megatron's own moe_enable_routing_replay is on for this model; use one replay, "
                "not both (set moe_enable_routing_replay=False)")
        if getattr(cfg, "moe_router_fusion", False):
            raise RoutingReplayError(
                "routing replay: moe_router_fusion=True uses Transformer Engine's fused top-k, which bypasses the "
                "replay hook; set moe_router_fusion=False")
        if getattr(router, "routing_type", None) == "sinkhorn":
            raise RoutingReplayError("routing replay: sinkhorn load balancing is not a top-k router; not supported")
        if not all(hasattr(router, a) for a in ("topk", "layer_number")) or not hasattr(cfg, "num_moe_experts"):
            raise _api_error("TopKRouter lacks topk / layer_number / config.num_moe_experts")

    # ------------------------------------------------------------------------------------------ lookup / teardown
    @staticmethod
    def of(module: torch.nn.Module, *, missing_ok: bool = False) -> RoutingReplay | None:
        """The RoutingReplay attached to ``module`` or to the model it wraps (``.module``: DDP, Float16Module)."""
        m = module
        while m is not None:
            found = m.__dict__.get(_ATTR)
            if found is not None:
                return found
            m = getattr(m, "module", None)
        if missing_ok:
            return None
        raise RoutingReplayError("routing replay: no RoutingReplay is attached to this model chunk")

    def detach(self) -> None:
        """Restore every router (remove both per-instance hooks) and forget the records."""
        self.clear()
        for hook in self._hooks:
            del hook.router.routing  # the instance shadow; the class method is visible again
            hook.router.router_replay = None
        self._model.__dict__.pop(_ATTR, None)
        self._hooks = []

    # ------------------------------------------------------------------------------------------ state
    @property
    def mode(self) -> str:
        return self._mode

    @property
    def weights(self) -> str:
        """``"recomputed"`` or ``"recorded"`` (module docstring); may be changed between passes."""
        return self._weights

    @weights.setter
    def weights(self, value: str) -> None:
        if value not in WEIGHT_MODES:
            raise ValueError(f"routing replay: weights must be one of {WEIGHT_MODES}, got {value!r}")
        if getattr(self, "_mode", "off") != "off":
            raise RoutingReplayError("routing replay: change weights between passes, not during one")
        self._weights = value

    @property
    def num_layers(self) -> int:
        """MoE layers (routers) in this chunk."""
        return len(self._hooks)

    @property
    def layer_numbers(self) -> list[int]:
        """Global 1-based layer numbers of this chunk's MoE layers (megatron's ``router.layer_number``)."""
        return [h.router.layer_number for h in self._hooks]

    def micro_batch_ids(self) -> list[Hashable]:
        """The micro-batch ids that have records, in first-recorded order."""
        return list(dict.fromkeys(k[0] for k in self._records))

    def records(self, mb_id: Hashable) -> list[_Record]:
        """This micro-batch's records, one per MoE layer of the chunk (for inspection and tests)."""
        try:
            return [self._records[(mb_id, h.ordinal)] for h in self._hooks]
        except KeyError:
            raise RoutingReplayError(f"routing replay: no complete record for micro-batch id {mb_id!r}") from None

    @contextlib.contextmanager
    def micro_batch(self, mb_id: Hashable) -> Iterator[None]:
        """Name the micro-batch whose forward runs inside the block (any hashable; unique within a pass)."""
        if self._mb is not None:
            raise RoutingReplayError(f"routing replay: micro_batch({mb_id!r}) inside micro_batch({self._mb!r})")
        self._mb = mb_id
        try:
            yield
        finally:
            self._mb = None

    def _require_mb(self, hook: _LayerHook) -> Hashable:
        if self._mb is None:
            raise RoutingReplayError(
                f"routing replay: layer {hook.layer_number} routed in mode {self._mode!r} outside "
                "`with replay.micro_batch(mb_id):`; wrap each micro-batch's forward")
        return self._mb

    def _require_off(self, action: str) -> None:
        if self._mode != "off":
            raise RoutingReplayError(f"routing replay: {action} during a {self._mode!r} pass; call end_pass() first")

    # ------------------------------------------------------------------------------------------ passes
    def begin_record(self) -> None:
        """Start a record pass (the π_old forward); earlier records are dropped."""
        self._require_off("begin_record()")
        self.clear()
        self._source = "record"
        self._mode = "record"

    def set_external_routes(self, mb_id: Hashable, expert_ids: torch.Tensor, weights: torch.Tensor | None = None, *,
                            validate: bool = True) -> None:
        """R3: routes supplied with the rollout (e.g. SGLang ``return_routed_experts``) for one micro-batch.

        Shapes: ``expert_ids`` [L, T, k] integer global expert ids, ``weights`` [L, T, k] or None, with T this rank's
        tokens in the router's order (module docstring; ``routes_to_router_order``) and k the router's top-k. The layer
        axis is either every transformer layer of the model (L = config.num_layers, SGLang's convention, indexed by
        global layer number − 1; dense layers' rows are ignored) or exactly this chunk's MoE layers in order. A token
        whose k ids are all −1 has no route (prompt padding, the last sampled token): the router chooses for it.
        ``validate`` checks ids range, duplicates and −1 rows (a few host syncs; once per micro-batch).
        """
        self._require_off("set_external_routes()")
        if self._source == "record":
            raise RoutingReplayError("routing replay: records from a record pass exist; clear() before external routes")
        if expert_ids.dim() != 3:
            raise ValueError(f"routing replay: expert_ids must be [L, T, k], got shape {tuple(expert_ids.shape)}")
        if weights is not None and weights.shape != expert_ids.shape:
            raise ValueError(f"routing replay: weights shape {tuple(weights.shape)} != expert_ids shape "
                             f"{tuple(expert_ids.shape)}")
        if self.weights == "recorded" and weights is None:
            raise RoutingReplayError('routing replay: weights="recorded" needs the rollout routing weights; pass '
                                     'weights= or build RoutingReplay with weights="recomputed"')
        n_layers = expert_ids.shape[0]
        if n_layers == self.num_layers_total:
            rows = [h.router.layer_number - 1 for h in self._hooks]
        elif n_layers == self.num_layers:
            rows = list(range(self.num_layers))
        else:
            raise ValueError(f"routing replay: expert_ids has {n_layers} layers; expected config.num_layers = "
                             f"{self.num_layers_total} or this chunk's {self.num_layers} MoE layers")
        staged = {}
        for hook, row in zip(self._hooks, rows):
            ids = expert_ids[row]
            topk, n_exp = hook.router.topk, hook.router.config.num_moe_experts
            if ids.shape[1] != topk:
                raise ValueError(f"routing replay: layer {hook.layer_number} routes top-{topk}, external routes "
                                 f"have {ids.shape[1]} ids per token")
            no_route = (ids == _NO_ROUTE).all(dim=1)
            if validate:
                partial = (ids == _NO_ROUTE).any(dim=1) & ~no_route
                bad = ((ids < 0) | (ids >= n_exp)) & ~no_route.unsqueeze(1)
                if bool(partial.any()) or bool(bad.any()):
                    raise ValueError(f"routing replay: layer {hook.layer_number}: expert ids outside [0, {n_exp}) "
                                     "or rows mixing -1 and ids")
                srt = ids.sort(dim=1).values
                dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1) & ~no_route
                if bool(dup.any()):
                    raise ValueError(f"routing replay: layer {hook.layer_number}: a token lists an expert twice")
            dev = self.storage_device or ids.device
            ids = torch.where(no_route.unsqueeze(1), torch.zeros_like(ids), ids)
            num_no_route = int(no_route.sum())
            staged[(mb_id, hook.ordinal)] = _Record(
                indices=ids.to(device=dev, dtype=torch.int32),
                weights=None if weights is None else weights[row].detach().to(dev),
                routing_map=None,
                no_route=no_route.to(dev) if num_no_route else None,
                num_no_route=num_no_route)
        if any(k in self._records for k in staged):
            raise RoutingReplayError(f"routing replay: external routes for micro-batch id {mb_id!r} set twice")
        self._records.update(staged)
        self._source = "external"

    def begin_replay_pass(self, micro_batches: Iterable[Hashable] | None = None) -> None:
        """Start one training pass: each record in it must be consumed exactly once before ``end_pass``.

        ``micro_batches``: the ids this pass covers, e.g. one mini-batch of a rollout batch updated in several
        optimizer steps (one pass per update); records of other ids are then neither usable nor required.
        None: every record (one pass per epoch over the whole batch).
        """
        self._require_off("begin_replay_pass()")
        if not self._records:
            raise RoutingReplayError("routing replay: nothing to replay; run a record pass or set_external_routes()")
        expected = None
        if micro_batches is not None:
            expected = set(micro_batches)
            missing = sorted(repr(m) for m in expected - set(self.micro_batch_ids()))
            if missing or not expected:
                raise RoutingReplayError(f"routing replay: begin_replay_pass over micro-batch ids without records: "
                                         f"{', '.join(missing[:8]) or '(none given)'}")
        self._expected = expected
        if self._weights == "recorded" and any(rec.weights is None for rec in self._records.values()):
            raise RoutingReplayError('routing replay: weights="recorded" but some external routes came without '
                                     "weights")
        for rec in self._records.values():
            rec.consumed = False
        for hook in self._hooks:
            hook.recompute_fifo.clear()
            hook.drift_tokens, hook.routed_tokens, hook.no_route_tokens = None, 0, 0
        self._mode = "replay" if self._source == "record" else "external"

    def end_pass(self) -> dict[str, float]:
        """Close the current pass; after a replay pass raise if a record was not consumed, else return metrics.

        Metrics (replay passes; one host sync): ``routing_replay/drift`` the fraction of replayed tokens whose own
        top-k under the current weights differs from the replayed experts, ``routing_replay/drift_layer{n}`` per
        global layer number, ``routing_replay/tokens`` (token-layer pairs replayed) and
        ``routing_replay/no_route_tokens`` (external tokens the router chose for itself).
        """
        mode, self._mode = self._mode, "off"
        for hook in self._hooks:
            hook.recompute_fifo.clear()
        if mode == "off":
            raise RoutingReplayError("routing replay: end_pass() without begin_record() / begin_replay_pass()")
        if mode == "record":
            return {"routing_replay/recorded_micro_batches": float(len(self.micro_batch_ids()))}
        left = [k for k, rec in self._records.items()
                if not rec.consumed and (self._expected is None or k[0] in self._expected)]
        if left:
            names = sorted({f"mb {k[0]!r}" for k in left})
            raise RoutingReplayError(
                f"routing replay: {len(left)} record(s) not consumed in this pass ({', '.join(names[:8])}"
                f"{' ...' if len(names) > 8 else ''}); every recorded micro-batch must be replayed exactly once")
        counts = [h.drift_tokens if h.drift_tokens is not None else torch.zeros(()) for h in self._hooks]
        drift = torch.stack([c.detach().float().cpu() for c in counts]).tolist()
        metrics = {}
        total_drift, total = 0.0, 0
        for hook, d in zip(self._hooks, drift):
            metrics[f"routing_replay/drift_layer{hook.layer_number}"] = d / max(hook.routed_tokens, 1)
            total_drift += d
            total += hook.routed_tokens
        metrics["routing_replay/drift"] = total_drift / max(total, 1)
        metrics["routing_replay/tokens"] = float(total)
        metrics["routing_replay/no_route_tokens"] = float(sum(h.no_route_tokens for h in self._hooks))
        return metrics

    def clear(self) -> None:
        """Drop all records and return to mode off."""
        self._records.clear()
        self._source = None
        self._mode = "off"
        for hook in self._hooks:
            hook.recompute_fifo.clear()

    # ------------------------------------------------------------------------------------------ internals
    def _store(self, key, hook: _LayerHook, probs: torch.Tensor, routing_map: torch.Tensor,
               indices: torch.Tensor | None) -> None:
        """Record pass: keep the ids the top-k hook saw and the weights/map the router returned. Shapes: [T, E]."""
        dev = self.storage_device or probs.device
        with torch.no_grad():
            weights = probs.detach().gather(1, indices)  # [T, k], post scaling and token dropping
            self._records[key] = _Record(
                indices=indices.to(device=dev, dtype=torch.int32),
                weights=weights.to(dev),
                routing_map=routing_map.detach().to(dev) if self._store_map else None,
                no_route=None)

    def _postprocess(self, rec: _Record, probs: torch.Tensor, routing_map: torch.Tensor):
        """Replay: enforce the recorded routing map (token dropping) and, if asked, the recorded weight values."""
        if rec.routing_map is not None:  # capacity dropping reran on new probs; the recorded map is what π_old used
            routing_map = rec.routing_map.to(routing_map.device)
            probs = probs * routing_map
        if self.weights == "recorded":
            indices = rec.indices.to(device=probs.device, dtype=torch.long)
            recorded = torch.zeros_like(probs).scatter(1, indices, rec.weights.to(probs))
            if rec.routing_map is not None:
                recorded = recorded * routing_map
            if rec.no_route is not None:  # the router chose for these tokens: keep its own weights
                recorded = torch.where(rec.no_route.to(probs.device).unsqueeze(1), probs.detach(), recorded)
            # Straight-through: forward value is exactly `recorded` (p - sg(p) == 0 in floating point); the gradient
            # is that of the recomputed weights p, and autograd nodes megatron attached to p (aux loss) stay live.
            probs = recorded + (probs - probs.detach())
        return probs, routing_map


# ---------------------------------------------------------------------------------------------- route layout helpers


def routes_to_router_order(routes: torch.Tensor) -> torch.Tensor:
    """Per-sequence routes ``[B, S, L, k]`` (SGLang's [seq, layer, k] per sample, stacked and padded with −1) to the
    router's flattened order ``[L, S·B, k]``: token ``s·B + b``, as the router sees the ``[S, B, H]`` hidden states.
    Works for weights too (pad them with anything; −1-id rows ignore them)."""
    if routes.dim() != 4:
        raise ValueError(f"routes must be [B, S, L, k], got shape {tuple(routes.shape)}")
    b, s, n_layers, k = routes.shape
    return routes.permute(2, 1, 0, 3).reshape(n_layers, s * b, k)


def sequence_parallel_shard(routes: torch.Tensor, *, batch_size: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of router-order routes ``[L, S·B, k]`` under sequence parallel: the router sees the
    sequence positions ``[r·S/TP, (r+1)·S/TP)`` of all B samples, i.e. one contiguous block of S/TP·B tokens."""
    tokens = routes.shape[1]
    if tokens % (batch_size * tp_size):
        raise ValueError(f"{tokens} tokens are not S·B with S divisible by TP={tp_size} (B={batch_size})")
    block = tokens // tp_size
    return routes[:, tp_rank * block:(tp_rank + 1) * block]
