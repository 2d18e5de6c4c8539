#!/usr/bin/env bash
# The one script to run when a GPU is lent (H100/H200, no internet, nothing installable): two calls of at most
# about 5 minutes each, every step under its own time limit, every result under $OUT (the folder a lent machine
# gives back; a new folder under /tmp when $OUT is unset, printed), the package imported from this tree (no
# install: PYTHONPATH starts with the tree).
#
#   bash benchmarks/gpu_run.sh --call 1   # probe, build the CUDA extension, linear/MLP/covariance kernels
#   bash benchmarks/gpu_run.sh --call 2   # the GPU tests, M 1/8/16 under CUDA graphs, tuned choice, ViT-B/16
#   bash benchmarks/gpu_run.sh --dry-run  # every step's setup on a CPU, made-up timings (CI runs it)
#
# Results: $OUT/<device>_gpu-<step>.json per step and $OUT/gpu_run-<call>.log (this script's whole output);
# the steps and what each measures: benchmarks/tools/gpu_run.py. Other options go to it (--steps A,B,
# --call-seconds S). Env: PYTHON (default python3), OUT.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

label=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) label="dry-run" ;;
    --call=*) label="call${arg#--call=}" ;;
  esac
done
prev=""
for arg in "$@"; do
  [ "$prev" = "--call" ] && [ "$label" != "dry-run" ] && label="call$arg"
  prev="$arg"
done
if [ -z "$label" ] && [ $# -eq 0 ]; then
  echo "usage: bash benchmarks/gpu_run.sh --call 1 | --call 2 | --dry-run [gpu_run.py options]" >&2
  exit 2
fi

OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/utilrank-gpu-run.XXXXXX")}"
export OUT
mkdir -p "$OUT"
log="$OUT/gpu_run-${label:-steps}.log"
started=$(date +%s)
{
  echo "gpu_run: $(date -u +%Y-%m-%dT%H:%M:%SZ) ${label:-steps} in $ROOT; results in $OUT; python $PYTHON"
  "$PYTHON" -m benchmarks.tools.gpu_run --out-dir "$OUT" "$@"
  rc=$?
  echo "gpu_run: done in $(( $(date +%s) - started ))s (rc $rc); results in $OUT"
  exit $rc
} 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
