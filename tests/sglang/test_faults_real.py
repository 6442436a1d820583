"""Faults a real SGLang server does produce, against the client (``SGLangEngine``): two real CPU servers (fp32,
``--skip-tokenizer-init``, ``--api-key``) serving a tiny random Qwen2 (tests/convert/hf_tiny.py), started once for
the module by ``oar_megatron.rollout.servers.SGLangServers``:

- a wrong API key is refused at once, one line naming the server and the status; the right one samples;
- a per-request timeout shorter than the generation is counted (``rollout/invalid_timeout``) and retried, and the
  call fails loudly, naming the reason, when no group is left;
- one server killed mid-rollout (SIGKILL of its process group a second into a rollout of ~10k tokens): the rollout completes
  on the other server, every group valid (no sample lost), the failures counted.

Needs the SGLang CPU venv (conftest: skipped without it on a dev machine, a failure under CI)."""

from __future__ import annotations

import pytest

from oar_megatron.rollout.base import SamplingParams
from oar_megatron.rollout.servers import SGLangServers
from oar_megatron.rollout.sglang import RolloutError, SGLangEngine
from tests.convert.hf_tiny import make_hf_model

pytestmark = pytest.mark.sglang

KEY = "oar-test-key"
VOCAB = 100  # hf_tiny's vocabulary


@pytest.fixture(scope="module")
def servers(sglang_python, tmp_path_factory):
    d = tmp_path_factory.mktemp("sglang_faults")
    make_hf_model("qwen2", d / "hf", seed=0)
    with SGLangServers(d / "hf", 2, python=sglang_python, dtype="float32", skip_tokenizer_init=True, api_key=KEY,
                       run_dir=d / "logs", startup_timeout=400, stop_grace=3,
                       env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ""}) as s:
        yield s


def test_api_key(servers):
    params = SamplingParams(max_new_tokens=4, n=2)
    bad = SGLangEngine(servers.urls, vocab_size=VOCAB, api_key="wrong", timeout_s=60)
    with pytest.raises(RolloutError) as err:
        bad.generate([[1, 5, 7]], params)
    msg = str(err.value)
    assert "\n" not in msg and "401" in msg and any(u in msg for u in servers.urls), msg
    good = SGLangEngine(servers.urls, vocab_size=VOCAB, api_key=KEY, timeout_s=60)
    samples = good.generate([[1, 5, 7], [2, 9]], params)
    assert len(samples) == 4 and good.last_stats["rollout/invalid_responses"] == 0


def test_timeout_counted_and_named(servers):
    eng = SGLangEngine(servers.urls, vocab_size=VOCAB, api_key=KEY, timeout_s=0.02, max_retries=1, backoff_s=0.01)
    with pytest.raises(RolloutError) as err:
        eng.generate([[1, 5, 7]], SamplingParams(max_new_tokens=100, n=1))
    assert "timeout" in str(err.value) and "\n" not in str(err.value), err.value
    assert eng.last_stats["rollout/invalid_timeout"] == 2 and eng.last_stats["rollout/retries"] == 1
    assert eng.last_stats["rollout/invalid_groups"] == 1


def test_server_killed_mid_rollout(servers):
    import threading
    import time

    eng = SGLangEngine(servers.urls, vocab_size=VOCAB, api_key=KEY, timeout_s=120, max_retries=3, backoff_s=0.1)
    prompts = [[1, 5, 7, i] for i in range(24)]
    params = SamplingParams(temperature=1.0, max_new_tokens=100, n=4)  # ~10k tokens: several seconds here
    got: dict[int, list] = {}
    killed: list[float] = []
    timer = threading.Timer(1.0, lambda: (servers.kill(1), killed.append(time.monotonic())))
    timer.start()
    try:
        for batch in eng.stream_groups(prompts, params):
            got.update(dict(batch))
        done = time.monotonic()
    finally:
        timer.cancel()
    assert killed and killed[0] < done  # server 1 died while the rollout was running
    assert sorted(got) == list(range(len(prompts)))  # every group, nothing lost
    assert all(len(g) == 4 and all(len(s.response_ids) >= 1 for s in g) for g in got.values())
    st = eng.last_stats
    assert st["rollout/invalid_groups"] == 0
    assert st["rollout/invalid_responses"] >= 1 and st["rollout/retries"] >= 1, st  # the dead server's requests
    assert not servers.alive(1) and servers.alive(0)
