"""Autoregressive sampling from a megatron-core ``GPTModel`` with megatron's static KV cache (the local engine).

``generate(model, prompts, params, vocab_size=..., generator=...)`` returns one :class:`~oar_megatron.rollout.Sample`
per (prompt, sample) pair, prompt-major. Cost is linear in the response length: each prompt is encoded once
(prefill), then one token per model call reads the cached keys/values (``StaticInferenceContext``).

Batching. Rows (each prompt repeated ``n`` times) are bucketed by prompt length, so a batch needs no left padding
and one position offset serves every row; a bucket is cut into batches of at most ``max_batch_size`` rows, each with
its own KV cache of ``[prompt_len + max_new_tokens]`` positions. Under FP8 a batch is padded with dummy rows (fed
``pad_id``, never sampled) to a multiple of the model's FP8 token multiple (``policy.padding``), since each decode
step feeds one token per row to the GEMMs. A row that has finished (stop token) keeps being fed
``pad_id`` until the whole batch is done; those outputs are discarded. A batch stops as soon as every row finished.

Sampling happens on the model's device in float32 from the vocabulary-gathered last-token logits [B, V_pad]
(``runtime_gather_output``), with the caller's ``torch.Generator`` (on that device): the [B, V] logits never leave
the device; the drawn tokens and log-probs of every step stay there too and are copied to the host once per batch,
after the last step (the only per-step host traffic is the one boolean "every row finished"):

* columns >= ``vocab_size`` are TP/divisibility padding of the embedding and are never sampled, nor part of the
  softmax below;
* temperature 0 is greedy (argmax); otherwise logits / T, then top-k, then top-p (nucleus: the smallest set of
  most likely tokens whose cumulative probability reaches top_p, at least one) filter the draw;
* the reported log-prob of a drawn token is log_softmax(logits[:vocab_size] / T) at that token, WITHOUT the
  top-k / top-p renormalisation (T = 1 when greedy): the distribution the trainer recomputes, the convention of
  verl and slime with SGLang. ``policy.forward`` masks the padded columns (``mask_padded_vocab``) before its
  softmax, so its log-probs of these samples equal the ones reported here.

Tensor parallel: every TP rank runs the same calls; the gathered logits are the same on every rank, and the tokens
and log-probs drawn by TP rank 0 are broadcast over ``tp_group`` anyway, so the KV caches can never diverge and
every rank returns identical samples. Sequence parallel is switched off for the call (one decode position cannot be
split over TP; megatron's static-batching generation does the same) and restored; MoE under SP is refused. Pipeline
parallel is not supported (the model must hold the embedding and the output layer); MoE routing replay must be off
(generation never records routes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .. import collectives
from ..algorithms.reduce import ProcessGroup, group_size
from ..rollout.base import Sample, SamplingParams
from .padding import fp8_multiple, pad_rows

__all__ = ["PP_ERROR", "generate", "sample_tokens"]

PP_ERROR = "the local engine needs pipeline_model_parallel_size=1; use rollout=sglang for PP"


def sample_tokens(logits: torch.Tensor, params: SamplingParams, *, vocab_size: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``logits`` [B, V_pad] (any dtype; computed in fp32 on the logits' device, with
    ``generator`` on that device too).

    Returns (tokens [B] long, logprobs [B] fp32) on the logits' device; logprobs as in the module docstring
    (unfiltered, tempered, over the first ``vocab_size`` columns).
    """
    if generator is not None and generator.device.type != logits.device.type:
        raise ValueError(f"generator: on {generator.device}, the logits are on {logits.device} (sampling stays on "
                         "the model's device)")
    # (narrow/unsqueeze rather than indexing: the same ops, and they also run on fake CUDA tensors in the tests)
    x = logits.detach().narrow(-1, 0, vocab_size).float()  # [B, V] on the device
    if params.temperature == 0:
        tokens = x.argmax(-1)
        return tokens, torch.log_softmax(x, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    x = x / params.temperature
    logp = torch.log_softmax(x, -1)  # [B, V] the reported distribution
    filtered = x
    if 0 < params.top_k < vocab_size:
        kth = torch.topk(x, params.top_k, dim=-1).values.narrow(-1, params.top_k - 1, 1)  # [B, 1]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1:
        probs, order = torch.softmax(filtered, -1).sort(-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    tokens = torch.multinomial(torch.softmax(filtered, -1), 1, generator=generator).squeeze(-1)  # [B]
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a sequence of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompts[{i}]: empty prompt (at least one token is needed to predict from)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} is outside [0, vocab_size={vocab_size})")
        out.append(ids)
    return out


_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def _sequence_parallel_off(gpt: torch.nn.Module) -> Iterator[None]:
    """Run the model without sequence parallel (a decode step has one position, which cannot be split over TP),
    as megatron's static-batching text generation does (``set_model_to_sequence_parallel``): every module attribute
    in ``_SP_ATTRS`` and ``config.sequence_parallel`` are set False, and restored on exit. Parameter attributes (the
    gradient-reduction flags) are left alone. A MoE model under SP is refused: megatron keeps SP inside its MoE
    layers for TP x EP and supports nothing else; our CPU path cannot test either."""
    config = gpt.config
    if not config.sequence_parallel:
        yield
        return
    if config.num_moe_experts:
        raise ValueError("the local engine cannot run a MoE model with sequence_parallel (TP > 1); "
                         "use rollout=sglang")
    saved = [(m, a, getattr(m, a)) for m in gpt.modules() for a in _SP_ATTRS if getattr(m, a, None) is True]
    try:
        for m, a, _ in saved:
            setattr(m, a, False)
        config.sequence_parallel = False
        yield
    finally:
        config.sequence_parallel = True
        for m, a, v in saved:
            setattr(m, a, v)


def _check_routing_replay(model: torch.nn.Module) -> None:
    from .routing_replay import RoutingReplay

    replay = RoutingReplay.of(model, missing_ok=True)
    if replay is not None and replay.mode != "off":
        raise RuntimeError(f"routing replay: a {replay.mode!r} pass is open on this model; end it before generating "
                           "(generation must not record or replay routes)")


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *, vocab_size: int,
             generator: torch.Generator, tp_group: ProcessGroup | None = None, max_batch_size: int = 64,
             pad_id: int = 0) -> list[Sample]:
    """Sample ``params.n`` responses for each prompt (module docstring); prompt-major ``list[Sample]``.

    model: a ``GPTModel`` chunk holding both the embedding and the output layer (possibly wrapped: DDP,
    Float16Module); it is put in eval mode for the call and its training flag restored. prompts: token ids in
    [0, vocab_size). vocab_size: the tokenizer's vocabulary (<= the model's padded vocabulary). generator: the generator
    every draw uses, on the model's device (seed it identically on every TP rank). tp_group: the model's TP group
    (None: TP=1).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from .forward import unwrap_model

    params = params.validate()
    gpt = unwrap_model(model)
    if not (gpt.pre_process and gpt.post_process):
        raise ValueError(PP_ERROR)
    tp = gpt.config.tensor_model_parallel_size
    if group_size(tp_group) != tp:
        raise ValueError(f"tp_group: has {group_size(tp_group)} ranks, the model was built for TP={tp}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= gpt.vocab_size:
        raise ValueError(f"vocab_size: must be in [1, {gpt.vocab_size}] (the model's padded vocabulary), "
                         f"got {vocab_size!r}")
    real = getattr(gpt, "oar_vocab_size", None)  # recorded by build_model; the trainer masks columns >= it
    if real is not None and vocab_size > real:
        raise ValueError(f"vocab_size: {vocab_size} exceeds the model's real vocabulary {real} (build_model's "
                         "vocab_size); tokens beyond it are padding the trainer never scores")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size: must be an integer >= 1, got {max_batch_size!r}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id: {pad_id} is outside [0, vocab_size={vocab_size})")
    device = next(gpt.parameters()).device
    if generator.device.type != device.type:
        raise ValueError(f"generator: must be a torch.Generator on the model's device ({device}), got one on "
                         f"{generator.device}")
    ids = _check_prompts(prompts, vocab_size)
    longest = max((len(p) for p in ids), default=0) + params.max_new_tokens
    if gpt.position_embedding_type == "learned_absolute" and longest > gpt.max_sequence_length:
        raise ValueError(f"params.max_new_tokens: prompt + response length {longest} exceeds the model's "
                         f"max_sequence_length {gpt.max_sequence_length}")
    _check_routing_replay(model)

    n = params.n
    samples: list[Sample | None] = [None] * (len(ids) * n)
    buckets: dict[int, list[int]] = {}  # prompt length -> row indices (row = prompt_index * n + j)
    for row in range(len(samples)):
        buckets.setdefault(len(ids[row // n]), []).append(row)
    rows_multiple = fp8_multiple(gpt)  # decode feeds one position per row, sequence parallel off
    training = model.training
    model.eval()
    try:
        with _sequence_parallel_off(gpt):
            for length in sorted(buckets):
                rows = buckets[length]
                for start in range(0, len(rows), max_batch_size):
                    batch = rows[start:start + max_batch_size]
                    prompt = torch.tensor([ids[r // n] for r in batch], dtype=torch.long, device=device)  # [B, P]
                    prompt = pad_rows(prompt, rows_multiple, pad_id)  # [B', P] FP8: B' rows per GEMM (padding.py)
                    ctx = StaticInferenceContext(prompt.shape[0], length + params.max_new_tokens)
                    out = _decode(model, ctx, prompt, params, vocab_size, generator, tp_group, pad_id, len(batch))
                    for r, (resp, lps, reason) in zip(batch, out):
                        samples[r] = Sample(prompt_index=r // n, prompt_ids=list(ids[r // n]), response_ids=resp,
                                            logprobs=lps, finish_reason=reason)
    finally:
        model.train(training)
    return samples  # type: ignore[return-value]


def _decode(model, ctx, prompt: torch.Tensor, params: SamplingParams, vocab_size: int, generator: torch.Generator,
            tp_group, pad_id: int, real: int) -> list[tuple[list[int], list[float], str]]:
    """Prefill ``prompt`` [B, P] into ``ctx``, then decode up to ``max_new_tokens`` tokens per row. Everything
    stays on the model's device until the batch is done (module docstring). Rows ``real``..B−1 are FP8 padding
    (``policy.padding``): decoded on ``pad_id`` alongside, never sampled nor returned."""
    b, length = prompt.shape
    device = prompt.device
    pos = torch.arange(length, device=device).expand(b, length)  # [B, P]
    logits = model(prompt, pos, None, inference_context=ctx, runtime_gather_output=True)  # [B, 1, V_pad]
    ctx.sequence_len_offset += length
    ctx.enable_decode_mode()
    stops = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
    done = torch.zeros(real, dtype=torch.bool, device=device)
    steps = params.max_new_tokens
    tokens_all = torch.empty(steps, real, dtype=torch.long, device=device)  # [S, B]
    logp_all = torch.empty(steps, real, dtype=torch.float32, device=device)
    live_all = torch.empty(steps, real, dtype=torch.bool, device=device)  # the row had not finished before the step
    pad_tail = torch.full((b - real,), pad_id, dtype=torch.long, device=device)  # FP8 padding rows' feed
    ran = 0
    for step in range(steps):
        tokens, logp = _draw(logits[:real, -1], params, vocab_size, generator, tp_group)  # [B], [B] on the device
        tokens_all[step], logp_all[step], live_all[step] = tokens, logp, ~done
        done |= torch.isin(tokens, stops)
        ran = step + 1
        if step == steps - 1 or bool(done.all()):  # one boolean to the host per step
            break
        feed = torch.cat([torch.where(done, torch.full_like(tokens, pad_id), tokens), pad_tail])[:, None]  # [B', 1]
        pos = torch.full((b, 1), ctx.sequence_len_offset, dtype=torch.long, device=device)
        logits = model(feed, pos, None, inference_context=ctx, runtime_gather_output=True)  # [B, 1, V_pad]
        ctx.sequence_len_offset += 1
    # one copy per batch: a row's live steps are a prefix (a finished row stays finished)
    toks, lps = tokens_all[:ran].t().tolist(), logp_all[:ran].t().tolist()
    counts, stopped = live_all[:ran].sum(0).tolist(), done.tolist()
    return [(toks[i][:counts[i]], lps[i][:counts[i]], "stop" if stopped[i] else "length") for i in range(real)]


def _draw(logits: torch.Tensor, params: SamplingParams, vocab_size: int, generator: torch.Generator,
          tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tokens`` on every rank, then TP rank 0's tokens and log-probs broadcast over ``tp_group`` (one
    message on the device: token ids are exact in float64, < 2^53)."""
    tokens, logp = sample_tokens(logits, params, vocab_size=vocab_size, generator=generator)
    if group_size(tp_group) == 1:
        return tokens, logp
    buf = collectives.broadcast(torch.stack([tokens.double(), logp.double()]), src=0, group=tp_group)  # [2, B]
    tokens, logp = buf.unbind(0)
    return tokens.long(), logp.float()
