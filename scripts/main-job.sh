#!/usr/bin/env bash
# The main job: installs what is missing, builds qmoe (Release), generates a Switch Transformers
# checkpoint in the Hugging Face layout (switch-base-8 shaped by default: 8 experts x 6 sparse blocks
# in encoder and decoder, d_model 768, d_ff 3072, fp32, 2.5 GB), compresses it with `qmoe compress`,
# verifies the container, inspects it, decodes every expert and compares it with the ternarized
# original, and prints bits per weight, the reconstruction check and the throughput.
#
#   ./scripts/main-job.sh [--size tiny|small|base8|base8-bf16|c2048-style] [--threads N]
#                         [--codec auto|qmoe-v1|qmoe-v2|qmoe-v3|qmoe-p5] [--max-memory BYTES]
#                         [--shard-size BYTES] [--work DIR] [--keep]
#
# Exits non-zero on any failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

size=base8
threads=$(nproc)
max_memory=0
shard_size=0
codec=auto
work="$root/build/main-job"
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --codec) codec=$2; shift 2 ;;
    --max-memory) max_memory=$2; shift 2 ;;
    --shard-size) shard_size=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "main-job: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$size" in
  tiny) preset=tiny ;;
  small) preset=small ;;
  base8) preset=switch-base-8 ;;
  base8-bf16) preset=switch-base-8-bf16 ;;
  c2048-style) preset=c2048-style; [ "$shard_size" = 0 ] && shard_size=64M ;;
  *) echo "main-job: --size must be tiny, small, base8, base8-bf16 or c2048-style" >&2; exit 2 ;;
esac

step() { printf '\n==== %s ====\n' "$*"; }

step "Dependencies"
./scripts/install-deps.sh

step "Release build"
export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=true
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/qmoe-ccache}
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache >/dev/null
cmake --build build/release --target qmoe -j "$(nproc)"
qmoe="$root/build/release/cli/qmoe"

rm -rf "$work"
mkdir -p "$work"
ckpt="$work/checkpoint"
out="$work/model.qmoe"
[ "$shard_size" != 0 ] || out="$work/model.qmoe.safetensors"

step "Generate a $preset checkpoint (Hugging Face layout)"
"$qmoe" generate "$ckpt" --preset "$preset" --threads "$threads"
ls -l "$ckpt"

step "Compress"
"$qmoe" compress "$ckpt" -o "$out" --threads "$threads" --codec "$codec" --max-memory "$max_memory" --shard-size "$shard_size" \
  | tee "$work/compress.log"

step "Verify"
"$qmoe" verify "$out"

step "Inspect"
"$qmoe" inspect "$out" --summary | tee "$work/inspect.log"

if python3 -c "import safetensors" 2>/dev/null; then
  step "The container is a valid safetensors file"
  python3 - "$out" <<'PY'
import os, sys
from safetensors import safe_open
p = sys.argv[1]
files = [os.path.join(p, f) for f in sorted(os.listdir(p)) if f.endswith(".safetensors")] if os.path.isdir(p) else [p]
n = 0
for f in files:
    with safe_open(f, framework="numpy") as s:
        n += len(list(s.keys()))
print(f"safetensors opened {len(files)} file(s), {n} tensors")
PY
fi

step "Decode every expert and compare with the ternarized originals"
"$qmoe" check-compressed "$ckpt" "$out" --threads "$threads" | tee "$work/check.log"

step "Summary"
grep -E "^experts:|^container:|^time:|^peak resident" "$work/compress.log"
grep -E "^size:" "$work/inspect.log" || true
grep -E "^check:" "$work/check.log"
if [ "$keep" = 0 ]; then rm -rf "$ckpt"; fi
echo "main job: OK (outputs in $work)"
