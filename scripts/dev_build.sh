#!/usr/bin/env bash
# In-place developer build: compiles colabx._C into ./colabx so `PYTHONPATH=. pytest` works
# without reinstalling. Usage: scripts/dev_build.sh [cpu|cuda] (default cpu; cuda compiles for
# COLABX_CUDA_ARCHS, default 90). Build trees live under build/dev-<mode>[-<COLABX_BUILD_TAG>];
# COLABX_CUDA_FLAGS adds nvcc flags (an experimental variant in its own tree); the last build wins.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-cpu}
py=${PYTHON:-python}
cuda_flag=off
[ "$mode" = cuda ] && cuda_flag=on
tree="build/dev-$mode${COLABX_BUILD_TAG:+-$COLABX_BUILD_TAG}"
cmake -S . -B "$tree" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCOLABX_CUDA=$cuda_flag -DCOLABX_CUDA_ARCHS="${COLABX_CUDA_ARCHS:-90}" \
  -DCMAKE_CUDA_FLAGS="${COLABX_CUDA_FLAGS:-}" \
  -DPython_EXECUTABLE="$(command -v "$py")" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$tree"
cp "$tree"/_C*.so colabx/
