#!/usr/bin/env bash
# Hostile and careless inputs to the qmoe tool: each must end with a clear message naming the file,
# a non-zero exit, no hang and nothing left behind; never a crash or a false "OK".
#   bad_inputs.sh QMOE_BINARY SOURCE_DIR
# numpy, safetensors and xxhash are required (scripts/install-deps.sh installs them): the
# script fails when they are missing instead of skipping checks.
set -euo pipefail
qmoe=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fixture="$src/tests/switch/fixtures/every_other_f32"
fail() { echo "FAIL: $*" >&2; exit 1; }
python3 -c "import numpy, safetensors, xxhash" ||
  fail "python3 with numpy, safetensors and xxhash is required (scripts/install-deps.sh)"
# expect_exit CODE CMD...: runs CMD with a time limit (a hang is a failure), checks its exit code,
# keeps its output in $work/out.
expect_exit() {
  local want=$1; shift
  set +e; timeout 60 "$@" >"$work/out" 2>&1; local got=$?; set -e
  [ "$got" != 124 ] || fail "'$*' hung (killed after 60 s)"
  [ "$got" = "$want" ] || { cat "$work/out" >&2; fail "'$*' exited $got, expected $want"; }
}
expect_text() {  # expect_text FRAGMENT: the last command's output contains FRAGMENT
  grep -qF -- "$1" "$work/out" || { cat "$work/out" >&2; fail "output lacks '$1'"; }
}

# ---- named pipes: refused at once, never opened for a blocking read ----------------------------
mkfifo "$work/pipe.safetensors"
expect_exit 1 "$qmoe" verify "$work/pipe.safetensors"
expect_text "pipe.safetensors: not a regular file (a named pipe)"
expect_exit 2 "$qmoe" inspect "$work/pipe.safetensors"
expect_text "named pipe"
expect_exit 2 "$qmoe" decode "$work/pipe.safetensors" -o "$work/never.safetensors"
expect_text "named pipe"
[ ! -e "$work/never.safetensors" ] || fail "decode wrote output for a named pipe"
expect_exit 2 "$qmoe" eval "$fixture" --tokens "$work/pipe.safetensors"
expect_text "pipe.safetensors: not a regular file (a named pipe)"
mkdir "$work/ck-pipe"
cp "$fixture/model.safetensors" "$fixture/tokens.safetensors" "$work/ck-pipe/"
mkfifo "$work/ck-pipe/config.json"
expect_exit 2 "$qmoe" eval "$work/ck-pipe" --tokens "$fixture/tokens.safetensors"
expect_text "config.json: not a regular file (a named pipe)"
expect_exit 2 "$qmoe" compress "$work/ck-pipe" -o "$work/never.safetensors"
expect_text "config.json: not a regular file (a named pipe)"
[ ! -e "$work/never.safetensors" ] || fail "compress wrote output for a named pipe"

# ---- eval: no false result ---------------------------------------------------------------------
python3 - "$fixture" "$work" <<'PY'
import shutil, sys
import numpy as np
from safetensors.numpy import load_file, save_file
fixture, work = sys.argv[1], sys.argv[2]
# A NaN in a router (a dense tensor): the loss comes out NaN.
shutil.copytree(fixture, work + "/nan")
d = load_file(fixture + "/model.safetensors")
k = "encoder.block.1.layer.1.mlp.router.classifier.weight"
d[k] = d[k].copy()
d[k][2, 5] = np.nan
save_file(d, work + "/nan/model.safetensors", metadata={"format": "pt"})
meta = {"format": "qmoe-tokens", "version": "1"}
i32, i64 = np.int32, np.int64
save_file({"encoder_ids": np.zeros(0, i32), "encoder_offsets": np.zeros(1, i64),
           "decoder_targets": np.zeros(0, i32), "decoder_offsets": np.zeros(1, i64)},
          work + "/zero-pairs.safetensors", metadata=meta)
save_file({"encoder_ids": np.array([5, 6], i32), "encoder_offsets": np.array([0, 2], i64),
           "decoder_targets": np.array([-100, -100], i32), "decoder_offsets": np.array([0, 2], i64)},
          work + "/no-targets.safetensors", metadata=meta)
PY
expect_exit 2 "$qmoe" eval "$work/nan" --tokens "$fixture/tokens.safetensors"
expect_text "nan/model.safetensors: tensor 'encoder.block.1.layer.1.mlp.router.classifier.weight': element 69 is nan"
if grep -q "^loss" "$work/out"; then cat "$work/out" >&2; fail "eval printed a loss for NaN weights"; fi
expect_exit 2 "$qmoe" eval "$fixture" --tokens "$work/zero-pairs.safetensors"
expect_text "zero-pairs.safetensors: holds no pairs"
expect_exit 2 "$qmoe" eval "$fixture" --tokens "$work/no-targets.safetensors"
expect_text "no target to score"

# ---- configs: bounded, checked against the weights, before any work ----------------------------
spoil_config() {  # spoil_config DIR KEY JSON_VALUE
  python3 - "$1/config.json" "$2" "$3" <<'PY'
import json, sys
p, k, v = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
c = json.load(open(p))
c[k] = v
json.dump(c, open(p, "w"))
PY
}
while read -r key value fragment; do  # fragment: the rest of the line
  rm -rf "$work/ck"
  cp -r "$fixture" "$work/ck"
  spoil_config "$work/ck" "$key" "$value"
  expect_exit 2 "$qmoe" compress "$work/ck" -o "$work/c.safetensors"
  expect_text "$fragment"
  [ ! -e "$work/c.safetensors" ] && [ ! -e "$work/c.safetensors.qmoe-work" ] ||
    fail "compress left output for a config with $key = $value"
  expect_exit 2 "$qmoe" eval "$work/ck" --tokens "$fixture/tokens.safetensors"
  expect_text "$fragment"
done <<'CASES'
d_kv 4611686018427387912 'd_kv' = 4611686018427387912 is above
vocab_size 97 shape [96, 32], expected [97, 32]
num_heads 8 expected [64, 32]
tie_word_embeddings false tensor 'lm_head.weight': missing tensor
decoder_start_token_id 96 not a token id of the vocabulary
CASES

# A container whose stored config overflows (written before configs were checked): verify fails.
expect_exit 0 "$qmoe" compress "$fixture" -o "$work/ok.safetensors" --threads 2
expect_exit 0 "$qmoe" verify "$work/ok.safetensors"
expect_text "its Switch config and every tensor shape the config implies checked"
python3 - "$work/ok.safetensors" "$work/bad-config.safetensors" <<'PY'
# Rewrites the stored config.json, with a valid header checksum (format/SPEC.md 2.6).
import json, struct, sys
import xxhash
raw = open(sys.argv[1], "rb").read()
(n,) = struct.unpack("<Q", raw[:8])
h = json.loads(raw[8:8 + n])
md = h["__metadata__"]
cfg = json.loads(md["config.json"])
cfg["d_kv"] = 2**62 + 8
md["config.json"] = json.dumps(cfg)
out = bytearray()
def s(x):
    b = x.encode()
    out.extend(struct.pack("<Q", len(b)) + b)
for k in sorted(md, key=lambda k: k.encode()):
    if k != "qmoe.header.xxh3":
        out.append(1); s(k); s(md[k])
for name in sorted((k for k in h if k != "__metadata__"), key=lambda k: k.encode()):
    e = h[name]
    out.append(2); s(name); s(e["dtype"])
    out.extend(struct.pack("<Q", len(e["shape"])) + struct.pack(f"<{len(e['shape'])}Q", *e["shape"]))
    out.extend(struct.pack("<QQ", *e["data_offsets"]))
md["qmoe.header.xxh3"] = xxhash.xxh3_64_hexdigest(bytes(out))
text = json.dumps(h, separators=(",", ":")).encode()
text += b" " * (-len(text) % 8)
open(sys.argv[2], "wb").write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
PY
expect_exit 1 "$qmoe" verify "$work/bad-config.safetensors"
expect_text "FAILED"
expect_text "'d_kv' = 4611686018427387912 is above"
expect_exit 2 "$qmoe" eval "$work/bad-config.safetensors" --tokens "$fixture/tokens.safetensors"
expect_text "'d_kv'"

# ---- a flipped bit in the header: never OK -----------------------------------------------------
python3 - "$work/ok.safetensors" "$work/flipped.safetensors" <<'PY'
import sys
b = bytearray(open(sys.argv[1], "rb").read())
i = b.find(b'"quantizer":"rtn"')
assert i > 0
b[i + len('"quantizer":"r')] ^= 0x01  # "rtn" -> "run": still valid JSON, another value
open(sys.argv[2], "wb").write(bytes(b))
PY
expect_exit 1 "$qmoe" verify "$work/flipped.safetensors"
expect_text "header checksum mismatch"

# ---- interrupted: the temporary files go with the process ---------------------------------------
# (SIGTERM: a background job of a non-interactive shell ignores SIGINT.)
"$qmoe" synth --preset small --experts 2 "$work/interrupted" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 1 1000); do
  compgen -G "$work/interrupted/*.tmp.*" >/dev/null && break
  sleep 0.01
done
compgen -G "$work/interrupted/*.tmp.*" >/dev/null || fail "synth wrote no temporary file to interrupt"
kill -TERM "$pid"
set +e; wait "$pid"; rc=$?; set -e
[ "$rc" = 143 ] || fail "interrupted synth exited $rc, expected 143 (SIGTERM)"
if compgen -G "$work/interrupted/*.tmp.*" >/dev/null; then
  ls -la "$work/interrupted" >&2; fail "an interrupted synth left temporary files"
fi

# ---- synth on a full disk: a clean error and nothing left -----------------------------------
# A 2 MiB file system of our own (a user and mount namespace); where the kernel refuses
# unprivileged namespaces the check cannot run here, which is reported as a skip (exit 77).
if unshare -rm true 2>/dev/null; then
  mkdir "$work/small"
  set +e
  timeout 120 unshare -rm sh -c 'mount -t tmpfs -o size=2m none "$1" && "$2" synth --preset tiny "$1/ck"; echo "rc=$?"; ls -A "$1/ck" 2>/dev/null | sed "s/^/left: /"' \
    sh "$work/small" "$qmoe" >"$work/out" 2>&1
  set -e
  expect_text "rc=2"
  expect_text "No space left on device"
  if grep -q "^left: " "$work/out"; then cat "$work/out" >&2; fail "synth left files on a full disk"; fi
  skipped=0
else
  echo "SKIPPED: synth on a full disk (unshare -rm is not permitted here)"
  skipped=1
fi
echo "cli bad inputs: all checks passed"
[ "$skipped" = 0 ] || exit 77
