#!/usr/bin/env bash
# One command for a rented GPU: every test on CUDA, the kernel benchmarks and the end-to-end benchmarks,
# then one summary table. Usage: bash benchmarks/gpu_check.sh OUT_DIR   (keeps to ~10 min on an H100)
# Install first on the GPU box (torch already there): pip install --no-deps --no-build-isolation -e .
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python}
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, platform
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"missing ({e})"
print("card:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv, "python", platform.python_version())
PY
rc=0
$PY -m pytest tests -q -x -rs 2>&1 | tee "$OUT/tests.txt" | tail -n 30 || rc=1
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
$PY -m pytest benchmarks -q -rs --benchmark-json="$OUT/bench.json" --benchmark-min-rounds=10 \
  --benchmark-warmup=on --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.txt" | tail -n 60
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
$PY benchmarks/summarize.py "$OUT/bench.json" "$OUT/env.txt" | tee "$OUT/summary.md"
exit $rc
