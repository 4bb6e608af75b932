#!/usr/bin/env bash
# Installs everything qmoe needs to build and test, idempotently (Debian 12, root).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

apt_pkgs=(cmake ninja-build g++ ccache pkg-config libeigen3-dev libomp-dev libgtest-dev libgmock-dev
          libbenchmark-dev libcli11-dev nlohmann-json3-dev libxxhash-dev pybind11-dev clang
          libclang-rt-14-dev clang-format
          libopenblas-dev                  # bench_core's reference GEMM (benchmarks only)
          libopenmpi-dev openmpi-bin)      # qmoe compress across processes (mpirun)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python packages for the bindings, the tests and the fixture tools.
py=${PYTHON:-python3}
"$py" -m pip install -q --disable-pip-version-check -r "$here/scripts/requirements-dev.txt"
