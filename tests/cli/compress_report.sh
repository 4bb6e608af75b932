#!/usr/bin/env bash
# `qmoe compress --calib-tokens --report`: the report names every phase of the block loop with its
# seconds, CPU seconds and work; the calibrated phases did work; the expert outputs are a phase of
# their own (dense-equivalent work of exactly the tokens the experts computed, no more than every
# routed token once per sparse block); the printed phase table lists the same phases.
#   compress_report.sh QMOE_BINARY
set -euo pipefail
qmoe=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$qmoe" synth "$work/ck" --preset tiny --calib-pairs 6 --encoder-length 24 --decoder-length 8 \
  > "$work/gen.out"
"$qmoe" compress "$work/ck" -o "$work/out.safetensors" --calib-tokens "$work/ck/calibration.safetensors" \
  --threads 2 --report "$work/report.json" > "$work/compress.out" 2>&1 || { cat "$work/compress.out"; fail "compress failed"; }
for phase in load forward hessians gptq encode write outputs; do
  grep -q "^$phase " "$work/compress.out" || { cat "$work/compress.out"; fail "phase table lacks $phase"; }
done
python3 - "$work/report.json" "$work/ck/config.json" "$work/ck/calibration.safetensors" <<'PY'
import json, struct, sys
report, config, tokens = sys.argv[1:]
r = json.load(open(report))
c = json.load(open(config))
phases = r["phases"]
want = {"load", "forward", "hessians", "gptq", "encode", "write", "outputs"}
assert set(phases) == want, sorted(phases)
for name, p in phases.items():
    for key in ("seconds", "cpu_seconds", "flops"):
        assert key in p and p[key] >= 0, (name, key, p)
for name in ("forward", "hessians", "gptq", "outputs"):
    assert phases[name]["flops"] > 0, (name, phases[name])
# Every calibration token passes each sparse block's experts at most once: the outputs' work is
# at most 4 d_model d_ff per token and sparse block, and the forward keeps the rest.
with open(tokens, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
per_token = 4.0 * c["d_model"] * c["d_ff"]
enc = header["encoder_ids"]["shape"][0] * (c["num_layers"] // c["encoder_sparse_step"])
dec = header["decoder_targets"]["shape"][0] * (c["num_decoder_layers"] // c["decoder_sparse_step"])
assert phases["outputs"]["flops"] <= per_token * (enc + dec), (phases["outputs"], enc, dec)
assert phases["outputs"]["flops"] % per_token == 0, phases["outputs"]["flops"] / per_token
PY
echo "compress report: OK"
