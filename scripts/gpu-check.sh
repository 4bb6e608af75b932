#!/usr/bin/env bash
# One-command GPU check, for a machine with an NVIDIA GPU: builds the CUDA tests and benchmark for
# the architecture(s) of the GPU(s) present only (nvidia-smi --query-gpu=compute_cap), runs the
# gpu-labelled CTests (they must run, not skip) and bench_decoder_cuda, and prints one table: per
# Switch expert shape and token count, microseconds, GB/s of the compressed bytes read and the
# percentage of the GPU's peak DRAM bandwidth, next to dense bf16 cuBLAS (scripts/gpu_table.py).
# About 3-6 minutes on one H100 with 16 cores (most of it nvcc); exits non-zero with a clear
# message when there is no GPU, no driver or no nvcc.
#
#   scripts/gpu-check.sh [--dry-run] [--no-tests] [--no-bench] [--repetitions N] [--filter REGEX]
#
#   --dry-run       detect the GPU and print the commands, run nothing
#   --no-tests      skip ctest -L gpu;  --no-bench: skip the benchmark
#   --repetitions   benchmark repetitions (default 3; times are their medians)
#   --filter        --benchmark_filter for bench_decoder_cuda (default: all)
#
# Environment: QMOE_GPU_CHECK_BUILD (build folder, default build/gpu-check), QMOE_CUDA_ARCH (e.g.
# 90: skip the detection, for drivers too old for compute_cap), CUDACXX (nvcc, default
# /usr/local/cuda/bin/nvcc or the one on PATH), QMOE_JOBS (build jobs). Outputs in the build
# folder: gpu-check-bench.json (Google Benchmark JSON) and gpu-check-table.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

die() {
  echo "gpu-check: $*" >&2
  exit 1
}

dry_run=0 tests=1 bench=1 repetitions=3 filter=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    --repetitions) repetitions=${2:?--repetitions needs a number}; shift ;;
    --filter) filter=${2:?--filter needs a regular expression}; shift ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (--help lists them)" ;;
  esac
  shift
done
[[ "$repetitions" =~ ^[1-9][0-9]*$ ]] || die "--repetitions must be a positive integer, not '$repetitions'"

# ---- the GPU and its architecture
if [ -n "${QMOE_CUDA_ARCH:-}" ]; then
  [[ "$QMOE_CUDA_ARCH" =~ ^[0-9]+[af]?(;[0-9]+[af]?)*$ ]] ||
    die "QMOE_CUDA_ARCH='$QMOE_CUDA_ARCH' is not a CUDA architecture list (e.g. 90 or 80;90)"
  archs=$QMOE_CUDA_ARCH
  gpus="(QMOE_CUDA_ARCH=$archs)"
else
  command -v nvidia-smi >/dev/null 2>&1 ||
    die "nvidia-smi not found: this machine has no NVIDIA driver, so no GPU to check (the CPU-only tests are ./scripts/test.sh; QMOE_CUDA_ARCH=90 skips the detection)"
  if ! caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>&1); then
    die "nvidia-smi --query-gpu=compute_cap failed (no GPU, driver not loaded, or a driver older than 510 that lacks compute_cap: then set QMOE_CUDA_ARCH, e.g. 90): $(echo "$caps" | head -n 3)"
  fi
  archs=
  while IFS= read -r line; do
    line=${line//[[:space:]]/}
    [ -z "$line" ] && continue
    [[ "$line" =~ ^([0-9]+)\.([0-9]+)$ ]] ||
      die "nvidia-smi gave '$line' as a compute capability (expected e.g. 9.0); set QMOE_CUDA_ARCH"
    a="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
    case ";$archs;" in *";$a;"*) ;; *) archs=${archs:+$archs;}$a ;; esac
  done <<<"$caps"
  [ -n "$archs" ] || die "nvidia-smi lists no GPU"
  gpus=$(nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' -)
fi

nvcc=${CUDACXX:-}
if [ -z "$nvcc" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; else nvcc=$(command -v nvcc || true); fi
fi
[ -n "$nvcc" ] && [ -x "$nvcc" ] ||
  die "nvcc not found (looked at \$CUDACXX, /usr/local/cuda/bin/nvcc and PATH): install the CUDA toolkit"
if known=$("$nvcc" --list-gpu-arch 2>/dev/null); then
  IFS=';' read -ra list <<<"$archs"
  for a in "${list[@]}"; do
    grep -qx "compute_${a}" <<<"$known" ||
      die "$nvcc does not compile for compute_${a} (this GPU's architecture): use a newer CUDA toolkit"
  done
fi

build=${QMOE_GPU_CHECK_BUILD:-build/gpu-check}
jobs=${QMOE_JOBS:-$(nproc)}
launch=()
if command -v ccache >/dev/null 2>&1; then
  export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=true
  launch=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
json="$build/gpu-check-bench.json"
table="$build/gpu-check-table.txt"
configure=(cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DQMOE_CUDA=ON
  "-DCMAKE_CUDA_COMPILER=$nvcc" "-DCMAKE_CUDA_ARCHITECTURES=$archs" -DQMOE_BUILD_CLI=OFF
  -DQMOE_BUILD_PYTHON=OFF "${launch[@]}")
targets=()
[ "$tests" = 1 ] && targets+=(test_decoder_cuda_gpu)
[ "$bench" = 1 ] && targets+=(bench_decoder_cuda)
compile=(cmake --build "$build" -j "$jobs" --target "${targets[@]}")
ctest_cmd=(ctest --test-dir "$build" -L gpu --output-on-failure --no-tests=error -j 4)
bench_cmd=("$build/bench/bench_decoder_cuda" "--benchmark_repetitions=$repetitions" --benchmark_min_time=0.2
  --benchmark_display_aggregates_only=true "--benchmark_out=$json" --benchmark_out_format=json)
[ -n "$filter" ] && bench_cmd+=("--benchmark_filter=$filter")

echo "gpu-check: GPU(s): $gpus; CUDA architectures: $archs; nvcc: $nvcc"
if [ "$dry_run" = 1 ]; then
  echo "gpu-check: dry run, would run:"
  printf ' %q' "${configure[@]}"; echo
  [ ${#targets[@]} -gt 0 ] && { printf ' %q' "${compile[@]}"; echo; }
  [ "$tests" = 1 ] && { printf ' %q' "${ctest_cmd[@]}"; echo; }
  [ "$bench" = 1 ] && { printf ' %q' "${bench_cmd[@]}"; echo; printf ' %q' python3 scripts/gpu_table.py "$json"; echo; }
  exit 0
fi
[ ${#targets[@]} -gt 0 ] || die "--no-tests and --no-bench: nothing to do"

start=$SECONDS
echo "gpu-check: configure and build ($build, $jobs jobs)"
mkdir -p "$build"
"${configure[@]}" >"$build/gpu-check-configure.log" 2>&1 ||
  { tail -n 40 "$build/gpu-check-configure.log" >&2; die "cmake configure failed (log: $build/gpu-check-configure.log)"; }
"${compile[@]}" || die "build failed"
echo "gpu-check: built in $((SECONDS - start)) s"

if [ "$tests" = 1 ]; then
  echo "gpu-check: ctest -L gpu"
  log="$build/gpu-check-ctest.log"
  set +e
  "${ctest_cmd[@]}" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" = 0 ] || die "gpu tests FAILED (log: $log)"
  # With a GPU present, a skipped GPU test means the device was not usable: not a pass.
  if grep -Eq '\*\*\*Skipped|Not Run|tests did not run' "$log"; then
    reason=$(grep -m1 -A1 ': Skipped$' "$build/Testing/Temporary/LastTest.log" 2>/dev/null | tail -n 1)
    die "gpu tests were skipped although nvidia-smi lists a GPU (${reason:-no reason given}; is it visible to CUDA? CUDA_VISIBLE_DEVICES, driver/toolkit mismatch); log: $log"
  fi
fi

if [ "$bench" = 1 ]; then
  echo "gpu-check: bench_decoder_cuda ($repetitions repetitions)"
  "${bench_cmd[@]}" || die "bench_decoder_cuda failed"
  [ -s "$json" ] || die "bench_decoder_cuda wrote no results ($json): no CUDA device visible?"
  echo
  python3 scripts/gpu_table.py "$json" | tee "$table"
  echo
  echo "gpu-check: table in $table, raw results in $json"
fi
echo "gpu-check: done in $((SECONDS - start)) s"
