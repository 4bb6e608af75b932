#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) in build/fuzz and runs each one briefly from
# the committed seed corpus. Exits non-zero on the first crash, sanitizer report or timeout.
# Longer runs by hand: build/fuzz/tests/fuzz/fuzz_container -max_total_time=3600 WORKDIR tests/fuzz/corpus/container
# Targets: container (one file, or a sharded folder), decoder (one matrix, every kernel),
# inputs (Hessian files, token files and config.json; the first byte of an input picks which),
# checkpoint (checkpoint folders through the forward pass), tokens (token files through the
# forward pass). tests/fuzz/make_seeds.cpp writes the generated seeds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${QMOE_FUZZ_SECONDS:-20}
jobs=${QMOE_JOBS:-$(nproc)}
launch=()
if command -v ccache >/dev/null; then
  launch=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi

CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=Release -DQMOE_FUZZ=ON \
  -DQMOE_CUDA=OFF -DQMOE_BUILD_BENCH=OFF -DQMOE_BUILD_CLI=OFF -DQMOE_BUILD_PYTHON=OFF "${launch[@]}" >/dev/null
targets=(container decoder inputs checkpoint tokens)
cmake --build build/fuzz -j "$jobs" --target "${targets[@]/#/fuzz_}"

for t in "${targets[@]}"; do
  work=build/fuzz/corpus-$t  # new inputs land here; the committed corpus is read only
  mkdir -p "$work"
  echo "fuzz-smoke: fuzz_$t for ${seconds}s"
  log=build/fuzz/fuzz_$t.log
  set +e
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "build/fuzz/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="build/fuzz/crash-$t-" "$work" "tests/fuzz/corpus/$t" >"$log" 2>&1
  status=$?
  set -e
  grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units)" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz-smoke: fuzz_$t FAILED (exit $status); log $log, reproducer build/fuzz/crash-$t-*" >&2
    exit 1
  fi
done
echo "fuzz-smoke: no crashes"
