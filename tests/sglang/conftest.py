"""Real-server tests need the SGLang CPU venv (launch/setup_sglang_cpu.sh). Without it they SKIP with the reason on
a dev machine, and FAIL under CI (``CI`` set to true/1), where .ci/run builds it: a missing venv there is a bug."""

import os
from pathlib import Path

import pytest

from oar_megatron.rollout.servers import default_sglang_python

SETUP_HINT = "bash launch/setup_sglang_cpu.sh"


def sglang_venv_missing_reason() -> str | None:
    py = Path(default_sglang_python())
    if py.is_file() and os.access(py, os.X_OK):
        return None
    return f"no SGLang venv at {py.parent.parent} (build it with `{SETUP_HINT}`, or set OAR_SGLANG_VENV / OAR_SGLANG_PYTHON)"


@pytest.fixture(scope="session")
def sglang_python() -> str:
    reason = sglang_venv_missing_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI: {reason}; .ci/run must build it before the tests", pytrace=False)
        pytest.skip(reason)
    return default_sglang_python()
