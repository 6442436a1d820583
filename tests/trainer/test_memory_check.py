"""oar-train refuses a plan that cannot fit the device it will run on, before anything is built: one line with the
estimate, the limit and settings that would fit (their arithmetic checked by hand here)."""

import subprocess
import sys
import time

import psutil
import pytest

from oar_megatron.trainer import compose_config
from oar_megatron.trainer.app import run_train
from oar_megatron.trainer.plan import GiB, DeviceMemory, check_memory, estimate_memory, make_plan

GPU = dict(where="cuda:0 free memory", shared_host=False)


def test_qwen3_8b_on_this_cpu_is_refused_at_once_and_nothing_is_built(tmp_path):
    cfg = compose_config(["model=qwen3-8b"])
    need = make_plan(cfg, 1).memory.total_gib
    if psutil.virtual_memory().available / GiB > need:
        pytest.skip(f"this machine has more than {need:.0f} GiB available")
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "oar_megatron.trainer.app", "model=qwen3-8b",
                        f"logging.run_dir={run_dir}"], capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith(f"oar-train: memory: the plan needs ~{need:.1f} GiB per rank (weights 15.3 + grads "
                               f"30.5 + optimizer 91.5 + activations 2.0 + logits 0.2), more than the "), lines[0]
    assert "GiB this rank has (host memory available" in lines[0] and "/ 1 local rank)" in lines[0]
    assert lines[0].endswith("; trainer.memory_check=false skips this check")
    assert not run_dir.exists()  # no logger, no checkpoint directory, no model
    assert elapsed < 60  # interpreter + Hydra start-up; the check itself is timed below


def test_the_check_is_arithmetic_only():
    cfg = compose_config(["model=qwen3-8b"])
    plan = make_plan(cfg, 1)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="^memory: "):
        check_memory(cfg, plan, DeviceMemory(20.0, "host", shared_host=True))
    assert time.perf_counter() - t0 < 2.0


def test_tiny_default_fits_this_machine():
    cfg = compose_config()
    plan = make_plan(cfg, 1)
    device = check_memory(cfg, plan)  # the real device: raises if the embedded run would not fit
    assert device.shared_host and plan.memory.total_gib < 0.01 < device.gib


def test_memory_check_switch(monkeypatch, capsys):
    import oar_megatron.trainer.loop as loop
    import oar_megatron.trainer.plan as plan_mod

    class Reached(ValueError):
        pass

    def fake_trainer(cfg):
        raise Reached("reached the trainer")

    monkeypatch.setattr(plan_mod, "device_memory", lambda: DeviceMemory(1e-6, "a tiny device", shared_host=False))
    monkeypatch.setattr(loop, "Trainer", fake_trainer)
    assert run_train(compose_config()) == 2
    err = capsys.readouterr().err
    assert "memory: the plan needs" in err and "a tiny device" in err and "reached" not in err
    assert run_train(compose_config(["trainer.memory_check=false"])) == 2
    assert "reached the trainer" in capsys.readouterr().err


def test_suggestions_by_hand():
    """Qwen3-8B in fp32 (``model.params_dtype=float32``), the embedded run's batch (one rank: 128 rows, micro-batches
    of 32, seq 5 + 8 = 13), Adam without the distributed optimizer: 4 + 4 + 8 = 16 bytes per parameter (the bf16
    preset: 2 + 4 fp32 main grads + 4 fp32 main weights + 8 Adam = 18). On an 80 GB-class GPU with 123 GiB free
    (as if) the plan's ~124.3 GiB misses by a little: full recompute or micro-batches of 8 fit, 16 do not; a
    70 GiB device needs TP 2 (or PP 2); a 3 GiB device needs 48 ranks."""
    bf16 = make_plan(compose_config(["model=qwen3-8b"]), 1).memory
    n = compose_config(["model=qwen3-8b"]).model.num_params(1)
    assert (bf16.weights_gib, bf16.grads_gib, bf16.optimizer_gib) == pytest.approx((2 * n / GiB, 4 * n / GiB,
                                                                                    12 * n / GiB))
    cfg = compose_config(["model=qwen3-8b", "model.params_dtype=float32"])
    plan = make_plan(cfg, 1)
    m, mem = cfg.model, plan.memory
    s, b, h, a, L = 13, 32, 4096, 32, 36
    assert (plan.batch.seq_len, plan.batch.micro_batch_size) == (s, b)
    act = s * b * h * (34 + 5 * a * s / h) * L / GiB
    logits = b * s * m.padded_vocab_size(1) * 4 / GiB
    states = m.num_params(1) * 16 / GiB
    assert mem.activations_gib == pytest.approx(act) and mem.logits_gib == pytest.approx(logits)
    total = states + act + logits
    assert mem.total_gib == pytest.approx(total)
    full = states + 2 * s * b * h * L / GiB + logits  # full recompute keeps each layer's input: 2·s·b·h bytes
    mb8 = states + (act + logits) / 4
    mb16 = states + (act + logits) / 2
    assert full < 123 and mb8 < 123 < mb16 < total
    tp2 = m.num_params(2) // 2 * 16 / GiB + act / 2 + b * s * m.padded_vocab_size(2) / 2 * 4 / GiB
    pp2 = m.num_params(1) // 2 * 16 / GiB + act / 2 * 2 + logits  # half the layers, 2 micro-batches in flight
    with pytest.raises(ValueError) as e:
        check_memory(cfg, plan, DeviceMemory(123.0, **GPU))
    assert str(e.value) == (
        f"memory: the plan needs ~{total:.1f} GiB per rank (weights {mem.weights_gib:.1f} + grads {mem.grads_gib:.1f}"
        f" + optimizer {mem.optimizer_gib:.1f} + activations {act:.1f} + logits {logits:.1f}), more than the 123.0 "
        f"GiB this rank has (cuda:0 free memory); would fit: trainer.recompute=full (~{full:.1f} GiB) | "
        f"trainer.micro_batch_size=8 (~{mb8:.1f} GiB) | parallel.tp=2 (2 ranks, ~{tp2:.1f} GiB) | "
        f"parallel.pp=2 with rollout=sglang (2 ranks, ~{pp2:.1f} GiB); trainer.memory_check=false skips this check")
    assert tp2 < 70 and pp2 < 70 < full
    with pytest.raises(ValueError) as e:
        check_memory(cfg, plan, DeviceMemory(70.0, **GPU))
    assert f"would fit: parallel.tp=2 (2 ranks, ~{tp2:.1f} GiB) | parallel.pp=2 with rollout=sglang (2 ranks" in str(e.value)
    # 3 GiB: no single change fits; the smallest TP×PP with full recompute and micro-batch 1. tp must divide the 32
    # heads and the 8 KV groups, pp the 36 layers; 36 ranks (tp 1 × pp 36) need 8.19e9·16 B / 36 ≈ 3.4 GiB of
    # weights, grads and Adam state; sizes 37..47 have no valid split; 48 = tp 4 × pp 12 needs ≈ 2.5 GiB.
    with pytest.raises(ValueError) as e:
        check_memory(cfg, plan, DeviceMemory(3.0, **GPU))
    assert "would fit: parallel.tp=4 parallel.pp=12 with rollout=sglang trainer.recompute=full " \
           "trainer.micro_batch_size=1 (48 ranks, " in str(e.value)


def test_on_a_cpu_host_more_ranks_do_not_help_and_a_smaller_model_is_named():
    cfg = compose_config(["model=qwen3-8b"])
    plan = make_plan(cfg, 1)
    with pytest.raises(ValueError) as e:
        check_memory(cfg, plan, DeviceMemory(20.0, "host memory available 20.0 GiB / 1 local rank", shared_host=True))
    # ranks on one host share its memory: tp=8 needs ~15.5 GiB on each of 8 ranks (> 20 / 8); of the presets,
    # qwen3-0.6b fits and the next larger, qwen2.5-1.5b (1.8e9 params · 16 B ≈ 26 GiB), does not
    small = compose_config(["model=qwen3-0.6b"])
    need = estimate_memory(small, make_plan(small, 1).layout).total_gib
    assert need < 20 < estimate_memory(compose_config(["model=qwen2.5-1.5b"]), plan.layout).total_gib
    assert str(e.value).endswith(f"no tp/pp layout fits this device; a smaller model does: model=qwen3-0.6b "
                                 f"(~{need:.1f} GiB); trainer.memory_check=false skips this check")
