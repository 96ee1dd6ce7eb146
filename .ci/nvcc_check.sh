#!/usr/bin/env bash
# Compile-check csrc/centroid_align_kernel.cu with plain nvcc (no torch) for sm_80 and sm_90, and fail on any
# register spill or local memory (ptxas -v: stack frame, spill stores/loads, lmem). Skips without nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "nvcc_check: nvcc not on PATH, skipped"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
declare -A pid
for arch in 80 90; do  # both at once: about 10 s of CPU each
  nvcc -c -O3 -std=c++17 -arch=sm_$arch -Xptxas -v csrc/centroid_align_kernel.cu -o "$tmp/k$arch.o" \
    >"$tmp/log$arch" 2>&1 &
  pid[$arch]=$!
done
for arch in 80 90; do
  log="$tmp/log$arch"
  if ! wait "${pid[$arch]}"; then
    echo "nvcc_check: sm_$arch failed to compile:"; cat "$log"; exit 1
  fi
  kernels=$(grep -c "bytes stack frame" "$log" || true)
  bad=$(grep -E "(^|[^0-9])[1-9][0-9]* bytes (stack frame|spill stores|spill loads)|[1-9][0-9]* bytes lmem" "$log" || true)
  if [ "$kernels" -eq 0 ]; then
    echo "nvcc_check: sm_$arch: no ptxas report found:"; cat "$log"; exit 1
  fi
  if [ -n "$bad" ]; then
    echo "nvcc_check: sm_$arch: spills or local memory:"; grep -B2 -E "[1-9][0-9]* bytes (stack|spill)|lmem" "$log"; exit 1
  fi
  echo "nvcc_check: sm_$arch ok ($kernels functions, 0 spills, 0 bytes stack/local memory)"
done
