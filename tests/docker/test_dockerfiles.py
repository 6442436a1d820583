"""The Dockerfiles against docker/versions.lock (every pin, one place) and hadolint; no Docker daemon needed.
The GPU and SGLang images cannot be built here (no registry access, no GPU): these checks are what runs for them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest

from tests.docker.conftest import ROOT, hadolint, require, versions_lock

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))


def _arg_defaults(path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), flags=re.M))


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / "requirements-cpu.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_dockerfile_pin_is_the_lock_files():
    lock = versions_lock()
    args = {p.name: _arg_defaults(p) for p in DOCKERFILES}
    assert args["Dockerfile.cpu"]["BASE"] == lock["CPU_BASE"] and args["Dockerfile.cpu"]["PYTHON"] == lock["PYTHON"]
    assert args["Dockerfile.cpu"]["MCORE_VERSION"] == lock["MEGATRON_CORE"]
    assert args["Dockerfile"]["BASE"] == lock["GPU_BASE"] and args["Dockerfile"]["TE_MIN"] == lock["TRANSFORMER_ENGINE_MIN"]
    assert args["Dockerfile"]["MCORE_VERSION"] == lock["GPU_MEGATRON_CORE"]
    assert args["Dockerfile.sglang"]["BASE"] == lock["SGLANG_BASE"]
    assert args["Dockerfile.sglang"]["SGLANG_VERSION"] == lock["SGLANG"]
    assert args["Dockerfile.sglang"]["SGLANG_ROUTER_VERSION"] == lock["SGLANG_ROUTER"]
    # every version-looking ARG default is one the lock records (a new pin must be added there first)
    recorded = set(lock.values())
    for name, a in args.items():
        for key, value in a.items():
            if re.fullmatch(r"[\d.]+", value) or (":" in value and "//" not in value):  # versions, image tags
                assert value in recorded, f"{name}: ARG {key}={value} is not in docker/versions.lock"
    pins = _lock_pins()
    assert pins["torch"] == lock["TORCH_CPU"] and pins["megatron-core"] == lock["MEGATRON_CORE"]
    # the SGLang pins are the CPU integration tests' (launch/setup_sglang_cpu.sh)
    sglang_reqs = (ROOT / "launch" / "sglang-cpu-requirements.txt").read_text()
    assert f"sglang=={lock['SGLANG']}" in sglang_reqs and f"sglang-router=={lock['SGLANG_ROUTER']}" in sglang_reqs


def test_the_cpu_lock_covers_the_project_dependencies():
    """requirements-cpu.lock is a full resolution: every dependency and test extra of pyproject.toml is pinned, at a
    version inside the range pyproject allows."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock_pins()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} ({spec}) is not pinned in docker/requirements-cpu.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {spec}"
    assert "setuptools" in pins and "wheel" in pins  # the editable install's build backend, offline


def test_image_check_script_names_what_is_wrong():
    """docker/check_image.py, which the builds run: passes for this (CPU) environment as the CPU image, and refuses it
    as a GPU image naming each missing piece."""
    lock = versions_lock()
    ok = subprocess.run([sys.executable, "docker/check_image.py", "cpu", lock["MEGATRON_CORE"]], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "image ok: torch" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "docker/check_image.py", "gpu", "0.99.0", lock["TRANSFORMER_ENGINE_MIN"]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    for line in ("megatron-core 0.16.1, the lock pins 0.99.0", "is not a CUDA build",
                 "transformer_engine is not importable", "apex is not importable"):
        assert line in bad.stderr, bad.stderr


def _ignores(path) -> dict[int, list[str]]:
    """{line number (1-based) of the instruction an inline ``# hadolint ignore=`` applies to: [rule codes]}, after
    checking that the comment block right above each pragma gives the reason, as ``# CODE (what it flags): why``."""
    lines = path.read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"#\s*hadolint\s+ignore=([\w,]+)\s*", line)
        if not m:
            continue
        codes = m.group(1).split(",")
        j = i
        while j > 0 and lines[j - 1].startswith("#") and "hadolint ignore=" not in lines[j - 1]:
            j -= 1
        above = lines[j:i]  # the comment block right above the pragma
        for code in codes:
            assert any(re.match(rf"# {code} \([^)]+\): \S.{{20,}}", c) for c in above), (
                f"{path.name}:{i + 1}: `# hadolint ignore={code}` needs its reason in the comment right above, "
                f"as `# {code} (what it flags): why it does not apply here`")
        out[i + 2] = codes
    return out


def _hadolint(dockerfile, *flags) -> list[dict]:
    require("hadolint", hadolint().is_file())
    r = subprocess.run([str(hadolint()), "--no-color", "--no-fail", "-f", "json", *flags,
                        str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    """No finding at all, info level included; every inline `# hadolint ignore=` states its reason in the comment
    above it and is still needed: with the pragmas disabled hadolint reports exactly the ignored rules on those lines."""
    assert _hadolint(dockerfile) == []
    ignored = {(line, code) for line, codes in _ignores(dockerfile).items() for code in codes}
    found = {(f["line"], f["code"]) for f in _hadolint(dockerfile, "--disable-ignore-pragma")}
    assert found == ignored, f"hadolint without pragmas found {sorted(found)}; the file ignores {sorted(ignored)}"
