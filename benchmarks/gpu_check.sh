#!/usr/bin/env bash
# The staged GPU check: about 10-12 minutes on an H200 with every stage (docs/testing.md lists each stage's
# time), so in a 15-minute lease skip what is not needed (GPU_CHECK_SKIP). Each stage has its own time limit
# and logs to OUT/log.txt as it goes, so a stage that fails or runs out still leaves the others' results.
#   bash benchmarks/gpu_check.sh OUT          CUDA machine: installs this checkout (--no-deps), then checks and times
#   bash benchmarks/gpu_check.sh --dry OUT    CPU, tiny sizes, kernels interpreted: proves the script runs (CI)
#   GPU_CHECK_SKIP="ncu e2e" bash ...        skips the named stages (to fit what is left of a lease)
#   GPU_CHECK_E2E_ONLY="fast,amp" bash ...   runs only those end-to-end variants
# OUT gets 8 files (what the GPU tool brings back): env.txt, stages.txt, log.txt, compile_parity.jsonl,
# breakdown.jsonl, e2e.jsonl, summary.json, summary.md. The optional ncu report goes into log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = --dry ]; then DRY=1; shift; fi
OUT=${1:?usage: gpu_check.sh [--dry] OUT_DIR}
# every stage's name (tests/test_gpu_check.py holds this to the stage calls below): a misspelt skip would run a
# stage the lease has no time for, so it is refused before any work
STAGES="install build-ext tests-dmfb tests-centroid tests-recipe train-smoke compile-parity compile-parity-opaque
        sanitizer sanitizer-case breakdown e2e e2e-opaque ncu-case ncu-centroid-case ncu ncu-centroid"
STAGES=$(echo $STAGES)  # one space between names
for s in ${GPU_CHECK_SKIP:-}; do
  if [[ " $STAGES " != *" $s "* ]]; then
    echo "GPU_CHECK_SKIP: there is no stage '$s'; the stages are: $STAGES" >&2
    exit 2
  fi
done
for a in ${GPU_CHECK_BREAKDOWN_ARGS:-}; do  # gpu_breakdown.py's options are all switches
  if ! grep -q -- "add_argument(\"$a\", action=\"store_true\"" benchmarks/gpu_breakdown.py; then
    echo "GPU_CHECK_BREAKDOWN_ARGS: gpu_breakdown.py has no switch '$a' (python benchmarks/gpu_breakdown.py -h)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
LOG=$OUT/log.txt
DRYFLAG=(); [ $DRY = 1 ] && DRYFLAG=(--dry)
rc=0

stage() {  # stage NAME LIMIT_S CMD...: run CMD under LIMIT_S seconds, append its output to log.txt
  local name=$1 limit=$2 t0=$SECONDS r; shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    echo "$name: skipped (GPU_CHECK_SKIP)" >> "$OUT/stages.txt"; return 0
  fi
  echo "===== stage $name (limit ${limit}s) =====" >> "$LOG"
  timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1; r=$?
  echo "$name: rc=$r, $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/stages.txt" >> "$LOG"
  [ $r = 0 ] || rc=1
  return $r
}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  uname -r
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv,noheader 2>&1 || true
  $PY -c "import torch, triton, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
      triton.__version__)
print('card', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  $PY -c "import setuptools; print('setuptools', setuptools.__version__)"
  # the host's speed: eager rows are host-bound, and two H200 machines' hosts differed by about 1.5x
  grep -m1 'model name' /proc/cpuinfo || true
  $PY -c "import time, torch
a = torch.ones(4); t = time.perf_counter(); [a.add(a) for _ in range(20000)]
print('host: %.2f us per torch.add of 4 CPU floats' % ((time.perf_counter() - t) / 20000 * 1e6))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. install, exactly as the README says, with the extension built for this card only; if the editable
#    install is unusable there, the source tree with the extension built in place.
if [ $DRY = 0 ]; then
  export TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export MAX_JOBS=${MAX_JOBS:-16}
  stage install 240 $PY -m pip install --no-deps --no-build-isolation -e .
  if ! $PY -c "import dmfn_fast._C, dmfn_fast.kernels" >> "$LOG" 2>&1; then
    echo "the install is unusable: running from the source tree" | tee -a "$OUT/stages.txt" >> "$LOG"
    ln -sfn ../kernels dmfn_fast/kernels
    stage build-ext 240 $PY setup.py build_ext --inplace
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "from dmfn_fast.ops import centroid_align as ca
ca.extension_available(); print('extension:', ca._ext_state)" 2>&1 | tee -a "$LOG" "$OUT/stages.txt"
fi

# 2. correctness on CUDA at full sizes: the Triton DMFB tests, then (extension built) the centroid tests,
#    then compute-sanitizer memcheck on one small fused DMFB forward+backward and one centroid call.
#    The DMFB tests' time is mostly Triton compiling and autotuning on the host (51 tests: 91 s in s4; cut at
#    180 s after 44 in s7, on a slower host; 60 tests in 4 processes: 159 s in s10; s13 and s14 added about 25),
#    so on the GPU machine (16 cores) they run in 8 processes.
XDIST=()
[ $DRY = 0 ] && $PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stage tests-dmfb 240 $PY -m pytest tests/test_dmfb_cuda.py -q -rs -p no:cacheprovider --durations=8 "${XDIST[@]}"
# the CUDA tests only (the CPU ones and the nvcc check run in CI): the centroid op's, and the training step
# captured as a CUDA graph (train.py --cuda-graphs) against the eager step; in 8 processes too: the Triton
# forward's test compiles about 90 kernel specializations (plans x dtypes x shapes), one at a time otherwise
stage tests-centroid 150 $PY -m pytest tests/test_centroid_align.py tests/test_graphed.py -q -rs -p no:cacheprovider \
  -k "cuda and not compile_without_spills" "${XDIST[@]}"
# recipe="authors": reference and fast paths (fused DMFB + C++ op on CUDA) give the same 3 training steps
stage tests-recipe 60 $PY -m pytest tests/test_recipe.py -q -rs -p no:cacheprovider -k same_steps
# train.py as users run it: --amp (bf16), --amp --amp-dtype fp16, both with --cuda-graphs, and --amp --compile
# --compile-mode reduce-overhead, 50 steps each at 256 px, finite losses; two at once, the compiled run first (its
# compile is host work, which the other runs' steps overlap: about 150 s expected, about 290 one at a time)
stage train-smoke 330 $PY benchmarks/gpu_train_smoke.py "${DRYFLAG[@]}" --jobs 2
# torch.compile of the fused ops must give what their eager runs give (op by op, and the generator); on
# CUDA Inductor traces into the Triton kernels (the default; the interpreter cannot, so --dry runs opaque ops)
stage compile-parity 150 $PY benchmarks/gpu_compile_parity.py "$OUT" "${DRYFLAG[@]}"
# the same with the ops opaque to the compiler (DMFN_TRITON_OP=0)
[ $DRY = 1 ] || stage compile-parity-opaque 150 env DMFN_TRITON_OP=0 $PY benchmarks/gpu_compile_parity.py "$OUT"
# (48 s in s18; the Triton plans since, each dtype's kernels compiled once under the tool, may take 40-60 s more)
if [ $DRY = 0 ] && command -v compute-sanitizer >/dev/null; then
  stage sanitizer 180 compute-sanitizer --tool memcheck --error-exitcode 7 $PY benchmarks/gpu_sanitize_case.py
elif [ $DRY = 1 ]; then  # its centroid plans and small kernels, interpreted, so the workload cannot rot
  stage sanitizer-case 120 $PY benchmarks/gpu_sanitize_case.py --dry
fi

# 3. per-kernel breakdown and op baselines; 4. end to end.
# GPU_CHECK_BREAKDOWN_ARGS: more arguments (--centroid-only: the ceilings and the centroid rows alone, for a
# lease that measures the centroid plans beside its other stages)
# shellcheck disable=SC2086  # zero or more arguments
stage breakdown 150 $PY benchmarks/gpu_breakdown.py "$OUT" "${DRYFLAG[@]}" ${GPU_CHECK_BREAKDOWN_ARGS:-}
# Each kernel switch as the breakdown measured it (gpu_adopt.py): on where its kernels beat the ones they
# replace by 3%, else off, for the end-to-end stage (its rows name them in "opt_in"). The choice is kept
# outside OUT, so that a later call on the same machine (a lease's second call, which skips the breakdown)
# takes it too. GPU_CHECK_ADOPT=0: defaults only.
STATE=${GPU_CHECK_STATE:-$HOME/.cache/dmfn-gpu-check}
[ $DRY = 1 ] && STATE=$(mktemp -d)
ADOPT=""
if [ "${GPU_CHECK_ADOPT:-1}" = 1 ]; then
  if [[ " ${GPU_CHECK_SKIP:-} " != *" breakdown "* ]] && [ -s "$OUT/breakdown.jsonl" ]; then
    # GPU_CHECK_ADOPT_GPU_ONLY=1: GPU time alone decides (this call's e2e rows are GPU-bound: a graphed step,
    # inference at batch 64), not also the eager per-call time
    BY=(); [ "${GPU_CHECK_ADOPT_GPU_ONLY:-0}" = 1 ] && BY=(--gpu-time-only)
    mkdir -p "$STATE" && $PY benchmarks/gpu_adopt.py "$OUT" "${BY[@]}" > "$STATE/adopt.env" 2>> "$OUT/stages.txt"
  fi
  ADOPT=$(cat "$STATE/adopt.env" 2>/dev/null)
  [ -n "$ADOPT" ] && echo "e2e runs with the kernel switches the breakdown chose: $ADOPT" >> "$OUT/stages.txt"
fi
[ $DRY = 1 ] && rm -rf "$STATE"
# --dry: the kernels that cost host time per call off (their default, graphs, takes them in the graphed
# step): interpreted, they took the graphed 32 px step to 76 s (the eager one 6 s) and the stage past its
# limit; the breakdown's dry run and the interpreter tests run them
[ $DRY = 1 ] && ADOPT="DMFN_BIAS_ACT=0 DMFN_MAX_POOL=0 DMFN_L1_KERNEL=0 DMFN_THIN_CONV=0"
# GPU_CHECK_E2E_ONLY="fast,amp+compile,...": only those variants (gpu_e2e.py --only), to fit a lease;
# GPU_CHECK_E2E_LIMIT: the stage's limit in seconds (360), for a call that gives it most of its time
E2E_ONLY=(); [ -n "${GPU_CHECK_E2E_ONLY:-}" ] && E2E_ONLY=(--only "$GPU_CHECK_E2E_ONLY")
# shellcheck disable=SC2086  # ADOPT: zero or more NAME=VALUE words
stage e2e "${GPU_CHECK_E2E_LIMIT:-360}" env $ADOPT $PY benchmarks/gpu_e2e.py "$OUT" "${DRYFLAG[@]}" "${E2E_ONLY[@]}"
# fast+compile again with the fused ops opaque to the compiler (DMFN_TRITON_OP=0; CUDA only), to compare
# shellcheck disable=SC2086
[ $DRY = 1 ] || stage e2e-opaque 240 env $ADOPT DMFN_TRITON_OP=0 $PY benchmarks/gpu_e2e.py "$OUT" --only fast+compile

# 5. optional: ncu on the fused branch kernels (speed of light, memory), then on the centroid op's kernels
#    beside a streaming read (also occupancy and stall reasons, DRAM bytes), where ncu exists; --dry runs the
#    profiled workloads alone, interpreted, so the cases cannot rot.
if [ $DRY = 1 ]; then
  stage ncu-case 120 $PY benchmarks/gpu_ncu_case.py --dry
  stage ncu-centroid-case 120 $PY benchmarks/gpu_ncu_case.py --dry --centroid
elif command -v ncu >/dev/null; then
  NCU_TXT=$(mktemp)
  stage ncu 120 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --nvtx --nvtx-include "profile/" -k "regex:branches" --log-file "$NCU_TXT" \
    $PY benchmarks/gpu_ncu_case.py
  { echo "===== ncu report ====="; cat "$NCU_TXT"; } >> "$LOG"; rm -f "$NCU_TXT"
  NCU_TXT=$(mktemp)
  KERNELS="pair_sums|plane_sums|_read_sum|_read_pair|_read_columns|finish_pairs|centroid_finish|grad_channels"
  KERNELS+="|centroid_grad"
  stage ncu-centroid 180 ncu --clock-control none --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section LaunchStats \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum \
    --nvtx --nvtx-include "profile/" \
    -k "regex:$KERNELS" \
    --log-file "$NCU_TXT" $PY benchmarks/gpu_ncu_case.py --centroid
  { echo "===== ncu centroid report ====="; cat "$NCU_TXT"; } >> "$LOG"; rm -f "$NCU_TXT"
fi

$PY benchmarks/gpu_summary.py "$OUT" >> "$LOG" 2>&1 || rc=1
echo; echo "stages:"; cat "$OUT/stages.txt"
grep -E "passed|failed|error" "$LOG" | grep -E "^[0-9=]|in [0-9.]+s" | head -5
echo; cat "$OUT/summary.md"
exit $rc
