#!/usr/bin/env bash
# Installs what is missing, checks that the C++ sources are clang-formatted, builds everything
# (Release with the CUDA kernels when nvcc is present, plus an AddressSanitizer+UBSan build of the
# tests) and runs every test: C++ (CTest, including the replay of every committed fuzz corpus in the
# sanitizer build), Python (pytest) and a short run of every fuzz target. Build folders under build/
# are reused between runs; ccache shares objects between clones on the same machine.
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

# Both always run: a missing script fails the run (a lost file or exec bit must not drop tests
# silently), and they are run through bash so that the exec bit does not matter.
for s in scripts/test-python.sh scripts/fuzz-smoke.sh; do
  [ -f "$s" ] || { echo "test.sh: $s is missing" >&2; exit 1; }
done
step "Python"
bash scripts/test-python.sh
step "Fuzz smoke run"
bash scripts/fuzz-smoke.sh
step "all tests passed"
