"""Parallel-consistency harness: one saved rollout batch replayed under several parallel layouts, every result
compared against the single-rank layout (TP1/PP1/DP1, EP1 for MoE).

Steps (``tools/parallel_consistency.py`` and ``tests/cpu/test_parallel_consistency.py`` drive them):

1. ``save_case(path)``: the batch (token ids, response mask, advantages, a fixed log-prob offset that makes π_old ≠
   π_θ so clipping is exercised, the OAR scoring sequences) with ``torch.save``; loaded with ``weights_only=True``.
2. ``run_layouts(rank, world_size, path, names)`` on ``world_size`` gloo ranks (``tests.dist_harness.run_ranks``):
   for each layout, ``init_parallel`` → ``PolicyActor`` → the reference weights loaded by global name (TP shards
   sliced exactly as megatron's ``use_cpu_initialization`` slices them, PP stages by layer number, EP ranks by
   global expert index) → this DP rank's rows → ``compute_ref_logprobs``, ``compute_old_logprobs``, OAR-G saliency
   and token advantages, OAR-P scores (``saliency_pass`` at PP = 1, ``pipeline`` at PP > 1), one ``update``
   (loss, grad norm), and the π log-probs after the update. The reference layouts (``tp1``, ``tp1-moe``) also
   return their weights, which the caller stores next to the batch (``save_reference``) for the other layouts.
3. ``assemble`` puts the per-rank pieces back into global [N, ...] tensors (last pipeline stage, TP rank 0, ordered
   by DP rank); ``compare`` checks them against the reference within ``TOLERANCES`` (fp32 throughout).

The algorithm is OAR-G shaping + GRPO loss + k3 KL (β = 0.01, reference = initial weights) + entropy bonus, so
every loss term, the saliency pass, routing replay (MoE) and the optimizer step are covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LAYOUTS", "TOLERANCES", "Layout", "assemble", "compare", "load_weights_into", "run_layouts",
           "save_case", "save_reference"]

N, PROMPT, RESP, MICRO = 8, 5, 10, 2
ALGORITHM = dict(updates_per_batch=1, kl={"coef": 0.01, "kind": "k3"}, entropy_coef=0.01)


@dataclass(frozen=True)
class Layout:
    name: str
    preset: str
    world_size: int
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    distributed_optimizer: bool = False
    reference: str = "tp1"


LAYOUTS = {l.name: l for l in [
    Layout("tp1", "tiny", 1, reference=""),
    Layout("tp2", "tiny", 2, tp=2),
    Layout("pp2", "tiny", 2, pp=2),
    Layout("pp2-vpp2", "tiny", 2, pp=2, vpp=2),
    Layout("dp2", "tiny", 2),
    Layout("dp2-zero1", "tiny", 2, distributed_optimizer=True),
    Layout("tp2pp2", "tiny", 4, tp=2, pp=2),
    Layout("tp1-moe", "tiny-moe", 1, reference=""),
    Layout("ep2", "tiny-moe", 2, ep=2, reference="tp1-moe"),
    Layout("dp2-moe", "tiny-moe", 2, reference="tp1-moe"),
]}

# fp32 everywhere; different TP/PP/DP splits only reorder sums.
# OAR-P scores are KL(P‖Q) between nearly equal P_final (≤ ~5e-4 on the tiny model); fp32 log-softmax rounding
# (~1e-7 per log-prob) under a different TP reduction order leaves ~1e-6 absolute, hence an absolute tolerance.
TOLERANCES = dict(old_logp=1e-5, ref_logp=1e-5, scores_rel=1e-3, oar_p_abs=5e-6, token_advantages=1e-3,
                  loss=2e-6, grad_norm_rel=1e-5, new_logp=1e-4)


def save_case(path: str, *, vocab: int = 250, seed: int = 0) -> dict:
    """Write the batch (module docstring) to ``path``; returns it."""
    g = torch.Generator().manual_seed(seed)
    length = PROMPT + RESP
    ids = torch.randint(1, vocab, (N, length), generator=g)
    resp_len = torch.randint(RESP // 2, RESP + 1, (N,), generator=g)
    col = torch.arange(length)[None]
    mask = (col >= PROMPT) & (col < PROMPT + resp_len[:, None])
    ids = torch.where(col < PROMPT + resp_len[:, None], ids, torch.zeros_like(ids))
    adv = torch.randn(N, generator=g)
    offset = 0.2 * torch.randn(N, length, generator=g) * mask  # π_old = π_θ + offset: ratios away from 1
    reasoning = (resp_len - 2).clamp(min=1)
    answers = torch.randint(1, vocab, (N, 2), generator=g)
    case = dict(input_ids=ids, response_mask=mask, advantages=adv, old_offset=offset, reasoning_len=reasoning,
                answers=answers, conclude=torch.tensor([3, 4]))
    torch.save(case, path)
    return case


def save_reference(path: str, preset: str, ref: dict) -> None:
    """Add a reference layout's weights (``assemble`` output) for ``preset`` to the case file; the other layouts
    load them."""
    case = torch.load(path, weights_only=True)
    case.setdefault("weights", {})[preset] = ref["weights"]
    torch.save(case, path)


def _scoring(case):
    from ..algorithms.segment import build_scoring_batch

    ids = case["input_ids"]
    prompts = [r[:PROMPT].tolist() for r in ids]
    reasonings = [ids[b, PROMPT: PROMPT + int(case["reasoning_len"][b])].tolist() for b in range(ids.shape[0])]
    return build_scoring_batch(prompts, reasonings, case["conclude"].tolist(), case["answers"].tolist(), pad_id=0)


def _global_name(name: str, gpt, groups, num_experts: int | None) -> str:
    head, sep, tail = name.partition("decoder.layers.")
    if sep:
        index, rest = tail.split(".", 1)
        number = gpt.decoder.layers[int(index)].layer_number  # 1-based global layer number
        name = f"{head}decoder.layers.{number - 1}.{rest}"
        if ".local_experts." in name and num_experts:
            pre, _, post = name.partition(".local_experts.")
            local, rest2 = post.split(".", 1)
            per_rank = num_experts // groups.ep
            name = f"{pre}.local_experts.{groups.ep_rank * per_rank + int(local)}.{rest2}"
    return name


def _tp_slice(full: torch.Tensor, p: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Megatron's ``_initialize_affine_weight_cpu`` split of a full weight (stride-aware)."""
    if not getattr(p, "tensor_model_parallel", False) or world == 1:
        return full
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    per = p.shape[dim] // stride
    return torch.cat(torch.split(full, per, dim=dim)[rank::world], dim=dim)


@torch.no_grad()
def load_weights_into(models, weights: dict[str, torch.Tensor], groups, num_experts: int | None = None) -> None:
    """Copy full single-layout weights into this rank's chunks (PP by layer number, EP by expert id, TP slices)."""
    for gpt in models:
        for name, p in gpt.named_parameters():
            gname = _global_name(name, gpt, groups, num_experts)
            if gname not in weights and gname == "output_layer.weight":  # tied output on the last PP stage
                gname = "embedding.word_embeddings.weight"
            expert = ".experts." in gname
            rank, world = (groups.etp_rank, groups.etp) if expert else (groups.tp_rank, groups.tp)
            val = _tp_slice(weights[gname], p, rank, world)
            if tuple(val.shape) != tuple(p.shape):
                raise ValueError(f"weights[{gname!r}]: sliced shape {tuple(val.shape)} != local {tuple(p.shape)}")
            p.copy_(val)


def _one_layout(layout: Layout, case: dict) -> dict:
    from ..config import ParallelConfig, model_preset
    from ..config.algorithm import load_algorithm
    from ..config.optim import OptimConfig
    from .actor import PolicyActor, RolloutBatch
    from .parallel import destroy_parallel, init_parallel

    model = model_preset(layout.preset)
    groups = init_parallel(ParallelConfig(tp=layout.tp, pp=layout.pp, virtual_pp=layout.vpp, ep=layout.ep,
                                          distributed_optimizer=layout.distributed_optimizer),
                           model, seed=11)
    try:
        optim = OptimConfig(lr=1e-3, weight_decay=0.0)
        actor = PolicyActor(model=model, parallel=groups.cfg, optim=optim,
                            algorithm=load_algorithm("oar_g", **ALGORITHM), groups=groups, micro_batch_size=MICRO,
                            use_cpu_initialization=True)
        out = dict(dp_rank=groups.dp_rank, tp_rank=groups.tp_rank, last=groups.is_last_stage, pp=groups.pp)
        if layout.reference:
            load_weights_into(actor.models, case["weights"][layout.preset], groups, model.num_moe_experts)
            actor.set_reference_weights()
        else:
            out["weights"] = {n: p.detach().clone() for n, p in actor.models[0].named_parameters()}
        full = RolloutBatch(case["input_ids"], case["response_mask"], case["advantages"], scoring=_scoring(case))
        rows = torch.arange(N).chunk(groups.dp)[groups.dp_rank]
        batch = full.rows(rows)
        ref = actor.compute_ref_logprobs(batch)
        old = actor.compute_old_logprobs(batch)
        if old is not None:
            batch.old_logp = old + case["old_offset"][rows]
            out.update(old_logp=old, ref_logp=ref)
        out["scores"] = actor.saliency(batch).scores
        out["oar_p_scores"] = actor.saliency(batch, "oar_p").scores
        actor.compute_token_advantages(batch)
        out["token_advantages"] = batch.token_advantages
        m = actor.update(batch)
        out.update(loss=m["loss"][0], grad_norm=m["grad_norm"][0], metrics={k: v[0] for k, v in m.items()})
        out["new_logp"] = actor._forward_only_logprobs(batch)
        return out
    finally:
        destroy_parallel()


def run_layouts(rank: int, world_size: int, path: str, names: list[str]) -> dict:
    """Rank function for ``run_ranks``: every layout in ``names`` (all for ``world_size`` ranks), in order."""
    case = torch.load(path, weights_only=True)
    out = {}
    for name in names:
        layout = LAYOUTS[name]
        if layout.world_size != world_size:
            raise ValueError(f"names: layout {name!r} needs {layout.world_size} ranks, got {world_size}")
        out[name] = _one_layout(layout, case)
    return out


def assemble(per_rank: list[dict], name: str) -> dict:
    """Global tensors of one layout from its ranks' results (last stage, TP rank 0, by DP rank)."""
    owners = sorted((r[name] for r in per_rank if r[name]["last"] and r[name]["tp_rank"] == 0),
                    key=lambda r: r["dp_rank"])
    first = owners[0]
    out = dict(loss=first["loss"], grad_norm=first["grad_norm"], pp=first["pp"])
    for key in ("old_logp", "ref_logp", "token_advantages", "new_logp", "scores", "oar_p_scores"):
        if key in first and first[key] is not None:
            parts = [r[key] for r in owners]
            width = max(t.shape[1] for t in parts)  # saliency width = the rank's longest reasoning
            out[key] = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in parts], 0)
    if "weights" in first:
        out["weights"] = first["weights"]
    return out


def _max_abs(a, b) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def compare(ref: dict, got: dict, tol: dict | None = None) -> dict[str, tuple[float, float, bool]]:
    """{quantity: (error, tolerance, ok)}: max-abs errors for log-probs / advantages / OAR-P scores, relative for
    OAR-G scores (to the largest reference score) and the grad norm, absolute for the loss."""
    tol = {**TOLERANCES, **(tol or {})}
    res = {}
    for key in ("old_logp", "ref_logp", "new_logp"):
        res[key] = (_max_abs(ref[key], got[key]), tol[key])
    if "scores" in got:  # OAR-G, relative to the largest score
        scale = float(ref["scores"].abs().max()) or 1.0
        res["scores"] = (_max_abs(ref["scores"], got["scores"]) / scale, tol["scores_rel"])
    if "oar_p_scores" in got:
        res["oar_p_scores"] = (_max_abs(ref["oar_p_scores"], got["oar_p_scores"]), tol["oar_p_abs"])
    if "scores" in got:
        res["token_advantages"] = (_max_abs(ref["token_advantages"], got["token_advantages"]),
                                   tol["token_advantages"])
    res["loss"] = (abs(ref["loss"] - got["loss"]), tol["loss"])
    res["grad_norm"] = (abs(ref["grad_norm"] - got["grad_norm"]) / max(ref["grad_norm"], 1e-12), tol["grad_norm_rel"])
    return {k: (e, t, bool(e <= t) and not math.isnan(e)) for k, (e, t) in res.items()}
