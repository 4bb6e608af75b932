#!/usr/bin/env bash
# Python bindings check: `pip install .` into a virtual environment of its own (build/venv, no
# system site-packages), then the pytest suite (tests/python). Exits non-zero if the install or
# any test fails, and also when pytest collects no test at all (its exit code 5).
#
# Reruns are fast: the venv and its requirements are reused (reinstalled when
# scripts/requirements-dev.txt changes), scikit-build-core keeps its CMake build folder under
# build/python/, and ccache caches the objects.
#
# torch and transformers (scripts/requirements-torch.txt, pinned) are installed into the venv too,
# once (a stamp records the file's hash), and QMOE_REQUIRE_TORCH=1 makes qmoe.torch's tests fail
# rather than skip should they be missing.
#
# Environment: PYTHON (interpreter for the venv, default python3), QMOE_VENV (venv folder),
# QMOE_JOBS (parallel build jobs), QMOE_PY_CLEAN=1 (install from a fresh clone of HEAD into a
# brand-new venv instead, as a user would; slower), QMOE_TORCH=0 (neither install torch nor
# require it: qmoe.torch's tests skip).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

py=${PYTHON:-python3}
src=$root
venv=${QMOE_VENV:-$root/build/venv}
if [ "${QMOE_PY_CLEAN:-0}" = 1 ]; then
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/qmoe-py-clean.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  git clone -q --no-hardlinks "$root" "$tmp/src"
  src=$tmp/src
  venv=$tmp/venv
fi

export CCACHE_BASEDIR="$src" CCACHE_NOHASHDIR=true
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/qmoe-ccache}
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-10G}
if command -v ccache >/dev/null; then
  # CMake (>= 3.17) takes these as the default compiler launchers.
  export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache CMAKE_CUDA_COMPILER_LAUNCHER=ccache
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${QMOE_JOBS:-$(nproc)}

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
vpy=$venv/bin/python
stamp=$venv/.qmoe-requirements
want=$(sha256sum "$src/scripts/requirements-dev.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  "$vpy" -m pip install -q --disable-pip-version-check -r "$src/scripts/requirements-dev.txt"
  echo "$want" >"$stamp"
fi
if [ "${QMOE_TORCH:-1}" = 1 ]; then
  stamp=$venv/.qmoe-requirements-torch
  want=$(sha256sum "$src/scripts/requirements-torch.txt" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "test-python: pip install -r scripts/requirements-torch.txt (torch, transformers)"
    "$vpy" -m pip install -q --disable-pip-version-check -r "$src/scripts/requirements-torch.txt"
    echo "$want" >"$stamp"
  fi
  export QMOE_REQUIRE_TORCH=1
fi

echo "test-python: pip install $src"
"$vpy" -m pip install -q --disable-pip-version-check "$src"
"$vpy" -c 'import qmoe, sys; print("test-python: qmoe", qmoe.__version__, "from", qmoe.__file__)'

# Run from the tests folder so that `import qmoe` finds the installed package only.
cd "$src/tests/python"
set +e
# -rs: every skipped test is listed with its reason at the end.
"$vpy" -m pytest -q -rs -p no:cacheprovider "$@" .
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "test-python: pytest collected no tests" >&2
  exit 1
fi
exit $rc
