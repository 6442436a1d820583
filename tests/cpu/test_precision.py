"""Mixed precision on real megatron-core (CPU, gloo): a 16-bit model built from ``model.params_dtype`` trains with
megatron's mixed-precision optimizer (fp32 main weights and main grads) with ``OptimConfig``'s default precision
settings, and its updates equal an fp32-master reference written with plain torch:

    reference step: bf16 forward/backward (the same model, same weights) -> fp32 copies of the bf16 grads (megatron's
    DDP accumulates them into fp32 main grads) -> global-norm clip in fp32 (when on, as megatron's clip_grads) ->
    torch AdamW on fp32 master weights ->
    master weights rounded to bf16 into the model.

A pure-fp32 run of the same initial weights checks that the bf16 trajectory stays within bf16 tolerance of fp32
training. Before the fix, ``build_model`` built fp32 on CPU whatever ``params_dtype`` said and a bf16 model with the
default ``OptimConfig`` got megatron's FP32Optimizer, which raises at the first step (fp32 main grad assigned to a
bf16 parameter).
"""

import math

import pytest
import torch

from tests.dist_harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.megatron]
B, S, STEPS, LR, SEED = 8, 16, 4, 3e-3, 11


def _model(dtype):
    from oar_megatron.config import model_preset

    return model_preset("tiny", num_layers=2, params_dtype=dtype)


def _batches(vocab):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (B, S), generator=g) for _ in range(STEPS)]


def _loss(model, ids):
    """Mean next-token cross-entropy over the real vocabulary, computed in fp32 from the model's logits."""
    vocab = 250  # the tiny preset's real vocabulary (the logits carry padded rows up to 256)
    logits = model(ids, torch.arange(S).expand_as(ids), None)[:, :-1, :vocab].float()  # [b, S-1, V]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))


def _megatron_run(rank, world_size, dtype, distributed_optimizer, optim_overrides, refs=()):
    """megatron's DDP + optimizer + train_step on this rank's half of each batch, then the plain-torch references
    ``refs`` ((dtype, master, clip, loss_scale) each, see ``_reference``) in the same process and parallel state."""
    from megatron.core import parallel_state

    from oar_megatron.config import ParallelConfig
    from oar_megatron.config.optim import OptimConfig
    from oar_megatron.policy import build_model, init_parallel
    from oar_megatron.policy.optim import build_optimizer, wrap_ddp
    from oar_megatron.policy.train_step import train_step

    model_cfg = _model(dtype)
    init_parallel(ParallelConfig(distributed_optimizer=distributed_optimizer), model_cfg, seed=SEED)
    gpt = build_model(model_cfg, ParallelConfig())
    init = {k: v.detach().clone() for k, v in gpt.state_dict().items() if v is not None and torch.is_tensor(v)}
    dtypes = sorted({str(p.dtype) for p in gpt.parameters()})
    chunks = wrap_ddp([gpt], distributed_optimizer=distributed_optimizer)
    optim = OptimConfig(**{"lr": LR, "weight_decay": 0.0, "clip_grad": 0.0, **optim_overrides})
    optimizer, scheduler = build_optimizer(chunks, optim, distributed_optimizer=distributed_optimizer)
    kinds = [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    losses, updated, scales, norms, sched = [], [], [], [], []
    for ids in _batches(model_cfg.vocab_size):
        rows = ids.chunk(world_size)[rank]

        def forward_fn(chunk, mb):  # train_step sums the ranks' losses: each rank gives its share of the batch mean
            return _loss(chunk, mb) / world_size, lambda out: (out, {})

        res = train_step(chunks, optimizer, scheduler, [rows], forward_fn, dp_size=world_size, seq_length=S,
                         micro_batch_size=len(rows))
        losses.append(res.loss)
        norms.append(res.grad_norm)
        updated.append(res.updated)
        scales.append(float(optimizer.get_loss_scale()))
        sched.append(int(scheduler.num_steps))
    out = {"sched": sched, "init": init, "dtypes": dtypes, "kinds": kinds, "losses": losses, "updated": updated, "scales": scales,
           "norms": norms, "params": {n: p.detach().clone() for n, p in gpt.named_parameters()}}
    inner = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    if hasattr(inner, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params: the fp32 main weights
        out["main"] = [m.detach().clone() for group in inner.fp32_from_float16_groups for m in group]
        out["main_of"] = [_name_of(gpt, p) for group in inner.float16_groups for p in group]
    out["refs"] = [_reference(init, *spec) for spec in refs]
    parallel_state.destroy_model_parallel()
    return out


def _name_of(module, param):
    return next(n for n, p in module.named_parameters() if p is param)


def _reference(init, dtype, master, clip=0.0, loss_scale=1.0):
    """Plain torch, the whole batch, no DDP or megatron optimizer: the same model and weights; fp32 master weights
    when ``master`` (else the model's own parameters are the optimizer's: the fp32 run). ``loss_scale`` (a power of 2)
    multiplies the loss before the 16-bit backward and divides the fp32 grads after it, as fp16 training must (small
    fp16 grads underflow)."""
    from oar_megatron.config import ParallelConfig
    from oar_megatron.policy import build_model

    model_cfg = _model(dtype)
    gpt = build_model(model_cfg, ParallelConfig())  # a second model in the run's parallel state, loaded with init
    gpt.load_state_dict({k: v.to(gpt.state_dict()[k].dtype) for k, v in init.items()}, strict=False)
    params = list(gpt.parameters())
    mains = [p.detach().float().clone().requires_grad_() for p in params] if master else params
    adam = torch.optim.AdamW(mains, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses, norms = [], []
    for ids in _batches(model_cfg.vocab_size):
        gpt.zero_grad()
        loss = _loss(gpt, ids)
        (loss * loss_scale).backward()
        losses.append(float(loss))
        if master:
            for m, p in zip(mains, params):
                m.grad = p.grad.float() / loss_scale
        norm = torch.linalg.vector_norm(torch.stack([m.grad.norm() for m in mains])).item()
        norms.append(norm)
        if clip and clip / (norm + 1e-6) < 1:  # megatron's clip_grad_by_total_norm_fp32
            for m in mains:
                m.grad.mul_(clip / (norm + 1e-6))
        adam.step()
        if master:
            with torch.no_grad():
                for m, p in zip(mains, params):
                    p.copy_(m)  # round the fp32 master weights to the model dtype
    names = [n for n, _ in gpt.named_parameters()]
    return {"losses": losses, "norms": norms, "params": {n: p.detach().clone() for n, p in gpt.named_parameters()},
            "main": dict(zip(names, (m.detach().clone() for m in mains)))}


def _update_error(params, ref_params, init):
    """||params - ref_params|| / ||ref_params - init|| over all parameters: the relative error of the whole update."""
    diff = sum(((p.float() - ref_params[n].float()) ** 2).sum() for n, p in params.items())
    update = sum(((ref_params[n].float() - init[n].float()) ** 2).sum() for n in params)
    return float((diff / update).sqrt())


def test_bf16_model_default_optimizer_matches_fp32_master_reference():
    """Without clipping every operation of the two paths is the same, so the match is exact up to fp32 rounding."""
    (run,) = run_ranks(_megatron_run, 1, "bfloat16", False, {}, [("bfloat16", True), ("float32", False)])
    ref, fp32 = run["refs"]
    assert run["dtypes"] == ["torch.bfloat16"]  # every parameter in the model dtype (norms included)
    assert run["kinds"] == ["Float16OptimizerWithFloat16Params"]
    assert all(run["updated"]) and run["scales"] == [1.0] * STEPS  # bf16: no loss scaling
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert run["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    for name, main in zip(run["main_of"], run["main"]):
        torch.testing.assert_close(main, ref["main"][name], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(run["params"][name], ref["params"][name], atol=0, rtol=0)
    # The masters hold what bf16 cannot: steps of lr 3e-3 leave sub-bf16 residue in the fp32 copies.
    residue = max((m - m.bfloat16().float()).abs().max().item() for m in run["main"])
    assert residue > 1e-6
    # And bf16 training tracks fp32 training of the same initial weights within bf16 tolerance.
    # Per element Adam amplifies rounding (an update is ~lr·sign(grad) where the grad is tiny), so compare the whole
    # update: measured 5.7% relative difference, dominated by the norm weights (~1.0, where a bf16 ulp is 2^-7 > lr).
    assert run["losses"] == pytest.approx(fp32["losses"], rel=1e-3)
    assert _update_error(run["params"], fp32["params"], run["init"]) < 0.1


def test_bf16_distributed_optimizer_dp2_clipped_and_fp16_loss_scale():
    """DP2 with the distributed optimizer (the cluster default) and gradient clipping (the default 1.0), and an fp16
    model with its dynamic loss scale. DP2 sums two bf16 half-batch gradients in fp32 where the reference has one
    bf16 full-batch gradient, so the match is to bf16 rounding: exact at step 1 up to it, then Adam's normalised
    update lets ulp-level differences grow a little."""
    dp2 = run_ranks(_megatron_run, 2, "bfloat16", True, {"clip_grad": 1.0}, [("bfloat16", True, 1.0)])
    ref = dp2[0]["refs"][0]
    assert ref["norms"][0] > 1.0  # clipping is active
    for run in dp2:
        assert run["kinds"] == ["DistributedOptimizer"] and all(run["updated"])
        assert run["norms"] == pytest.approx(ref["norms"], rel=1e-2)
        err = _update_error(run["params"], ref["params"], run["init"])
        assert err < 0.05, err  # measured 0.021
    torch.testing.assert_close(dp2[0]["params"], dp2[1]["params"], atol=0, rtol=0)  # one model on both ranks
    both = [a + b for a, b in zip(dp2[0]["losses"], dp2[1]["losses"])]  # the halves' shares add to the batch mean
    assert both == pytest.approx(ref["losses"], rel=2e-3)

    (fp16,) = run_ranks(_megatron_run, 1, "float16", False, {"initial_loss_scale": 1024.0},
                        [("float16", True, 0.0, 1024.0)])
    ref16 = fp16["refs"][0]
    assert fp16["dtypes"] == ["torch.float16"] and fp16["kinds"] == ["Float16OptimizerWithFloat16Params"]
    assert all(fp16["updated"]) and fp16["scales"] == [1024.0] * STEPS  # dynamic scaler, no overflow: kept
    assert fp16["losses"] == pytest.approx(ref16["losses"], rel=1e-6)
    for name, main in zip(fp16["main_of"], fp16["main"]):
        # The loss scale is a power of 2: it multiplies and divides exactly, so the match is exact again.
        torch.testing.assert_close(main, ref16["main"][name], atol=1e-7, rtol=1e-6)


def _loop(rank, world_size, tmp):
    from oar_megatron.trainer import compose_config
    from oar_megatron.trainer.loop import Trainer
    from tests.trainer.test_loop import SMALL

    out = {}
    for dtype, algorithm in (("bfloat16", "oar_g"), ("float16", "grpo")):
        cfg = compose_config(SMALL + ["trainer.steps=2", f"model.params_dtype={dtype}", f"algorithm={algorithm}",
                                      f"logging.run_dir={tmp}/{dtype}"])
        trainer = Trainer(cfg)
        try:
            hist = trainer.fit()
            actor = trainer.actor
            kinds = [type(o).__name__ for o in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])]
            dtypes = sorted({str(p.dtype) for m in actor.models for p in m.parameters()})
        finally:
            trainer.close()
        out[dtype] = dict(kinds=kinds, dtypes=dtypes, hist=[{k: v for k, v in m.items() if isinstance(v, float)}
                                                            for m in hist])
    return out


def test_the_loop_trains_16bit_models(tmp_path):
    """oar-train end to end (rollouts, OAR-G saliency, updates, metrics) with a bf16 and an fp16 policy."""
    (res,) = run_ranks(_loop, 1, str(tmp_path), timeout=900)
    for dtype, r in res.items():
        assert r["dtypes"] == [f"torch.{dtype}"] and r["kinds"] == ["Float16OptimizerWithFloat16Params"], dtype
        assert len(r["hist"]) == 2
        for m in r["hist"]:
            for key in ("loss/total", "grad_norm", "entropy/mean", "reward/mean"):
                assert key in m and math.isfinite(m[key]), (dtype, key)
            # the engine's and the trainer's log-probs: one 16-bit model, cached decode vs full forward
            assert m["rollout/logp_diff_abs_mean"] < 0.05, (dtype, m["rollout/logp_diff_abs_mean"])


def test_fp16_overflow_skips_the_update_and_the_schedule():
    """An fp16 loss scale of 2^20 overflows the first two steps (megatron's dynamic scaler halves it after two, its
    hysteresis): those updates are skipped, and the LR schedule counts only the applied ones (before the fix it
    advanced on skipped steps too: [1, 2, 3, 4])."""
    (run,) = run_ranks(_megatron_run, 1, "float16", False, {"initial_loss_scale": float(2 ** 20)})
    assert run["updated"] == [False, False, True, True]
    assert run["scales"] == [2.0 ** 20, 2.0 ** 19, 2.0 ** 19, 2.0 ** 19]
    assert run["sched"] == [0, 0, 1, 2]
