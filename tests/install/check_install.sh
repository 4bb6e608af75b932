#!/usr/bin/env bash
# check_install.sh BUILD_DIR EXAMPLE_SOURCE WORK_DIR CXX [LAUNCHER]
# Installs the dev component of BUILD_DIR into WORK_DIR/prefix, builds EXAMPLE_SOURCE against it
# with find_package(qmoe) and runs the example. Fails on any step.
set -euo pipefail
build=$1 example=$2 work=$3 cxx=$4 launcher=${5:-}
rm -rf "$work"
mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" --component dev >"$work/install.log"
for f in lib/cmake/qmoe/qmoeConfig.cmake include/qmoe/decoder_cpu/matmul.h; do
  [ -f "$work/prefix/$f" ] || { echo "missing after install: $f" >&2; exit 1; }
done
args=(-S "$example" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx"
      -DCMAKE_PREFIX_PATH="$work/prefix")
if [ -n "$launcher" ]; then args+=(-DCMAKE_CXX_COMPILER_LAUNCHER="$launcher"); fi
if command -v ninja >/dev/null; then args+=(-G Ninja); fi
cmake "${args[@]}" >"$work/configure.log" || { cat "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
cd "$work"
TMPDIR="$work" "$work/build/expert_matvec"  # its container goes to the scratch folder
"$work/build/moe_layer"
