"""docker/Dockerfile.cpu built and run here, offline: the base image made with debootstrap and every wheel from the
wheelhouse (launch/setup_docker.sh), the build context assembled from the repository's files plus hard links to
the wheels. Inside the image, ``oar-train`` (the embedded default, shortened as in tests/trainer/test_learns.py)
raises the training reward, as a non-root user with no network; a subset of the test suite passes there too.
The first build on a fresh machine takes ~3 min (2 shared cores), later ones reuse Docker's layer cache (~7 s)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess

import pytest

from tests.docker.conftest import ROOT, docker_ready, wheelhouse

pytestmark = pytest.mark.docker
DOC_TAG = "oar_megatron:cpu-test"
# The tests tag their build per session (removed at the end, its layers kept as cache): two sessions on one machine
# (a developer's and a CI run's) must never run each other's image under the shared documented tag.
TAG = f"{DOC_TAG}-{os.getpid()}"
# The commands docs/docker.md shows, verbatim (tests/test_doc_commands.py maps them here): run as written, except that
# the training run is shortened with LEARN and its output directory is the test's, and the tag is TAG (_doc).
BUILD = "docker build --network host -f docker/Dockerfile.cpu --build-arg BASE=local/bookworm:minbase --build-arg WHEELHOUSE=docker/wheelhouse -t oar_megatron:cpu-test ."
TRAIN = "docker run --rm --network none -v /tmp/oar-docker:/out oar_megatron:cpu-test oar-train logging.run_dir=/out/run"
SUBSET = "docker run --rm --network none oar_megatron:cpu-test python -m pytest -q -p no:cacheprovider tests/algorithms tests/trainer/test_app_config.py"
COPIED = ["pyproject.toml", "README.md", ".dockerignore", "oar_megatron", "configs", "tests", "benchmarks", "tools",
          "docker/Dockerfile.cpu", "docker/requirements-cpu.lock", "docker/check_image.py"]
LEARN = ["trainer.seed=0", "trainer.steps=60", "data.synthetic.base=2", "data.synthetic.reasoning_len=1",
         "eval.at_start=false", "eval.at_end=false", "checkpoint.every=0", "checkpoint.save_final=false",
         "trainer.progress=false", "logging.step_line=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    docker_ready()
    ctx = tmp_path_factory.mktemp("docker-context")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for rel in COPIED:
        src, dst = ROOT / rel, ctx / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy2(src, dst)
    wheels = ctx / "docker" / "wheelhouse"
    wheels.mkdir()
    for whl in wheelhouse().glob("*.whl"):
        try:
            os.link(whl, wheels / whl.name)  # no copy of ~340 MB: same filesystem
        except OSError:
            shutil.copy2(whl, wheels / whl.name)
    r = subprocess.run(_doc(BUILD), cwd=ctx, env={**os.environ, "DOCKER_BUILDKIT": "0"},
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    check = _run(TAG, "python", "docker/check_image.py", "cpu", "0.16.1")  # what the build ran (maybe cached)
    assert check.stdout.strip() == "image ok: torch 2.13.0+cpu (cuda None), megatron-core 0.16.1", check.stderr
    yield TAG
    subprocess.run(["docker", "rmi", "--no-prune", TAG], capture_output=True, timeout=120)


def _doc(command: str) -> list[str]:
    """A documented command's argv with this session's tag."""
    return shlex.split(command.replace(DOC_TAG, TAG))


def _run(*args, timeout=900):
    return subprocess.run(["docker", "run", "--rm", "--network", "none", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_image_metadata(image):
    info = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True,
                                     check=True).stdout)[0]["Config"]
    assert info["Cmd"] == ["oar-train"] and info["User"] == "1000:1000"
    r = _run(image, "python", "-c", "import os, sys, torch; print(os.getuid(), sys.version_info[:2], torch.__version__)")
    assert r.returncode == 0 and r.stdout.split("\n")[0] == "1000 (3, 11) 2.13.0+cpu", r.stderr


def test_oar_train_learns_inside_the_image(image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the container's user is uid 1000
    cmd = _doc(TRAIN.replace("/tmp/oar-docker", str(out))) + LEARN
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rewards = [m["reward/mean"] for m in map(json.loads, (out / "run" / "metrics.jsonl").read_text().splitlines())
               if m["phase"] == "train"]
    assert len(rewards) == 60
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last - first >= 0.3 and last >= 0.8, (first, last)


def test_a_test_subset_passes_inside_the_image(image):
    r = subprocess.run(_doc(SUBSET), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
