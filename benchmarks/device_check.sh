#!/usr/bin/env bash
# The GPU check, run on a machine with an NVIDIA GPU (no network needed):
#   1. builds colabx._C in place with nvcc (sm_90 by default: COLABX_CUDA_ARCHS),
#   2. runs the GPU tests (pytest -m cuda) and compute-sanitizer on one small case per kernel,
#   3. runs bench_ops on CUDA (colabx vs eager twin vs torch.compile twin; EDT also vs cuCIM when
#      it imports: carry its wheel in .whl/) and profile_kernels; COLABX_BENCH_OPS limits the ops,
#   4. runs `colabx bench meta` on CUDA at the paper's sizes (B=2, 80³, 30 features, 4 pools) in
#      the two default configurations, fp32 with the one-sided difference and bf16 with the
#      central one: vanilla, CoLab's iterations and the pure-PyTorch steps, same run, each row
#      then profiled (how busy its kernels keep the GPU, its costliest kernels); only when
#      asked (stage metastep), bench_meta_step (issue 4's meta-step table; at most 180 s),
#   5. runs bench_train and bench_data on the phantom (trainer patches/s consumed vs loader
#      patches/s delivered with 4/8/12 workers; at most 150 s; nibabel and pyyaml wheels in .whl/),
#   6. runs bench_compat on CUDA (the colabx.compat drop-ins vs the reference-style twins; 60 s),
#   7. only when asked (stage compare): `colabx compare` of all five modes x 3 seeds on the
#      phantom at a GPU configuration (20 epochs x 100 iterations, 16 features), into
#      $COLABX_COMPARE_DIR (default /tmp/colabx-compare, kept while the machine stays warm): at
#      most 540 s per call, so a stopped compare continues on the next call; tables into $OUT,
#   8. only when asked (stage ncu): Nsight Compute on the pooled context_labels kernels and the
#      80^3 loss kernels (throughput, occupancy, warp stalls; ~60 s), into $OUT/ncu.txt,
# writing logs and JSON under $OUT (default benchmarks/results) and printing summary tables last.
# Usage: benchmarks/device_check.sh [STAGE ...]
#   STAGE: all (default) | test | bench | train | meta | metastep | compat | compare | ncu;
#   stages run in the order given ("all" = test bench train meta compat). Each log and JSON lands in
#   $OUT, and, when $OUT is given, all of them again in $OUT/device_check.tgz (the device tool
#   returns at most 8 files).
# COLABX_SKIP_BUILD=1 uses a colabx/_C*.so already in place (e.g. built elsewhere for this Python:
# on a development machine with nvcc and a python3.12 that has pybind11,
# `PYTHON=python3.12 COLABX_BUILD_TAG=py312 scripts/dev_build.sh cuda` leaves
# colabx/_C.cpython-312-x86_64-linux-gnu.so to carry, saving the lease the ~130 s build).
# COLABX_SANITIZER=0 leaves out compute-sanitizer (e.g. when no kernel changed since its last run).
# COLABX_CHECK_SECONDS=N ends every step by N seconds after the start (each step's own limit is
# cut to what is left; a step with under 20 s left is skipped and reported), so that a call of the
# device tool returns with its logs before the tool's own limit.
set -uo pipefail
cd "$(dirname "$0")/.."
stages=" ${*:-all} "
[ "$stages" = " all " ] && stages=" test bench train meta compat "
for s in $stages; do
  case $s in test|bench|train|meta|metastep|compat|compare|ncu) ;; *) echo "device_check: unknown stage '$s'"; exit 2 ;; esac
done
bundle() { tar czf /tmp/device_check.tgz -C "$OUT" --exclude device_check.tgz . && mv /tmp/device_check.tgz "$OUT/"; }
# a given $OUT (the device tool's) gets the archive, also after a failed build; the default
# benchmarks/results holds the committed results, which need none
[ -n "${OUT:-}" ] && trap bundle EXIT
trap 'exit 143' TERM
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
py=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/colabx-site .whl/*.whl && export PYTHONPATH=/tmp/colabx-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$SECONDS
if [ "${COLABX_SKIP_BUILD:-0}" = 1 ]; then
  echo "build: skipped (COLABX_SKIP_BUILD=1)"
elif ! PYTHON=$py COLABX_CUDA_ARCHS=${COLABX_CUDA_ARCHS:-90} scripts/dev_build.sh cuda \
    >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "device_check: build failed"; exit 1
fi
[ "${COLABX_SKIP_BUILD:-0}" = 1 ] || echo "build: $((SECONDS - t0)) s"
$py -c "import colabx._C as c, colabx._backend as b; print('cuda kernels:', c.built_with_cuda, 'devices:', c.cuda_device_count(), 'usable:', b.cuda_kernels_available())"

status=0
deadline=${COLABX_CHECK_SECONDS:-0}
# budget SECONDS: prints SECONDS cut to the time left before COLABX_CHECK_SECONDS (5 s spare), or
# nothing (and fails) when under 20 s are left
budget() {
  [ "$deadline" -gt 0 ] || { echo "$1"; return 0; }
  local left=$((deadline - SECONDS - 5))
  [ "$left" -ge 20 ] || return 1
  echo $(($1 < left ? $1 : left))
}

# run_logged SECONDS LOG MODULE ARGS...: `python -m MODULE ARGS...` under a timeout, output into
# $OUT/LOG; a failure or timeout is reported and fails the check
run_logged() {
  local limit log=$2
  limit=$(budget "$1") || { echo "$3: skipped, COLABX_CHECK_SECONDS reached"; status=1; return; }
  shift 2
  timeout "$limit" $py -m "$@" >"$OUT/$log" 2>&1 || { echo "$1: failed or timed out"; status=1; }
}

# show_table LOG PATTERN: $OUT/LOG from its first line matching PATTERN on, or its tail
show_table() {
  if grep -q "$2" "$OUT/$1"; then sed -n "/$2/,\$p" "$OUT/$1"; else tail -20 "$OUT/$1"; fi
}

stage_test() {
  t0=$SECONDS
  run_logged 170 pytest_cuda.log pytest -q -m cuda tests -p no:cacheprovider \
    --junitxml="$OUT/pytest_cuda.xml"
  grep -E "(passed|failed|error)" "$OUT/pytest_cuda.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -30
  # the reasons too: the device tool may not return the log itself (at most 8 files come back)
  grep -E "^E   " "$OUT/pytest_cuda.log" | head -30
  echo "gpu tests: $((SECONDS - t0)) s"
  t0=$SECONDS
  local limit
  if [ "${COLABX_SANITIZER:-1}" = 0 ]; then
    echo "compute-sanitizer: skipped (COLABX_SANITIZER=0)"
  elif ! limit=$(budget 120); then
    echo "compute-sanitizer: skipped, COLABX_CHECK_SECONDS reached"; status=1
  elif command -v compute-sanitizer >/dev/null; then
    timeout "$limit" compute-sanitizer --tool memcheck --error-exitcode 7 --print-limit 20 \
      $py benchmarks/sanitize_cuda.py >"$OUT/sanitizer.log" 2>&1
    rc=$?
    tail -4 "$OUT/sanitizer.log"
    [ $rc = 0 ] || { echo "compute-sanitizer: exit $rc"; status=1; }
  else
    echo "compute-sanitizer not found"
  fi
  echo "sanitizer: $((SECONDS - t0)) s"
}

stage_bench() {
  t0=$SECONDS
  # shellcheck disable=SC2086
  run_logged 260 bench_ops_cuda.log benchmarks.bench_ops --device cuda --min-time 0.2 \
    --cuda-graphs --ops ${COLABX_BENCH_OPS:-dice_ce_loss context_labels distance_transform} \
    --out "$OUT/ops_cuda.json"
  run_logged 90 profile_kernels.log benchmarks.profile_kernels --out "$OUT/kernels.json"
  cat "$OUT/profile_kernels.log"
  show_table bench_ops_cuda.log '^| op '
  echo "ops bench: $((SECONDS - t0)) s"
}

stage_train() {
  t0=$SECONDS
  export COLABX_CACHE=${COLABX_CACHE:-/tmp/colabx-cache}
  run_logged 90 bench_train_cuda.log benchmarks.bench_train --device cuda --iterations 10 \
    --workers 4 8 12 --out "$OUT/train_cuda.json"
  show_table bench_train_cuda.log '^|'
  run_logged 60 bench_data.log benchmarks.bench_data --workers 4 8 12 --iterations 20 \
    --out "$OUT/data_gpu_host.json"
  show_table bench_data.log '^|'
  echo "train/data bench: $((SECONDS - t0)) s"
}

# cuda_bench NAME TIMEOUT MODULE TABLE_PATTERN: one CUDA benchmark, its log, JSON and table.
cuda_bench() {
  t0=$SECONDS
  run_logged "$2" "bench_$1_cuda.log" "$3" --device cuda --min-time 0.2 --out "$OUT/$1_cuda.json"
  show_table "bench_$1_cuda.log" "$4"
  echo "$1 bench: $((SECONDS - t0)) s"
}

# what users run: colabx bench meta at the paper's sizes, in the defaults of fp32 (one-sided
# difference; the published iteration, reference order with the central difference, is timed
# beside it) and of bf16 (central difference)
stage_meta() {
  local v t0=$SECONDS
  # then each with its iterations replayed from CUDA graphs (colabx train --cuda-graphs: the
  # updates of θ and the update iterations' meta passes)
  for v in "none one_sided" "bf16 central" "none one_sided --cuda-graphs" \
           "bf16 central --cuda-graphs"; do
    # shellcheck disable=SC2086
    set -- $v
    local name="colabx_bench_meta_$1_$2${3:+_graphs}" extra=${3:-}
    run_logged 120 "$name.log" colabx bench meta --device cuda --patch 80 --features 30 \
      --pools 4 --min-time 2 --amp "$1" --difference "$2" $extra --profile 3 --out "$OUT/$name.json"
    show_table "$name.log" '^| per iteration'
  done
  echo "meta bench: $((SECONDS - t0)) s"
}

# the meta JSON is written after the timings and again after the float64 accuracy part, so a
# timeout in the latter keeps the timings
stage_metastep() { cuda_bench meta 180 benchmarks.bench_meta_step '^| part '; }

stage_compat() { cuda_bench compat 60 benchmarks.bench_compat '^| op '; }

stage_compare() {
  t0=$SECONDS
  local dir=${COLABX_COMPARE_DIR:-/tmp/colabx-compare}
  export COLABX_CACHE=${COLABX_CACHE:-/tmp/colabx-cache}
  timeout 540 $py -m colabx compare --modes vanilla manual dilation kmeans colab --seeds 0 1 2 \
    --device cuda --epochs 20 --iterations 100 --base-features 16 --num-workers 4 \
    --manual-contexts 1 --no-progress --out "$dir" >>"$OUT/compare.log" 2>&1
  local rc=$?
  if [ $rc = 124 ]; then
    echo "compare: stopped at the time limit; call the stage again to continue"
  elif [ $rc != 0 ]; then
    tail -20 "$OUT/compare.log"; echo "compare: failed"; status=1
  fi
  cp "$dir"/compare.{md,csv,json,png} "$OUT/" 2>/dev/null && cat "$OUT/compare.md"
  echo "compare: $((SECONDS - t0)) s"
}

stage_ncu() {
  t0=$SECONDS
  if ! command -v ncu >/dev/null; then echo "ncu not found"; return; fi
  local w
  for w in "context_labels 2x2x160^3 L=4" "dice_ce_loss 2x3x80^3 fp32"; do
    echo "== $w" >>"$OUT/ncu.txt"
    timeout 90 ncu -k 'regex:tiled|dce_' --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
      $py -m benchmarks.profile_kernels --once "$w" 2>&1 | grep -v '^==PROF==' >>"$OUT/ncu.txt" \
      || { echo "ncu ($w): failed or timed out"; status=1; }
  done
  grep -E '^  [a-z_ ]*void|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy' \
    "$OUT/ncu.txt"
  echo "ncu: $((SECONDS - t0)) s"
}

for s in $stages; do "stage_$s"; done
exit $status
