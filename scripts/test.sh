#!/usr/bin/env bash
# Installs what is missing, checks that the C++ sources are clang-formatted, builds everything
# (Release with the CUDA kernels when nvcc is present, plus an AddressSanitizer+UBSan build of the
# tests) and runs every test: C++ (CTest) and Python (pytest). Build folders under build/ are
# reused between runs; ccache shares objects between clones on the same machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
./scripts/install-deps.sh

jobs=${QMOE_JOBS:-$(nproc)}
export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=true
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/qmoe-ccache}
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-10G}
launch=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)

step() { printf '\n==== %s ====\n' "$*"; }

step "Format check"
./scripts/format.sh --check

step "Release build"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release "${launch[@]}" >/dev/null
cmake --build build/release -j "$jobs"

step "C++ tests (Release)"
# Every test, the gpu-labelled ones included: without a CUDA device they are reported as skipped,
# with the reason (scripts/gpu-check.sh runs them on a GPU machine).
ctest --test-dir build/release --output-on-failure -j "$jobs"
if grep -q ': Skipped$' build/release/Testing/Temporary/LastTest.log 2>/dev/null; then
  echo "skipped tests, first reason: $(grep -m1 -A1 ': Skipped$' build/release/Testing/Temporary/LastTest.log | tail -n 1)"
fi

step "AddressSanitizer + UBSan build"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQMOE_SANITIZE=ON -DQMOE_CUDA=OFF \
  -DQMOE_BUILD_BENCH=OFF "${launch[@]}" >/dev/null
cmake --build build/asan -j "$jobs"

step "C++ tests (ASan + UBSan)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan --output-on-failure -j "$jobs" -LE slow

if [ -x scripts/test-python.sh ]; then
  step "Python"
  ./scripts/test-python.sh
fi
if [ -x scripts/fuzz-smoke.sh ]; then
  step "Fuzz smoke run"
  ./scripts/fuzz-smoke.sh
fi
step "all tests passed"
