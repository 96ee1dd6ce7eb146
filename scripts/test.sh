#!/usr/bin/env bash
# Install everything into .venv and run the whole test suite (CPU; CUDA tests skip without a GPU),
# the benchmarks in quick mode, the cubin check under the GPU machines' Triton, and, where nvcc is present, the
# real CUDA-extension build check.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test . scripts/install.sh
DMFN_BENCH_QUICK=1 python -m pytest tests benchmarks -q \
  --benchmark-min-rounds=3 --benchmark-max-time=0.05 --benchmark-warmup=off --benchmark-columns=min,median,rounds
bash .ci/triton_stack_check.sh
if command -v nvcc >/dev/null && [ -f .ci/cuda_ext_check.sh ]; then
  bash .ci/cuda_ext_check.sh
fi
