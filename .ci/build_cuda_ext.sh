#!/usr/bin/env bash
# Builds the CUDA extension utilrank_kernels._C in place (utilrank_kernels/_C*.so, build/ for objects).
# Needs nvcc, not a GPU. Usage: .ci/build_cuda_ext.sh   (env: PYTHON, CUDA_HOME, TORCH_CUDA_ARCH_LIST,
# MAX_JOBS). CUDA_HOME must be the toolkit's own folder: left to torch, it is guessed from the folder
# of the nvcc on PATH, which may be a wrapper (/usr/local/bin/nvcc), and the link then misses libcudart.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

is_toolkit() {  # a folder with bin/nvcc and libcudart
  local d="$1"
  [ -n "$d" ] && [ -x "$d/bin/nvcc" ] || return 1
  compgen -G "$d/lib64/libcudart.so*" >/dev/null || compgen -G "$d/lib/libcudart.so*" >/dev/null \
    || compgen -G "$d/targets/*/lib/libcudart.so*" >/dev/null
}

find_cuda_home() {
  local c nvcc here
  for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [ -n "$c" ] && is_toolkit "$c"; then readlink -f "$c"; return 0; fi
  done
  if nvcc="$(command -v nvcc)"; then
    # nvcc reports its real folder (_HERE_) even when PATH holds a wrapper script or a symlink.
    here="$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)"
    for c in "${here:+$here/..}" "$(dirname "$(dirname "$(readlink -f "$nvcc")")")"; do
      if [ -n "$c" ] && is_toolkit "$c"; then readlink -f "$c"; return 0; fi
    done
  fi
  for c in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV) /opt/cuda /usr/lib/cuda; do
    if is_toolkit "$c"; then readlink -f "$c"; return 0; fi
  done
  return 1
}

if ! CUDA_HOME="$(find_cuda_home)"; then
  echo "build_cuda_ext: no CUDA toolkit found (nvcc and libcudart); set CUDA_HOME" >&2
  exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export UTILRANK_BUILD_CUDA=1

echo "build_cuda_ext: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
start=$(date +%s)
"$PYTHON" setup.py -q build_ext --inplace
"$PYTHON" -c "import torch, utilrank_kernels._C; print('build_cuda_ext: loaded', utilrank_kernels._C.__file__)"
echo "build_cuda_ext: built in $(( $(date +%s) - start ))s"
