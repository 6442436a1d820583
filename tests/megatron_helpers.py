"""Helpers shared by the megatron CPU tests: TP shards of TP=1 tensors, all-gathers along the vocab dimension,
and layer renaming between a pipeline stage / virtual chunk and the single-stage (reference) model."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["gather_last_dim", "load_renamed", "stage_renamer", "tp_shard"]


def tp_shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP shard of a full (TP=1) tensor that megatron's CPU initialisation gives ``param`` (its
    ``partition_dim`` / ``partition_stride``); ``full`` itself for replicated parameters or TP=1."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, param.partition_stride
    chunks = torch.split(full, full.shape[dim] // (tp_size * stride), dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``x`` over ``group`` and concatenate along the last dimension (e.g. vocab-parallel logits)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def stage_renamer(offset: int, *, tied_output: bool = False) -> Callable[[str], str]:
    """Map a pipeline stage's (or virtual chunk's) parameter name to the single-stage model's: local layer i is
    global layer i + ``offset``. ``tied_output``: the last stage's ``output_layer.weight`` is its copy of the tied
    embedding (``embedding.word_embeddings.weight`` in the reference)."""

    def rename(name: str) -> str:
        if tied_output and name == "output_layer.weight":
            return "embedding.word_embeddings.weight"
        head, sep, tail = name.partition("decoder.layers.")
        if not sep:
            return name
        index, rest = tail.split(".", 1)
        return f"{head}decoder.layers.{int(index) + offset}.{rest}"

    return rename


def load_renamed(model: torch.nn.Module, ref: dict[str, torch.Tensor], rename: Callable[[str], str]) -> None:
    """Copy reference (single-layout) weights into ``model``; ``rename`` maps a local name to the reference name."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ref[rename(name)])


def random_rollout(vocab: int, n: int = 4, prompt: int = 4, resp: int = 8):
    """A fixed small rollout batch for actor tests: ``n`` prompts [prompt] and responses [resp] of random ids, the
    advantages (1, −1, 0.5, −0.5), and OAR scoring rows (the first 6 response tokens, 2 answer tokens)."""
    from oar_megatron.algorithms.segment import build_scoring_batch

    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, vocab, (n, prompt), generator=g).tolist()
    responses = torch.randint(1, vocab, (n, resp), generator=g).tolist()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:n]
    answers = torch.randint(1, vocab, (n, 2), generator=g).tolist()
    scoring = build_scoring_batch(prompts, [r[:6] for r in responses], [7, 8], answers, pad_id=0)
    return prompts, responses, adv, scoring
