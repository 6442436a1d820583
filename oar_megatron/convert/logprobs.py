"""``oar-convert logprobs``: per-token log-probs of given token sequences, computed by the project's megatron policy
under a chosen layout — to check a conversion, or to compare a checkpoint with another implementation.

``oar-convert logprobs MODEL_DIR --tokens IN.json --out OUT.json [--tp N] [--pp N] [--ep N] [--dtype fp32|bf16]``

- MODEL_DIR: an HF directory or a megatron checkpoint (``convert.source.resolve_model_source``).
- IN.json: ``{"sequences": [[token ids], ...]}``; every sequence has 2 ≤ L ≤ ``max_position_embeddings`` tokens,
  ids in ``[0, vocab_size)``; lengths may differ.
- OUT.json: ``{"logprobs": [[...], ...]}``: for a sequence of length L, the L−1 log-probs log p(x_t | x_<t) of tokens
  t = 1..L−1 (natural log, temperature 1), written atomically (a temporary file renamed at the end).

How. ``launch.run_local`` starts N = tp·pp·ep local ranks (data parallel 1 outside the expert dimension; gloo on CPU,
NCCL with one GPU per rank on GPU). Each rank builds a :class:`~oar_megatron.policy.actor.PolicyActor` (KL off) with
the source's model config (``--dtype`` sets ``params_dtype``), loads the weights — an HF directory streamed tensor by
tensor with ``convert.hf_to_mcore`` into this rank's shard (the trainer's ``model.pretrained`` path); a megatron
checkpoint with ``CheckpointManager.load`` (model only; dist-checkpointing reshards any saved TP/PP/EP layout) — and
runs the trainer's own π_old pass (``compute_old_logprobs``: the forward-only pipeline schedule, vocab-parallel
log-probs on the last stage). The sequences are packed as one-token prompts with the rest as the response, right
padded to the longest (``PolicyActor.pack``), so every padded position lies after the real tokens of its row and
causal attention keeps it out of every log-prob. The last stage's rows travel to rank 0, which returns them.

``policy_outputs`` is the rank function; ``oar-convert verify`` asks it for the full logits and an export of the
loaded parameters too (``convert/verify.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..config.model import ModelConfig
from .source import ModelSource

__all__ = ["DTYPES", "compute_logprobs", "policy_outputs", "read_sequences", "supported_layout", "write_json_atomic"]

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MICRO_BATCH = 4  # rows per micro-batch (the row count is padded to a multiple with copies of the last row)


# ------------------------------------------------------------------------------------------------ host side


def read_sequences(path: str | Path, model: ModelConfig) -> list[list[int]]:
    """IN.json's sequences, checked against ``model`` (vocabulary, length); one-line ``ValueError`` naming the file
    and the offending sequence."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--tokens: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--tokens: {path} is not valid JSON ({exc})") from None
    seqs = data.get("sequences") if isinstance(data, dict) else None
    if not isinstance(seqs, list) or not seqs:
        raise ValueError(f'--tokens: {path} must hold {{"sequences": [[token ids], ...]}} with at least one sequence')
    limit = model.max_position_embeddings
    for i, seq in enumerate(seqs):
        if not isinstance(seq, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise ValueError(f"--tokens: {path} sequences[{i}] is not a list of integer token ids")
        if len(seq) < 2:
            raise ValueError(f"--tokens: {path} sequences[{i}] has {len(seq)} token(s); at least 2 are needed "
                             f"(the first token has no log-prob)")
        if len(seq) > limit:
            raise ValueError(f"--tokens: {path} sequences[{i}] has {len(seq)} tokens, more than the model's "
                             f"max_position_embeddings ({limit})")
        bad = [t for t in seq if not 0 <= t < model.vocab_size]
        if bad:
            raise ValueError(f"--tokens: {path} sequences[{i}] has token id {bad[0]} outside the vocabulary "
                             f"[0, {model.vocab_size})")
    return seqs


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same directory, renamed at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def supported_layout(source: ModelSource, *, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """Refuse, in one line, a layout the source cannot be loaded under (before any rank starts)."""
    for key, n in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{key}: must be a positive integer, got {n!r}")
    if ep > 1 and not source.model.is_moe:
        raise ValueError(f"--ep: expert parallelism needs an MoE model; {source.path} is dense")
    if source.kind == "hf":
        if source.arch is None:
            raise ValueError(f"model: {source.path}: no mapping table for this model")
    from ..config.parallel import ParallelConfig

    ParallelConfig(tp=tp, pp=pp, ep=ep).validate(tp * pp * ep, source.model)


def compute_logprobs(source: ModelSource, sequences: list[list[int]], *, tp: int = 1, pp: int = 1, ep: int = 1,
                     dtype: str = "fp32", timeout: float = 3600.0) -> list[list[float]]:
    """The L−1 log-probs of every sequence (module docstring), on tp·pp·ep local ranks."""
    from .launch import run_local

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown {dtype!r}; known: {', '.join(DTYPES)}")
    source = source.with_dtype(DTYPES[dtype])
    supported_layout(source, tp=tp, pp=pp, ep=ep)
    out = run_local(policy_outputs, tp * pp * ep, source, sequences, (tp, pp, ep), ("logprobs",), None,
                    timeout=timeout)
    return out["logprobs"]


# ---------------------------------------------------------------------------------------------- rank side


def _load_weights(actor, source: ModelSource, groups) -> None:
    """HF directory: this rank's shard streamed with ``hf_to_mcore``; megatron checkpoint: ``CheckpointManager``."""
    from .mapping import load_hf_chunks

    if source.kind == "megatron":
        from ..checkpoint import CheckpointManager

        manager = CheckpointManager(source.root, keep_last=0, groups=groups, readonly=True)
        manager.load(actor, source.step_dir, load_optimizer=False, load_rng=False, load_reference=False)
        return
    from .io import SafetensorsReader

    with SafetensorsReader(source.hf_dir) as src:
        load_hf_chunks(src, source.model, source.arch, actor.models, groups)
    actor.optimizer.reload_model_params()


def _rows(sequences: list[list[int]], micro: int) -> list[list[int]]:
    """The sequences, padded in count to a multiple of ``micro`` with copies of the last one (dropped after)."""
    return sequences + [sequences[-1]] * (-len(sequences) % micro)


def _full_logits(actor, batch, lengths: list[int]) -> list[Any] | None:
    """Vocab-gathered logits [L_b, V] (fp32, padding rows dropped) of every row, on the last stage: the actor's
    forward-only schedule (``PolicyActor.run_forward_only``) with the output layer applied to every position."""
    import torch

    from .. import collectives
    from ..policy.forward import unwrap_model, vocab_parallel_logits

    vocab = actor.model_cfg.vocab_size
    tp_group = actor.tp_group

    def head(model, hidden, mb):  # hidden: the π_old pass's feed (final-norm hidden states on the last stage)
        b, width = mb.input_ids.shape
        rows = torch.stack(torch.meshgrid(torch.arange(width), torch.arange(b), indexing="ij"), -1)
        rows = rows.reshape(-1, 2).to(hidden.device)  # (position, row), position-major
        logits = vocab_parallel_logits(unwrap_model(model), hidden, rows, tp_group=tp_group)  # [W·b, V/TP]
        if tp_group is not None:
            logits = torch.cat(collectives.all_gather(logits.contiguous(), tp_group), dim=-1)
        return logits[:, :vocab].float().reshape(width, b, vocab).transpose(0, 1).cpu()

    with torch.no_grad():
        parts = actor.run_forward_only(batch, head)
    if parts is None:
        return None
    full = torch.cat(parts, 0)
    return [full[b, :n].clone() for b, n in enumerate(lengths)]


def _export_check(actor, source: ModelSource, groups, hf_dir: str) -> dict | None:
    """The loaded parameters exported with ``mcore_to_hf`` (TP shards gathered to TP rank 0) compared tensor by
    tensor with ``hf_dir``'s safetensors (each HF tensor rounded to the parameters' dtype first, so an fp32 model of
    a bf16 checkpoint round-trips exactly): every rank's chunks gathered (any TP / PP / EP layout). Returns, on
    rank 0, ``{"identical", "first_diff", "tensors"}``."""
    import torch

    from .. import collectives
    from .io import SafetensorsReader
    from .mapping import mcore_to_hf

    mine = {(groups.pp_rank, None if groups.vpp is None else v, groups.tp_rank, groups.ep_rank):
            {n: p.detach().cpu() for n, p in chunk.named_parameters()} for v, chunk in enumerate(actor.models)}
    shards: dict = {}
    for part in (collectives.all_gather_object(mine) if groups.world_size > 1 else [mine]):  # every rank's chunks
        shards.update(part)
    if groups.rank != 0:
        return None
    first, count = None, 0
    with SafetensorsReader(hf_dir) as src:
        names = set(src.names())
        seen = set()
        for name, tensor in mcore_to_hf(shards, source.model, source.arch, etp=groups.etp):
            count += 1
            seen.add(name)
            if name not in names:
                first = first or f"{name} (not in the HF checkpoint)"
                continue
            want = src.get(name)
            if tuple(want.shape) != tuple(tensor.shape) or not torch.equal(tensor, want.to(tensor.dtype)):
                first = first or name
        # a tied checkpoint may carry an lm_head copy that the export does not write (checked equal on import)
        left = sorted(names - seen - {"lm_head.weight"})
        if left:
            first = first or f"{left[0]} (in the HF checkpoint, not exported)"
    return {"identical": first is None, "first_diff": first, "tensors": count}


def policy_outputs(source: ModelSource, sequences: list[list[int]], layout: tuple[int, int, int],
                   want: tuple[str, ...], compare_hf_dir: str | None) -> dict | None:
    """Rank function (``launch.run_local``): build the actor, load ``source``, compute what ``want`` names —
    ``"logprobs"`` (list of L−1 floats per sequence), ``"logits"`` (a [L, V] fp32 tensor per sequence), ``"export"``
    (the round-trip check against ``compare_hf_dir``) — and return them on rank 0 (None elsewhere)."""
    import torch

    from .. import collectives
    from ..config import ParallelConfig
    from ..config.algorithm import AlgorithmConfig
    from ..config.optim import OptimConfig
    from ..policy import destroy_parallel, init_parallel
    from ..policy.actor import PolicyActor

    tp, pp, ep = layout
    model = dataclasses.replace(source.model, pretrained=None)
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep)
    groups = init_parallel(parallel, model, seed=0)
    try:
        algorithm = AlgorithmConfig()
        algorithm.kl.coef = 0.0
        rows = _rows(sequences, min(MICRO_BATCH, len(sequences)))
        actor = PolicyActor(model=model, parallel=parallel, optim=OptimConfig(), algorithm=algorithm, groups=groups,
                            micro_batch_size=min(MICRO_BATCH, len(rows)), routing_replay=False, reference=None)
        _load_weights(actor, source, groups)
        batch = actor.pack([r[:1] for r in rows], [r[1:] for r in rows], torch.zeros(len(rows)), pad_id=0)
        out: dict[str, Any] = {}
        last = groups.is_last_stage and groups.tp_rank == 0
        if "logprobs" in want:
            logp = actor.compute_old_logprobs(batch)  # [N, W] on the last stage, 0 off the response
            if last:
                out["logprobs"] = [logp[b, 1: len(s)].tolist() for b, s in enumerate(sequences)]
        if "logits" in want:
            logits = _full_logits(actor, batch, [len(s) for s in sequences])
            if last:
                out["logits"] = logits
        if "export" in want:
            check = _export_check(actor, source, groups, compare_hf_dir)
            if groups.rank == 0:
                out["export"] = check
        # the last stage's results to rank 0 (rank 0 is the last stage itself when pp == 1)
        holders = collectives.all_gather_object(groups.rank if last else None)
        src = next(r for r in holders if r is not None)
        if src != 0:
            moved = collectives.broadcast_object({k: v for k, v in out.items() if k != "export"}, src=src)
            if groups.rank == 0:
                out.update(moved)
        return out if groups.rank == 0 else None
    finally:
        destroy_parallel()
