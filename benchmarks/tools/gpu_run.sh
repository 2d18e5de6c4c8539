#!/usr/bin/env bash
# The one script to run when a GPU is lent (H100/H200, no internet), in under 8 minutes:
#   1. builds the CUDA extension if nvcc is there (.ci/build_cuda_ext.sh, at most BUILD_SECONDS);
#   2. benchmarks/tools/gpu_run.py (`benchmarks/run.py gpu-run`): the GPU tests, each kernel against two cuBLAS
#      calls (with and without a GELU, eager and torch.compile'd) beside the roofline's ideal, ViT-B/16 at 50%
#      params in bf16 at batch 1 (CUDA graphs) and 64, each step at most STEP_SECONDS;
#   3. one summary table; results in benchmarks/results/<device>_gpu-*.json.
# Usage: bash benchmarks/tools/gpu_run.sh [gpu-run options, e.g. --steps kernels --quick]
# Env: PYTHON (default python3), BUILD_SECONDS (150), STEP_SECONDS (100).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
BUILD_SECONDS="${BUILD_SECONDS:-150}"
STEP_SECONDS="${STEP_SECONDS:-100}"
started=$(date +%s)

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_run: no CUDA device visible to $PYTHON; nothing to measure" >&2
  exit 2
fi
"$PYTHON" -c "import torch; print('gpu_run:', torch.cuda.get_device_name(), 'torch', torch.__version__)"

if command -v nvcc >/dev/null 2>&1; then
  # the build's failure is reported and the run goes on: the extension's tests then skip, the rest runs
  if ! MAX_JOBS="${MAX_JOBS:-8}" timeout "$BUILD_SECONDS" bash .ci/build_cuda_ext.sh; then
    echo "gpu_run: the CUDA extension did not build (see above); continuing without it" >&2
  fi
else
  echo "gpu_run: no nvcc on PATH: the CUDA extension is not built; continuing without it"
fi

"$PYTHON" benchmarks/run.py gpu-run --step-seconds "$STEP_SECONDS" "$@"
rc=$?
echo "gpu_run: done in $(( $(date +%s) - started ))s (rc $rc)"
exit $rc
