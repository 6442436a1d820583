"""Routed experts (R3) from a real SGLang 0.5.23 CPU server: a tiny Qwen3-MoE (``tests/convert/hf_tiny.py``: 4 experts,
top-2, 2 layers) served with ``--enable-return-routed-experts``; the client (``RouteSpec``) gets, checks and carries
each sample's routes; they equal the experts ``transformers``' routers choose on the same sequence (as sets per token:
SGLang orders a token's k ids by its own top-k), and the megatron policy loaded from the same weights replays them:
π_old under the server's routes equals the server's log-probs (fp32, ≤ 1e-3) and its own free forward, with zero
rollout/π_old routing mismatch.

The CPU server needs one test-only shim for this flag (``tests/sglang_shims/routed_experts/sitecustomize.py``, put on
the server's ``PYTHONPATH``): sglang 0.5.23 allocates the routes' host buffer with ``cudaHostRegister``, which a CPU
torch cannot do. Needs the SGLang CPU venv (conftest: skipped without it on a dev machine, a failure under CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.servers import SGLangServers
from oar_megatron.rollout.sglang import RouteSpec, SGLangEngine
from tests.convert.hf_tiny import make_hf_model
from tests.dist_harness import run_ranks
from tests.sglang_fake import HFModel

pytestmark = [pytest.mark.sglang, pytest.mark.megatron, pytest.mark.dist]

SHIM = Path(__file__).resolve().parents[1] / "sglang_shims" / "routed_experts"


def _replay(rank, world_size, hf_dir, samples):
    from tests.cpu.test_rollout_routes import replay_samples

    return replay_samples(hf_dir, samples)


def test_real_server_routes_replay(sglang_python, tmp_path):
    d = tmp_path / "qwen3_moe"
    make_hf_model("qwen3_moe", d)
    spec = RouteSpec(num_layers=2, topk=2, num_experts=4)
    with SGLangServers(d, 1, python=sglang_python, dtype="float32", skip_tokenizer_init=True,
                       extra_args=["--enable-return-routed-experts"], run_dir=tmp_path / "logs", startup_timeout=300,
                       stop_grace=3, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(SHIM)}) as servers:
        eng = SGLangEngine(servers.urls, vocab_size=100, routed_experts=spec, timeout_s=120)
        eng.check_servers()  # the flag is on (/server_info)
        samples = eng.generate([[5, 17, 3, 44, 8], [9, 2, 71]],
                               SamplingParams(temperature=1.0, max_new_tokens=8, n=2))
    assert len(samples) == 4 and eng.last_stats["rollout/invalid_responses"] == 0
    ref = HFModel(d)
    for s in samples:
        seq = s.prompt_ids + s.response_ids
        assert tuple(s.routed_experts.shape) == (len(seq) - 1, 2, 2)
        want = ref.routes(seq[:-1]).sort(-1).values
        assert torch.equal(s.routed_experts.long().sort(-1).values, want)  # the prompt's routes too
    (res,) = run_ranks(_replay, 1, str(d), samples, timeout=600)
    assert res["calls"] == 4 and res["mismatch"] == 0.0, res
    assert res["server_vs_old"] <= 1e-3 and res["free_vs_old"] <= 1e-6, res
