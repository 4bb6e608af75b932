#!/usr/bin/env bash
# scripts/gpu-check.sh without a GPU: a clear message and a non-zero exit when there is no
# nvidia-smi, when it fails or when it prints no compute capability; with a stand-in nvidia-smi
# (and nvcc), --dry-run shows the architectures it would build for. Hermetic: PATH holds only the
# tools the script needs, so a real nvidia-smi on the machine is not seen.
set -uo pipefail
root=${1:?usage: gpu_check_without_gpu.sh SOURCE_DIR}
script="$root/scripts/gpu-check.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
mkdir -p "$work/bin" "$work/gpu"
for tool in sh bash dirname sed grep nproc paste head cat tee mkdir; do
  p=$(command -v "$tool") || fail "no $tool on this machine"
  ln -s "$p" "$work/bin/$tool"
done
cat >"$work/nvcc" <<'SH'
#!/bin/sh
[ "$1" = --list-gpu-arch ] && printf 'compute_80\ncompute_86\ncompute_90\n'
SH
chmod +x "$work/nvcc"
run() {  # run EXPECTED_EXIT ARGS...: the script's output in $work/out
  local want=$1
  shift
  env -i PATH="$work/bin" HOME="$work" CUDACXX="$work/nvcc" QMOE_GPU_CHECK_BUILD="$work/build" \
    "$@" bash "$script" ${ARGS:-} >"$work/out" 2>&1
  local got=$?
  [ "$got" = "$want" ] || { cat "$work/out"; fail "exit $got, expected $want ($*)"; }
}
smi() {  # a stand-in nvidia-smi printing $1 for compute_cap, exiting with $2
  printf "$1" >"$work/gpu/caps"
  cat >"$work/bin/nvidia-smi" <<SH
#!/bin/sh
case "\$*" in
  *=compute_cap\ *) cat "$work/gpu/caps"; exit $2 ;;
  *) echo 'Stand-in GPU, 9.0, 81559 MiB' ;;
esac
SH
  chmod +x "$work/bin/nvidia-smi"
}

run 1
grep -q "nvidia-smi not found" "$work/out" || { cat "$work/out"; fail "no message without nvidia-smi"; }
[ ! -e "$work/build" ] || fail "a build folder was made without a GPU"

smi "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n" 9
run 1
grep -q "compute_cap failed" "$work/out" || { cat "$work/out"; fail "no message when nvidia-smi fails"; }
grep -q "couldn't communicate with the NVIDIA driver" "$work/out" || { cat "$work/out"; fail "nvidia-smi's own message is not shown"; }

smi "" 0
run 1
grep -q "nvidia-smi lists no GPU" "$work/out" || { cat "$work/out"; fail "no message when no GPU is listed"; }

smi "[N/A]\n" 0
run 1
grep -q "gave '\[N/A\]' as a compute capability" "$work/out" || { cat "$work/out"; fail "no message for an unreadable compute capability"; }

smi "12.0\n" 0
run 1
grep -q "does not compile for compute_120" "$work/out" || { cat "$work/out"; fail "no message for an architecture nvcc lacks"; }

# Two H100s and an A10: each architecture once, in the order found.
smi "9.0\n9.0\n8.6\n" 0
ARGS=--dry-run run 0
grep -q "CUDA architectures: 90;86" "$work/out" || { cat "$work/out"; fail "architectures not detected"; }
grep -q -- '-DCMAKE_CUDA_ARCHITECTURES=90\\;86' "$work/out" || { cat "$work/out"; fail "the configure command does not build for exactly those"; }
grep -q "ctest .*-L gpu" "$work/out" || { cat "$work/out"; fail "no ctest -L gpu"; }
grep -q "bench_decoder_cuda .*--benchmark_repetitions=3" "$work/out" || { cat "$work/out"; fail "no benchmark command"; }
[ ! -e "$work/build" ] || fail "--dry-run made a build folder"

ARGS="--dry-run --no-bench" run 0
grep -q "bench_decoder_cuda" "$work/out" && { cat "$work/out"; fail "--no-bench still runs the benchmark"; }
ARGS="--repetitions 0" run 1
grep -q "positive integer" "$work/out" || { cat "$work/out"; fail "no message for --repetitions 0"; }
ARGS=--frobnicate run 1
grep -q "unknown option '--frobnicate'" "$work/out" || { cat "$work/out"; fail "no message for an unknown option"; }
rm "$work/bin/nvidia-smi"
ARGS=--dry-run run 0 QMOE_CUDA_ARCH=80
grep -q "CUDA architectures: 80" "$work/out" || { cat "$work/out"; fail "QMOE_CUDA_ARCH is not used"; }
ARGS=--dry-run run 1 QMOE_CUDA_ARCH="sm_90"
grep -q "is not a CUDA architecture list" "$work/out" || { cat "$work/out"; fail "no message for a bad QMOE_CUDA_ARCH"; }
echo "gpu-check without a GPU: OK"
