"""Weight sync from disk against fake workers: the export is the conversion mapping's (bit-identical HF tensors and
a config.json that reads back to the same architecture), the directory swap is atomic with old versions removed,
every worker (never the router) gets ``/update_weights_from_disk`` with the new version, a failed worker is a
one-line error naming it, and a failed sync blocks generation. No megatron: the "actor" holds megatron-named
tensors made by ``hf_to_mcore``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from oar_megatron.config.model import ModelConfig
from oar_megatron.convert.config import hf_model_config
from oar_megatron.convert.io import SafetensorsReader
from oar_megatron.convert.mapping import hf_shapes, hf_to_mcore
from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.sglang import RolloutError, SGLangEngine
from oar_megatron.rollout.weight_sync import SyncDir, hf_config_for
from tests.sglang_fake import FakeSGLang

ROOT = Path(__file__).resolve().parents[2]
GROUPS = SimpleNamespace(pp_rank=0, vpp=None, tp_rank=0, ep_rank=0, etp=1, dp_rank=0, world_size=1, rank=0)


def _model() -> ModelConfig:
    raw = yaml.safe_load((ROOT / "configs/model/tiny-synthetic.yaml").read_text())
    return ModelConfig(**raw).validate()


def _actor(cfg: ModelConfig, seed: int):
    g = torch.Generator().manual_seed(seed)
    hf = {n: torch.randn(s, generator=g) * 0.1 for n, s in hf_shapes(cfg, "qwen3").items()}
    state = hf_to_mcore(hf, cfg, "qwen3")
    module = torch.nn.Module()
    for i, (name, t) in enumerate(state.items()):
        module.register_parameter(f"p{i}", torch.nn.Parameter(t.clone()))
    names = list(state)

    class Chunk:
        def named_parameters(self):
            return [(names[i], p) for i, (_, p) in enumerate(module.named_parameters())]

    return SimpleNamespace(models=[Chunk()], groups=GROUPS), hf


def test_hf_config_reads_back_to_the_same_model(tmp_path):
    cfg = _model()
    back = hf_model_config(hf_config_for(cfg, "qwen3"), make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    for attr in ("num_layers", "hidden_size", "num_attention_heads", "query_groups", "head_dim", "ffn_size",
                 "vocab_size", "rotary_base", "norm_epsilon", "qk_layernorm", "add_qkv_bias",
                 "untie_embeddings_and_output_weights", "max_position_embeddings"):
        assert getattr(back, attr) == getattr(cfg, attr), attr
    with pytest.raises(ValueError, match="no HF config writer"):
        hf_config_for(cfg, "mixtral")


def test_sync_dir_is_atomic_and_pruned(tmp_path):
    d = SyncDir(tmp_path / "sync")
    (tmp_path / "sync").mkdir()
    (tmp_path / "sync" / "v3.tmp").mkdir()  # a crash's leftover
    for v in (1, 2, 3):
        d.write(v, {"w": torch.ones(2)}, {"architectures": ["X"]})
        d.prune(keep=v)
    assert d.versions() == [2, 3] and not list((tmp_path / "sync").glob("*.tmp"))
    d.write(3, {"w": torch.full((2,), 7.0)}, {})  # rewritten (a crash or a failed update left it)
    with SafetensorsReader(d.path(3)) as src:
        assert torch.equal(src.get("w"), torch.full((2,), 7.0))

    class Boom(dict):
        def items(self):
            raise OSError("disk full")
    with pytest.raises(OSError):
        d.write(4, Boom(w=torch.ones(1)), {})
    assert d.versions() == [2, 3] and not (tmp_path / "sync" / "v4.tmp").exists()  # nothing partial left


def test_sync_weights_hits_every_worker(tmp_path):
    cfg = _model()
    actor, hf = _actor(cfg, seed=1)
    workers = [FakeSGLang(vocab_size=cfg.vocab_size, seed=i) for i in range(2)]
    router = FakeSGLang(vocab_size=cfg.vocab_size)
    for f in (*workers, router):
        f.start()
    try:
        eng = SGLangEngine([w.url for w in workers], router_url=router.url, vocab_size=cfg.vocab_size,
                           sync_dir=tmp_path / "sync", model=cfg, arch="qwen3", backoff_s=0.01)
        eng.sync_weights(actor)
        assert eng.weight_version == 1 and eng.pushed
        v1 = tmp_path / "sync" / "v1"
        for w in workers:
            assert w.updates == [{"model_path": str(v1.resolve()), "weight_version": "1", "flush_cache": False}]
            assert w.weight_version == "1" and type(w.model).__name__ == "HFModel"  # transformers loaded v1
        assert router.updates == []  # weight endpoints go to the workers, never the router
        with SafetensorsReader(v1) as src:  # bit-identical export; tied embedding written once
            assert sorted(src.names()) == sorted(hf) and "lm_head.weight" not in src.names()
            for name, t in hf.items():
                assert torch.equal(src.get(name), t), name
        back = hf_model_config(json.loads((v1 / "config.json").read_text()))
        assert back.num_layers == cfg.num_layers and back.vocab_size == cfg.vocab_size
        # the router's responses carry its own version: generation through it is checked against "1"
        router.weight_version = "1"
        samples = eng.generate([[1, 3, 13, 4, 14]], SamplingParams(max_new_tokens=4, stop_token_ids=(2,), n=2))
        assert len(samples) == 2 and {s.weight_version for s in samples} == {1}
        assert len(router.requests) == 2 and not workers[0].requests

        # version 2, 3: v1 removed once v3 is written (the previous version stays for servers still reading it)
        eng.sync_weights(actor)
        eng.sync_weights(actor)
        assert SyncDir(tmp_path / "sync").versions() == [2, 3]
        assert [u["weight_version"] for u in workers[1].updates] == ["1", "2", "3"]

        # a worker that refuses: one line naming it; generation refused until a sync succeeds
        workers[1].update_fault = "fail"
        with pytest.raises(RolloutError) as err:
            eng.sync_weights(actor)
        msg = str(err.value)
        assert workers[1].url in msg and "/update_weights_from_disk" in msg and "\n" not in msg
        assert eng.weight_version == 3
        with pytest.raises(RolloutError, match="last weight sync failed"):
            eng.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        workers[0].update_fault = "http_500"
        with pytest.raises(RolloutError, match=workers[0].url.replace(".", r"\.") + ".*http_500"):
            eng.sync_weights(actor)
        eng.sync_weights(actor)  # healed
        assert eng.weight_version == 4 and eng.broken is None

        # the radix cache not flushed at once (a request still finishing, as a real 0.5.23 server does now and then):
        # the protocol's /flush_cache step is retried until it succeeds, then the version counts
        before = [w.flushes for w in workers]
        workers[1].flush_refusals = 2
        eng.sync_weights(actor)
        assert eng.weight_version == 5 and workers[1].weight_version == "5"
        assert workers[1].flushes - before[1] == 3 and workers[0].flushes - before[0] == 1
    finally:
        for f in (*workers, router):
            f.stop()


def test_sync_needs_workers(tmp_path):
    cfg = _model()
    actor, _ = _actor(cfg, seed=2)
    with FakeSGLang(vocab_size=cfg.vocab_size) as router:
        eng = SGLangEngine([], router_url=router.url, vocab_size=cfg.vocab_size, sync_dir=tmp_path, model=cfg,
                           arch="qwen3")
        with pytest.raises(RolloutError, match="worker"):
            eng.sync_weights(actor)
