"""Real megatron-core on CPU under gloo through oar_megatron.compat.megatron_cpu.

Shims are applied only in child processes (a subprocess or run_ranks spawns), never in the pytest process, because
they patch torch.cuda and push a global TorchFunctionMode that would leak into other tests. Each multi-rank test
computes its single-layout reference in the same rank function (TP=1 / EP=1 first, then TP=2 / EP=2), so one spawn
pays the ~6 s megatron import once.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.megatron_helpers import gather_last_dim, tp_shard

pytestmark = pytest.mark.megatron

SEED = 1234
B, S, V, H = 2, 8, 64, 32  # batch, sequence, vocabulary, hidden


# ----------------------------------------------------------------------------------------------- 1. CUDA present

_NO_OP_SCRIPT = textwrap.dedent(
    """
    import torch
    torch.cuda.is_available = lambda: True  # pretend to be a CUDA machine
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as dispatcher
    from torch.overrides import _get_current_function_mode_stack
    names = ["get_rng_state", "set_rng_state", "manual_seed", "current_device", "synchronize", "Stream", "Event",
             "current_stream", "default_stream", "stream"]
    before = {n: getattr(torch.cuda, n) for n in names}
    before_m = (mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state, dispatcher.maybe_move_tensor_to_cpu)
    had_gemm = hasattr(moe_utils, "te_general_gemm")
    from oar_megatron.compat import megatron_cpu
    assert megatron_cpu.apply_cpu_shims() is False
    assert megatron_cpu.cpu_shims_active() is False and megatron_cpu._PATCHED == []
    assert all(getattr(torch.cuda, n) is f for n, f in before.items()), "torch.cuda was patched"
    assert (mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state, dispatcher.maybe_move_tensor_to_cpu) == before_m
    assert hasattr(moe_utils, "te_general_gemm") == had_gemm
    assert _get_current_function_mode_stack() == []
    assert torch.ones(1).type() == "torch.FloatTensor"
    print("NO-OP OK")
    """
)


def test_no_op_when_cuda_is_available():
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _NO_OP_SCRIPT], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NO-OP OK" in out.stdout


def test_missing_megatron_attribute_is_skipped_not_fatal(monkeypatch, caplog):
    """Version drift (megatron-core 0.16-0.19): a shim whose target attribute is gone logs at debug and moves on."""
    import logging
    import types

    from oar_megatron.compat import megatron_cpu

    monkeypatch.setattr(megatron_cpu, "_PATCHED", [])
    owner = types.SimpleNamespace(__name__="fake.megatron.module", present=1)
    with caplog.at_level(logging.DEBUG, logger=megatron_cpu.__name__):
        assert megatron_cpu._patch(owner, "renamed_in_a_later_version", 2) is False
        assert megatron_cpu._patch(owner, "present", 2) is True
    assert owner.present == 2 and not hasattr(owner, "renamed_in_a_later_version")
    assert megatron_cpu._PATCHED == [(owner, "present", 1)]
    assert "renamed_in_a_later_version" in caplog.text
    assert megatron_cpu._import("no_such_megatron_module_anywhere") is None


# ----------------------------------------------------------------------------------------------- 2. RNG + placement


def _rng_and_placement(rank, world_size):
    import logging

    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils
    from torch.overrides import _get_current_function_mode_stack

    from oar_megatron.compat import megatron_cpu
    from oar_megatron.compat.megatron_cpu import CudaToCpuMode, apply_cpu_shims, cpu_shims_active

    assert apply_cpu_shims() and cpu_shims_active()
    n_patched = len(megatron_cpu._PATCHED)
    assert apply_cpu_shims() and len(megatron_cpu._PATCHED) == n_patched  # idempotent
    assert sum(isinstance(m, CudaToCpuMode) for m in _get_current_function_mode_stack()) == 1
    assert moe_utils.te_general_gemm is None

    # torch.cuda RNG entry points drive the CPU generator.
    torch.cuda.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(3))
    state = torch.cuda.get_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    b = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(b, torch.rand(3))

    # Hard-coded CUDA placement lands on the CPU; the optimizers' Tensor.type() check sees CUDA names.
    dev = torch.cuda.current_device()
    made = [torch.empty(2, device=dev), torch.empty(2, device=0), torch.zeros(2, device="cuda"), torch.ones(2).cuda(),
            torch.ones(2).to("cuda"), torch.ones(2).to(torch.device("cuda", 0), non_blocking=True), torch.ones(2).to(0),
            torch.ones(2).new_zeros(3, device="cuda:0"), torch.arange(4, device=torch.device("cuda"))]
    assert all(t.device.type == "cpu" for t in made)
    assert torch.ones(1).type() == "torch.cuda.FloatTensor" and torch.ones(1).half().type() == "torch.cuda.HalfTensor"
    assert torch.ones(1).type("torch.cuda.DoubleTensor").dtype == torch.float64
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        event = stream.record_event()
    event.synchronize()

    # megatron's seeding and tracker fork: deterministic, per-TP-rank streams, outer stream untouched by forks.
    warnings = []
    handler = logging.Handler()
    handler.emit = warnings.append
    logging.getLogger(mrandom.__name__).addHandler(handler)

    def draws(tp_rank):
        mrandom.model_parallel_cuda_manual_seed(SEED, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        tracker = mrandom.get_cuda_rng_tracker()
        outer1 = torch.randn(4)
        with tracker.fork():
            fork1 = torch.randn(4)
        outer2 = torch.randn(4)
        with tracker.fork():
            fork2 = torch.randn(4)
        return torch.cat([outer1, outer2]), torch.cat([fork1, fork2])

    outer, forked = draws(0)
    again_outer, again_forked = draws(0)
    assert torch.equal(outer, again_outer) and torch.equal(forked, again_forked)
    torch.manual_seed(SEED)  # data-parallel seed: the default stream continues as if no fork happened
    assert torch.equal(outer, torch.randn(8))
    torch.manual_seed(SEED + 2718)  # megatron's tensor-parallel seed for tp_rank 0
    assert torch.equal(forked, torch.randn(8))
    _, forked_tp1 = draws(1)
    assert not torch.equal(forked, forked_tp1)
    assert warnings == [], [r.getMessage() for r in warnings]
    return True


@pytest.mark.dist
def test_rng_tracker_and_placement_on_cpu():
    assert run_ranks(_rng_and_placement, 1) == [True]


# ----------------------------------------------------------------------------------------------- 3. TP=2 == TP=1


def _tp_run(tp):
    """Build the layers and a tiny GPT at TP=``tp`` from the same seed; forward + backward on fixed inputs."""
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                               model_parallel_cuda_manual_seed)
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    model_parallel_cuda_manual_seed(SEED)
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32)
    col = ColumnParallelLinear(H, 4 * H, config=cfg, init_method=init, bias=True, gather_output=False)
    row = RowParallelLinear(4 * H, H, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                            skip_bias_add=False)
    emb = VocabParallelEmbedding(V, H, init_method=init, config=cfg)
    gcfg = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=2 * H,
                             tensor_model_parallel_size=tp, use_cpu_initialization=True, params_dtype=torch.float32,
                             hidden_dropout=0.0, attention_dropout=0.0)
    gpt = GPTModel(config=gcfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=V,
                   max_sequence_length=S, position_embedding_type="rope")

    g = torch.Generator().manual_seed(7)
    x = torch.randn(S, B, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    w_out = torch.randn(S, B, H, generator=g)
    mid, _ = col(x)
    out, _ = row(mid)
    embedded = emb(ids)
    ((out * w_out).sum() + (embedded * embedded).sum()).backward()
    positions = torch.arange(S).expand(B, S)
    logits = gpt(ids, positions, attention_mask=None)  # [B, S, V/TP] vocab-parallel
    loss = gpt(ids, positions, attention_mask=None, labels=labels)  # [B, S]
    loss.sum().backward()

    modules = {"col": col, "row": row, "emb": emb, "gpt": gpt}
    params = {f"{m}.{n}": p for m, mod in modules.items() for n, p in mod.named_parameters()}
    result = {
        "out": out.detach(), "x_grad": x.grad, "emb_out": embedded.detach(), "loss": loss.detach(),
        "logits": gather_last_dim(logits.detach(), tp_group),
        "params": {n: p.detach().clone() for n, p in params.items()},
        "grads": {n: p.grad.clone() for n, p in params.items()},
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
    }
    result["grad_norm"], result["stepped"] = _optimizer_step(gpt, gcfg, ids, labels)
    parallel_state.destroy_model_parallel()
    return result, params


def _optimizer_step(gpt, gcfg, ids, labels):
    """One Adam step through megatron DDP + DistributedOptimizer + the no-pipelining schedule (2 micro-batches).

    Exercises the shims the layer forward/backward does not: ``device="cuda"`` literals in the schedule and the
    optimizer (CudaToCpuMode) and the optimizer's ``Tensor.type()`` dtype dispatch.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for p in gpt.parameters():
        p.grad = None
    ddp = DistributedDataParallel(config=gcfg, ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  module=gpt)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                 clip_grad=1.0), [ddp])
    positions = torch.arange(S).expand(B // 2, S)

    def forward_step(data, model):
        mb_ids, mb_labels = next(data)
        out = model(mb_ids, positions, None, labels=mb_labels)
        return out, lambda out: (out.mean(), {})

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(zip(ids.chunk(2), labels.chunk(2))),
                                model=[ddp], num_microbatches=2, seq_length=S, micro_batch_size=B // 2)
    ok, grad_norm, _ = opt.step()
    assert ok
    return grad_norm, {f"gpt.{n}": p.detach().clone() for n, p in gpt.named_parameters()}


def _tp2_vs_tp1(rank, world_size):
    from oar_megatron.compat.megatron_cpu import apply_cpu_shims

    assert apply_cpu_shims()
    ref, _ = _tp_run(1)
    got, params = _tp_run(2)
    errs = {k: (got[k] - ref[k]).abs().max().item() for k in ("out", "x_grad", "emb_out", "loss", "logits")}
    assert set(got["params"]) == set(ref["params"])
    errs["grad_norm"] = abs(got["grad_norm"] - ref["grad_norm"])
    for name, p in params.items():
        full_w, full_g = ref["params"][name], ref["grads"][name]
        initial = tp_shard(full_w, p, got["tp_rank"], world_size)
        assert torch.equal(got["params"][name], initial), name  # TP=2 weights are slices of the TP=1 ones
        errs["grad:" + name] = (got["grads"][name] - tp_shard(full_g, p, got["tp_rank"], world_size)).abs().max().item()
        if name in got["stepped"]:
            stepped = tp_shard(ref["stepped"][name], p, got["tp_rank"], world_size)
            assert not torch.equal(stepped, initial), name  # the optimizer did move it
            errs["step:" + name] = (got["stepped"][name] - stepped).abs().max().item()
    return errs, len(params)


@pytest.mark.dist
def test_tensor_parallel_layers_and_gpt_match_single_rank():
    for errs, n_params in run_ranks(_tp2_vs_tp1, 2):
        assert n_params > 20  # the GPT's parameters are all in the comparison
        bad = {k: v for k, v in errs.items() if v > 1e-5}
        assert not bad, bad


# ----------------------------------------------------------------------------------------------- 4. MoE EP=2 == EP=1

N_EXPERTS = 4


def _moe_run(ep, weights=None):
    """Tiny MoE GPT (4 experts, top-2, alltoall dispatcher) at EP=``ep`` on this rank's own batch; loss + grads.

    ``weights``: full (EP=1) parameters to load; expert ``i`` of this EP rank is global expert ``ep_rank * 4/ep + i``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(SEED)
    ep_rank, n_local = parallel_state.get_expert_model_parallel_rank(), N_EXPERTS // ep
    # Bias-free experts: with add_bias_linear=True expert backward fails in mlp.py (MEGATRON_CPU.md gotchas).
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, ffn_hidden_size=2 * H,
                            num_moe_experts=N_EXPERTS, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                            expert_model_parallel_size=ep, add_bias_linear=False, use_cpu_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    gpt = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(num_experts=N_EXPERTS), vocab_size=V,
                   max_sequence_length=S, position_embedding_type="rope")

    def global_name(name):
        head, sep, tail = name.partition("local_experts.")
        if not sep:
            return name
        local, rest = tail.split(".", 1)
        return f"{head}local_experts.{ep_rank * n_local + int(local)}.{rest}"

    if weights is not None:
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                p.copy_(weights[global_name(name)])
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank routes its own tokens
    ids, labels = torch.randint(0, V, (2, B, S), generator=g)
    loss = gpt(ids, torch.arange(S).expand(B, S), attention_mask=None, labels=labels)
    loss.sum().backward()
    params = {global_name(n): p.detach().clone() for n, p in gpt.named_parameters()}
    grads = {global_name(n): p.grad.clone() for n, p in gpt.named_parameters()}
    parallel_state.destroy_model_parallel()
    return loss.detach(), params, grads


def _moe_ep2_vs_ep1(rank, world_size):
    import torch.distributed as dist

    from oar_megatron.compat.megatron_cpu import apply_cpu_shims

    assert apply_cpu_shims()
    ref_loss, ref_params, ref_grads = _moe_run(1)
    loss, _, grads = _moe_run(2, weights=ref_params)
    for name in sorted(ref_grads):  # at EP=2 an expert sees the tokens of both ranks: sum the EP=1 expert grads
        if "local_experts." in name:
            dist.all_reduce(ref_grads[name])
    errs = {"loss": (loss - ref_loss).abs().max().item()}
    errs.update({name: (grad - ref_grads[name]).abs().max().item() for name, grad in grads.items()})
    n_expert_grads = sum("local_experts." in n and g.abs().sum() > 0 for n, g in grads.items())
    return errs, n_expert_grads


@pytest.mark.dist
def test_moe_expert_parallel_alltoall_matches_single_rank():
    for errs, n_expert_grads in run_ranks(_moe_ep2_vs_ep1, 2):
        assert n_expert_grads == 2 * (N_EXPERTS // 2)  # fc1 and fc2 of both local experts got gradient
        bad = {k: v for k, v in errs.items() if v > 1e-5}
        assert not bad, bad
