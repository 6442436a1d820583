"""Tiny random-weight HF models (fp32) saved with ``save_pretrained``, one per supported architecture: ``CASES``
(dense) and ``MOE_CASES`` (Qwen3-MoE with renormalised top-k, Mixtral; 4 experts, top-2, routers scaled so that
the routing is decisive and differs per token)."""

from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 10000.0}

# name → (transformers class names, extra config); "llama3.2" is tied with llama3 RoPE scaling, as Llama-3.2 is.
CASES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0)),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, rope_theta=1000000.0, rms_norm_eps=1e-6)),
}

_MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.001)
MOE_CASES = {
    # Qwen3-30B-A3B's routing (norm_topk_prob), expert FFN 32 != the dense intermediate_size 128 (unused)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_MOE, head_dim=24, rope_theta=1000000.0, rms_norm_eps=1e-6, num_experts=4,
                       moe_intermediate_size=32, norm_topk_prob=True)),
    # norm_topk_prob false: the top-k softmax probabilities as they are (megatron: moe_router_pre_softmax)
    "qwen3_moe_raw_topk": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                           dict(_MOE, head_dim=24, num_experts=4, moe_intermediate_size=32, norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_MOE, intermediate_size=48, num_local_experts=4, rope_theta=1000000.0, rms_norm_eps=1e-5)),
}


def make_hf_model(case: str, directory: str | Path, seed: int = 0, **overrides):
    """Build ``case`` with random weights (norm weights perturbed off 1, biases nonzero, routers ×4), save it,
    return it. ``overrides``: config fields replacing the defaults (e.g. ``num_hidden_layers=4`` for pipeline
    layouts)."""
    import transformers

    cfg_cls, model_cls, extra = {**CASES, **MOE_CASES}[case]
    config = getattr(transformers, cfg_cls)(**{**_COMMON, **extra, **overrides})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("gate.weight"):  # the MoE router
                p.mul_(4)
    model.save_pretrained(str(directory))
    return model


def save_random(config, directory: str | Path, seed: int = 0):
    """``config.architectures[0]`` built with random weights (norm weights perturbed off 1), saved with
    ``save_pretrained`` into ``directory`` and returned (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model


def make_synthetic_qwen3(directory: str | Path, seed: int = 0):
    """A tiny random Qwen3 with the ``tiny-synthetic`` preset's architecture (vocab 24 = the synthetic tokenizer's,
    tied, QK-norm, fp32), norm weights perturbed off 1; saved with ``save_pretrained`` and returned."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=24, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True, initializer_range=0.2)
    config.architectures = ["Qwen3ForCausalLM"]
    return save_random(config, directory, seed)


def hf_references(tmp_path_factory, cases, batch: int = 2, seq: int = 16, prompt: int = 4, suffix: str = "",
                  **overrides):
    """For the parity tests: each case built (``make_hf_model``, ``overrides``) into a fresh directory, and its fp32
    reference on ``batch`` × ``seq`` random ids (seed 5): logits [B, S, V] and response log-probs [B, S] (position
    t holds log p(ids[t] | ids[:t]); the first ``prompt`` positions, not response tokens, are 0). Returns
    ``(dirs, refs, ids)`` with ``refs[case] = (logits, logp)``."""
    dirs, refs = {}, {}
    ids = torch.randint(0, _COMMON["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(5))
    for case in cases:
        d = tmp_path_factory.mktemp(case.replace(".", "_") + suffix)
        model = make_hf_model(case, d, **overrides)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        logp = torch.nn.functional.pad(logp, (1, 0))
        logp[:, :prompt] = 0
        dirs[case], refs[case] = str(d), (logits, logp)
    return dirs, refs, ids
