#!/usr/bin/env bash
# Accuracy of ternary expert compression on a small trained Switch model: eval loss of the
# original, round-to-nearest ternary, and GPTQ ternary with and without sequential calibration.
#
#   tools/switch_accuracy/run_experiment.sh [QMOE_BINARY] [WORK_DIR] [TRAIN_MINUTES]
#
# Trains the model first (tools/switch_accuracy/train_small_switch.py; needs torch and
# transformers==4.46.3) unless WORK_DIR/model already exists. Results go to stdout and
# WORK_DIR/results.txt.
set -euo pipefail
QMOE=${1:-build/switch/cli/qmoe}
WORK=${2:-/tmp/qmoe_small_switch}
MINUTES=${3:-10}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ ! -f "$WORK/model/config.json" ]; then
  "$PY" "$HERE/train_small_switch.py" --out "$WORK" --minutes "$MINUTES"
fi
run() {
  echo "== $*"
  "$QMOE" eval "$WORK/model" --tokens "$WORK/eval.safetensors" "$@" | grep -E '^(quantize|loss)'
}
{
  run --quantize none
  run --quantize rtn
  run --quantize gptq --calib-tokens "$WORK/calib.safetensors" --no-sequential
  run --quantize gptq --calib-tokens "$WORK/calib.safetensors"
} | tee "$WORK/results.txt"
