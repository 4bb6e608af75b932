#!/bin/sh
# Compiler launcher for the CUDA objects of qmoe_decoder_cuda: runs the compile command given as
# arguments (after the log directory), passes its stderr through, and keeps a copy of it (the
# ptxas -v resource lines) in <log dir>/<object name>.log for tools/ptxas_report.cmake.
log_dir=$1
shift
if [ -z "$1" ]; then shift; fi  # an empty launcher slot
obj=unknown
prev=
for a in "$@"; do
  if [ "$prev" = "-o" ]; then obj=$(basename "$a"); fi
  prev=$a
done
tmp="$log_dir/$obj.log.tmp"
"$@" 2>"$tmp"
rc=$?
cat "$tmp" >&2
if [ $rc -eq 0 ]; then mv "$tmp" "$log_dir/$obj.log"; else rm -f "$tmp"; fi
exit $rc
