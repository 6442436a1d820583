"""The trainer's pretrained start under pipeline parallelism: ``Trainer._load_pretrained`` (the trainer's own
method, run on a real ``PolicyActor`` — model, megatron DDP, distributed optimizer — on 2 gloo ranks, pp=2) loads a
tiny random 4-layer HF model into every model chunk of its stage, and the first π_old log-probs (and the π_ref ones
after ``set_reference_from_current``, what ``fit`` does) equal HF's within 1e-4:

- a Llama-3.2-style model (tied embeddings, llama3 RoPE scaling) at pp=2: stage 0's embedding and stage 1's
  ``output_layer.weight`` (megatron's copy of the tied embedding) both carry the HF embedding; after one optimizer
  update (finalize_model_grads all-reduces the two copies' gradients over the embedding group) the copies are still
  bit-identical and moved off the HF weights, and the chunk states export (``mcore_to_hf``) to HF names;
- the ``tiny-synthetic`` preset's Qwen3 (tied, QK-norm) at pp=2 with virtual_pp=2 (2 chunks per stage);
- an untied Qwen3 at pp=2.

A full ``oar-train`` under pp > 1 is still refused by the rollout engine (the local engine generates at pp=1 only,
``rollout.engine``), which is why the trainer's loader is driven here without ``Trainer.__init__``."""

import types

import pytest
import torch

from tests.convert.hf_tiny import save_random
from tests.convert.test_pretrained_start import _hf_logprobs
from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

TOL = 1e-4
BASE = ["algorithm=grpo", "algorithm.kl.coef=0.05", "trainer.micro_batch_size=2", "model.num_layers=4",
        "parallel.pp=2", "optim.lr=1e-2"]
CASES = {  # name → (HF builder kwargs, extra overrides, train one step)
    "llama3.2": (dict(kind="llama"), ["model.qk_layernorm=false", "model.rope_scaling=llama3"], True),
    "qwen3-vpp": (dict(kind="qwen3"), ["parallel.virtual_pp=2"], False),
    "qwen3-untied": (dict(kind="qwen3", tie=False), ["model.untie_embeddings_and_output_weights=true"], False),
}


def _hf(directory, kind, tie=True, seed=0):
    """A tiny random 4-layer HF model with the ``tiny-synthetic`` preset's sizes (vocab 24, fp32)."""
    import transformers

    common = dict(vocab_size=24, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                  initializer_range=0.2)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 10000.0})
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = transformers.Qwen3Config(**common, head_dim=16, rope_theta=10000.0)
        config.architectures = ["Qwen3ForCausalLM"]
    return save_random(config, directory, seed)


def _rows():
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 24, (5,), generator=gen).tolist() for _ in range(4)]
    responses = [torch.randint(1, 24, (n,), generator=gen).tolist() for n in (4, 3, 4, 2)]
    return prompts, responses


def _states(actor, g):
    """{(pp_rank, vp_stage): state dict} of this rank's chunks (detached copies)."""
    return {(g.pp_rank, None if g.vpp is None else v): {n: p.detach().clone() for n, p in m.named_parameters()}
            for v, m in enumerate(actor.models)}


def _ranks(rank, world, dirs):
    from oar_megatron.policy import destroy_parallel, init_parallel
    from oar_megatron.policy.actor import PolicyActor
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    prompts, responses = _rows()
    out = {}
    for name, (_, over, train) in CASES.items():
        cfg = compose_config(BASE + over + [f"model.pretrained={dirs[name]}"])
        g = init_parallel(cfg.parallel, cfg.model, seed=cfg.trainer.seed)
        try:
            actor = PolicyActor(model=cfg.model, parallel=cfg.parallel, optim=cfg.optim, algorithm=cfg.algorithm,
                                groups=g, micro_batch_size=cfg.trainer.micro_batch_size, reference=None,
                                temperature=cfg.rollout.temperature)
            trainer = types.SimpleNamespace(cfg=cfg, groups=g, actor=actor, warmed_up=False, _print=lambda *_: None)
            Trainer._load_pretrained(trainer)  # the trainer's own loader, on the real actor
            res = {"warmed_up": trainer.warmed_up, "loaded": _states(actor, g), "pp_rank": g.pp_rank}
            batch = actor.pack(prompts, responses, torch.tensor([1.0, -1.0, 0.5, -0.5]), pad_id=0)
            res["old"] = actor.compute_old_logprobs(batch)
            actor.set_reference_from_current()  # what fit() does for a pretrained start
            res["ref"] = actor.compute_ref_logprobs(batch)
            res["ids"], res["mask"] = batch.input_ids, batch.response_mask
            if train:
                actor.compute_token_advantages(batch)
                res["update"] = actor.update(batch)
                res["trained"] = _states(actor, g)
            out[name] = res
        finally:
            destroy_parallel()
    return out


def test_pretrained_start_under_pipeline_parallelism(tmp_path):
    from oar_megatron.convert import hf_model_config, mcore_to_hf
    from oar_megatron.convert.mapping import pipeline_states

    hf, dirs = {}, {}
    for name, (kw, _, _) in CASES.items():
        dirs[name] = str(tmp_path / name)
        hf[name] = _hf(dirs[name], **kw)
    res = run_ranks(_ranks, 2, dirs, timeout=900)
    for name, model in hf.items():
        first, last = (r[name] for r in sorted(res, key=lambda r: r[name]["pp_rank"]))
        assert first["warmed_up"] and last["warmed_up"]  # the format warm-up stands in for pretraining: skipped
        assert first["old"] is None and first["ref"] is None  # log-probs live on the last stage
        want = _hf_logprobs(model, last["ids"])
        mask = last["mask"]
        for key in ("old", "ref"):
            assert (last[key].double() - want)[mask].abs().max().item() < TOL, (name, key)
        hf_sd = model.state_dict()
        emb = hf_sd["model.embed_tokens.weight"]
        chunks = {**first["loaded"], **last["loaded"]}
        order = sorted(chunks, key=lambda k: ((k[1] or 0), k[0]))  # global chunk order: v·pp + p
        c0, cl = chunks[order[0]], chunks[order[-1]]
        assert len(chunks) == (4 if name == "qwen3-vpp" else 2)
        assert torch.equal(c0["embedding.word_embeddings.weight"][:24], emb)
        assert torch.equal(cl["output_layer.weight"][:24], emb if not name.endswith("untied")
                           else hf_sd["lm_head.weight"])
        cfg = hf_model_config(dirs[name], make_vocab_size_divisible_by=8)  # the preset's
        back = dict(mcore_to_hf(pipeline_states(chunks), cfg, "qwen3" if "qwen3" in name else "llama"))
        assert set(back) == set(hf_sd) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
        assert all(torch.equal(back[k], hf_sd[k]) for k in back), name
    # the tied Llama after one update: both copies moved together (embedding-group gradient all-reduce)
    first, last = (r["llama3.2"] for r in sorted(res, key=lambda r: r["llama3.2"]["pp_rank"]))
    e0 = first["trained"][(0, None)]["embedding.word_embeddings.weight"]
    e1 = last["trained"][(1, None)]["output_layer.weight"]
    assert first["update"]["updated"] == last["update"]["updated"] == [1.0]
    assert not torch.equal(e0, first["loaded"][(0, None)]["embedding.word_embeddings.weight"])
    assert torch.equal(e0, e1)
    trained = {**first["trained"], **last["trained"]}
    cfg = hf_model_config(dirs["llama3.2"], make_vocab_size_divisible_by=8)
    back = dict(mcore_to_hf(pipeline_states(trained), cfg, "llama"))  # verifies the last stage's copy equals the embedding
    assert torch.equal(back["model.embed_tokens.weight"], e0[:24])
