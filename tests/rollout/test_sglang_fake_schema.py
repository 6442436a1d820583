"""The JSON the client sends (recorded by the fake server) is accepted by SGLang's own request types, run in the
SGLang venv (``launch/setup_sglang_cpu.sh`` builds it at ``${OAR_SGLANG_VENV:-~/.cache/oar_megatron/sglang-venv}``):
``io_struct.GenerateReqInput`` (normalised as the server does), ``sampling_params.SamplingParams`` (built and
verified against the vocabulary) and ``io_struct.UpdateWeightFromDiskReqInput``. Skipped when the venv is absent and
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
