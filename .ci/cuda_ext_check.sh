#!/usr/bin/env bash
# CI step (only where nvcc is on PATH): compile-check the CUDA kernels with plain nvcc, then build, link and load
# the real CUDA extension (setup.py's CUDAExtension) against the CUDA build of torch 2.14.1 in a separate venv,
# and assert that the dmfn_fast:: ops register CUDA kernels. Needs no GPU; running the kernels does.
# Re-runs reuse the venv and the ninja build directory. DMFN_CUDA_VENV overrides the venv path.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "cuda_ext_check: nvcc not on PATH, skipped"
  exit 0
fi
start=$(date +%s)
bash .ci/nvcc_check.sh

VENV=${DMFN_CUDA_VENV:-.venv-cuda}   # .venv*/ is git-ignored
TORCH_PIN=2.14.1                     # lies on this machine's disk; another version would download GBs
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(not (torch.__version__.startswith('$TORCH_PIN') and torch.version.cuda))" \
    2>/dev/null; then
  echo "cuda_ext_check: creating $VENV with torch==$TORCH_PIN (CUDA build)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # --no-compile: byte-compiling torch's sources would double the install time.
  { "$PY" -m pip install -q --no-compile "torch==$TORCH_PIN" numpy setuptools 2>&1; } \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi

# The toolkit root of the nvcc on PATH (/usr/local/bin/nvcc may be a wrapper script).
CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
CUDA_HOME=$(cd "$CUDA_HOME" && pwd -P)
export CUDA_HOME
# The system toolkit has only nvcc and cudart; the other CUDA headers and libraries come with torch's pip wheels.
NV="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
export CPATH="$NV/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$NV/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-2}
echo "cuda_ext_check: CUDA_HOME=$CUDA_HOME, torch $("$PY" -c 'import torch; print(torch.__version__)')"

BUILD="$VENV/dmfn-ext-build"
"$PY" setup.py -q build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib"

"$PY" - "$BUILD/lib" <<'PYEOF'
import glob, sys
import torch
lib = glob.glob(f"{sys.argv[1]}/dmfn_fast/_C*.so")
assert len(lib) == 1, f"expected one built dmfn_fast._C, found {lib}"
torch.ops.load_library(lib[0])
for op in ("dmfn_fast::centroid_align_fwd", "dmfn_fast::centroid_align_bwd"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
print(f"cuda_ext_check: {lib[0]} loads; dmfn_fast::centroid_align_fwd/_bwd have CPU and CUDA kernels")
if torch.cuda.is_available():  # a GPU here: run the kernels once against the CPU op
    # The schema lives in dmfn_fast/ops/centroid_align.py (not importable in this bare venv); the
    # dispatcher checks these kernels' signatures against it, so a drift fails here.
    lib_ = torch.library.Library("dmfn_fast", "FRAGMENT")
    lib_.define("centroid_align_fwd(Tensor f_out, Tensor f_tgt) -> (Tensor, Tensor)")
    lib_.define("centroid_align_bwd(Tensor grad, Tensor stats, Tensor like, int which) -> Tensor")
    a, b = torch.rand(2, 64, 9, 12, device="cuda"), torch.rand(2, 64, 9, 12, device="cuda")
    got = torch.ops.dmfn_fast.centroid_align_fwd(a, b)[1].cpu()
    want = torch.ops.dmfn_fast.centroid_align_fwd(a.cpu(), b.cpu())[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    print("cuda_ext_check: CUDA kernels match the CPU op")
PYEOF
echo "cuda_ext_check: ok in $(( $(date +%s) - start )) s"
