#!/usr/bin/env bash
# `qmoe eval` on every golden fixture of tests/switch/fixtures, with the expert capacity the
# reference ran with: the loss it prints must equal transformers' (expected.safetensors, made by
# tools/make_switch_fixtures.py) within 2e-5 relative. Also run on a round-to-nearest container of
# each fixture, where the loss must equal the checkpoint's with --dense-experts on the container.
#   eval_fixtures.sh QMOE_BINARY SOURCE_DIR
set -euo pipefail
qmoe=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# Reads metadata key $2 or the first float of tensor $3 of safetensors file $1 (plain Python).
st_read() {
  python3 - "$@" <<'PY'
import json, struct, sys
path, key, tensor = sys.argv[1], sys.argv[2], sys.argv[3]
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    if key:
        print(header["__metadata__"][key])
    else:
        t = header[tensor]
        assert t["dtype"] == "F32", t
        f.seek(8 + n + t["data_offsets"][0])
        print(repr(struct.unpack("<f", f.read(4))[0]))
PY
}
loss_of() { sed -n 's/^loss *\([0-9.eE+-]*\) nats.*/\1/p' "$1"; }
close() {  # close A B REL: |A - B| <= REL * |B|
  python3 -c "import sys; a, b, r = map(float, sys.argv[1:]); sys.exit(0 if abs(a - b) <= r * abs(b) else 1)" "$@"
}

n=0
for dir in "$src"/tests/switch/fixtures/*/; do
  name=$(basename "$dir")
  [ -f "$dir/expected.safetensors" ] || continue
  cap=$(st_read "$dir/expected.safetensors" expert_capacity "")
  want=$(st_read "$dir/expected.safetensors" "" loss)
  "$qmoe" eval "$dir" --tokens "$dir/tokens.safetensors" --capacity "$cap" --threads 2 >"$work/$name.out" \
    || { cat "$work/$name.out" >&2; fail "$name: qmoe eval failed"; }
  got=$(loss_of "$work/$name.out")
  [ -n "$got" ] || { cat "$work/$name.out" >&2; fail "$name: no loss line"; }
  close "$got" "$want" 2e-5 || fail "$name: qmoe eval loss $got, transformers $want (capacity $cap)"
  echo "$name: qmoe eval loss $got, transformers $want (capacity $cap)"
  # A compressed container: compressed experts through the kernels = the same experts decoded.
  "$qmoe" compress "$dir" -o "$work/$name.qmoe.safetensors" --threads 2 --no-disk-check >/dev/null
  "$qmoe" eval "$work/$name.qmoe.safetensors" --tokens "$dir/tokens.safetensors" --capacity "$cap" >"$work/c.out"
  "$qmoe" eval "$work/$name.qmoe.safetensors" --tokens "$dir/tokens.safetensors" --capacity "$cap" --dense-experts >"$work/d.out"
  grep -q "of [0-9]* experts run compressed" "$work/c.out" || fail "$name: no expert count"
  close "$(loss_of "$work/c.out")" "$(loss_of "$work/d.out")" 2e-5 || fail "$name: compressed and decoded experts disagree"
  n=$((n + 1))
done
[ "$n" -ge 4 ] || fail "only $n fixtures found"
echo "eval_fixtures: $n fixtures OK"
