"""Distributed weight sync with one group per pipeline stage, streamed: real gloo trainer ranks holding megatron
shards (no megatron: the "actors" hold tensors made by ``hf_to_mcore`` for their (pp, vpp, tp) position) push to
fake SGLang workers in their own processes (tests/sglang_fake.py; a group member must be another process).

* the stage-local export (``mapping.iter_chunk_to_hf`` over each chunk) is ``mcore_to_hf`` of the whole model,
  bit for bit, tied embedding once, for PP / VPP / TP layouts, tied and untied;
* PP 2 × TP 2 (4 ranks): each worker joins one group per stage (same rank offsets), every stage's buckets arrive on
  its own group in stage order, the received tensors are the export bit for bit, ``weight_version`` only on the
  very last bucket, the protocol's calls once around all stages; ``/weights_checker`` verification passes;
* streaming: peak staged bytes ≤ 2 buckets, and at every bucket only a handful of exported tensors are alive;
* failures: a worker dying in stage 1 (stage 0 loaded, no version claimed), a refused bucket in stage 0 (stage 1
  never sent), each one line naming the server and the stage on every rank; the next sync reconnects every stage and
  succeeds; a corrupted tensor on a worker is caught by ``rollout.verify_sync`` naming the server and tensor;
* the CPU transcription of SGLang's GPU tensor hash (CUDA servers' ``/weights_checker``) equals a word-by-word one.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from types import SimpleNamespace

import httpx
import pytest
import torch

from oar_megatron.convert.mapping import hf_shapes, hf_to_mcore, iter_chunk_to_hf, mcore_to_hf
from oar_megatron.rollout import weight_sync
from oar_megatron.rollout.sglang import RolloutError, SGLangEngine
from tests.dist_harness import run_ranks
from tests.rollout.test_sglang_distributed import _spawn
from tests.rollout.test_sglang_sync import _model

pytestmark = pytest.mark.dist


def _cfg(layers: int = 2, untied: bool = False):
    return dataclasses.replace(_model(), num_layers=layers, untie_embeddings_and_output_weights=untied).validate()


def _hf(cfg, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.1 for n, s in hf_shapes(cfg, "qwen3").items()}


class _Chunk:
    def __init__(self, state):
        self.params = {n: torch.nn.Parameter(t.clone()) for n, t in state.items()}

    def named_parameters(self):
        return list(self.params.items())


def _actor(cfg, hf, *, pp=1, pp_rank=0, tp=1, tp_rank=0, vpp=None, rank=0, world=1):
    chunks = [_Chunk(hf_to_mcore(hf, cfg, "qwen3", tp=tp, tp_rank=tp_rank, pp=pp, pp_rank=pp_rank, vpp=vpp,
                                 vp_stage=v)) for v in ([None] if vpp is None else range(vpp))]
    groups = SimpleNamespace(pp_rank=pp_rank, vpp=vpp, tp_rank=tp_rank, ep_rank=0, etp=tp, dp_rank=0,
                             world_size=world, rank=rank)
    return SimpleNamespace(models=chunks, groups=groups)


@pytest.mark.parametrize("untied", [False, True])
def test_stage_local_export_is_mcore_to_hf(untied):
    cfg = _cfg(layers=4, untied=untied)
    hf = _hf(cfg)
    for pp, vpp, tp in ((2, None, 1), (2, 2, 2), (1, None, 2)):
        states, got = {}, []
        for v in ([None] if vpp is None else range(vpp)):
            for p in range(pp):
                shards = {t: hf_to_mcore(hf, cfg, "qwen3", tp=tp, tp_rank=t, pp=pp, pp_rank=p, vpp=vpp, vp_stage=v)
                          for t in range(tp)}
                states.update({(p, v, t, 0): s for t, s in shards.items()})
        for p in range(pp):  # stage by stage, each from its own chunks only
            for v in ([None] if vpp is None else range(vpp)):
                got += list(iter_chunk_to_hf(lambda n, t, e, p=p, v=v: states[(p, v, t, e)][n], cfg, "qwen3", tp=tp,
                                             pp=pp, pp_rank=p, vpp=vpp, vp_stage=v))
        want = dict(mcore_to_hf(states, cfg, "qwen3"))
        assert len(got) == len(want) == len(hf) and dict(got).keys() == want.keys(), (pp, vpp, tp)
        for n, t in got:
            assert torch.equal(t, want[n]) and torch.equal(t, hf[n]), (pp, vpp, tp, n)
        assert ("lm_head.weight" in dict(got)) == untied


# ------------------------------------------------------------------------------------------ multi-rank


def _sync_ranks(rank, world, pp, tp, urls, bucket_bytes, verify, rounds, timeout_s=20.0):
    """Rank ``rank`` of a pp × tp trainer (rank = pp_rank·tp + tp_rank, megatron's order) syncs ``rounds`` times
    (a list of worker-URL lists, one engine each; an engine is reused while the list repeats); returns per round
    the error line or the stats."""
    cfg = _cfg()
    actor = _actor(cfg, _hf(cfg), pp=pp, pp_rank=rank // tp, tp=tp, tp_rank=rank % tp, rank=rank, world=world)
    out, eng, last = [], None, None
    for ws in rounds:
        if ws != last:
            if eng is not None:
                eng.close()
            eng = SGLangEngine(ws, vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", weight_sync="distributed",
                               sync_backend="gloo", sync_bucket_mb=bucket_bytes / 2**20, update_timeout_s=timeout_s,
                               verify_sync=verify)
            last = ws
        t0 = time.monotonic()
        try:
            eng.sync_weights(actor)
            out.append({"ok": dict(eng.last_sync_stats), "version": eng.weight_version})
        except RolloutError as exc:
            out.append({"error": str(exc), "broken": eng.broken is not None})
        out[-1]["s"] = time.monotonic() - t0
    eng.close()
    return out


def _dump(url, tmp, name):
    r = httpx.post(url + "/fake_dump", json={"path": str(tmp / f"{name}.safetensors")}, timeout=30)
    r.raise_for_status()
    from safetensors.torch import load_file

    return r.json(), load_file(str(tmp / f"{name}.safetensors"))


def _kill(procs):
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_pp2_tp2_one_group_per_stage(tmp_path):
    cfg = _cfg()
    hf = _hf(cfg)
    procs = [_spawn(tmp_path, "w0"), _spawn(tmp_path, "w1")]
    try:
        urls = [u for _, u in procs]
        bucket = 40_000  # the tiny model is ~290 kB: several buckets per stage, the largest tensor (32 kB) fits
        res = run_ranks(_sync_ranks, 4, 2, 2, urls, bucket, True, [urls, urls], timeout=300)
        for r in res:  # every rank: both syncs succeeded (verified by /weights_checker)
            assert [x.get("version") for x in r] == [1, 2], r
        stats = res[0][0]["ok"]
        assert stats["sync/stages"] == 2 and stats["sync/bytes"] == sum(t.numel() * 4 for t in hf.values())
        assert stats["sync/peak_staged_bytes"] <= 2 * bucket
        for i, u in enumerate(urls):
            info, got = _dump(u, tmp_path, f"w{i}")
            assert sorted(got) == sorted(hf) and "lm_head.weight" not in got  # tied: sent once
            for n, t in hf.items():
                assert torch.equal(got[n], t), n
            joined = info["joined"]  # one group per stage, joined once (the second sync reuses them), same offsets
            assert [g["group_name"].rsplit("-", 1)[1] for g in joined] == ["pp0", "pp1"]
            assert all(g["rank_offset"] == 1 + i and g["world_size"] == 3 for g in joined)
            assert info["groups"] == {}  # destroyed when the engines closed
            ups = info["dist_updates"]
            per_sync = len(ups) // 2
            for k in range(2):  # each sync: stage 0's buckets, then stage 1's; the version on the last one only
                sync = ups[k * per_sync:(k + 1) * per_sync]
                stages = [u_["group_name"].rsplit("-", 1)[1] for u_ in sync]
                assert stages == sorted(stages) and set(stages) == {"pp0", "pp1"}, stages
                assert [u_.get("weight_version") for u_ in sync] == [None] * (per_sync - 1) + [str(k + 1)]
            calls = [c for c in info["calls"] if c not in ("/server_info", "/fake_dump")]
            one = (["/pause_generation", "/begin_weight_update"] + ["/update_weights_from_distributed"] * per_sync
                   + ["/end_weight_update", "/flush_cache", "/weights_checker", "/continue_generation"])
            groups2 = ["/init_weights_update_group"] * 2, ["/destroy_weights_update_group"] * 2
            assert calls == groups2[0] + one + one + groups2[1], calls  # joined once, destroyed at close
            assert info["weight_version"] == "2"
    finally:
        _kill(procs)


def test_stage_failures_are_named_and_defined(tmp_path):
    cfg = _cfg()
    hf = _hf(cfg)
    stage0 = [n for n in hf if n.startswith(("model.embed_tokens", "model.layers.0."))]
    states = {(0, None, 0, 0): hf_to_mcore(hf, cfg, "qwen3", pp=2, pp_rank=0)}
    n0, size = 0, 0  # stage 0's buckets of 40 kB, counted as the sender fills them
    for _, t in iter_chunk_to_hf(lambda n, t, e: states[(0, None, t, e)][n], cfg, "qwen3", pp=2, pp_rank=0):
        if size and size + t.numel() * 4 > 40_000:
            n0, size = n0 + 1, 0
        size += t.numel() * 4
    n0 += 1
    # the dying worker dies when stage 1's first bucket is announced; the refusing one refuses stage 0's second
    procs = [_spawn(tmp_path, "good"), _spawn(tmp_path, "dying", "--dist-fault", f"die:{n0 + 1}"),
             _spawn(tmp_path, "refusing", "--dist-fault", "fail:2")]
    try:
        (_, good), (pd, dying), (_, refusing) = procs
        res = run_ranks(_sync_ranks, 2, 2, 1, [good, dying], 40_000, False,
                        [[good, dying], [good], [good, refusing], [good, refusing]], timeout=300)
        for r in res:
            died, ok, refused, again = r
            assert died["broken"] and "\n" not in died["error"] and refused["broken"]
            assert f"{dying}/update_weights_from_distributed" in died["error"], died
            assert "pipeline stage 1 of 2, bucket 1" in died["error"], died
            assert ok["version"] == 1  # a new engine, every stage reconnected
            assert f"{refusing}/update_weights_from_distributed failed" in refused["error"], refused
            assert "fake refusal" in refused["error"]
            assert "pipeline stage 0 of 2, bucket 2" in refused["error"], refused
            # named at once: the broadcast a refusing worker will never join is abandoned when its answer arrives,
            # not after rollout.update_timeout_s (60 s here)
            assert died["s"] < 10 and refused["s"] < 10, (died, refused)
            assert again["version"] == 1  # one-off refusal: the next sync reconnects every stage and succeeds
        assert pd.wait(5) == 3
        info, got = _dump(refusing, tmp_path, "refusing")
        ups = info["dist_updates"]
        first = [u_ for u_ in ups[:2]]  # the failed sync: stage 0's bucket 1, then the refused bucket 2 ...
        assert all(u_["group_name"].endswith("-pp0") for u_ in first) and "weight_version" not in str(first)
        failed_group = first[0]["group_name"]
        assert not any(u_["group_name"].rsplit("-", 1)[0] == failed_group.rsplit("-", 1)[0]
                       and u_["group_name"].endswith("-pp1") for u_ in ups)  # ... and stage 1 never sent
        assert info["weight_version"] == "1" and sorted(got) == sorted(hf)
        info, got = _dump(good, tmp_path, "good")
        assert set(stage0) <= set(got)
    finally:
        _kill(procs)


def test_streaming_and_verification_single_rank(tmp_path, monkeypatch):
    """One rank (PP 1): the exported tensors stay few (weak references counted at every bucket), and
    ``/weights_checker`` catches a worker holding a corrupted tensor, naming it."""
    cfg = _cfg()
    hf = _hf(cfg)
    actor = _actor(cfg, hf)
    alive: list[weakref.ref] = []
    live_at_flush: list[int] = []
    real = weight_sync.export_stage

    params = {(p.data_ptr(), p.numel()) for c in actor.models for _, p in c.named_parameters()}

    def tracked(*args, **kwargs):
        for name, t in real(*args, **kwargs):
            if (t.data_ptr(), t.numel()) not in params:  # a whole parameter (norms) is held by the model anyway
                alive.append(weakref.ref(t))
            yield name, t

    monkeypatch.setattr(weight_sync, "export_stage", tracked)
    procs = [_spawn(tmp_path, "w0"), _spawn(tmp_path, "bad", "--dist-fault",
                                            "corrupt:model.layers.1.self_attn.k_proj.weight")]
    try:
        (_, u0), (_, bad) = procs
        eng = SGLangEngine([u0], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", weight_sync="distributed",
                           sync_backend="gloo", sync_bucket_mb=20_000 / 2**20, update_timeout_s=20.0,
                           verify_sync=True)
        eng._dist.on_flush = lambda s, i, n: live_at_flush.append(sum(r() is not None for r in alive))
        eng.sync_weights(actor)
        assert len(alive) == 10 and len(live_at_flush) >= 10  # q/k/v, gate/up of each layer
        assert max(live_at_flush) <= 3, live_at_flush  # never more than a few of the exported tensors
        assert eng.last_sync_stats["sync/peak_staged_bytes"] <= 2 * 20_000
        eng.close()

        eng = SGLangEngine([u0, bad], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", weight_sync="distributed",
                           sync_backend="gloo", sync_bucket_mb=1, update_timeout_s=20.0, verify_sync=True)
        with pytest.raises(RolloutError) as err:
            eng.sync_weights(actor)
        msg = str(err.value)
        assert "\n" not in msg and f"{bad} verification failed" in msg, msg
        assert "'model.layers.1.self_attn.qkv_proj.weight'" in msg and eng.broken is not None
        eng.verify_sync = eng._dist.verify = False  # without verification the same sync "succeeds"
        eng.sync_weights(actor)
        eng.close()
    finally:
        _kill(procs)


def test_layout_errors_before_any_transfer():
    """A chunk whose names do not match the conversion table is one line naming the tensor and the chunk, raised
    while the layout is built (before any HTTP call or transfer: the worker URL here answers nothing)."""
    cfg = _cfg()
    actor = _actor(cfg, _hf(cfg))
    del actor.models[0].params["decoder.layers.1.mlp.linear_fc2.weight"]
    eng = SGLangEngine(["http://127.0.0.1:9"], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3",
                       weight_sync="distributed", sync_backend="gloo")
    with pytest.raises(RolloutError, match=r"^weight sync: megatron tensor 'decoder.layers.1.mlp.linear_fc2.weight' "
                                           r"missing on \(pp_rank, vp_stage, tp_rank, ep_rank\)=\(0, None, 0, 0\)$"):
        eng.sync_weights(actor)
    assert eng.broken is not None


def _gpu_hash_reference(data: bytes, seed: int = 0x243F6A88, tile: int = 8192) -> int:
    """SGLang's ``hash_tiles32_kernel_blocked`` + ``add_tree_reduce_u64_kernel`` + ``_final_splitmix64``, word by
    word in plain Python integers (a transcription of the Triton source, loop for loop)."""
    m32, m64 = 0xFFFFFFFF, (1 << 64) - 1

    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & m32
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & m32
        return x ^ (x >> 16)

    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & m32

    data += bytes(-len(data) % 4)
    words = [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]
    n = len(words)
    if n == 0:
        return 0
    s1, s2 = seed & m32, ((seed * 0x9E3779B1) ^ 0xDEADBEEF) & m32
    total = 0
    for base in range(0, n, tile):
        h1 = h2 = 0
        for i in range(base, min(base + tile, n)):
            p1 = ((i * 0x27D4EB2D + s1) & m32) ^ rotl(i, 15)
            p2 = ((i * 0x165667B1 + s2) & m32) ^ rotl(i, 13)
            h1 = (h1 + fmix(words[i] ^ p1)) & m32
            h2 = (h2 + fmix(words[i] ^ p2)) & m32
        h1, h2 = fmix(h1 ^ (n * 4 & m32)), fmix(h2 ^ (n * 4 & m32))
        total = (total + ((h1 << 32) | h2)) & m64
    total ^= total >> 30
    total = (total * 0xBF58476D1CE4E5B9) & m64
    total ^= total >> 27
    total = (total * 0x94D049BB133111EB) & m64
    return total ^ (total >> 31)


def test_gpu_checksum_transcription():
    """The streamed CPU transcription of SGLang's GPU tensor hash equals a word-by-word transcription of the kernel:
    several tiles and a partial one, a byte count not a multiple of 4 (bf16 with an odd element count), a fused
    tensor hashed in parts (word indices continue across parts), chunks of tiles smaller than the data."""
    from oar_megatron.rollout.weight_sync import GpuTensorHash

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(20_001, generator=g), torch.randn(7, generator=g).bfloat16(), torch.zeros(0)]
    for t in cases:
        h = GpuTensorHash(chunk_tiles=1)
        h.update(t)
        assert h.digest() == _gpu_hash_reference(t.numpy().tobytes() if t.dtype != torch.bfloat16
                                                 else t.view(torch.int16).numpy().tobytes())
    q, k, v = torch.randn(3001, generator=g), torch.randn(13, generator=g), torch.randn(5000, generator=g)
    parts = GpuTensorHash(tile_words=64, chunk_tiles=3)
    for x in (q, k, v):
        parts.update(x)
    whole = torch.cat([q, k, v]).numpy().tobytes()
    assert parts.digest() == _gpu_hash_reference(whole, tile=64)
