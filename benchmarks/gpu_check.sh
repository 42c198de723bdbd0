#!/usr/bin/env bash
# The whole GPU check in one command, for an H100/H200 machine whose tree is a copy of this
# repository (torch, triton and nvcc already installed; no package registry needed):
#
#     OUT=/some/folder benchmarks/gpu_check.sh
#
# Parts, in this order, each time-boxed with `timeout` and run even when an earlier one failed:
#   env     versions: nvidia-smi, python, torch, triton, nvcc                      (env.log)
#   build   pip install --no-build-isolation --no-deps -e .  (the extension with its CUDA
#           kernels, sm_90); if that fails (a setuptools older than 77 rejects pyproject.toml),
#           python setup.py build_ext with pyproject.toml set aside, the .so copied into
#           src/gfs_kernels                                                          (build.log)
#   tests   the GPU tests (pytest -m gpu: triton and cuda against the float64 reference, one
#           sync per select, CUDA graph, host streaming, the Triton Gram loop), the build test
#           and the CUDA kernels' sm_90 / spill check                                (tests.log)
#   bench   benchmarks/bench_gpu.py: streaming step vs device copy bandwidth (float32, bfloat16),
#           the Gram loop in one launch vs per-step launches, host streaming vs the host-to-device
#           copy, host synchronisations per select                    (bench.log, gpu-*.md/json)
# and $OUT/summary.md: each part's status and seconds, the tail of any failed part's log, the
# benchmark tables. The summary is printed last. At most 7 files are written, all in $OUT.
#
# The run ends within GPU_CHECK_BUDGET_S seconds (default 460, under 8 minutes): the build gets at
# most 200 s, the tests 150 s (each test's result is logged as it ends, so a cut-short run still
# says which passed), the benchmark what is left, at least 100 s (its parts in order of priority;
# what would start too late is listed as not run). Environment:
#   OUT                  output folder (default ./gpu-check-out)
#   PYTHON               the interpreter (default python3)
#   GPU_CHECK_BUDGET_S   the whole run's time budget in seconds (default 460)
#   GPU_CHECK_SKIP       parts to skip, comma-separated (e.g. build when the extension is built)
#   GPU_CHECK_BUILD_S    the build's time limit (default 200)
#   GPU_CHECK_DRY=1      rehearsal on a machine without a GPU: the benchmark runs its --dry-run
#                        (tiny shapes on the CPU); the GPU tests skip, naming why
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET_S:-460}
SKIP=",${GPU_CHECK_SKIP:-},"
DRY=${GPU_CHECK_DRY:-0}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/python:$ROOT/src:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

ROWS=()

elapsed() { echo $(($(date +%s) - START)); }

# limit WANT RESERVE: WANT seconds, or fewer so that RESERVE seconds of the budget stay left
limit() {
  local left=$((BUDGET - $(elapsed) - $2)) want=$1
  ((left < want)) && want=$left
  ((want < 1)) && want=1
  echo "$want"
}

# part NAME LIMIT COMMAND...: runs COMMAND under `timeout`, its output in $OUT/NAME.log
part() {
  local name=$1 lim=$2 t0 rc status
  shift 2
  if [[ $SKIP == *",$name,"* ]]; then
    ROWS+=("| $name | skipped (GPU_CHECK_SKIP) | 0 |")
    return 0
  fi
  echo "== $name (at most ${lim} s; log $OUT/$name.log)"
  t0=$(date +%s)
  timeout --kill-after=10 "$lim" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT (limit ${lim} s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  ROWS+=("| $name | $status | $(($(date +%s) - t0)) |")
  echo "   $status in $(($(date +%s) - t0)) s"
  if ((rc != 0)); then
    FAILED+=("$name")
  fi
  return 0
}
FAILED=()

part env 20 bash -c '
  echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; nproc; free -g | head -2
  nvidia-smi || echo "nvidia-smi: not available"
  '"$PY"' -c "import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  '"$PY"' -c "import triton; print(\"triton\", triton.__version__)" || echo "triton: not importable"
  (nvcc --version || ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --version) | tail -2
  git -C '"$ROOT"' rev-parse --short HEAD 2>/dev/null || echo "commit: (not a git checkout)"'

part build "$(limit "${GPU_CHECK_BUILD_S:-200}" 150)" bash -c '
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  '"$PY"' -m pip install --no-build-isolation --no-deps -e . && exit 0
  # a setuptools older than 77 rejects pyproject.toml (its license field) before building
  # anything: build the extension in place without it (gfs is then imported through PYTHONPATH)
  echo "== pip install -e failed; building the extension in place without pyproject.toml"
  mv pyproject.toml pyproject.toml.gpu-check || exit 1
  trap "mv pyproject.toml.gpu-check pyproject.toml" EXIT
  '"$PY"' setup.py build_ext --build-lib build/gpu-check || exit 1
  cp build/gpu-check/gfs_kernels/_C*.so src/gfs_kernels/'

# the extension must import and carry its CUDA kernels before anything is timed
part tests "$(limit 150 100)" bash -c '
  '"$PY"' -c "import torch, gfs_kernels; from gfs_kernels import _ops; print(\"extension:\", _ops.load_error or \"ok\", \"| CUDA kernels:\", _ops.has_cuda_kernels()); print(gfs_kernels.availability(\"cuda\" if torch.cuda.is_available() else \"cpu\"))"
  rc=0
  '"$PY"' -m pytest -q -rs -p no:cacheprovider tests/test_build.py \
    "tests/test_gpu_kernels.py::test_cuda_kernels_are_sm90_and_spill_free" || rc=1
  '"$PY"' -m pytest -v -rs -p no:cacheprovider -m gpu tests/test_gpu_kernels.py tests/test_triton_gram.py || rc=1
  exit $rc'

BENCH_LIMIT=$(limit 600 15)
if [[ $DRY == 1 ]]; then
  part bench "$BENCH_LIMIT" "$PY" benchmarks/bench_gpu.py --dry-run --out "$OUT" --deadline-s $((BENCH_LIMIT - 30))
else
  # priority: the large streaming shape (both dtypes), the Gram loop, host streaming, then the
  # ResNet-50 layer4 shape and the synchronisation count
  part bench "$BENCH_LIMIT" "$PY" benchmarks/bench_gpu.py --out "$OUT" \
    --parts stream:N16384_M262144,gram,host,stream:resnet50_layer4,syncs \
    --k-select 64 --reps-select 1 --deadline-s $((BENCH_LIMIT > 90 ? BENCH_LIMIT - 75 : 15))
fi

# ---- summary ------------------------------------------------------------------------------------
{
  echo "# GPU check: $(grep -m1 '^device' "$OUT/env.log" 2>/dev/null | cut -d' ' -f2- || echo unknown device)"
  echo
  echo "$(date -u +%FT%TZ); commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown);" \
    "$(grep -m1 '^torch' "$OUT/env.log" 2>/dev/null); $(grep -m1 '^triton' "$OUT/env.log" 2>/dev/null);" \
    "whole run $(elapsed) s of a ${BUDGET} s budget$([[ $DRY == 1 ]] && echo '; DRY RUN on a machine without a GPU: no GPU figure')."
  echo
  echo "| part | status | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  for name in "${FAILED[@]+"${FAILED[@]}"}"; do
    echo "## $name: last lines of $name.log"
    echo
    echo '```'
    tail -n 40 "$OUT/$name.log"
    echo '```'
    echo
  done
  if [[ -f $OUT/tests.log ]]; then
    echo "## tests: results"
    echo
    echo '```'
    grep -E "^extension|FAILED|ERROR|SKIPPED|[0-9]+ (passed|failed|skipped|error)" "$OUT/tests.log" | tail -n 30
    echo "($(grep -c " PASSED" "$OUT/tests.log") GPU tests passed, $(grep -c " FAILED" "$OUT/tests.log") failed)"
    echo '```'
    echo
  fi
  for md in "$OUT"/gpu-*.md; do
    [[ -f $md ]] && sed 's/^# /## /' "$md" && echo
  done
} >"$OUT/summary.md"
cat "$OUT/summary.md"
