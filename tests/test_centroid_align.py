"""The C++/CUDA centroid alignment op against the PyTorch reference (the ground truth).

Tolerances: fp32 centroids and S0 1e-6 relative; the fp32 loss 1e-6 relative where centroids differ
clearly, 1e-5 on i.i.d. noise, where the squared difference of two nearly equal centroids amplifies the
rounding of either implementation (the reference itself is ~4e-7 off the float64 value there);
bf16/fp16 1e-2.
"""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from dmfn_fast.ops import _impl
from dmfn_fast.ops import centroid_align as ca

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ext = pytest.mark.skipif(not ca.extension_available(), reason=f"dmfn_fast extension not available: "
                         f"{ca._ext_state['why']}")
cuda_ext = pytest.mark.skipif(not (torch.cuda.is_available() and ca.has_kernel("cuda")),
                              reason="needs a CUDA GPU and the extension built with CUDA")


def fast(a, b):
    return ca.centroid_align_loss(a, b, impl="fast")


def unset_plan_switches(monkeypatch):
    """Unset every DMFN_CENTROID_* switch (ca.PLAN_SWITCHES), for this test."""
    for n in ca.PLAN_SWITCHES:
        monkeypatch.delenv(n, raising=False)


def rand(shape, seed, dtype=torch.float32, device="cpu", layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider map, and channels seen through a transpose
        wide = torch.rand((shape[0], shape[2], shape[1], 2 * shape[3]), generator=g, dtype=torch.float64)
        t = wide.transpose(1, 2)[..., ::2]
        assert not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last)
    elif layout == "cropped":  # unit-stride rows inside a bigger map: walked by planes, in place
        big = torch.rand((shape[0], shape[1], shape[2] + 2, shape[3] + 3), generator=g, dtype=torch.float64)
        t = big[:, :, 1:-1, 2:-1]
    elif layout == "cl_sliced":  # unit-stride channels inside a wider channels-last map: walked by channels
        big = torch.rand((shape[0], shape[1] + 3, shape[2], shape[3]), generator=g, dtype=torch.float64)
        t = big.to(memory_format=torch.channels_last)[:, 1:-2]
    return t.to(device=device, dtype=dtype)


def stats(a, b):
    return torch.ops.dmfn_fast.centroid_align_fwd(a, b)[1]


def grads(fn, a, b):
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def assert_grads_close(got, want, rtol):
    # Gradients of large maps are tiny: in fp16 they are subnormal, where one rounding step
    # (the smallest subnormal, 6e-8) can exceed rtol * scale.
    scale = want.abs().max().item()
    fi = torch.finfo(got.dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=max(rtol * scale, fi.tiny * fi.eps))


LAYOUTS = ["contiguous", "channels_last", "strided", "cropped", "cl_sliced"]
SHAPES = [(1, 3, 1, 1), (2, 5, 3, 5), (1, 16, 32, 32), (2, 7, 17, 19)]


@ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout):
    a = rand((2, 2, 3, 5), 1, torch.float64, layout=layout).requires_grad_()
    b = rand((2, 2, 3, 5), 2, torch.float64, layout=layout).requires_grad_()
    assert torch.autograd.gradcheck(fast, (a, b))


@ext
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_parity(shape, layout):
    a, b = rand(shape, 3, layout=layout), rand(shape, 4, layout=layout)
    st = stats(a, b)
    for m, f in enumerate((a, b)):
        torch.testing.assert_close(st[m, ..., 1:], ca.centroids_reference(f), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st[m, ..., 0], (f + ca.EPS).sum(dim=(2, 3)), rtol=1e-6, atol=0)
    loss, ga, gb = grads(fast, a, b)
    want, wa, wb = grads(ca.centroid_align_loss_reference, a, b)
    assert loss.dtype == want.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-12)
    assert_grads_close(ga, wa, 1e-5)
    assert_grads_close(gb, wb, 1e-5)


@ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp32_loss_parity_1e6_when_centroids_differ(layout):
    shape = (2, 16, 13, 24)
    ramp = torch.linspace(0.1, 3.0, shape[3]).view(1, 1, 1, -1)
    a = rand(shape, 5, layout=layout) * ramp            # mass pushed right
    b = rand(shape, 6, layout=layout) * ramp.flip(-1)   # mass pushed left
    torch.testing.assert_close(fast(a, b), ca.centroid_align_loss_reference(a, b), rtol=1e-6, atol=0)


@ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_parity(dtype, layout):
    a, b = rand((2, 8, 9, 11), 7, dtype, layout=layout), rand((2, 8, 9, 11), 8, dtype, layout=layout)
    loss, ga, gb = grads(fast, a, b)
    want, wa, wb = grads(ca.centroid_align_loss_reference, a, b)
    assert loss.dtype == torch.float32 and ga.dtype == gb.dtype == dtype
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=0)
    assert_grads_close(ga, wa, 1e-2)
    assert_grads_close(gb, wb, 1e-2)


@ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_zero_and_negative_sum_channels(layout):
    a, b = rand((2, 4, 6, 5), 9), rand((2, 4, 6, 5), 10)
    a[:, 0] = 0                 # the eps alone sets the centroid: the mean of the grid
    b[:, 1] = -b[:, 1]          # negative sum
    b[0, 2] = 0
    a, b = a.contiguous(memory_format=torch.channels_last) if layout != "contiguous" else a, b
    loss, ga, gb = grads(fast, a, b)
    want, wa, wb = grads(ca.centroid_align_loss_reference, a, b)
    assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    assert_grads_close(ga, wa, 1e-4)  # 1/S0 ~ 3e5 on the zero channel
    assert_grads_close(gb, wb, 1e-4)


@ext
def test_target_without_grad_gets_none_and_out_grad_matches():
    a, b = rand((2, 3, 4, 6), 11).requires_grad_(), rand((2, 3, 4, 6), 12)
    fast(a, b).backward()
    assert b.grad is None
    a2 = a.detach().clone().requires_grad_()
    ca.centroid_align_loss_reference(a2, b).backward()
    assert_grads_close(a.grad, a2.grad, 1e-5)


@ext
def test_backward_runs_one_kernel_and_no_zero_fill():
    """The backward is the gradient kernel alone: no zeros materialized for the stats' gradient (a fill kernel
    of [2, N, C, 3] per backward on the H200, s15), which it never reads."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = []
    a, b = rand((2, 16, 5, 6), 17).requires_grad_(), rand((2, 16, 5, 6), 18)
    loss, seed = fast(a, b), torch.tensor(0.5)
    with Ops():
        (g,) = torch.autograd.grad(loss, a, seed)
    assert seen == ["dmfn_fast.centroid_align_bwd.default"], seen
    a2 = a.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(ca.centroid_align_loss_reference(a2, b), a2, torch.tensor(0.5))
    assert_grads_close(g, want, 1e-5)


@ext
def test_mixed_dtypes_promote_like_the_reference():
    a, b = rand((1, 4, 5, 6), 13, torch.bfloat16), rand((1, 4, 5, 6), 14)
    torch.testing.assert_close(fast(a, b), ca.centroid_align_loss_reference(a, b), rtol=1e-5, atol=0)


@ext
def test_bad_inputs_raise_clear_errors():
    a = rand((1, 2, 3, 4), 15)
    with pytest.raises(ValueError, match="differ in shape"):
        fast(a, rand((1, 2, 4, 3), 16))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ca.centroid_align_loss(a[0], a[0])
    with pytest.raises(RuntimeError, match="differ in dtype"):
        torch.ops.dmfn_fast.centroid_align_fwd(a, a.double())
    with pytest.raises(RuntimeError, match="dtype must be"):
        torch.ops.dmfn_fast.centroid_align_fwd(a.int(), a.int())


@ext
def test_opcheck():
    for layout in ("contiguous", "channels_last"):
        a = rand((2, 3, 5, 4), 17, layout=layout).requires_grad_()
        b = rand((2, 3, 5, 4), 18, layout=layout)
        torch.library.opcheck(torch.ops.dmfn_fast.centroid_align_fwd.default, (a, b))
        torch.library.opcheck(torch.ops.dmfn_fast.centroid_align_fwd.default, (a, b, 13))  # a measured plan
    # The backward op on a channels-last map: its fake kernel must predict the gradient's strides.
    loss, st = torch.ops.dmfn_fast.centroid_align_fwd(a.detach(), b)
    torch.library.opcheck(torch.ops.dmfn_fast.centroid_align_bwd.default, (torch.ones(()), st, a.detach(), 1))


@ext
def test_torch_compile_smoke():
    torch._dynamo.reset()
    a, b = rand((2, 4, 6, 10), 19).requires_grad_(), rand((2, 4, 6, 10), 20)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def weighted(x, y):
        return 2.0 * ca.centroid_align_loss(x, y)

    loss = weighted(a, b)
    loss.backward()
    a2 = a.detach().clone().requires_grad_()
    want = 2.0 * ca.centroid_align_loss_reference(a2, b)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    assert_grads_close(a.grad, a2.grad, 1e-5)


_TRITON_TRACE = r"""
import os
from dmfn_fast.ops import centroid_align as ca, dmfb
assert ca.extension_available()
os.environ["DMFN_CENTROID_TRITON"] = MODE
ca.triton_forward_why_not = lambda *args: ""  # it refuses CPU tensors: the graph is captured, never run
cl = torch.channels_last
a = torch.rand(2, 16, 6, 5).contiguous(memory_format=cl).requires_grad_()
b = torch.rand(2, 16, 6, 5).contiguous(memory_format=cl)
fn = torch.compile(lambda x, y: ca.centroid_align_loss(x, y, impl="fast"), fullgraph=True,
                   backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
try:
    fn(a, b)
except Captured:
    pass
print("TRITON_OP", dmfb._USE_TRITON_OP)
print("LAUNCHES", sum("triton_kernel_wrapper" in ln and "= torch.ops" in ln for ln in graphs[0].splitlines()))
print("CPP_FWD", "centroid_align_fwd(" in graphs[0])
"""


@ext
@pytest.mark.parametrize("mode", ["1", "3"])
def test_triton_forward_traces_into_its_kernels(mode):
    """torch.compile(fullgraph=True) of the loss with DMFN_CENTROID_TRITON=1 or 3 (traced with CPU tensors: the
    graph is captured, never run): the Triton forward's op is a triton_op, so the AOT forward graph holds its two
    kernel launches (sums and finish; whole-plane sums and the shares' sum), not the C++ forward."""
    if ca._kcs is None:
        pytest.skip("the Triton centroid forward did not import (Triton missing?)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # wrap_triton cannot trace interpreted kernels
    env.pop("DMFN_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    from test_dmfb_triton import CAPTURE_SCRIPT

    p = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT + f"MODE = {mode!r}\n" + _TRITON_TRACE],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = dict(ln.split(" ", 1) for ln in p.stdout.splitlines() if " " in ln)
    if out["TRITON_OP"] == "False":
        pytest.skip("this torch has no torch.library.triton_op / wrap_triton")
    assert (out["LAUNCHES"], out["CPP_FWD"]) == ("2", "False"), p.stdout


def test_measured_plans_are_forward_plans():
    """Each MEASURED_PLANS entry (the default plan a GPU run measured) is a (capability major, dtype) key and a
    forward plan: a Triton one (TRITON 1 to 4, its switches read in Python) or the C++ op's (given as its plan
    argument), no switch the other ignores, each a value the switch takes."""
    for (major, dtype), plan in ca.MEASURED_PLANS.items():
        assert isinstance(major, int) and dtype in (torch.float32, torch.float16, torch.bfloat16), (major, dtype)
        triton = plan.get("DMFN_CENTROID_TRITON", "0") != "0"
        assert plan and set(plan) <= set(ca.TRITON_PLAN_SWITCHES if triton else ca.CPP_PLAN_SWITCHES), plan
        assert all(v in _impl.SWITCHES[k] for k, v in plan.items()), plan


def test_plan_switches_are_every_centroid_switch():
    """The switches whose setting turns a measured plan off are every centroid switch the package has."""
    assert set(ca.PLAN_SWITCHES) == {n for n in _impl.SWITCHES if n.startswith("DMFN_CENTROID_")}
    assert set(ca.TRITON_PLAN_SWITCHES) | set(ca.CPP_PLAN_SWITCHES) < set(ca.PLAN_SWITCHES)


def test_measured_cpp_plan_is_the_ops_argument(monkeypatch):
    """A measured plan of the C++ op reaches it as its plan argument (bits 0-1 waves - 1, bit 2 the finish in
    blocks, bit 3 whole pixels; -1: the switches, read per call); none for another dtype, and none where a
    measured Triton plan cannot take the maps. A plan outside 0..15 is refused; the CPU kernel has one plan."""
    assert ca.cpp_plan({}) == -1
    assert ca.cpp_plan({"DMFN_CENTROID_PIXELS": "1", "DMFN_CENTROID_WAVES": "2"}) == 9
    assert ca.cpp_plan({"DMFN_CENTROID_BLOCK_FINISH": "1", "DMFN_CENTROID_WAVES": "4"}) == 7
    assert ca.cpp_plan({"DMFN_CENTROID_TRITON": "0"}) == 0
    unset_plan_switches(monkeypatch)
    a, b = rand((2, 3, 5, 4), 23), rand((2, 3, 5, 4), 24)
    loss = fast(a, b)
    plans = []
    real = torch.ops.dmfn_fast.centroid_align_fwd
    monkeypatch.setattr(torch.ops.dmfn_fast, "centroid_align_fwd",
                        lambda x, y, plan=-1: plans.append(plan) or real(x, y, plan), raising=False)
    monkeypatch.setattr(ca, "_capability_major", lambda f: 9)
    monkeypatch.setattr(ca, "MEASURED_PLANS", {(9, torch.float32): {"DMFN_CENTROID_PIXELS": "1",
                                                                    "DMFN_CENTROID_WAVES": "2"},
                                               (9, torch.float16): {"DMFN_CENTROID_TRITON": "2",
                                                                    "DMFN_CENTROID_WAVES": "2"}})
    assert torch.equal(fast(a, b), loss)  # the CPU kernel: one plan
    fast(a.double(), b.double())
    fast(a.half(), b.half())  # a Triton plan, CPU maps it cannot take (no interpreter): the C++ op's defaults
    monkeypatch.setenv("DMFN_CENTROID_GRAD_ROWS", "4")  # a switch set: no measured plan
    fast(a, b)
    assert plans == [9, -1, -1, -1], plans
    with pytest.raises(RuntimeError, match="plan must be -1"):
        real(a, b, 16)


def test_measured_plan_applies_only_where_no_switch_is_set(monkeypatch):
    """A measured plan is the default for its GPU and dtype alone: with any DMFN_CENTROID_* switch set (even to
    its default) that plan runs, its unset switches at their defaults; no plans, no device query."""
    unset_plan_switches(monkeypatch)
    f32, f16 = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4, dtype=torch.float16)
    monkeypatch.setattr(ca, "MEASURED_PLANS", {})
    monkeypatch.setattr(ca, "_capability_major", lambda f: pytest.fail("a device query with no measured plan"))
    assert ca.default_plan(f32) == {} and ca.plan_switch("DMFN_CENTROID_TRITON", ca.default_plan(f32)) == "0"
    plan = {"DMFN_CENTROID_TRITON": "2", "DMFN_CENTROID_ONE_MAP": "1"}
    monkeypatch.setattr(ca, "MEASURED_PLANS", {(9, torch.float32): plan})
    monkeypatch.setattr(ca, "_capability_major", lambda f: 9)
    assert [ca.plan_switch(n, ca.default_plan(f32)) for n in ca.TRITON_PLAN_SWITCHES] == ["2", "0", "0", "1", "1"]
    assert ca.default_plan(f16) == {} and ca.plan_switch("DMFN_CENTROID_TRITON", ca.default_plan(f16)) == "0"
    monkeypatch.setenv("DMFN_CENTROID_APART", " ")  # blank: unset
    assert ca.default_plan(f32) == plan
    monkeypatch.setenv("DMFN_CENTROID_GRAD_ROWS", "4")
    assert ca.default_plan(f32) == {} and ca.plan_switch("DMFN_CENTROID_TRITON", ca.default_plan(f32)) == "0"
    monkeypatch.setenv("DMFN_CENTROID_TRITON", "1")
    assert [ca.plan_switch(n, ca.default_plan(f32)) for n in ca.TRITON_PLAN_SWITCHES] == ["1", "0", "0", "0", "1"]
    unset_plan_switches(monkeypatch)
    monkeypatch.setattr(ca, "_capability_major", lambda f: 8)  # another GPU
    assert ca.default_plan(f32) == {}


@ext
def test_auto_uses_the_extension():
    a, b = rand((1, 3, 4, 5), 21), rand((1, 3, 4, 5), 22)
    assert ca.centroid_align_loss(a, b).item() == torch.ops.dmfn_fast.centroid_align_fwd(a, b)[0].item()


@pytest.mark.skipif(os.environ.get("DMFN_NO_EXT", "") not in ("", "0"), reason="DMFN_NO_EXT=1: built without the extension")
def test_the_install_built_the_extension():
    """`pip install --no-build-isolation -e .` (the README's install) builds dmfn_fast._C, and the op is
    served by it, not by the JIT build on first use (which needs a compiler and ~30 s at run time)."""
    import importlib

    importlib.import_module("dmfn_fast._C")
    assert ca.extension_available()
    assert ca._ext_state["source"] == "built", ca._ext_state


def _refuse_extension():
    raise AssertionError("the extension must not be consulted")


@pytest.mark.parametrize("how", ["impl", "env"])
def test_reference_forced(how, monkeypatch):
    monkeypatch.setattr(ca, "extension_available", _refuse_extension)
    a, b = rand((2, 3, 4, 5), 23), rand((2, 3, 4, 5), 24)
    if how == "env":
        monkeypatch.setenv("DMFN_IMPL", "reference")
        got = ca.centroid_align_loss(a, b, impl="auto")
    else:
        got = ca.centroid_align_loss(a, b, impl="reference")
    assert torch.equal(got, ca.centroid_align_loss_reference(a, b))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    def missing():
        raise ImportError("simulated: no module")

    monkeypatch.setattr(ca, "_import_built", missing)
    monkeypatch.setattr(ca, "_jit_build", missing)
    monkeypatch.setattr(ca, "_ops_registered", lambda: False)
    monkeypatch.setitem(ca._ext_state, "loaded", None)
    monkeypatch.setattr(_impl, "_warned", set())
    a, b = rand((2, 3, 4, 5), 25), rand((2, 3, 4, 5), 26)
    with pytest.warns(RuntimeWarning, match="reference") as record:
        first = ca.centroid_align_loss(a, b)
        second = ca.centroid_align_loss(a, b)
    assert len([w for w in record if "extension" in str(w.message)]) == 1
    assert "simulated" in str(record[0].message)
    assert torch.equal(first, ca.centroid_align_loss_reference(a, b)) and torch.equal(first, second)
    with pytest.raises(RuntimeError, match="impl='fast'.*simulated"):
        ca.centroid_align_loss(a, b, impl="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ca.centroid_align_loss(a, b)  # no second warning


def test_jit_build_is_tried_when_the_built_module_is_missing(monkeypatch):
    tried = []
    monkeypatch.setattr(ca, "_import_built", lambda: tried.append("built") or (_ for _ in ()).throw(ImportError()))
    monkeypatch.setattr(ca, "_jit_build", lambda: tried.append("jit"))
    monkeypatch.setattr(ca, "_ops_registered", lambda: False)
    monkeypatch.setitem(ca._ext_state, "loaded", None)
    monkeypatch.setattr(_impl, "_warned", set())
    assert not ca.extension_available()  # the fake JIT registers nothing, so it still falls back
    assert tried == ["built", "jit"]


def test_schema_fake_and_autograd_registered_at_import():
    """Importing the module registers the op's schema, fake kernel and autograd, before any kernel loads
    (the extension loads, or JIT-builds, on first use only). The built .so adds kernels only."""
    code = (
        "import torch\n"
        "from dmfn_fast.ops import centroid_align as ca\n"
        "from torch._library.simple_registry import singleton\n"
        "assert ca._ext_state['loaded'] is None\n"
        "q = 'dmfn_fast::centroid_align_fwd'\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key(q, 'CPU')\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key(q, 'Autograd')\n"
        "for op in ('centroid_align_fwd', 'centroid_align_bwd'):\n"
        "    assert singleton.find('dmfn_fast::' + op).fake_impl.kernel is not None, op\n"
        "print(torch.ops.dmfn_fast.centroid_align_fwd.default._schema)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "centroid_align_fwd(Tensor f_out, Tensor f_tgt, int plan=-1) -> (Tensor, Tensor)" in p.stdout


@ext
def test_built_module_loads_before_or_after_the_schema():
    """`import dmfn_fast._C` before the Python module (kernels registered before the schema) works too."""
    code = ("import torch, importlib\n"
            "importlib.import_module('dmfn_fast._C')\n"
            "from dmfn_fast.ops import centroid_align as ca\n"
            "a = torch.rand(2, 3, 4, 5)\n"
            "got = ca.centroid_align_loss(a, a.flip(-1), impl='fast')\n"
            "torch.testing.assert_close(got, ca.centroid_align_loss_reference(a, a.flip(-1)), rtol=1e-5, atol=0)\n"
            "print('OK')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


def test_sources_are_located():
    src = ca.csrc_dir()
    for f in ("centroid_align.cpp", "centroid_align_cuda.cpp", "centroid_align_kernel.cu", "centroid_align.h",
              "centroid_align_kernel.h"):
        assert os.path.isfile(os.path.join(src, f)), f


def test_sources_located_in_an_installed_package(tmp_path, monkeypatch):
    """An installed package has dmfn_fast/csrc beside the ops; that copy wins over any checkout."""
    pkg = tmp_path / "dmfn_fast"
    (pkg / "ops").mkdir(parents=True)
    shutil.copytree(ca.csrc_dir(), pkg / "csrc")
    monkeypatch.setattr(ca, "__file__", str(pkg / "ops" / "centroid_align.py"))
    assert ca.csrc_dir() == str(pkg / "csrc")
    shutil.rmtree(pkg / "csrc")
    with pytest.raises(FileNotFoundError, match="sources"):
        ca.csrc_dir()


def test_wheel_ships_the_sources(tmp_path):
    """A normal (non-editable) install carries csrc/ as dmfn_fast/csrc, so the JIT-build fallback finds
    its sources there; the Triton kernels as dmfn_fast/kernels. (A wheel build without the extension.)"""
    import zipfile

    env = dict(os.environ, DMFN_NO_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel, = tmp_path.glob("dmfn_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("centroid_align.cpp", "centroid_align.h", "centroid_align_cuda.cpp", "centroid_align_kernel.cu",
              "centroid_align_kernel.h"):
        assert f"dmfn_fast/csrc/{f}" in names, sorted(names)
    for f in ("__init__.py", "dmfb_branches.py", "instance_norm.py"):
        assert f"dmfn_fast/kernels/{f}" in names


# ---------------------------------------------------------------- CUDA

@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 3, 5), (2, 64, 32, 32), (2, 40, 17, 19), (3, 512, 9, 16),
                                   (1, 24, 5, 37)])  # the last: rows wider than the forward's 32-pixel step
def test_cuda_parity_and_grads(shape, layout, dtype):
    a, b = rand(shape, 27, dtype, "cuda", layout), rand(shape, 28, dtype, "cuda", layout)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    loss, ga, gb = grads(fast, a, b)
    want, wa, wb = grads(ca.centroid_align_loss_reference, a, b)
    torch.testing.assert_close(loss, want, rtol=tol, atol=1e-12)
    assert_grads_close(ga, wa, tol)
    assert_grads_close(gb, wb, tol)
    if dtype == torch.float32:
        torch.testing.assert_close(stats(a, b)[0, ..., 1:], ca.centroids_reference(a), rtol=1e-6, atol=1e-6)


@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_two_map_launch_matches_one_map_launches(dtype):
    """Channels-last maps with 16-byte loads go through one launch for both maps, split over pixels as well
    as channels (33x35 pixels: several runs, the last partial; 104 channels: a partial channel group; 312
    planes: two finishing blocks, the second partial); a target in another layout sends each map through a
    launch of its own. Both give the reference's loss, the same stats, and the same loss again on a second
    run (fixed-order sums, no float atomics)."""
    shape = (3, 104, 33, 35)
    a, b = rand(shape, 31, dtype, "cuda", "channels_last"), rand(shape, 32, dtype, "cuda", "channels_last")
    loss, st = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    loss2, st2 = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    assert torch.equal(loss, loss2) and torch.equal(st, st2)
    loss_m, st_m = torch.ops.dmfn_fast.centroid_align_fwd(a, b.contiguous())
    torch.testing.assert_close(st_m, st, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_m, loss, rtol=1e-4, atol=1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, ca.centroid_align_loss_reference(a, b).to(loss.dtype), rtol=tol, atol=1e-12)


# The A/B plans (DMFN_CENTROID_*, read per call) that keep the default's runs, each against the default plan with
# the same waves: GRAD_ROWS, the gradient written by more blocks of fewer image rows, in one wave and in two
# (several runs per column of blocks).
PLANS = [dict(GRAD_ROWS="1"), dict(GRAD_ROWS="2"), dict(GRAD_ROWS="1", WAVES="2")]


def _plan_maps(shape, seed, dtype, monkeypatch):
    """Two channels-last CUDA maps (the first requiring grad), with every plan switch unset and no measured plan:
    the plans are held to the C++ op's defaults, which the loss then runs too."""
    a, b = rand(shape, seed, dtype, "cuda", "channels_last"), rand(shape, seed + 1, dtype, "cuda", "channels_last")
    unset_plan_switches(monkeypatch)
    monkeypatch.setattr(ca, "MEASURED_PLANS", {})
    return a.requires_grad_(), b


@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_cuda_forward_plans_match_the_default(dtype, plan, monkeypatch):
    """The same stats and loss bit for bit, the same bits on a rerun, and the same gradient bit for bit (each
    element's arithmetic is its own); [3, 104, 33, 35]: the last run ends inside a step. (A bad value:
    test_cuda_bad_plan_values_are_refused.)"""
    a, b = _plan_maps((3, 104, 33, 35), 33, dtype, monkeypatch)
    monkeypatch.setenv("DMFN_CENTROID_WAVES", plan.get("WAVES", "1"))
    loss, st = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    g = torch.autograd.grad(ca.centroid_align_loss(a, b, impl="fast"), a)[0]
    for k, v in plan.items():
        monkeypatch.setenv(f"DMFN_CENTROID_{k}", v)
    for _ in range(3):
        loss_p, st_p = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
        assert torch.equal(st_p, st) and torch.equal(loss_p, loss)
    assert torch.equal(torch.ops.dmfn_fast.centroid_align_fwd(a, b)[0], loss_p)
    assert torch.equal(torch.autograd.grad(ca.centroid_align_loss(a, b, impl="fast"), a)[0], g)
    assert torch.isfinite(g).all()


@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plan", [{}, dict(WAVES="2")],
                         ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "alone")
@pytest.mark.parametrize("shape", [(3, 264, 33, 35), (16, 512, 32, 32)], ids=["pixels", "pixels-training"])
def test_cuda_pixel_blocks_match_the_default(dtype, plan, shape, monkeypatch):
    """DMFN_CENTROID_PIXELS: blocks of every vector of their pixels (264 channels: 64 or 128 vectors, idle
    lanes; 512 at the training size: 64 or 128, none idle) add each plane's pixels in other runs, so the stats
    match the default's to rounding, not bit for bit; the same bits on a rerun (in one wave and in two: its own
    bits each); the gradient to rounding. The gradients are of the loss times 2^16, as a
    GradScaler's: this loss's own are about 1e-7, below fp16's normal range, where one rounding is a whole
    subnormal step (H100, s18: 6e-8 apart against an allowance of 1e-10)."""
    a, b = _plan_maps(shape, 35, dtype, monkeypatch)
    loss, st = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    g = torch.autograd.grad(ca.centroid_align_loss(a, b, impl="fast") * 2.0 ** 16, a)[0]
    monkeypatch.setenv("DMFN_CENTROID_PIXELS", "1")
    for k, v in plan.items():
        monkeypatch.setenv(f"DMFN_CENTROID_{k}", v)
    loss_w, st_w = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    for _ in range(3):
        loss_p, st_p = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
        assert torch.equal(st_p, st_w) and torch.equal(loss_p, loss_w)
    torch.testing.assert_close(st_p, st, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_p, loss, rtol=1e-4, atol=1e-12)
    g_p = torch.autograd.grad(ca.centroid_align_loss(a, b, impl="fast") * 2.0 ** 16, a)[0]
    torch.testing.assert_close(g_p.float(), g.float(), rtol=1e-2 if dtype != torch.float32 else 1e-4,
                               atol=1e-3 * g.abs().max().item())
    assert torch.isfinite(g_p).all()
    _same_by_argument(a, b, dict(plan, PIXELS="1"), loss_w, st_w, monkeypatch)


@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("waves", ["1", "2", "4"])
@pytest.mark.parametrize("shape", [(3, 264, 33, 35), (2, 1032, 7, 9), (16, 512, 32, 32)],
                         ids=["odd", "groups", "training"])
def test_cuda_triton_forward_matches_the_cpp_op(dtype, waves, shape, monkeypatch):
    """DMFN_CENTROID_TRITON=1: the forward by kernels/centroid_sums.py (whole pixels a program, its own finish
    and ticket) gives the C++ op's stats and loss to rounding (another order of sums), the same bits on a rerun,
    and through centroid_align_loss both maps' gradients to rounding, by the C++ backward (1) or the Triton one
    (2), in 1 to 4 waves of programs (DMFN_CENTROID_WAVES); and in whole planes a program, with the Triton
    backward (3) or the C++ one (4), the same. Both forwards with DMFN_CENTROID_APART=1 (map b's pixels half a run
    ahead of map a's, half the loads a step), and the runs with DMFN_CENTROID_INTERLEAVE=1 (their steps
    interleaved over the image's programs), with or without APART, or with DMFN_CENTROID_ONE_MAP=1 (a program a
    map, map a's dispatched first), interleaved or not, give the same to rounding, and the same bits on a rerun.
    [3, 264, 33, 35]: runs cut short, idle lanes; [2, 1032, 7, 9]: partial channel groups. The gradients are
    of the loss times 2^16, as in the test above."""
    if ca._kcs is None:
        pytest.skip("the Triton centroid forward did not import (Triton missing?)")
    a, b = _plan_maps(shape, 41, dtype, monkeypatch)
    loss, st = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    monkeypatch.setenv("DMFN_CENTROID_WAVES", waves)
    for mode in ("1", "3"):  # runs of whole pixels, or whole planes a program
        monkeypatch.setenv("DMFN_CENTROID_TRITON", mode)
        loss_t, st_t = ca._fwd_triton(a.detach(), b)
        for _ in range(2):
            loss_r, st_r = ca._fwd_triton(a.detach(), b)
            assert torch.equal(st_r, st_t) and torch.equal(loss_r, loss_t)
        torch.testing.assert_close(st_t, st, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_t, loss, rtol=1e-4, atol=1e-12)
        # map b's pixels half a run ahead; the runs' steps interleaved (map b then half an image ahead); a program
        # a map: the sums to rounding
        runs = (("0", "1", "0"), ("1", "1", "0"), ("0", "0", "1"), ("0", "1", "1")) if mode == "1" else ()
        for apart, inter, one in (("1", "0", "0"),) + runs:
            monkeypatch.setenv("DMFN_CENTROID_APART", apart)
            monkeypatch.setenv("DMFN_CENTROID_INTERLEAVE", inter)
            monkeypatch.setenv("DMFN_CENTROID_ONE_MAP", one)
            loss_ap, st_ap = ca._fwd_triton(a.detach(), b)
            assert torch.equal(ca._fwd_triton(a.detach(), b)[1], st_ap)
            torch.testing.assert_close(st_ap, st, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loss_ap, loss, rtol=1e-4, atol=1e-12)
        for k in ("APART", "INTERLEAVE", "ONE_MAP"):
            monkeypatch.setenv(f"DMFN_CENTROID_{k}", "0")
    calls = []
    real = ca._fwd_triton
    monkeypatch.setattr(ca, "_fwd_triton", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setenv("DMFN_CENTROID_TRITON", "0")
    bt = b.detach().clone().requires_grad_()
    g2 = torch.autograd.grad(ca.centroid_align_loss(a, bt, impl="fast") * 2.0 ** 16, (a, bt))
    for mode in ("1", "2", "3", "4"):  # 2: the gradients by the Triton kernel too, both maps'; 3, 4: planes
        monkeypatch.setenv("DMFN_CENTROID_TRITON", mode)
        g_t = torch.autograd.grad(ca.centroid_align_loss(a, bt, impl="fast") * 2.0 ** 16, (a, bt))
        for got, want in zip(g_t, g2):
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if dtype != torch.float32 else 1e-4,
                                       atol=1e-3 * want.abs().max().item())
            assert torch.isfinite(got).all() and got.is_contiguous(memory_format=torch.channels_last)
    assert calls == [1, 1, 1, 1]


@cuda_ext
def test_cuda_measured_plan_is_the_default(monkeypatch):
    """A MEASURED_PLANS entry for this GPU and dtype (here the Triton forward and backward, a map a program) runs
    where no switch is set, eager and under torch.compile (which folds the device query), with the C++ op's loss
    and gradients to rounding; with a switch set, the C++ op runs. A C++ plan (whole pixels) gives the bits of
    that plan set by its switch."""
    if ca._kcs is None:
        pytest.skip("the Triton centroid forward did not import (Triton missing?)")
    a, b = _plan_maps((3, 264, 33, 35), 45, torch.float32, monkeypatch)
    bt = b.detach().clone().requires_grad_()
    want = ca.centroid_align_loss(a, bt, impl="fast")
    g_want = torch.autograd.grad(want, (a, bt))
    major = torch.cuda.get_device_capability()[0]
    monkeypatch.setattr(ca, "MEASURED_PLANS", {(major, torch.float32): {"DMFN_CENTROID_TRITON": "2",
                                                                        "DMFN_CENTROID_ONE_MAP": "1"}})
    calls = []
    real_fwd, real_bwd = ca._fwd_triton, ca._bwd_triton
    monkeypatch.setattr(ca, "_fwd_triton", lambda *args: calls.append("fwd") or real_fwd(*args))
    monkeypatch.setattr(ca, "_bwd_triton", lambda *args: calls.append("bwd") or real_bwd(*args))
    torch._dynamo.reset()
    for loss_fn in (ca.centroid_align_loss, torch.compile(ca.centroid_align_loss, fullgraph=True)):
        got = loss_fn(a, bt, impl="fast")
        g_got = torch.autograd.grad(got, (a, bt))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)
        for x, y in zip(g_got, g_want):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-3 * y.abs().max().item())
        if loss_fn is ca.centroid_align_loss:
            assert calls == ["fwd", "bwd", "bwd"], calls  # a gradient a map
    torch._dynamo.reset()
    calls.clear()
    monkeypatch.setenv("DMFN_CENTROID_WAVES", "1")
    torch.autograd.grad(ca.centroid_align_loss(a, bt, impl="fast"), (a, bt))
    assert calls == []
    # a measured plan of the C++ op: the bits of that plan set by its switch
    monkeypatch.setenv("DMFN_CENTROID_PIXELS", "1")
    want = ca._forward(a.detach(), b)
    unset_plan_switches(monkeypatch)
    monkeypatch.setattr(ca, "MEASURED_PLANS", {(major, torch.float32): {"DMFN_CENTROID_PIXELS": "1"}})
    got = ca._forward(a.detach(), b)
    assert calls == [] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 104, 5, 9), (16, 512, 32, 32)], ids=["one-step", "training"])
@pytest.mark.parametrize("plan", [{}, dict(PIXELS="1")],
                         ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "alone")
def test_cuda_block_finish_matches_the_default(dtype, shape, plan, monkeypatch):
    """DMFN_CENTROID_BLOCK_FINISH: where a column of blocks is one run ([3, 104, 5, 9]: 45 pixels, less than one
    step of any dtype, also for PIXELS' fp32 blocks of 32 vectors, 26 of them busy; fp32 [16, 512, 32, 32] on a
    card of 132 SMs), each block turns its planes' sums into stats and a loss share and one block adds the
    shares; elsewhere the plan without it. Either way the same plan's
    stats bit for bit, its loss to rounding (the shares add in another order), the same bits on a rerun, and
    the same gradient bit for bit (it follows from the stats)."""
    a, b = _plan_maps(shape, 37, dtype, monkeypatch)
    for k, v in plan.items():
        monkeypatch.setenv(f"DMFN_CENTROID_{k}", v)
    loss, st = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    g = torch.autograd.grad(ca.centroid_align_loss(a, b, impl="fast"), a)[0]
    monkeypatch.setenv("DMFN_CENTROID_BLOCK_FINISH", "1")
    for _ in range(3):
        loss_p, st_p = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
        assert torch.equal(st_p, st)
        torch.testing.assert_close(loss_p, loss, rtol=1e-6, atol=1e-12)
    assert torch.equal(torch.ops.dmfn_fast.centroid_align_fwd(a, b)[0], loss_p)
    assert torch.equal(torch.autograd.grad(ca.centroid_align_loss(a, b, impl="fast"), a)[0], g)
    assert torch.isfinite(g).all()
    _same_by_argument(a, b, dict(plan, BLOCK_FINISH="1"), loss_p, st_p, monkeypatch)


def _same_by_argument(a, b, plan, loss, st, monkeypatch):
    """The plan given as the op's argument (cpp_plan: a measured plan), its switches unset, gives its bits."""
    code = ca.cpp_plan({f"DMFN_CENTROID_{k}": v for k, v in plan.items()})
    for k in plan:
        monkeypatch.delenv(f"DMFN_CENTROID_{k}")
    loss_c, st_c = torch.ops.dmfn_fast.centroid_align_fwd(a, b, code)
    assert code > 0 and torch.equal(st_c, st) and torch.equal(loss_c, loss), code


_REFUSALS = """
import os, sys, torch
from dmfn_fast.ops import centroid_align as ca
assert ca.has_kernel("cuda")
a = torch.rand(2, 64, 9, 8, device="cuda").contiguous(memory_format=torch.channels_last)
def refused(what, fn, match):
    print("calling:", what, flush=True)
    try:
        fn()
    except RuntimeError as e:
        assert match in str(e), str(e)
        print("refused:", what, flush=True)
    else:
        sys.exit("not refused: " + what)
c = a.cpu()  # the same extension's CPU kernel first: does any C++ error kill this process, or the CUDA path's?
refused("dtype mismatch, CPU", lambda: torch.ops.dmfn_fast.centroid_align_fwd(c, c.double()), "differ in dtype")
refused("dtype mismatch", lambda: torch.ops.dmfn_fast.centroid_align_fwd(a, a.double()), "differ in dtype")
for name in sys.argv[1:]:
    os.environ[name] = "3"  # after import: import dmfn_fast refuses it itself
    refused(name + ", the op", lambda: torch.ops.dmfn_fast.centroid_align_fwd(a, a), name + " must be one of")
    x = a.clone().requires_grad_()
    refused(name + ", through autograd", lambda: torch.autograd.grad(ca.centroid_align_loss(x, a, impl="fast"), x),
            name + " must be one of")
    os.environ[name] = ""
"""


@cuda_ext
@pytest.mark.parametrize("preset", [False, True], ids=["added", "replaced"])
def test_cuda_bad_plan_values_are_refused(preset):
    """A plan switch set to a value it does not take, after import (import refuses it itself), is refused by the
    CUDA op with a RuntimeError that names it, called directly and through autograd, after a dtype mismatch
    refused by the CPU and the CUDA kernels. In a child process, under faulthandler (a crash prints every
    thread's Python stack): the first such refusal ended the process with a segmentation fault, through
    autograd on the H200 (s15), called directly on the H100 (s18), while the dtype refusals, thrown from the
    same C++ frame, passed. Both ways here: the switches added to the environment by the child (setenv
    grows glibc's environ, which a thread reading it at that moment can fault on), and set blank beforehand
    (setenv then replaces a value in place). The markers say which call crashed."""
    names = ["DMFN_CENTROID_BLOCK_FINISH", "DMFN_CENTROID_PIXELS", "DMFN_CENTROID_GRAD_ROWS"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMFN_CENTROID_")}
    env.update({k: "" for k in names} if preset else {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _REFUSALS, *names], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, f"rc {r.returncode} (-11: a segmentation fault)\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.count("refused:") == 2 + 2 * len(names), r.stdout


@cuda_ext
def test_cuda_matches_cpu_op_and_compiles():
    a, b = rand((2, 32, 9, 12), 29, device="cuda"), rand((2, 32, 9, 12), 30, device="cuda")
    torch.testing.assert_close(stats(a, b).cpu(), stats(a.cpu(), b.cpu()), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.dmfn_fast.centroid_align_fwd.default, (a.requires_grad_(), b))


# ---------------------------------------------------------------- nvcc compile check

def test_cuda_kernels_compile_without_spills():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the CUDA kernel compile check needs the CUDA toolkit")
    r = subprocess.run(["bash", os.path.join(ROOT, ".ci", "nvcc_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
