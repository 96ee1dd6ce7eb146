#!/usr/bin/env bash
# CI step: the cubin check (tests/test_dmfb_compile.py: every Triton kernel compiles for sm_80/sm_90 with no
# spills, with tensor cores where it dots) under the Triton of the GPU machines the benchmarks run on (3.6.0,
# torch 2.11's pin), in a venv of its own. CI's own venv takes the newest Triton setup.py admits (3.7.x), and
# the two differ: under 3.6 the centroid sums kernels first spilled (its coalescing put warps along another
# dimension of a 3-D load) and the IEEE fp32 thin convolution took a 7 KB stack, where 3.7.1 compiled both
# clean. Needs PyPI once (about 160 MB); without it, says so and skips. DMFN_TRITON_PIN picks another version.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PIN=${DMFN_TRITON_PIN:-3.6.0}
VENV=.venv-triton${PIN//./}   # .venv*/ is git-ignored
PY="$VENV/bin/python"
quiet() { { "$@" 2>&1; } | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if ! "$PY" -c "import triton, sys; sys.exit(triton.__version__ != '$PIN')" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # torch's CPU wheel (on this machine's disk) only imports the package; the compiles need no GPU
  if ! quiet "$PY" -m pip install -q --no-compile torch==2.13.0 "triton==$PIN" numpy pillow pytest setuptools \
      wheel; then
    echo "triton_stack_check: could not install triton==$PIN (no network?): skipped"
    rm -rf "$VENV"
    exit 0
  fi
fi
DMFN_NO_EXT=1 quiet "$PY" -m pip install -q --no-deps --no-build-isolation -e .
versions=$("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')
echo "triton_stack_check: $versions"
"$PY" -m pytest -q -p no:cacheprovider tests/test_dmfb_compile.py
echo "triton_stack_check: ok in $(( $(date +%s) - start )) s"
