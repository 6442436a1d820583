"""Distributed weight sync (``rollout.weight_sync: distributed``) on CPU: fake SGLang workers in their own processes
join a real gloo group through ``/init_weights_update_group`` (ranks at ``rank_offset`` after the trainer's rank 0)
and receive every ``/update_weights_from_distributed`` bucket as SGLang does (one ``uint8`` buffer, byte offsets,
dtype views: ``FlattenedTensorBucket``); the reconstructed HF tensors are bit-identical to the conversion export
of the trainer's weights, with buckets smaller than one tensor and buckets of many tensors; a worker that dies
mid-sync is a one-line error naming it, within the timeout, never a hang. Plus the bucket planner's layout rules."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from oar_megatron.convert.io import SafetensorsReader
from oar_megatron.rollout.sglang import RolloutError, SGLangEngine
from oar_megatron.rollout.weight_sync import bucket_nbytes, pack_bucket, plan_buckets, unpack_bucket
from tests.rollout.test_sglang_sync import _actor, _model

ROOT = Path(__file__).resolve().parents[2]


def test_buckets_layout():
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
          "c": torch.randn(2, 2, generator=g, dtype=torch.float64), "d": torch.tensor([-0.0, 1.0]).half(),
          "e": torch.randn(4, 3, generator=g).t()}  # non-contiguous
    for size in (1, 16, 60, 10**6):  # smaller than every tensor; a few per bucket; everything in one
        buckets = plan_buckets(ts, size)
        seen = {}
        for b in buckets:
            flat, meta = pack_bucket(b)
            assert flat.dtype == torch.uint8 and flat.numel() == bucket_nbytes(**meta)
            assert flat.numel() <= size or len(b) == 1  # a tensor larger than a bucket travels alone
            seen.update(unpack_bucket(flat.clone(), **meta))
        assert sorted(seen) == sorted(ts)
        for n, t in ts.items():  # bit-identical (the -0.0 sign included), shapes and dtypes kept
            assert seen[n].dtype == t.dtype and seen[n].shape == t.shape
            assert torch.equal(seen[n].view(torch.uint8), t.contiguous().view(torch.uint8)), n
    assert len(plan_buckets(ts, 1)) == len(ts) and len(plan_buckets(ts, 10**6)) == 1
    with pytest.raises(ValueError, match="unaligned byte offset"):  # what SGLang's receiver refuses
        bucket_nbytes(["h", "f"], ["float16", "float32"], [[1], [1]])
    with pytest.raises(ValueError, match="'x'.*int16"):
        plan_buckets({"x": torch.ones(2, dtype=torch.int16)}, 10)


def _spawn(tmp: Path, name: str, *extra: str) -> tuple[subprocess.Popen, str]:
    url_file = tmp / f"{name}.url"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.sglang_fake", "--url-file", str(url_file), "--vocab-size",
                             str(_model().vocab_size), *extra], cwd=ROOT, env=env,
                            stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + 60
    while not url_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / f"{name}.log").read_text()
        time.sleep(0.05)
    return proc, url_file.read_text()


def _dump(url: str, directory: Path) -> dict:
    directory.mkdir(exist_ok=True)
    r = httpx.post(url + "/fake_dump", json={"path": str(directory / "model.safetensors")}, timeout=30)
    r.raise_for_status()
    return r.json()


def test_distributed_sync_over_gloo(tmp_path):
    cfg = _model()
    actor, hf = _actor(cfg, seed=3)
    procs = [_spawn(tmp_path, "w0"), _spawn(tmp_path, "w1"), _spawn(tmp_path, "dying", "--dist-fault", "die:2")]
    try:
        (p0, u0), (p1, u1), (pd, ud) = procs
        largest = max(t.numel() * t.element_size() for t in hf.values())
        eng = SGLangEngine([u0, u1], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", weight_sync="distributed",
                           sync_backend="gloo", sync_bucket_mb=largest / 3 / 2**20, update_timeout_s=30.0)
        eng.sync_weights(actor)  # buckets smaller than the largest tensors: those travel alone
        first_buckets = int(eng.last_sync_stats["sync/buckets"])
        assert first_buckets > 3
        for u in (u0, u1):
            info = _dump(u, tmp_path / "got")
            with SafetensorsReader(tmp_path / "got") as src:  # bit-identical HF tensors, tied once
                assert sorted(src.names()) == sorted(hf) and "lm_head.weight" not in src.names()
                for name, t in hf.items():
                    assert torch.equal(src.get(name), t), name
            assert info["weight_version"] == "1"
            calls = [c for c in info["calls"] if c not in ("/server_info", "/fake_dump")]
            assert calls == (["/init_weights_update_group", "/pause_generation", "/begin_weight_update"]
                             + ["/update_weights_from_distributed"] * first_buckets
                             + ["/end_weight_update", "/flush_cache", "/continue_generation"])
            ups = info["dist_updates"]
            assert all(u_["load_format"] == "flattened_bucket" and u_["flush_cache"] is False for u_ in ups)
            assert [u_.get("weight_version") for u_ in ups] == [None] * (first_buckets - 1) + ["1"]
            (group, where), = info["groups"].items()
            assert group.startswith("oar_weight_sync-") and where == {"rank_offset": 1 + (u == u1), "world_size": 3}

        # a second sync reuses the group; one big bucket holds every tensor
        eng._dist.bucket_bytes = 1 << 30
        eng.sync_weights(actor)
        info = _dump(u1, tmp_path / "got")
        assert info["calls"].count("/init_weights_update_group") == 1 and info["weight_version"] == "2"
        assert info["dist_updates"][-1]["n"] == len(hf)
        eng.close()  # the workers destroy the group
        assert _dump(u1, tmp_path / "got")["groups"] == {}

        # a worker that dies when bucket 2 is announced: one line naming it, no hang, generation refused
        eng = SGLangEngine([u0, ud], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", weight_sync="distributed",
                           sync_backend="gloo", sync_bucket_mb=largest / 3 / 2**20, update_timeout_s=15.0)
        t0 = time.perf_counter()
        with pytest.raises(RolloutError) as err:
            eng.sync_weights(actor)
        msg = str(err.value)
        assert "\n" not in msg and f"{ud}/update_weights_from_distributed" in msg, msg
        assert time.perf_counter() - t0 < 60 and pd.wait(5) == 3 and eng.broken is not None
        eng.close()
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_config_and_trainer_arguments():
    from types import SimpleNamespace

    from oar_megatron.config.train import RolloutConfig
    from oar_megatron.trainer.loop import _distributed_sync_args

    urls = ["http://127.0.0.1:1"]
    RolloutConfig(engine="sglang", server_urls=urls, weight_sync="distributed", sync_bucket_mb=64).validate()
    with pytest.raises(ValueError, match="rollout.weight_sync: unknown 'nccl'"):
        RolloutConfig(engine="sglang", server_urls=urls, weight_sync="nccl").validate()
    with pytest.raises(ValueError, match="rollout.sync_bucket_mb"):
        RolloutConfig(engine="sglang", server_urls=urls, sync_bucket_mb=0).validate()
    with pytest.raises(ValueError, match="rollout.sync_bucket_mb: only rollout.engine=sglang"):
        RolloutConfig(sync_bucket_mb=64).validate()
    RolloutConfig(engine="sglang", server_urls=urls, weight_sync="distributed", verify_sync=True).validate()
    with pytest.raises(ValueError, match="rollout.verify_sync: only rollout.engine=sglang"):
        RolloutConfig(verify_sync=True).validate()
    args = _distributed_sync_args(SimpleNamespace(server_urls=urls, sync_bucket_mb=None, sync_master_address=None))
    assert args["sync_bucket_mb"] == 512 and args["sync_master_address"] == "127.0.0.1"
    assert args["sync_backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    remote = SimpleNamespace(server_urls=["http://node7:30000"], sync_bucket_mb=None, sync_master_address="10.0.0.1")
    assert _distributed_sync_args(remote)["sync_master_address"] == "10.0.0.1"
    with pytest.raises(ValueError, match="unknown 'nccl'"):
        SGLangEngine(urls, vocab_size=8, weight_sync="nccl")
