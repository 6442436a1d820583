#!/usr/bin/env bash
# Build the SGLang CPU test environment (docs/sglang.md): a venv of its own, outside the clone, at
# ${OAR_SGLANG_VENV:-$HOME/.cache/oar_megatron/sglang-venv}. SGLang pins another torch and transformers than the
# trainer, and its PyPI metadata pulls CUDA-only packages, so: CPU torch pinned through a constraint file (pip can
# never swap in a CUDA torch), `--no-deps sglang`, its pure-Python dependencies by hand, sglang-router, and the
# project's shims (tests/sglang_shims) copied into site-packages.
#
# Idempotent: a stamp in the venv records the hash of the pin files, the shims and the base Python; a venv whose
# stamp matches (and that still imports) is reused in seconds; a changed pin list rebuilds it from scratch; changed
# shims are re-copied. Pass --force to rebuild anyway. Prints what it did.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${OAR_SGLANG_VENV:-$HOME/.cache/oar_megatron/sglang-venv}"
PYTHON="${PYTHON:-python3}"
REQ="$ROOT/launch/sglang-cpu-requirements.txt"
CON="$ROOT/launch/sglang-cpu-constraints.txt"
SHIMS="$ROOT/tests/sglang_shims"
STAMP="$VENV/.oar_sglang_stamp"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
say() { echo "setup_sglang_cpu: $*"; }
# pip's one-line warnings about this machine's index locations that lack a package are noise (pipefail keeps pip's
# exit status).
quiet_pip() { grep -v "is ignored: it is neither a file nor a directory" || true; }

hash_files() { (cd "$ROOT" && for f in "$@"; do echo "== $f"; cat "$f"; done) | sha256sum | cut -d' ' -f1; }
base_py="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
pins_hash="$(hash_files launch/sglang-cpu-requirements.txt launch/sglang-cpu-constraints.txt) python=$base_py"
shim_files=$(cd "$ROOT" && find tests/sglang_shims -type f \( -name '*.py' -o -name '*.pth' \) | LC_ALL=C sort)
# shellcheck disable=SC2086
shims_hash="$(hash_files $shim_files)"

venv_imports() {
  "$VENV/bin/python" - "$1" <<'PY' >/dev/null 2>&1
import sys, importlib.metadata as md
want = {l.split("#")[0].split("==")[0].strip(): l.split("#")[0].split("==")[1].strip()
        for l in open(sys.argv[1]) if "==" in l.split("#")[0]}
for name, ver in want.items():
    assert md.version(name) == ver, (name, md.version(name), ver)
import sglang, sglang_router, sgl_kernel, oar_sglang_shims  # noqa: F401
PY
}

t0=$SECONDS
if [ $FORCE = 0 ] && [ -f "$STAMP" ] && [ "$(sed -n 1p "$STAMP")" = "$pins_hash" ] && venv_imports "$REQ"; then
  if [ "$(sed -n 2p "$STAMP")" = "$shims_hash" ]; then
    say "reusing $VENV (pins and shims unchanged; checked in $((SECONDS - t0)) s)"
    exit 0
  fi
  say "pins unchanged, shims changed: re-copying the shims into $VENV"
  rebuild=0
else
  if [ -d "$VENV" ]; then
    say "rebuilding $VENV ($([ $FORCE = 1 ] && echo '--force' || echo 'stamp missing, pins changed, or imports failing'))"
    rm -rf "$VENV"
  else
    say "building $VENV"
  fi
  rebuild=1
fi

if [ $rebuild = 1 ]; then
  mkdir -p "$(dirname "$VENV")"
  tmp="$VENV.building.$$"
  rm -rf "$tmp"
  "$PYTHON" -m venv "$tmp"
  # A venv's scripts hard-code their path: build in place of the final path, so move the temp dir there first
  # and write the stamp only at the very end (a half-built venv has no stamp and is rebuilt next time).
  mv "$tmp" "$VENV"
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${PIP[@]}" install --upgrade pip >/dev/null 2>&1 || true
  nodeps=$(grep -E '#[[:space:]]*no-deps' "$REQ" | sed 's/#.*//' | xargs)
  grep -vE '#[[:space:]]*no-deps' "$REQ" | sed 's/#.*//' | grep -v '^[[:space:]]*$' >"$VENV/.oar_requirements_deps.txt"
  say "installing torch (CPU, pinned) and sglang's pure-Python dependencies"
  "${PIP[@]}" install -c "$CON" -r "$VENV/.oar_requirements_deps.txt" 2>&1 | quiet_pip
  say "installing with --no-deps: $nodeps"
  # shellcheck disable=SC2086
  "${PIP[@]}" install --no-deps -c "$CON" $nodeps 2>&1 | quiet_pip
  "$VENV/bin/python" -c 'import torch; v = torch.__version__; assert v.endswith("+cpu"), f"not a CPU torch: {v}"'
fi

site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$site/sgl_kernel" "$site/oar_sglang_shims.py" "$site/oar_sglang_shims.pth"
cp -r "$SHIMS/sgl_kernel" "$site/sgl_kernel"
cp "$SHIMS/oar_sglang_shims.py" "$SHIMS/oar_sglang_shims.pth" "$site/"
find "$site/sgl_kernel" -name '__pycache__' -prune -exec rm -rf {} +
venv_imports "$REQ" || { say "ERROR: the built venv does not import sglang / pins mismatch"; exit 1; }
printf '%s\n%s\n' "$pins_hash" "$shims_hash" >"$STAMP"
"$VENV/bin/python" - <<'PY'
import torch, sglang, importlib.metadata as md
print(f"setup_sglang_cpu: ready: sglang {md.version('sglang')}, sglang-router {md.version('sglang-router')}, "
      f"torch {torch.__version__}, transformers {md.version('transformers')}")
PY
say "done in $((SECONDS - t0)) s ($VENV, $(du -sh "$VENV" | cut -f1))"
