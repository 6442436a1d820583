"""The overlapped passes (``trainer/overlap.py``): π_old, reference and OAR saliency of the groups that finished while
the rest generate give the same training step as the passes after the rollout.

Both runs sample from fake SGLang workers (tests/sglang_fake.py, generating with transformers from the pushed
weights) with ``rollout.seeded_sampling`` (a sampling seed per sample: the same samples whatever order the requests
finish in) and few requests in flight (``rollout.max_concurrency``), so groups arrive over time and the overlapped
run computes its passes in several batches, some before the last group exists. Everything drawn is then equal
(rewards, lengths), everything computed agrees to fp32 rounding (the pass batches differ in rows and padding).
Micro-batches of two groups make the overlap hold a lone group back and ``fill`` complete the remainder; dynamic
sampling (DAPO's filter) makes some groups skip the overlap. Real gloo ranks for TP 2 and PP 2.
"""

from __future__ import annotations

import pytest

from tests.dist_harness import run_ranks
from tests.sglang_fake import FakeSGLang

pytestmark = [pytest.mark.dist, pytest.mark.megatron]

BASE = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.micro_batch_size=8", "rollout.max_new_tokens=8", "eval.at_start=false", "eval.at_end=false", "checkpoint.every=0",
        "checkpoint.save_final=false", "trainer.progress=false", "logging.step_line=false",
        "logging.tensorboard=false", "rollout=sglang", "rollout.timeout_s=60", "rollout.max_concurrency=3",
        "rollout.seeded_sampling=true", "trainer.steps=2"]
# OAR-G with a KL term (reference pass), TIS weights from the rollout log-probs and DAPO's dynamic sampling
OAR = ["algorithm=oar_g", "algorithm.kl.coef=0.05", "algorithm.rollout_correction.mode=tis",
       "algorithm.advantage.filter_groups=true"]
SAME = ("reward/mean", "response/length_mean", "rollout/samples", "rollout/gen_rounds", "rollout/filled_groups",
        "throughput/response_tokens")
CLOSE = ("loss/total", "loss/pg", "loss/kl", "grad_norm", "kl/mean", "entropy/mean", "rollout/logp_diff_abs_mean",
         "rollout/is_weight_mean", "oar/ess_ratio", "oar/top10_mass", "policy/clip_frac", "policy/ratio_mean")


def _runs(rank, world, tmp, urls, cases):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    out = {}
    for name, overrides in cases.items():
        for overlap in (False, True):
            cfg = compose_config(BASE + overrides + [f"logging.run_dir={tmp}/{name}-{overlap}",
                                                     f"rollout.overlap={str(overlap).lower()}",
                                                     f"rollout.server_urls=[{','.join(urls[name])}]"])
            trainer = Trainer(cfg)
            try:
                assert trainer.overlap is overlap
                hist = trainer.fit()
            finally:
                trainer.close()
            out[name, overlap] = [{k: v for k, v in m.items() if isinstance(v, float)} for m in hist]
    return out


def _check(res, cases):
    for name in cases:
        plain, lapped = res[name, False], res[name, True]
        assert len(plain) == len(lapped) == 2
        for step, (a, b) in enumerate(zip(plain, lapped)):
            where = (name, step)
            for key in SAME:
                assert a[key] == b[key], (where, key, a[key], b[key])
            for key in CLOSE:
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (where, key, a[key], b[key])
            assert "rollout/overlap_frac" not in a and 0 <= b["rollout/overlap_frac"] <= 1, where
            assert b["rollout/overlap_unused_rows"] >= 0, where
            assert b["time/overlap_s"] > 0, where
        # the passes ran during the rollout for part of the batch (the rest in fill), and OAR had signal to shape
        assert sum(b["rollout/overlap_frac"] for b in lapped) > 0, name
        assert "oar/ess_ratio" in plain[0] or name == "grpo"


def _fakes(names):
    fakes = {name: [FakeSGLang(vocab_size=24, seed=i) for i in range(2)] for name in names}
    for pair in fakes.values():
        for f in pair:
            f.start()
    return fakes


def test_overlap_gives_the_same_steps(tmp_path):
    cases = {"oar": OAR, "grpo": ["algorithm=grpo"]}
    fakes = _fakes(cases)
    try:
        (res,) = run_ranks(_runs, 1, str(tmp_path), {k: [f.url for f in v] for k, v in fakes.items()}, cases,
                           timeout=900)
    finally:
        for pair in fakes.values():
            for f in pair:
                f.stop()
    _check(res, cases)


def test_overlap_under_tp2_and_pp2(tmp_path):
    """The replica's ranks get the same batches of finished groups (one broadcast per batch) and run their
    collective passes on them in step."""
    cases = {"tp2": OAR + ["parallel.tp=2"], "pp2": OAR + ["parallel.pp=2"]}
    fakes = _fakes(cases)
    try:
        res = run_ranks(_runs, 2, str(tmp_path), {k: [f.url for f in v] for k, v in fakes.items()}, cases,
                        timeout=900)
    finally:
        for pair in fakes.values():
            for f in pair:
                f.stop()
    _check(res[0], cases)


def test_overlap_refused_where_it_cannot_hold():
    from oar_megatron.trainer import compose_config

    with pytest.raises(ValueError, match="rollout.overlap: only rollout.engine=sglang"):
        compose_config(["rollout.overlap=true"]).validate(1)


def test_local_cpu_servers_refuse_what_sglang_cpu_cannot(tmp_path):
    """SGLang's deterministic inference (which honours sampling_seed) needs a GPU attention backend: local CPU
    servers would ignore the seeds, so the run refuses the setting before starting anything."""
    seeded, routes, overlap = run_ranks(_local_cpu_refusals, 1, str(tmp_path), timeout=300)[0]
    assert overlap == "overlap=False"  # local servers share the trainer's devices: the overlap is off by default
    assert seeded.startswith("rollout.seeded_sampling: local CPU servers") and "\n" not in seeded
    # likewise SGLang's routed-experts capture (R3) on a CPU server (tests/sglang_shims/routed_experts is test tooling)
    assert routes.startswith("rollout.return_routed_experts: local CPU servers") and "\n" not in routes


def _local_cpu_refusals(rank, world, tmp):
    from oar_megatron.policy import destroy_parallel
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer

    out = []
    for extra in (["rollout.seeded_sampling=true"],
                  ["rollout.return_routed_experts=true", "model=tiny-moe"], []):
        cfg = compose_config(["rollout=sglang", f"logging.run_dir={tmp}/run", "rollout.prompts_per_step=4",
                              "rollout.n_samples=4", "trainer.micro_batch_size=4"] + extra)
        try:
            trainer = Trainer(cfg)  # local servers start in fit(), not here
            out.append(f"overlap={trainer.overlap}")
            trainer.close()
        except ValueError as exc:
            out.append(str(exc))
            destroy_parallel()  # refused after the process groups were made
    return out
