#!/usr/bin/env bash
# qmoe encode / verify / decode / dictionary on a committed Switch fixture, and their errors.
#   codec_commands.sh QMOE_BINARY SOURCE_DIR
# The content checks read the outputs with numpy, safetensors and ml_dtypes, which are required
# (scripts/install-deps.sh installs them): without them the script fails, it does not skip them.
set -euo pipefail
qmoe=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
in="$src/tests/switch/fixtures/every_other_f32/model.safetensors"
fail() { echo "FAIL: $*" >&2; exit 1; }
python3 -c "import numpy, safetensors, ml_dtypes" ||
  fail "python3 with numpy, safetensors and ml_dtypes is required for the content checks (scripts/install-deps.sh)"
expect_exit() {  # expect_exit CODE CMD...: runs CMD, checks its exit code, keeps its output
  local want=$1; shift
  set +e; "$@" >"$work/out" 2>&1; local got=$?; set -e
  [ "$got" = "$want" ] || { cat "$work/out" >&2; fail "'$*' exited $got, expected $want"; }
}

# Only the expert matrices are compressed; every other tensor passes through.
expect_exit 0 "$qmoe" encode "$in" -o "$work/c.safetensors" --tensors '.*\.experts\.expert_[0-9]+\.w[io]\.weight' --threads 2
grep -q "^encoded 32 matrices" "$work/out" || { cat "$work/out"; fail "encode did not compress the 32 expert matrices"; }
[ ! -e "$work/c.safetensors.tmp."* ] 2>/dev/null || fail "temporary file left behind"
expect_exit 0 "$qmoe" verify "$work/c.safetensors"
grep -q ": OK (32 compressed matrices" "$work/out" || fail "verify did not report 32 matrices"

# Same bytes for any thread count.
expect_exit 0 "$qmoe" encode "$in" -o "$work/c1.safetensors" --tensors '.*\.experts\.expert_[0-9]+\.w[io]\.weight' --threads 1
cmp "$work/c.safetensors" "$work/c1.safetensors" || fail "output depends on the thread count"

# Decode back: F32 output holds every tensor; decoded experts are ternary (3 values per row at most).
expect_exit 0 "$qmoe" decode "$work/c.safetensors" -o "$work/d.safetensors" --dtype F32
python3 - "$in" "$work/d.safetensors" <<'PY' || fail "decoded file does not match"
import sys
import numpy as np
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert sorted(a) == sorted(b), "tensor names differ"
for k in a:
    if ".experts." in k and k.endswith(".weight"):
        assert b[k].shape == a[k].shape
        for row in b[k]:
            assert len(np.unique(row)) <= 3, k
            # zeros where the original was small
        assert (b[k] == 0).mean() > 0.5, k
    else:
        assert np.array_equal(a[k], b[k]), "passthrough tensor changed: " + k
PY

# The dictionary subcommand writes the reference decode table.
expect_exit 0 "$qmoe" dictionary --codec qmoe-v1 --out "$work/table.bin"
[ "$(stat -c %s "$work/table.bin")" = 524288 ] || fail "decode table has the wrong size"
# The table's sha256 given in format/SPEC.md 2.4 (the table QMoE's reference code builds).
[ "$(sha256sum "$work/table.bin" | cut -d' ' -f1)" = c09862c453fe122634070a475357ff81a679aff65829d84a56f806c02a54ed45 ] ||
  fail "decode table differs from the one of format/SPEC.md 2.4"

# qmoe-v2: smaller than qmoe-v1 on the same matrices, decodes to the same symbols, and inspect
# counts each stored dictionary once in the totals.
expect_exit 0 "$qmoe" encode "$in" -o "$work/v2.safetensors" --codec qmoe-v2 --tensors '.*\.experts\.expert_[0-9]+\.w[io]\.weight' --threads 2
grep -q "qmoe-v2" "$work/out" || { cat "$work/out"; fail "encode did not report qmoe-v2"; }
expect_exit 0 "$qmoe" verify "$work/v2.safetensors"
expect_exit 0 "$qmoe" encode "$in" -o "$work/v1.safetensors" --codec qmoe-v1 --tensors '.*\.experts\.expert_[0-9]+\.w[io]\.weight' --threads 2
expect_exit 0 "$qmoe" decode "$work/v2.safetensors" -o "$work/d2.safetensors" --dtype F32
expect_exit 0 "$qmoe" decode "$work/v1.safetensors" -o "$work/d1.safetensors" --dtype F32
cmp "$work/d1.safetensors" "$work/d2.safetensors" || fail "qmoe-v2 decodes to other weights than qmoe-v1"
expect_exit 0 "$qmoe" inspect "$work/v2.safetensors" --json
python3 - "$work/out" <<'PY' || fail "inspect --json does not describe the qmoe-v2 container"
import json, sys
t = json.load(open(sys.argv[1]))["totals"]
assert t["qmoe_v2"] == 32 and t["qmoe_v1"] == 0, t
assert t["qmoe_v2_dictionaries"] >= 1, t
PY
# transcode: qmoe-v1 -> qmoe-v2 gives the codes of encoding with qmoe-v2 directly (the tensors are
# stored in another order), and back again the same weights.
expect_exit 0 "$qmoe" transcode "$work/v1.safetensors" -o "$work/t2.safetensors" --codec qmoe-v2 --threads 2
grep -q "^transcoded 32 matrices to qmoe-v2" "$work/out" || { cat "$work/out"; fail "transcode did not report 32 matrices"; }
expect_exit 0 "$qmoe" transcode "$work/t2.safetensors" -o "$work/t1.safetensors" --codec qmoe-v1
expect_exit 0 "$qmoe" decode "$work/t1.safetensors" -o "$work/dt1.safetensors" --dtype F32
python3 - "$work" <<'PY' || fail "transcoded containers do not hold the same matrices"
import sys
import ml_dtypes  # noqa: F401  (BF16 levels)
import numpy as np
from safetensors.numpy import load_file
w = sys.argv[1]
a, b = load_file(w + "/t2.safetensors"), load_file(w + "/v2.safetensors")
assert sorted(a) == sorted(b)
for k in a:
    assert np.array_equal(a[k], b[k]), k  # codes, offsets, levels, dictionaries, dense tensors
d1, dt1 = load_file(w + "/d1.safetensors"), load_file(w + "/dt1.safetensors")
assert sorted(d1) == sorted(dt1)
for k in d1:
    assert np.array_equal(d1[k], dt1[k]), k
PY
expect_exit 2 "$qmoe" transcode "$work/v1.safetensors" -o "$work/bad.safetensors" --codec qmoe-v7
[ ! -e "$work/bad.safetensors" ] || fail "transcode wrote output for a bad codec"
expect_exit 0 "$qmoe" dictionary --codec qmoe-v2 --p0 0.890625 --out "$work/v2dict.bin"
[ "$(stat -c %s "$work/v2dict.bin")" = 262144 ] || fail "qmoe-v2 dictionary has the wrong size"
grep -q "id ed96d927233f97b2" "$work/out" || { cat "$work/out"; fail "qmoe-v2 dictionary id differs from format/SPEC.md 4.3.2"; }
expect_exit 2 "$qmoe" dictionary --codec qmoe-v2 --out "$work/none.bin"

# qmoe-v3: the same weights as qmoe-v1, inspect counts its matrices and dictionaries, transcode to
# qmoe-v2 (for the GPU) keeps the weights; its dictionary has the id of format/SPEC.md 4.4.2 and
# takes no --max-width.
expect_exit 0 "$qmoe" encode "$in" -o "$work/v3.safetensors" --codec qmoe-v3 --tensors '.*\.experts\.expert_[0-9]+\.w[io]\.weight' --threads 2
grep -q "qmoe-v3" "$work/out" || { cat "$work/out"; fail "encode did not report qmoe-v3"; }
expect_exit 0 "$qmoe" verify "$work/v3.safetensors"
expect_exit 0 "$qmoe" decode "$work/v3.safetensors" -o "$work/d3.safetensors" --dtype F32
cmp "$work/d1.safetensors" "$work/d3.safetensors" || fail "qmoe-v3 decodes to other weights than qmoe-v1"
expect_exit 0 "$qmoe" inspect "$work/v3.safetensors"
grep -q "compressed: 32 matrices (0 qmoe-v1, 0 qmoe-v2, 32 qmoe-v3, 0 qmoe-g4, 0 qmoe-p5)" "$work/out" || { cat "$work/out"; fail "inspect does not count the qmoe-v3 matrices"; }
expect_exit 0 "$qmoe" inspect "$work/v3.safetensors" --json
python3 - "$work/out" <<'PY' || fail "inspect --json does not describe the qmoe-v3 container"
import json, sys
j = json.load(open(sys.argv[1]))
t = j["totals"]
assert t["qmoe_v3"] == 32 and t["qmoe_v2"] == 0 and t["qmoe_v1"] == 0, t
n = t["qmoe_v3_dictionaries"]
assert n >= 1 and t["qmoe_v2_dictionaries"] == 0, t
matrices = [x for x in j["tensors"] if x.get("codec") == "qmoe-v3"]
assert len(matrices) == 32
assert t["compressed_bytes"] == sum(x["bytes"] for x in matrices) + n * 262144, t
PY
expect_exit 0 "$qmoe" transcode "$work/v3.safetensors" -o "$work/t32.safetensors" --codec qmoe-v2 --threads 2
grep -q "^transcoded 32 matrices to qmoe-v2" "$work/out" || { cat "$work/out"; fail "transcode qmoe-v3 -> qmoe-v2 did not report 32 matrices"; }
expect_exit 0 "$qmoe" decode "$work/t32.safetensors" -o "$work/dt32.safetensors" --dtype F32
cmp "$work/d1.safetensors" "$work/dt32.safetensors" || fail "qmoe-v3 transcoded to qmoe-v2 has other weights"
expect_exit 0 "$qmoe" dictionary --codec qmoe-v3 --p0 0.890625 --out "$work/v3dict.bin"
[ "$(stat -c %s "$work/v3dict.bin")" = 262144 ] || fail "qmoe-v3 dictionary has the wrong size"
grep -q "qmoe-v3 dictionary .*id 11ccb88076bd615f" "$work/out" || { cat "$work/out"; fail "qmoe-v3 dictionary id differs from format/SPEC.md 4.4.2"; }
# Entry 20000 of that dictionary is the example of SPEC 4.4.2 (little endian 0x300c40b9).
[ "$(od -An -tx4 -j $((4 * 20000)) -N4 "$work/v3dict.bin" | tr -d ' ')" = 300c40b9 ] || fail "qmoe-v3 dictionary entry 20000 differs from format/SPEC.md 4.4.2"
expect_exit 2 "$qmoe" dictionary --codec qmoe-v3 --p0 0.890625 --max-width 20 --out "$work/none.bin"
grep -q "qmoe-v3: --max-width does not apply" "$work/out" || { cat "$work/out"; fail "no clear message for --max-width with qmoe-v3"; }
[ ! -e "$work/none.bin" ] || fail "dictionary wrote output despite the error"
expect_exit 2 "$qmoe" dictionary --codec qmoe-v3 --out "$work/none.bin"
grep -q "qmoe-v3: --p0 is required" "$work/out" || { cat "$work/out"; fail "no message for qmoe-v3 without --p0"; }

# --target: encode for the CPU (qmoe-g4, recorded as qmoe.target "cpu"), then transcode for the
# GPU (qmoe-v2; the target recorded follows), the weights unchanged throughout.
expect_exit 0 "$qmoe" encode "$in" -o "$work/cpu.safetensors" --target cpu --tensors '.*\.experts\.expert_[0-9]+\.w[io]\.weight' --threads 2
grep -q "qmoe-g4" "$work/out" || { cat "$work/out"; fail "encode --target cpu did not pick qmoe-g4"; }
expect_exit 0 "$qmoe" verify "$work/cpu.safetensors"
expect_exit 0 "$qmoe" inspect "$work/cpu.safetensors"
# (auto for the CPU: qmoe-g4, or qmoe-p5 where smaller; this model has matrices of both kinds)
grep -Eq "compressed: 32 matrices \(0 qmoe-v1, 0 qmoe-v2, 0 qmoe-v3, [1-9][0-9]* qmoe-g4, [0-9]+ qmoe-p5\)" "$work/out" || { cat "$work/out"; fail "inspect does not count the qmoe-g4 matrices"; }
grep -q "target cpu" "$work/out" || { cat "$work/out"; fail "inspect does not show the target"; }
expect_exit 0 "$qmoe" decode "$work/cpu.safetensors" -o "$work/dg4.safetensors" --dtype F32
cmp "$work/d1.safetensors" "$work/dg4.safetensors" || fail "qmoe-g4 decodes to other weights than qmoe-v1"
expect_exit 0 "$qmoe" transcode "$work/cpu.safetensors" -o "$work/gpu.safetensors" --target gpu --threads 2
grep -q "^transcoded 32 matrices to auto (target gpu)" "$work/out" || { cat "$work/out"; fail "transcode --target gpu did not report 32 matrices"; }
expect_exit 0 "$qmoe" inspect "$work/gpu.safetensors"
# (auto for the GPU: qmoe-v2, or qmoe-p5 where smaller, which is every matrix of this small model)
grep -Eq "compressed: 32 matrices \(0 qmoe-v1, [0-9]+ qmoe-v2, 0 qmoe-v3, 0 qmoe-g4, [0-9]+ qmoe-p5\)" "$work/out" || { cat "$work/out"; fail "transcode --target gpu left CPU codecs"; }
grep -q "target gpu" "$work/out" || { cat "$work/out"; fail "transcode did not record the target"; }
expect_exit 0 "$qmoe" decode "$work/gpu.safetensors" -o "$work/dgpu.safetensors" --dtype F32
cmp "$work/d1.safetensors" "$work/dgpu.safetensors" || fail "qmoe-g4 transcoded for the GPU has other weights"
# The default target (any) writes no key: the default output is unchanged.
expect_exit 0 "$qmoe" inspect "$work/v3.safetensors"
grep -q "^container: .*, target " "$work/out" && { cat "$work/out"; fail "a file encoded for any device names a target"; }
# Without --target, transcode keeps the input's.
expect_exit 0 "$qmoe" transcode "$work/gpu.safetensors" -o "$work/gpu2.safetensors" --codec qmoe-v1
grep -q "(target gpu)" "$work/out" || { cat "$work/out"; fail "transcode did not keep the input's target"; }
expect_exit 2 "$qmoe" encode "$in" -o "$work/bad.safetensors" --target tpu
grep -q "unknown target 'tpu'" "$work/out" || { cat "$work/out"; fail "no clear message for a bad --target"; }
[ ! -e "$work/bad.safetensors" ] || fail "encode wrote output for a bad target"

# Errors: a clear message, a non-zero exit, nothing under the output name.
expect_exit 2 "$qmoe" encode "$in" -o "$work/bad.safetensors" --tensors '(unclosed'
grep -q "invalid regular expression" "$work/out" || fail "no message for a bad regex"
[ ! -e "$work/bad.safetensors" ] || fail "output written despite the error"
expect_exit 2 "$qmoe" encode "$in" -o "$work/bad.safetensors" --codec qmoe-v9
grep -q "unknown codec 'qmoe-v9' (qmoe-v1, qmoe-v2, qmoe-v3, qmoe-g4, qmoe-p5 or auto)" "$work/out" || { cat "$work/out"; fail "the unknown-codec message does not list the codecs"; }
[ ! -e "$work/bad.safetensors" ] || fail "output written despite the error"
head -c 1000 "$work/c.safetensors" > "$work/trunc.safetensors"
expect_exit 1 "$qmoe" verify "$work/trunc.safetensors"
grep -q "trunc.safetensors" "$work/out" || fail "verify did not name the file"
expect_exit 2 "$qmoe" decode "$work/trunc.safetensors" -o "$work/never.safetensors"
[ ! -e "$work/never.safetensors" ] || fail "decode wrote output for a bad input"
expect_exit 2 "$qmoe" dictionary --codec qmoe-p5 --out "$work/none.bin"
echo "cli codec commands: all checks passed"
