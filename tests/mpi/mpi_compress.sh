#!/usr/bin/env bash
# qmoe compress under mpirun: the same bytes for any number of processes and threads (single
# files, and sharded containers whose shards the processes write between them), and clean stops
# when a process fails or is killed. Usage: mpi_compress.sh QMOE MPIRUN
set -euo pipefail
qmoe=$1
mpirun=$2
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qmoe-mpi.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
# OpenMPI refuses to run as root without these (CI runs as root); one OpenMP thread per process
# unless a test says otherwise, since the processes share this machine's cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
mpi() { "$mpirun" --oversubscribe -n "$@"; }
fail() { echo "mpi_compress: FAIL: $*" >&2; exit 1; }

"$qmoe" synth ck --preset tiny --vocab 300 --experts 4 --calib-pairs 48 --encoder-length 40 \
  --decoder-length 12 >/dev/null
calib=(--calib-tokens ck/calibration.safetensors)
"$qmoe" compress ck -o ref.safetensors "${calib[@]}" --threads 1 >/dev/null
"$qmoe" compress ck -o rtn.safetensors --threads 1 >/dev/null

echo "== calibrated GPTQ: 1..4 processes x 1, 2 threads against one process"
for r in 1 2 3 4; do
  for t in 1 2; do
    mpi "$r" -x OMP_NUM_THREADS="$t" "$qmoe" compress ck -o "c$r$t.safetensors" "${calib[@]}" \
      --threads "$t" >"c$r$t.log" 2>&1 || { cat "c$r$t.log"; fail "$r processes, $t threads"; }
    cmp -s ref.safetensors "c$r$t.safetensors" || fail "$r processes x $t threads: other bytes"
    grep -q "MPI, $r process" "c$r$t.log" || fail "$r processes: not run under MPI"
  done
done
echo "== sharded: every process writes its shards, the same files for 1..3 processes"
"$qmoe" compress ck -o shref "${calib[@]}" --threads 1 --shard-size 20000 >/dev/null
n=$(ls shref/model-*.safetensors | wc -l)
[ "$n" -ge 4 ] || fail "the sharded reference has only $n shards"
for r in 1 2 3; do
  mpi "$r" "$qmoe" compress ck -o "sh$r" "${calib[@]}" --threads 1 --shard-size 20000 \
    >"sh$r.log" 2>&1 || { cat "sh$r.log"; fail "sharded, $r processes"; }
  diff -r shref "sh$r" >/dev/null || fail "sharded, $r processes: other files"
done
ls sh3 | grep -q partial && fail "intermediate shard files were left"
"$qmoe" verify sh3 >/dev/null || fail "the 3-process sharded container does not verify"

echo "== round to nearest: 3 processes"
mpi 3 "$qmoe" compress ck -o rtn3.safetensors --threads 1 >rtn3.log 2>&1 || fail "rtn"
cmp -s rtn.safetensors rtn3.safetensors || fail "rtn: other bytes"

echo "== a failing process: every process stops within seconds, the error once, no output"
cp -r ck bad
python3 - <<'PY'
import json, struct
p = 'bad/model.safetensors'
b = bytearray(open(p, 'rb').read())
n = struct.unpack('<Q', b[:8])[0]
t = json.loads(b[8:8 + n])['encoder.block.1.layer.1.mlp.experts.expert_2.wi.weight']
o = 8 + n + t['data_offsets'][0]
b[o:o + 4] = struct.pack('<f', float('nan'))
open(p, 'wb').write(b)
PY
start=$(date +%s)
if mpi 3 "$qmoe" compress bad -o bad.safetensors --calib-tokens bad/calibration.safetensors \
  --threads 1 >bad.log 2>&1; then fail "a NaN weight was accepted"; fi
[ $(( $(date +%s) - start )) -lt 60 ] || { cat bad.log; fail "the failed job took more than a minute to stop"; }
[ "$(grep -c 'holds a non-finite weight' bad.log)" = 1 ] || { cat bad.log; fail "the error is not reported exactly once"; }
grep -q "stopped: process 0 of 3 failed in encoder.block.1" bad.log || { cat bad.log; fail "no process named the failing one"; }
[ ! -e bad.safetensors ] || fail "a failed job left an output"

echo "== a bad input seen by every process is reported once"
cp -r ck trunc
truncate -s 1000 trunc/model.safetensors
if mpi 3 "$qmoe" compress trunc -o trunc.safetensors --threads 1 >trunc.log 2>&1; then
  fail "a truncated checkpoint was accepted"
fi
[ "$(grep -c 'qmoe: error (process 0 of 3): .*trunc/model.safetensors' trunc.log)" = 1 ] || { cat trunc.log; fail "the bad input is not reported once, by process 0"; }
[ ! -e trunc.safetensors ] || fail "an output was left"

echo "== a killed process: all stop, nothing under the output name, resume with 2 processes"
"$qmoe" synth sm --preset small --layers 2 --calib-pairs 48 --encoder-length 64 \
  --decoder-length 16 >/dev/null
"$qmoe" compress sm -o sm-ref.safetensors --calib-tokens sm/calibration.safetensors --threads 2 \
  >/dev/null
mpi 3 "$qmoe" compress sm -o k.safetensors --calib-tokens sm/calibration.safetensors --threads 1 \
  >k.log 2>&1 &
job=$!
for _ in $(seq 600); do  # until the first matrix is finished
  ls k.safetensors.qmoe-work/m*.safetensors >/dev/null 2>&1 && break
  sleep 0.1
done
victim=$(pgrep -f "qmoe compress sm -o k.safetensors" | tail -1)
[ -n "$victim" ] || { cat k.log; fail "no process to kill"; }
kill -9 "$victim"
start=$(date +%s)
if wait "$job"; then cat k.log; fail "mpirun exited 0 after a process was killed"; fi
[ $(( $(date +%s) - start )) -lt 30 ] || { cat k.log; fail "the job took more than 30 s to stop"; }
grep -q "exited on signal 9" k.log || { cat k.log; fail "mpirun did not name the killed process"; }
grep -q "stopped in " k.log || { cat k.log; fail "no process named the block it stopped in"; }
[ ! -e k.safetensors ] || fail "a killed job left an output"
mpi 2 "$qmoe" compress sm -o k.safetensors --calib-tokens sm/calibration.safetensors --threads 1 \
  --resume >k2.log 2>&1 || { cat k2.log; fail "resume with 2 processes"; }
cmp -s sm-ref.safetensors k.safetensors || fail "resumed with 2 processes: other bytes"
[ ! -e k.safetensors.qmoe-work ] || fail "the work directory is left after success"
echo "mpi_compress: all passed"
