"""The actor's context-parallel and THD-packing data paths, executed on CPU against the plain padded cp = 1 actor.

Transformer Engine's CP ring attention and THD kernels do not run on CPU, so this test swaps megatron's core
attention (``DotProductAttention``), *in the test only*, for ``_RefAttention``: exact causal softmax attention that
is CP-correct (keys/values all-gathered over the CP group and put back in sequence order, the backward summing every
rank's key/value gradients: all-gather / reduce-scatter, as TE's all-gather CP does) and THD-correct (block-diagonal
over ``cu_seqlens_padded``). Everything else is the project's and megatron's own code: the zigzag split, per-chunk
position ids, megatron's rotary table split per CP rank, the shifted labels, ``gather_zigzag`` of the log-probs and
entropy, the loss denominators and scale through megatron's schedule and DDP over the dp×cp group.

Run on 4 gloo ranks as dp = 2 × cp = 2 (padded rows, and THD rows split per row over CP), and THD packing on one
rank, each checked against the cp = 1 actor with megatron's own local attention on one rank (same weights: CPU
initialisation from one seed): reference and π_old log-probs [N, L], the losses of two updates, the grad norms (megatron's, before
clipping: a loss scaled by cp twice shows up here as ×2; Adam would hide it in the parameters), and the log-probs
after the updates. Also the refusals (local attention with cp > 1 or packing; OAR under CP with PP > 1).
"""

import dataclasses
import math

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

N, MICRO = 4, 2
PROMPTS = [[5, 9, 3], [7, 2], [11, 4, 6, 8], [3, 3]]
RESPONSES = [[12, 40, 7, 9, 2, 30], [8, 8, 15], [22, 4, 6, 1, 17, 19, 2, 5, 9], [14, 61]]  # ragged, longest 13


class _GatherSeq(torch.autograd.Function):
    """Full [W, b, h, d] keys/values from every CP rank's zigzag part [W/cp, b, h, d]; backward: the sum over
    ranks of the full gradient, this rank's positions kept (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, idx_all):
        import torch.distributed as dist

        ctx.group, ctx.idx = group, idx_all[dist.get_rank(group)]
        parts = [torch.empty_like(x) for _ in idx_all]
        dist.all_gather(parts, x.contiguous(), group=group)
        full = x.new_empty((sum(p.shape[0] for p in parts), *x.shape[1:]))
        for idx, p in zip(idx_all, parts):
            full[idx] = p
        return full

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.idx], None, None


class _RefAttention(torch.nn.Module):
    """Test-only core attention: exact causal attention, CP- and THD-correct (module docstring). Same signature as
    megatron's core attention modules."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__()
        from megatron.core import parallel_state as ps

        self.config = config
        self.cp_group = ps.get_context_parallel_group()
        self.cp, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from oar_megatron.algorithms.context_parallel import zigzag_indices
        from oar_megatron.policy.packing import thd_cp_indices

        assert attention_mask is None and attention_bias is None
        thd = packed_seq_params is not None
        if thd:  # [T(/cp), h, d] -> [T(/cp), 1, h, d]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            bounds = packed_seq_params.cu_seqlens_q_padded.long()
        s_local = query.shape[0]
        rep = query.shape[2] // key.shape[2]
        key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        if self.cp > 1:  # the positions each CP rank holds: every row's chunks (THD) or the zigzag chunks
            if thd:
                idx_all = [thd_cp_indices(bounds, self.cp, r) for r in range(self.cp)]
            else:
                idx_all = [zigzag_indices(s_local * self.cp, self.cp, r) for r in range(self.cp)]
            q_pos = idx_all[self.cp_rank]
            key = _GatherSeq.apply(key, self.cp_group, idx_all)
            value = _GatherSeq.apply(value, self.cp_group, idx_all)
        else:
            q_pos = torch.arange(s_local)
        k_pos = torch.arange(key.shape[0])
        blocked = k_pos[None, :] > q_pos[:, None]  # [sq, sk] future keys
        if thd:  # and keys of other rows
            seg_q = torch.bucketize(q_pos, bounds[1:], right=True)
            seg_k = torch.bucketize(k_pos, bounds[1:], right=True)
            blocked = blocked | (seg_q[:, None] != seg_k[None, :])
        scores = torch.einsum("sbhd,tbhd->bhst", query, key) * self.scale
        probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
        out = torch.einsum("bhst,tbhd->sbhd", probs, value)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return out.squeeze(1) if thd else out


def _cpu_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """megatron's ``get_pos_emb_on_this_cp_rank`` without its pinned-memory CUDA copy (absent on CPU)."""
    cp, r = cp_group.size(), cp_group.rank()
    idx = torch.tensor([r, 2 * cp - r - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


_ORIGINAL = {}


def _swap_attention(attention: bool = True) -> None:
    """Test-only: layouts validated as if the model had TE attention (the actor still checks the attention modules
    it got), megatron's rotary split per CP rank without pinned memory, and (``attention``) the local spec with
    ``_RefAttention`` as core attention."""
    import copy

    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from oar_megatron.config.parallel import ParallelConfig
    from oar_megatron.policy import model as model_mod

    if not _ORIGINAL:
        _ORIGINAL.update(spec=model_mod.layer_spec, validate=ParallelConfig.validate)

    def spec(model):
        s = copy.deepcopy(_ORIGINAL["spec"](model))
        s.submodules.self_attention.submodules.core_attention = _RefAttention
        return s

    def validate(self, world_size, model):
        te = dataclasses.replace(model, transformer_impl="transformer_engine")
        return _ORIGINAL["validate"](self, world_size, te)

    model_mod.layer_spec = spec if attention else _ORIGINAL["spec"]
    ParallelConfig.validate = validate
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank


def _actor(layout: dict, *, kl: float = 0.01, shaper: str | None = None, micro: int = MICRO):
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import init_parallel
    from oar_megatron.policy.actor import PolicyActor

    model = model_preset("tiny")
    groups = init_parallel(ParallelConfig(distributed_optimizer=False, **layout), model, seed=7)
    alg = load_algorithm("grpo", updates_per_batch=2, kl={"coef": kl, "kind": "k3"}, entropy_coef=0.01)
    if shaper is not None:
        alg = load_algorithm("oar_g")
    return PolicyActor(model=model, parallel=groups.cfg, optim=OptimConfig(lr=3e-3, weight_decay=0.0),
                       algorithm=alg, groups=groups, micro_batch_size=micro)


def _step(layout):
    """One rollout batch through the actor: reference and π_old log-probs, two updates, π after them. With DP2 the
    rows are dealt out (rank d: rows d, d + 2) in micro-batches of one, so update k sees rows 2k, 2k + 1 as the
    single-rank reference does with micro-batches of two."""
    from oar_megatron.policy import destroy_parallel

    dp = 2 if layout.get("dp2") else 1
    layout = {k: v for k, v in layout.items() if k != "dp2"}
    actor = _actor(layout, micro=MICRO // dp)
    try:
        assert actor.groups.dp == dp
        adv = torch.tensor([1.0, -0.5, 0.75, -1.25])
        batch = actor.pack(PROMPTS, RESPONSES, adv)
        if dp > 1:
            batch = batch.rows(torch.arange(actor.groups.dp_rank, N, dp))
        ref = actor.compute_ref_logprobs(batch)
        old = actor.compute_old_logprobs(batch)
        old = old + 0.05 * batch.response_mask.float()  # π_old ≠ π_θ: ratios ≠ 1 (clipping, k3 KL at work)
        batch.old_logp = old
        actor.compute_token_advantages(batch)
        m = actor.update(batch)
        new = actor.compute_old_logprobs(batch)
        return {"ref": ref, "old": old, "new": new, "loss": torch.tensor(m["loss"]),
                "grad_norm": torch.tensor(m["grad_norm"]), "kl": torch.tensor(m["kl_loss"]),
                "width": batch.input_ids.shape[1], "dp_rank": actor.groups.dp_rank}
    finally:
        destroy_parallel()


def _actor_refusals():
    """The actor's own checks (behind the config's): packing on megatron's local attention, OAR under CP with PP
    (OAR under CP at pp = 1: tests/cpu/test_oar_context_parallel.py)."""
    from oar_megatron.policy import destroy_parallel

    out = {}
    for key, layout, shaper in (("packing", {"packing": True}, None), ("oar", {"cp": 2, "pp": 2}, "oar")):
        _swap_attention(attention=key != "packing")  # packing: megatron's local DotProductAttention
        try:
            _actor(layout, shaper=shaper)
            out[key] = "accepted"
        except ValueError as exc:
            out[key] = str(exc)
        finally:
            destroy_parallel()
    return out


def _single(rank, world_size):
    """cp = 1 with megatron's own local attention (the reference), then THD packing with the swapped attention."""
    ref = _step({})
    _swap_attention()
    return {"ref": ref, "packed": _step({"packing": True})}


def _dp2cp2(rank, world_size):
    _swap_attention()
    return {"cp2": _step({"cp": 2, "dp2": True}), "cp2-packed": _step({"cp": 2, "dp2": True, "packing": True}),
            "refusals": _actor_refusals()}


@pytest.fixture(scope="module")
def runs():
    single = run_ranks(_single, 1)[0]
    return single["ref"], single["packed"], run_ranks(_dp2cp2, 4)


def _check_equal(got, ref):
    rows = torch.arange(got.get("dp_rank", 0), N, 2) if got["ref"].shape[0] < N else torch.arange(N)
    width = ref["width"]  # PolicyActor.pack pads the cp = 2 rows to a multiple of 2·cp: the rest is never a response
    for key in ("ref", "old", "new"):
        assert got[key].shape[1] >= width, key
        torch.testing.assert_close(got[key][:, :width], ref[key][rows], atol=2e-5, rtol=0, msg=key)
        assert not got[key][:, width:].any(), key
    torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["kl"], ref["kl"], atol=1e-7, rtol=1e-5)
    # megatron's schedule ×cp and DDP ÷(dp·cp) cancel: a second ×cp in the actor doubles this (seen before the fix)
    torch.testing.assert_close(got["grad_norm"], ref["grad_norm"], atol=0, rtol=1e-4)


def test_context_parallel_cp2_equals_cp1(runs):
    ref, _, per_rank = runs
    assert ref["width"] == 13  # not a multiple of 2·cp: pack pads the CP rows to 16 (padding.sequence_multiple)
    assert float(ref["grad_norm"].min()) > 1e-3 and float(ref["kl"].abs().max()) > 0
    assert float((ref["new"] - ref["old"]).abs().max()) > 1e-3  # the updates moved the policy
    assert sorted((r["cp2"]["dp_rank"]) for r in per_rank) == [0, 0, 1, 1]
    assert {r["cp2"]["width"] for r in per_rank} == {16}
    for res in per_rank:  # cp = 2 × dp = 2: both CP ranks of a replica hold its full rows' results
        _check_equal(res["cp2"], ref)


def test_packing_under_context_parallel_equals_padded_rows(runs):
    ref, _, per_rank = runs
    for res in per_rank:  # THD rows split per row over cp = 2 (TE's partition), gathered back
        _check_equal(res["cp2-packed"], ref)


def test_packing_equals_padded_rows(runs):
    ref, packed, _ = runs
    _check_equal(packed, ref)


def test_refusals_name_the_key():
    from oar_megatron.config import ParallelConfig, model_preset
    from oar_megatron.config.algorithm import load_algorithm
    from oar_megatron.config.train import RolloutConfig, TrainConfig

    local = model_preset("tiny")
    assert local.transformer_impl == "local"
    with pytest.raises(ValueError, match=r"^parallel\.cp: context parallelism needs model\.transformer_impl"):
        ParallelConfig(cp=2).validate(2, local)
    with pytest.raises(ValueError, match=r"^parallel\.packing: THD packing needs model\.transformer_impl"):
        ParallelConfig(packing=True).validate(1, local)
    te = dataclasses.replace(local, transformer_impl="transformer_engine")
    ParallelConfig(cp=2).validate(2, te)
    ParallelConfig(packing=True).validate(1, te)
    ParallelConfig(packing=True, cp=2).validate(2, te)
    with pytest.raises(ValueError, match=r"^parallel\.packing: THD packing is wired for pp=1"):
        ParallelConfig(packing=True, pp=2).validate(2, te)
    with pytest.raises(ValueError, match=r"^rollout\.engine: the local engine needs parallel\.cp=1"):
        TrainConfig(model=te, parallel=ParallelConfig(cp=2)).validate(2)
    sglang = RolloutConfig(engine="sglang", server_urls=["http://x:1"])
    TrainConfig(model=te, parallel=ParallelConfig(cp=2), rollout=sglang, algorithm=load_algorithm("oar_g")).validate(2)
    with pytest.raises(ValueError, match=r"^parallel\.cp: the OAR saliency pass under context parallelism is wired "
                                         r"for pp=1, got pp=2"):
        TrainConfig(model=te, parallel=ParallelConfig(cp=2, pp=2), rollout=sglang,
                    algorithm=load_algorithm("oar_g")).validate(4)


def test_actor_refuses_what_it_cannot_run(runs):
    out = runs[2][0]["refusals"]
    assert out["packing"].startswith("parallel.packing: THD packing needs Transformer Engine attention"), out
    assert out["oar"].startswith("parallel.cp: the OAR saliency pass under context parallelism is wired for pp=1"), out
