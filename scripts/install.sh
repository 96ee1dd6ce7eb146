# Sourced by demo.sh and test.sh: a venv in .venv with torch, triton and this package (C++ extension built).
# Triton stays below 3.8: 3.9 spills registers in the fp32 DMFB kernels on sm_80 (tests/test_dmfb_compile.py).
# TORCH_SPEC picks torch (default: the CPU wheel this project's CI uses; on a GPU box install your CUDA torch
# into .venv first, or set TORCH_SPEC, e.g. TORCH_SPEC="torch==2.11.*").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -c "import triton" 2>/dev/null || pip install -q "triton>=3.1,<3.8" || echo "triton unavailable: fused kernels disabled"
pip install -q setuptools wheel
pip install -q --no-build-isolation -e ".[${EXTRAS:-test}]"
