"""The JSON the client sends (recorded by the fake server) is accepted by SGLang's own request types, run in the
SGLang venv (``launch/setup_sglang_cpu.sh`` builds it at ``${OAR_SGLANG_VENV:-~/.cache/oar_megatron/sglang-venv}``):
``io_struct.GenerateReqInput`` (normalised as the server does), ``sampling_params.SamplingParams`` (built and
verified against the vocabulary) and ``io_struct.UpdateWeightFromDiskReqInput``; the distributed sync's bodies
(``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``, ``DestroyWeightsUpdateGroupReqInput``,
``CheckWeightsReqInput``) and the fake's ``/weights_checker`` answer (``ChecksumInfo``). Skipped when the venv is absent and
``CI`` is unset; fails under CI (CI must build it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.sglang import SGLangEngine
from tests.sglang_fake import FakeSGLang

VENV = Path(os.environ.get("OAR_SGLANG_VENV", Path.home() / ".cache/oar_megatron/sglang-venv"))
PYTHON = VENV / "bin" / "python"

CHECK = r"""
import json, sys
import msgspec, pydantic
from sglang.srt.managers.io_struct import GenerateReqInput, UpdateWeightFromDiskReqInput
from sglang.srt.sampling.sampling_params import SamplingParams
data = json.load(open(sys.argv[1]))
for req in data["generate"]:
    obj = GenerateReqInput(**req)
    obj.normalize_batch_and_arguments()
    sp = SamplingParams(**req["sampling_params"])
    sp.verify(data["vocab_size"]) if sp.verify.__code__.co_argcount > 1 else sp.verify()
    assert obj.return_logprob is True
fields = {f.name for f in msgspec.structs.fields(UpdateWeightFromDiskReqInput)}
for upd in data["update"]:
    extra = set(upd) - fields
    assert not extra, f"update_weights_from_disk fields unknown to sglang: {extra}"
    obj = pydantic.TypeAdapter(UpdateWeightFromDiskReqInput).validate_python(upd)  # as FastAPI decodes the body
    assert obj.weight_version == upd["weight_version"] and obj.model_path == upd["model_path"]
print("ok", len(data["generate"]), len(data["update"]))
"""


def test_client_json_is_sglangs(tmp_path):
    if not PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI: the SGLang venv {VENV} is missing (launch/setup_sglang_cpu.sh must build it)")
        pytest.skip(f"no SGLang venv at {VENV} (build it with launch/setup_sglang_cpu.sh)")
    with FakeSGLang(vocab_size=24) as fake:
        eng = SGLangEngine([fake.url], vocab_size=24)
        eng.generate([[1, 3, 13, 4, 14]], SamplingParams(temperature=0.8, top_p=0.9, top_k=5, max_new_tokens=4,
                                                         stop_token_ids=(2,), n=2))
        seeded = SGLangEngine([fake.url], vocab_size=24, seeded=True)  # rollout.seeded_sampling: sampling_seed
        seeded.generate([[1, 3]], SamplingParams(max_new_tokens=3, n=2))
        assert all(isinstance(r["sampling_params"]["sampling_seed"], int) for r in fake.requests[2:])
        payload = eng.update_payload(tmp_path / "v1", 1)  # what sync_weights sends
        data = {"generate": fake.requests, "update": [payload], "vocab_size": 24}
    path = tmp_path / "payloads.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([str(PYTHON), "-c", CHECK, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("ok 4 1")


DIST_CHECK = r"""
import json, sys
import msgspec, pydantic
from sglang.srt.managers import io_struct as io
data = json.load(open(sys.argv[1]))
types = {"/init_weights_update_group": io.InitWeightsUpdateGroupReqInput,
         "/update_weights_from_distributed": io.UpdateWeightsFromDistributedReqInput,
         "/destroy_weights_update_group": io.DestroyWeightsUpdateGroupReqInput,
         "/weights_checker": io.CheckWeightsReqInput}
seen = set()
for path, body in data["bodies"]:
    cls = types[path]
    extra = set(body) - {f.name for f in msgspec.structs.fields(cls)}
    assert not extra, f"{path} fields unknown to sglang: {extra}"
    obj = pydantic.TypeAdapter(cls).validate_python(body)  # as FastAPI decodes the body
    seen.add(path)
    if path == "/update_weights_from_distributed":
        assert obj.load_format == "flattened_bucket" and obj.flush_cache is False and obj.group_name == body["group_name"]
assert seen == set(types), seen
answer = data["checker"]
assert set(answer) == {"success", "message", "ranks", "per_engine_checksum"}, answer.keys()
for info in answer["ranks"]:  # the fake's answer: what sglang's ChecksumInfo serialises to
    assert msgspec.to_builtins(msgspec.convert(info, io.ChecksumInfo)) == info
print("ok", len(data["bodies"]))
"""


def test_distributed_sync_json_is_sglangs(tmp_path):
    """The distributed sync's requests (group init per pipeline stage, flattened buckets, ``/weights_checker``,
    group destroy), recorded by a fake worker, decode as SGLang's own request types; the fake's
    ``/weights_checker`` answer has SGLang's ``ChecksumInfo`` shape."""
    import httpx

    from tests.rollout.test_sglang_distributed import _spawn
    from tests.rollout.test_sglang_sync import _actor, _model

    if not PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI: the SGLang venv {VENV} is missing (launch/setup_sglang_cpu.sh must build it)")
        pytest.skip(f"no SGLang venv at {VENV} (build it with launch/setup_sglang_cpu.sh)")
    cfg = _model()
    actor, _ = _actor(cfg, seed=1)
    proc, url = _spawn(tmp_path, "w")
    try:
        eng = SGLangEngine([url], vocab_size=cfg.vocab_size, model=cfg, arch="qwen3", weight_sync="distributed",
                           sync_backend="gloo", sync_bucket_mb=0.05, update_timeout_s=30.0, verify_sync=True)
        eng.sync_weights(actor)
        eng.close()
        checker = httpx.post(url + "/weights_checker", json={"action": "checksum"}, timeout=30).json()
        dump = httpx.post(url + "/fake_dump", json={"path": str(tmp_path / "d.safetensors")}, timeout=30).json()
    finally:
        proc.kill()
        proc.wait()
    path = tmp_path / "dist.json"
    path.write_text(json.dumps({"bodies": dump["bodies"], "checker": checker}))
    out = subprocess.run([str(PYTHON), "-c", DIST_CHECK, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


ROUTES_CHECK = r"""
import json, sys
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info
data = json.load(open(sys.argv[1]))
for req in data["generate"]:
    obj = GenerateReqInput(**req)
    obj.normalize_batch_and_arguments()
    assert obj.return_routed_experts is True and obj.routed_experts_start_len == 0
for ans, n in zip(data["answers"], data["rows"]):
    flat = extract_routed_experts_from_meta_info(ans)  # sglang's own decoder of meta_info.routed_experts
    assert flat.dtype.name == "int32" and flat.size == n * data["layers"] * data["topk"], (flat.size, n)
    assert flat.reshape(n, data["layers"], data["topk"]).tolist() == ans["expected"]
print("ok", len(data["generate"]), len(data["answers"]))
"""


def test_routed_experts_json_is_sglangs(tmp_path):
    """R3: the client's ``return_routed_experts`` request is a valid ``GenerateReqInput``, and the fake's
    ``meta_info.routed_experts`` decodes with SGLang's own ``extract_routed_experts_from_meta_info`` to the
    [prompt + response − 1, layers, top_k] routes the client carries in ``Sample.routed_experts``."""
    from oar_megatron.rollout.sglang import RouteSpec

    if not PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI: the SGLang venv {VENV} is missing (launch/setup_sglang_cpu.sh must build it)")
        pytest.skip(f"no SGLang venv at {VENV} (build it with launch/setup_sglang_cpu.sh)")
    with FakeSGLang(vocab_size=24, routed_experts=(3, 2, 5)) as fake:
        eng = SGLangEngine([fake.url], vocab_size=24, routed_experts=RouteSpec(3, 2, 5))
        samples = eng.generate([[1, 3, 13, 4, 14], [7, 8]], SamplingParams(max_new_tokens=4, n=2))
        requests, answers = list(fake.requests), list(fake.answers)
    assert len(answers) == len(samples) == 4
    by_output = {(len(s.prompt_ids), tuple(s.response_ids)): s for s in samples}
    for ans in answers:  # one answer per sample (the requests run concurrently: matched by prompt and output)
        s = by_output[(ans["meta_info"]["prompt_tokens"], tuple(ans["output_ids"]))]
        ans["expected"] = s.routed_experts.tolist()
        assert len(ans["expected"]) == ans["meta_info"]["prompt_tokens"] + len(ans["output_ids"]) - 1
    data = {"generate": requests, "answers": answers, "rows": [len(a["expected"]) for a in answers],
            "layers": 3, "topk": 2}
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([str(PYTHON), "-c", ROUTES_CHECK, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("ok 4 4")
