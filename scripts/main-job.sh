#!/usr/bin/env bash
# The main job: installs what is missing, builds qmoe (Release), synthesizes a Switch Transformers
# checkpoint in the Hugging Face layout with calibration and evaluation token files, compresses it
# with GPTQ on Hessians from the calibration tokens run through the model block by block
# (`qmoe compress --calib-tokens`, the real path), prints the per-phase rates, verifies and
# inspects the container, and evaluates the original and the compressed model on the evaluation
# tokens with `qmoe eval`. With --rtn: round to nearest instead, and every decoded expert is
# checked against the ternarized original.
#
#   ./scripts/main-job.sh [--rtn] [--size small|tiny|base8|base8-bf16|c2048-style] [--threads N]
#                         [--codec auto|qmoe-v1|qmoe-v2|qmoe-v3|qmoe-p5] [--max-memory BYTES]
#                         [--shard-size BYTES] [--calib-pairs N] [--eval-pairs N] [--work DIR]
#                         [--keep]
#
# Default: --size small (d_model 512, d_ff 2048, 4 + 4 blocks, every other one sparse with 8
# experts, f32, 369 MB), 128 calibration pairs and 64 evaluation pairs of 128 + 32 tokens: a few
# minutes on 2 cores. Exits non-zero on any failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

size=small
threads=$(nproc)
max_memory=0
shard_size=0
codec=auto
work="$root/build/main-job"
keep=0
rtn=0
calib_pairs=128
eval_pairs=64
while [ $# -gt 0 ]; do
  case "$1" in
    --rtn) rtn=1; shift ;;
    --size) size=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --codec) codec=$2; shift 2 ;;
    --max-memory) max_memory=$2; shift 2 ;;
    --shard-size) shard_size=$2; shift 2 ;;
    --calib-pairs) calib_pairs=$2; shift 2 ;;
    --eval-pairs) eval_pairs=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "main-job: unknown argument $1" >&2; exit 2 ;;
  esac
done
gen=()
case "$size" in
  tiny) gen=(--preset tiny) ;;
  small) gen=(--preset small --layers 4) ;;
  base8) gen=(--preset switch-base-8) ;;
  base8-bf16) gen=(--preset switch-base-8-bf16) ;;
  c2048-style) gen=(--preset c2048-style); [ "$shard_size" = 0 ] && shard_size=64M ;;
  *) echo "main-job: --size must be small, tiny, base8, base8-bf16 or c2048-style" >&2; exit 2 ;;
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

step "Generate a $size checkpoint (Hugging Face layout) and token files"
"$qmoe" synth "$ckpt" "${gen[@]}" --threads "$threads" --calib-pairs "$calib_pairs" \
  --eval-pairs "$eval_pairs"
ls -l "$ckpt"

quantizer=(--calib-tokens "$ckpt/calibration.safetensors")
[ "$rtn" = 1 ] && quantizer=(--rtn)
step "Compress (${quantizer[*]})"
"$qmoe" compress "$ckpt" -o "$out" "${quantizer[@]}" --threads "$threads" --codec "$codec" \
  --max-memory "$max_memory" --shard-size "$shard_size" --report "$work/compress.json" \
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

step "Decode every expert and compare with the originals"
"$qmoe" check-compressed "$ckpt" "$out" --threads "$threads" | tee "$work/check.log"

step "Evaluate the original and the compressed model (qmoe eval, $eval_pairs pairs)"
"$qmoe" eval "$ckpt" --tokens "$ckpt/eval.safetensors" --threads "$threads" | tee "$work/eval-original.log"
"$qmoe" eval "$out" --tokens "$ckpt/eval.safetensors" --threads "$threads" | tee "$work/eval-compressed.log"

step "Summary"
grep -E "^experts:|^container:|^time:|^peak resident|^calibration:" "$work/compress.log"
sed -n '/^phase /,/^assemble /p' "$work/compress.log"
grep -E "^size:" "$work/inspect.log" || true
grep -E "^check:" "$work/check.log"
printf 'eval original:   %s\n' "$(grep -E '^loss' "$work/eval-original.log")"
printf 'eval compressed: %s\n' "$(grep -E '^loss' "$work/eval-compressed.log")"
grep -E "^speed" "$work/eval-original.log" | sed 's/^/eval original   /'
echo "per-phase figures: $work/compress.json"
if [ "$keep" = 0 ]; then rm -rf "$ckpt"; fi
echo "main job: OK (outputs in $work)"
