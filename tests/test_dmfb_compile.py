"""Every DMFB Triton kernel, at every autotune config, compiles to a cubin for sm_80 and sm_90 without
a GPU, with no register spills (the sm_90-only branches_wgrad9 and TMA kernels for sm_90 alone); the
tensor-core kernels use HMMA (sm_80) / HGMMA (sm_90), and the TMA kernels load by TMA (UTMALDG).

Compiled as a real launch specializes them: pointers 16-byte aligned, channel counts divisible by 16.
Spills are read from the cubin with the cuobjdump bundled in the triton wheel (stack frame and
local loads/stores). The compiles run in two child processes (CI has two cores)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
from dmfb_kernel_specs import compile_specs  # tests/dmfb_kernel_specs.py (test-only, beside this file)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CAPS = (80, 90)
# fp16 compiles to the same code as bf16 (same tiles, same instructions), so bf16 stands for both.
DTYPES = ("bf16", "fp32", "tf32")


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile_and_inspect(fn, signature, constexprs, options, divisible, cap):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", res)}
    ops = {op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass))
           for op in ("HMMA", "HGMMA", "LDL", "STL", "UTMALDG", "LDG.E.64", "LDG.E.128", "STG.E.128", "FFMA",
                      "HMUL2")}
    ops["ptx mul.rn.f32"] = kernel.asm["ptx"].count("mul.rn.f32")
    return dict(usage, **ops)


SM90_ONLY = ("wgrad9", "fwd_tma", "grad_tma", "dgrad_tma", "wgrad_tma")  # built for sm_90 only (dmfb._taps9, dmfb._tma)


def _worker(jobs):
    out = {}
    for cap, dtype in jobs:
        for name, fn, sig, cx, opts, div in compile_specs(dtype):
            if name.startswith(SM90_ONLY) and cap < 90:
                continue
            key = f"sm_{cap} {dtype} {name}"
            try:
                out[key] = _compile_and_inspect(fn, sig, cx, opts, div, cap)
            except Exception as e:  # reported per kernel by the test
                out[key] = {"exception": f"{type(e).__name__}: {str(e)[-2000:]}"}
    print("RESULTS " + json.dumps(out))


@pytest.fixture(scope="module")
def compiled():
    jobs = [(cap, dt) for cap in CAPS for dt in DTYPES]
    halves = [jobs[0::2], jobs[1::2]]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, __file__, json.dumps(h)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for h in halves]
    out = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULTS ")]
        if not lines:
            pytest.fail(f"compile worker crashed (rc {p.returncode}):\n{stderr[-3000:]}")
        out.update(json.loads(lines[-1][len("RESULTS "):]))
    return out


def test_every_kernel_and_config_compiles_without_spills(compiled):
    expected = {f"sm_{cap} {dt} {spec[0]}" for cap in CAPS for dt in DTYPES for spec in compile_specs(dt)
                if cap >= 90 or not spec[0].startswith(SM90_ONLY)}
    assert set(compiled) == expected
    bad = []
    for key, r in sorted(compiled.items()):
        if "exception" in r:
            bad.append(f"{key}: {r['exception']}")
        elif r.get("STACK", 0) or r.get("LOCAL", 0) or r["LDL"] or r["STL"]:
            bad.append(f"{key}: spills (STACK={r.get('STACK')} LOCAL={r.get('LOCAL')} LDL={r['LDL']} STL={r['STL']})")
    assert not bad, "\n".join(bad)


def test_tensor_cores_used(compiled):
    """fp16/bf16 and TF32 branch kernels run their dots on tensor cores (IEEE fp32 uses FMA by design)."""
    conv = [k for k in compiled if (" bf16 " in k or " tf32 " in k) and k.split()[2].split("[")[0] in
            ("fwd_lowp", "grad_lowp", "dgrad_lowp", "wgrad_lowp", "wgrad9_lowp", "fwd_tma_lowp", "grad_tma_lowp",
             "dgrad_tma_lowp", "wgrad_tma_lowp", "fwd_f32", "grad_f32", "dgrad_f32", "wgrad_f32")]
    assert conv
    for key in conv:
        op = "HGMMA" if key.startswith("sm_90") else "HMMA"
        assert compiled[key][op] > 0, f"{key}: no {op} instructions"
        if "_tma_" in key:
            assert compiled[key]["UTMALDG"] > 0, f"{key}: no TMA loads"


def test_thin_conv_kernels(compiled):
    """The thin-input convolution's dots run on tensor cores in bf16 and TF32 (HMMA, or HGMMA where the tile has
    64 pixels or more on sm_90), and its 4-channel gathers load each pixel's channels as one 8-byte vector."""
    thin = [k for k in compiled if k.split()[2] in ("thin_conv_fwd", "thin_conv_wgrad")]
    assert thin
    for key in thin:
        if " fp32 " not in key:
            assert compiled[key]["HMMA"] + compiled[key]["HGMMA"] > 0, f"{key}: no tensor-core instructions"
        if " bf16 " in key and ("thin_conv_fwd generator input" in key
                                 or "thin_conv_fwd discriminator input" in key):  # (the wgrad's dy rows load wider)
            assert compiled[key]["LDG.E.64"] > 0, f"{key}: no 8-byte gathers"


def test_centroid_sums_kernels(compiled):
    """The centroid loss's Triton forward reads each pixel's channels as 16-byte vectors, both maps' STEPS loads a
    step (at the training plan 8 a map in fp32, 4 in 16 bits), with no narrower global load, in runs of pixels and
    in whole planes (with DMFN_CENTROID_APART, map b's pixels half a run ahead of map a's, half those loads; the
    runs also with DMFN_CENTROID_INTERLEAVE, their steps interleaved over the image's programs); the finish
    loads its runs' sums 16 bytes a thread; the gradient stores 16 bytes a thread (the spill check above covers
    them all). On sm_90 the sums kernels fit 128 registers, so two programs of 8 warps share an SM as the plans
    assume (Triton 3.6 once took 171-255 for them without spilling: .ci/triton_stack_check.sh)."""
    from dmfn_fast.kernels import centroid_sums as kc

    two_a_sm = [k for k in compiled if k.startswith("sm_90") and k.split()[2] in ("centroid_pair_sums",
                                                                                    "centroid_plane_sums")]
    # fp32, bf16, fp16 x pair sums (C 512: plain, apart, interleaved, both, one map, one map interleaved; C 1032),
    # plane sums (apart or not)
    assert len(two_a_sm) == 3 * 9
    over = {k: compiled[k]["REG"] for k in two_a_sm if compiled[k]["REG"] > 65536 // (2 * 32 * kc.WARPS)}
    assert not over, over

    sums = [k for k in compiled if k.split()[2] == "centroid_pair_sums" and " C512" in k]
    planes = [k for k in compiled if k.split()[2] == "centroid_plane_sums"]
    assert len(sums) == 3 * len(planes) == 2 * 3 * 6  # sm_80, sm_90 x fp32, bf16, fp16 x the variants above
    for key in sums + planes:
        loads = 2 * kc.STEPS[4 if " fp32 " in key else 2] // (2 if key.endswith(" apart") else 1)
        assert compiled[key]["LDG.E.128"] == loads and compiled[key]["LDG.E.64"] == 0, (key, compiled[key])
    finishes = [k for k in compiled if k.split()[2] == "centroid_finish"]
    assert len(finishes) == 2 * 2  # sm_80, sm_90 x 16 runs a round, FINISH_RUNS
    for key in finishes:  # each thread's share of the [RUNS, PLANES] tiles in 16-byte loads, one a tile per 4 values
        runs = int(key.split()[3][len("runs"):])
        assert compiled[key]["LDG.E.128"] == 6 * runs * kc.FINISH_PLANES // (kc.FINISH_WARPS * 32 * 4), (key,
                                                                                                      compiled[key])
    assert any(k.split()[2] == "centroid_sum_shares" for k in compiled)
    grads = [k for k in compiled if k.split()[2] == "centroid_grad" and " C512" in k]
    assert len(grads) == 2 * 3
    for key in grads:  # its stores: 16 bytes a thread, as the loads
        assert compiled[key]["STG.E.128"] > 0 and compiled[key]["LDG.E.64"] == 0, (key, compiled[key])


def test_l1_loss_kernels(compiled):
    """The losses' L1 forward rounds each product before the subtraction, as ATen does. Plain multiplies (even
    rounded to 16 bits right after) were narrowed and contracted with the subtraction into one FMA
    (fma.rn.bf16x2 in the PTX; on sm_80 and for fp16 no HMUL2 shows it in the SASS): every product is an
    inline mul.rn.f32 (2 per element, 16 elements per thread), and the fp32 SASS has no FFMA. 16-byte loads."""
    fwd = [k for k in compiled if k.split()[2] == "l1_sign_fwd"]
    assert any(k.endswith(" fp16") for k in fwd)
    for key in fwd:
        guided = key.split()[3] != "g0"
        assert compiled[key]["ptx mul.rn.f32"] == (32 if guided else 0), f"{key}: products not by mul.rn"
        assert compiled[key]["FFMA"] == 0, f"{key}: a contracted product"
        assert compiled[key]["LDG.E.128"] > 0, f"{key}: no 16-byte loads"


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
