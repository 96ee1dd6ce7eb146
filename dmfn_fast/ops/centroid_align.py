"""Geometric alignment (centroid) loss of DMFN, on VGG relu4_1 features.

Per (n, c): p = (f + 1e-7) / sum(f + 1e-7); cx = sum p*u, cy = sum p*v with
u = 2*w/W - 1 along the width and v = 2*h/H - 1 along the height. The loss is
the mean over (n, c, {x, y}) of the squared centroid difference.

grid="paper" (the default) is that formula. grid="authors" is the authors' public
code, whose vertical grid runs along the width axis (v = u), so both components
measure horizontal position and the loss is the mean of (cx_out - cx_tgt)^2.
Their code runs only on square maps; here u = 2*w/W - 1 serves both for any shape.

The fast path is the C++/CUDA op dmfn_fast::centroid_align_fwd/_bwd: one read of
each map forward, one write backward. Its schema, fake kernel and autograd are
registered here at import; its CPU/CUDA kernels (csrc/, TORCH_LIBRARY_IMPL only)
come from the module built by setup.py, else from a one-off JIT build (cached by
torch) on first use, else the reference runs with one warning. DMFN_CENTROID_TRITON=1
(an A/B) runs the forward of channels-last CUDA maps by Triton kernels instead
(kernels/centroid_sums.py), with the same C++ backward; =2 the backward too; =3 as 2 with
the forward in whole planes a program. Where no plan switch (PLAN_SWITCHES) is set, a GPU and
dtype take the plan in MEASURED_PLANS (Triton, or the C++ op's) that a GPU run measured
faster, else the C++ op's defaults.
"""
import functools
import os
import struct

import torch

from . import _impl
from . import dmfb as _d

EPS = 1e-7
GRIDS = ("paper", "authors")
_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SOURCES = ("centroid_align.cpp", "centroid_align_cuda.cpp", "centroid_align_kernel.cu")


def csrc_dir() -> str:
    """The folder with the extension's sources: dmfn_fast/csrc in an installed package (setup.py ships the
    top-level csrc/ as package data there), else the checkout's csrc/ (an editable install)."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(pkg, "csrc"), os.path.join(os.path.dirname(pkg), "csrc")):
        if all(os.path.isfile(os.path.join(d, f)) for f in _SOURCES):
            return d
    raise FileNotFoundError(f"the dmfn_fast C++ sources ({', '.join(_SOURCES)}) are neither in "
                            f"{os.path.join(pkg, 'csrc')} nor in the checkout's csrc/")


def _check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    return grid


def centroids_reference(f: torch.Tensor, grid: str = "paper") -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2] centroids (x, y), computed in fp32 or wider."""
    _check_grid(grid)
    if f.dim() != 4:
        raise ValueError(f"feature map must be [N, C, H, W], got shape {tuple(f.shape)}")
    f = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
    H, W = f.shape[-2:]
    u = torch.arange(W, device=f.device, dtype=f.dtype) * (2.0 / W) - 1.0
    v = torch.arange(H, device=f.device, dtype=f.dtype) * (2.0 / H) - 1.0
    f = f + EPS
    s0 = f.sum(dim=(2, 3))
    cx = (f * u.view(1, 1, 1, W)).sum(dim=(2, 3)) / s0
    vgrid = v.view(1, 1, H, 1) if grid == "paper" else u.view(1, 1, 1, W)
    cy = (f * vgrid).sum(dim=(2, 3)) / s0
    return torch.stack([cx, cy], dim=-1)


def centroid_align_loss_reference(f_out: torch.Tensor, f_tgt: torch.Tensor, grid: str = "paper") -> torch.Tensor:
    if f_out.shape != f_tgt.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(f_out.shape)} vs {tuple(f_tgt.shape)}")
    return (centroids_reference(f_out, grid) - centroids_reference(f_tgt, grid)).pow(2).mean()


# ---------------------------------------------------------------- extension loading

# loaded: None = not tried yet, then True / False; devices: device types the op has kernels for;
# source: "built" (dmfn_fast._C from the install) or "jit" (compiled on first use).
_ext_state = {"loaded": None, "why": "", "devices": (), "source": None}


def _import_built():
    """The module setup.py built; importing it registers the ops."""
    from dmfn_fast import _C  # noqa: F401


def _jit_build():
    """Compile csrc/ once with torch's JIT builder (cached in TORCH_EXTENSIONS_DIR); CUDA too where it can."""
    from torch.utils import cpp_extension

    src = csrc_dir()
    with_cuda = bool(torch.version.cuda and cpp_extension.CUDA_HOME)
    sources = [os.path.join(src, f) for f in (_SOURCES if with_cuda else _SOURCES[:1])]
    cpp_extension.load(
        name="dmfn_fast_centroid_" + ("cuda" if with_cuda else "cpu"),
        sources=sources,
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,
        verbose=False,
    )


def _ops_registered() -> bool:
    """Whether a kernel (the extension's CPU one, always built) is registered; the schema is ours."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("dmfn_fast::centroid_align_fwd", "CPU")


@torch.compiler.assume_constant_result  # torch.compile runs it eagerly, once
def extension_available() -> bool:
    """Load the op's kernels once: built module, else JIT build, else False (the caller warns)."""
    if _ext_state["loaded"] is None:
        errors = []
        for source, load in (("built", _import_built), ("jit", _jit_build)):
            if _ops_registered():
                break
            try:
                load()
                _ext_state["source"] = source
            except Exception as e:  # a failed build or import must not crash training
                errors.append(f"{load.__name__}: {type(e).__name__}: {e}".splitlines()[0])
        _ext_state["loaded"] = _ops_registered()
        if _ext_state["loaded"]:
            # Asked once here, not per call: torch.compile cannot trace the dispatcher query.
            _ext_state["devices"] = tuple(d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(
                "dmfn_fast::centroid_align_fwd", d.upper()))
        else:
            _ext_state["why"] = "; ".join(errors)
    return _ext_state["loaded"]


def has_kernel(device_type: str) -> bool:
    """Whether the loaded op has a kernel for this device type ("cpu", "cuda")."""
    return extension_available() and device_type in _ext_state["devices"]


def _grad_channels_last(like: torch.Tensor) -> bool:
    # Mirrors grad_channels_last() in csrc/centroid_align.h.
    return like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()


def _fwd_fake(f_out, f_tgt, plan=-1):
    acc = torch.float64 if f_out.dtype == torch.float64 else torch.float32
    N, C = f_out.shape[:2]
    return f_out.new_empty((), dtype=acc), f_out.new_empty((2, N, C, 3), dtype=acc)


def _bwd_fake(grad, stats, like, which):
    fmt = torch.channels_last if _grad_channels_last(like) else torch.contiguous_format
    return torch.empty(like.shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _setup_context(ctx, inputs, output):
    f_out, f_tgt = inputs[:2]
    ctx.inputs = len(inputs)  # the C++ op's plan too: no gradient
    ctx.save_for_backward(output[1], f_out, f_tgt)
    ctx.mark_non_differentiable(output[1])
    # no zeros for the stats' gradient, which backward never reads: a fill kernel per backward (0.77 us of
    # the op's 38 us of GPU time on the H200, s15)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_stats):
    if grad_loss is None:  # not materialized: nothing flowed into the loss
        return (None,) * ctx.inputs
    stats, f_out, f_tgt = ctx.saved_tensors
    bwd = _bwd_triton if getattr(ctx, "triton_grad", False) else torch.ops.dmfn_fast.centroid_align_bwd
    g_out = bwd(grad_loss, stats, f_out, 0) if ctx.needs_input_grad[0] else None
    g_tgt = bwd(grad_loss, stats, f_tgt, 1) if ctx.needs_input_grad[1] else None
    return (g_out, g_tgt) + (None,) * (ctx.inputs - 2)


# The schema lives here, not in the .so: fake and autograd can then be registered at import, before the
# kernels are loaded (lazily: the first load may JIT-build). csrc/ registers only the kernels
# (TORCH_LIBRARY_IMPL), whose signatures the dispatcher checks against this schema.
_lib = torch.library.Library("dmfn_fast", "FRAGMENT")
# plan: the CUDA forward's launch plan, -1 (the plan switches, read per call) or a measured one
# (cpp_plan; check_plan in csrc/centroid_align.h)
_lib.define("centroid_align_fwd(Tensor f_out, Tensor f_tgt, int plan=-1) -> (Tensor, Tensor)")
_lib.define("centroid_align_bwd(Tensor grad, Tensor stats, Tensor like, int which) -> Tensor")
torch.library.register_fake("dmfn_fast::centroid_align_fwd", _fwd_fake, lib=_lib)
torch.library.register_fake("dmfn_fast::centroid_align_bwd", _bwd_fake, lib=_lib)
torch.library.register_autograd("dmfn_fast::centroid_align_fwd", _backward, setup_context=_setup_context, lib=_lib)


# ---------------------------------------------------------------- the forward in Triton (an A/B)

# DMFN_CENTROID_TRITON=1 (read per call, as the extension reads its plan switches): the forward of dense
# channels-last CUDA maps in fp32/fp16/bf16 by kernels/centroid_sums.py, whole pixels a program, its stats
# those the C++ backward reads; 2: the backward by its Triton kernel too; 3: as 2, with the forward in whole
# planes a program (column order, no partial sums to finish); 4: that forward with the C++ backward, so that
# each forward is timed with each backward. The C++ op's two-map kernel read at
# 2.0 TB/s on the H100 in every plan, where a Triton stream read the same bytes at 2.95 (s18): the next
# breakdown times this beside it.
_kcs = _d.import_kernel_module("centroid_sums", "centroid forward kernel", "the C++ op's forward runs")


# The forward's plan where no plan switch (PLAN_SWITCHES) is set, by (compute capability major, dtype): the plan
# a GPU run timed at least 3% faster than the default, its CUDA tests passed (benchmarks/gpu_summary.py's
# centroid_plan_to_adopt names it): a Triton one, or the C++ op's (given to it as its plan argument). Set any
# plan switch and that plan runs, its unset switches at their defaults. Empty: the C++ op's defaults.
MEASURED_PLANS: dict[tuple[int, torch.dtype], dict[str, str]] = {}
TRITON_PLAN_SWITCHES = ("DMFN_CENTROID_TRITON", "DMFN_CENTROID_APART", "DMFN_CENTROID_INTERLEAVE",
                        "DMFN_CENTROID_ONE_MAP", "DMFN_CENTROID_WAVES")
CPP_PLAN_SWITCHES = ("DMFN_CENTROID_WAVES", "DMFN_CENTROID_BLOCK_FINISH", "DMFN_CENTROID_PIXELS")  # its forward's
# every plan switch: the forward's and the C++ backward's
PLAN_SWITCHES = tuple(dict.fromkeys(TRITON_PLAN_SWITCHES + CPP_PLAN_SWITCHES + ("DMFN_CENTROID_GRAD_ROWS",)))


def _capability_major(f: torch.Tensor):
    """f's GPU's compute capability major, None off CUDA (get_device_properties: torch.compile folds it)."""
    return torch.cuda.get_device_properties(f.device).major if f.is_cuda else None


def default_plan(f: torch.Tensor) -> dict[str, str]:
    """The switches MEASURED_PLANS sets for maps like f where none is set in the environment, else {}."""
    if not MEASURED_PLANS or _impl.any_switch_set(PLAN_SWITCHES):
        return {}
    return MEASURED_PLANS.get((_capability_major(f), f.dtype), {})


def plan_switch(name: str, plan: dict[str, str]) -> str:
    """Switch `name`'s value: `plan`'s (default_plan's for the maps, resolved once a call), else as set in the
    environment, else its default."""
    return plan.get(name) or _impl.env_switch(name)


def cpp_plan(plan: dict[str, str]) -> int:
    """The C++ forward's plan argument for a measured plan, its unset switches at their defaults (bits 0-1: the
    waves less one; bit 2: the finish in blocks; bit 3: whole pixels); -1 for none: the op reads the switches."""
    if not plan:
        return -1
    value = {n: plan.get(n, _impl.SWITCHES[n][0]) for n in CPP_PLAN_SWITCHES}
    return (int(value["DMFN_CENTROID_WAVES"]) - 1 | int(value["DMFN_CENTROID_BLOCK_FINISH"]) << 2
            | int(value["DMFN_CENTROID_PIXELS"]) << 3)


def triton_forward_why_not(f_out: torch.Tensor, f_tgt: torch.Tensor) -> str:
    """"" when the Triton forward can take these maps (already promoted to one dtype), else why not."""
    if _kcs is None:
        return f"its kernels did not import ({_d.triton_unavailable_reason() or 'see the warning'})"
    why = _d.kernels_why_not(f_out, "the Triton centroid forward")
    if why:
        return why
    if not (f_out.is_contiguous(memory_format=torch.channels_last)
            and f_tgt.is_contiguous(memory_format=torch.channels_last)):
        return "it takes dense channels-last maps"
    if f_out.numel() == 0:
        return "empty feature map"
    return ""


def _sms(t: torch.Tensor) -> int:
    """The SMs the launch plans fill: t's GPU's, or 3 for CPU tensors (the interpreter's tests, or a trace:
    several runs an image with the smallest maps)."""
    return _d.sm_count(t) if t.is_cuda else 3


def _rows(cb: int, element_size: int, cap: int) -> int:
    """Pixels a load: the program's 8 warps at 16 bytes a thread over CB channels a pixel, at most cap."""
    return max(1, min(cap, _kcs.WARPS * 32 * 16 // (cb * element_size)))


def triton_forward_plan(shape, element_size: int, sms: int, waves: int = 1, apart: bool = False,
                        one_map: bool = False):
    """(CB channels a program, groups of them, ROWS pixels a load, STEPS loads a step, pixels a run, runs an
    image): 8 warps a program, ROWS rows of warps each taking one pixel's CB channels at 16 bytes a thread
    (fp32: 2 rows of 512 channels; 16 bits: 4), STEPS loads of each map in flight; runs of whole steps sized so
    the programs fill the card `waves` times at two an SM. apart (DMFN_CENTROID_APART): half the loads a step,
    for the registers map b's own pixel coordinates take (still 2 programs an SM). one_map
    (DMFN_CENTROID_ONE_MAP): a program reads one map, two steps at once (the same loads in flight), runs of whole
    pairs of steps; twice the programs: map a's wave, then map b's (APART does not apply)."""
    N, C, H, W = (int(s) for s in shape)  # a traced shape specializes here, as the DMFB ops' tiles do
    HW = H * W
    cb = min(_d.triton.next_power_of_2(C), _kcs.MAX_GROUP_BYTES // element_size)
    groups = _d._cdiv(C, cb)
    rows = _rows(cb, element_size, _kcs.MAX_ROWS)
    steps = _kcs.STEPS[element_size] // (2 if apart and not one_map else 1)
    runs = max(1, _d._cdiv(2 * sms * waves, N * groups))
    unit = rows * steps * (2 if one_map else 1)
    run = _d._cdiv(_d._cdiv(HW, runs), unit) * unit
    return cb, groups, rows, steps, run, _d._cdiv(HW, run)


def finish_runs(runs: int) -> int:
    """Runs centroid_finish loads at once: all of them (a power of two), at most FINISH_RUNS a round."""
    return min(_d.triton.next_power_of_2(runs), _kcs.FINISH_RUNS)


def triton_planes_plan(shape, element_size: int, sms: int, apart: bool = False):
    """DMFN_CENTROID_TRITON=3 and 4's (CB channels a program, groups of them, ROWS pixels a load, STEPS loads a step):
    128 bytes of each pixel a program (64 where that leaves an SM idle), over every pixel of its image; 8 warps,
    8 or 4 threads a pixel, so 32 or 64 pixels a load."""
    N, C = int(shape[0]), int(shape[1])
    cb_bytes = 128 if N * _d._cdiv(C, 128 // element_size) >= sms else 64
    cb = min(_d.triton.next_power_of_2(C), max(1, cb_bytes // element_size))
    return cb, _d._cdiv(C, cb), _rows(cb, element_size, 64), _kcs.STEPS[element_size] // (2 if apart else 1)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=None)
def _eps_terms(H: int, W: int) -> tuple[float, float, float]:
    """The reference's eps in closed form, as the C++ op's: sum(eps), sum(eps*u), sum(eps*v) over a plane, u
    and v rounded as the kernels make them in fp32 (plain Python: no tensors, so tracing sees none)."""
    su, sv = _f32(2.0 / W), _f32(2.0 / H)
    sum_u = sum(_f32(_f32(w * su) - 1.0) for w in range(W))
    sum_v = sum(_f32(_f32(h * sv) - 1.0) for h in range(H))
    return EPS * H * W, EPS * H * sum_u, EPS * W * sum_v


def _fwd_triton_fn(f_out: torch.Tensor, f_tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, H, W = (int(s) for s in f_out.shape)
    f_out = f_out.contiguous(memory_format=torch.channels_last)
    f_tgt = f_tgt.contiguous(memory_format=torch.channels_last)
    sms = _sms(f_out)
    NC = N * C
    e0, ex, ey = _eps_terms(H, W)
    dev = f_out.device
    stats = torch.empty(2, N, C, 3, device=dev, dtype=torch.float32)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    plan = default_plan(f_out)
    apart = plan_switch("DMFN_CENTROID_APART", plan) == "1"  # map b's pixels half a run (interleaved: image) ahead
    if plan_switch("DMFN_CENTROID_TRITON", plan) in ("3", "4"):  # whole planes a program: no partial sums
        cb, groups, rows, steps = triton_planes_plan(f_out.shape, f_out.element_size(), sms, apart)
        shares = torch.empty(N * groups, device=dev, dtype=torch.float64)
        _d._kernel(_kcs.centroid_plane_sums, f_out)[(N * groups,)](
            f_out, f_tgt, stats, shares, H * W, W, C, NC, 2.0 / W, 2.0 / H, e0, ex, ey, ROWS=rows, STEPS=steps,
            CB=cb, APART=apart, num_warps=_kcs.WARPS)
        _d._kernel(_kcs.centroid_sum_shares, f_out)[(1,)](shares, loss, N * groups, NC, PARTS=_kcs.PARTS,
                                                           num_warps=_kcs.FINISH_WARPS)
        return loss, stats
    # ONE_MAP: a program reads one map, map a's programs dispatched before map b's (APART moot)
    one_map = plan_switch("DMFN_CENTROID_ONE_MAP", plan) == "1"
    cb, groups, rows, steps, run, runs = triton_forward_plan(
        f_out.shape, f_out.element_size(), sms, int(plan_switch("DMFN_CENTROID_WAVES", plan)), apart, one_map)
    if runs * 6 * NC >= 2 ** 31:  # the kernels index the partial sums in int32
        raise RuntimeError(f"the Triton centroid forward's partial sums for maps of shape {tuple(f_out.shape)} "
                           "exceed 2^31 elements: unset DMFN_CENTROID_TRITON for the C++ forward")
    part = torch.empty(runs * 6 * NC, device=dev, dtype=torch.float32)
    fin = _d._cdiv(NC, _kcs.FINISH_PLANES)
    loss_parts = torch.empty(fin, device=dev, dtype=torch.float64)
    ticket = torch.empty(1, device=dev, dtype=torch.int32)
    # INTERLEAVE: each run a step of every R of its image, so the programs in flight read one window of it
    interleave = plan_switch("DMFN_CENTROID_INTERLEAVE", plan) == "1"
    _d._kernel(_kcs.centroid_pair_sums, f_out)[(N * groups, runs, 2 if one_map else 1)](
        f_out, f_tgt, part, ticket, H * W, W, C, NC, run, 2.0 / W, 2.0 / H, ROWS=rows, STEPS=steps, CB=cb,
        APART=apart and not one_map, INTERLEAVE=interleave, ONE_MAP=one_map, num_warps=_kcs.WARPS)
    _d._kernel(_kcs.centroid_finish, f_out)[(fin,)](
        part, stats, loss_parts, ticket, loss, NC, runs, e0, ex, ey, PLANES=_kcs.FINISH_PLANES,
        RUNS=finish_runs(runs), PARTS=_kcs.PARTS, num_warps=_kcs.FINISH_WARPS)
    return loss, stats


def _bwd_triton_fn(grad: torch.Tensor, stats: torch.Tensor, like: torch.Tensor, which: int) -> torch.Tensor:
    """The C++ backward's gradient (centroid_align_bwd) for a dense channels-last map, by centroid_grad."""
    N, C, H, W = (int(s) for s in like.shape)
    # a stream of stores, no partial sums to add: short runs, four times the forward's programs
    cb, groups, rows, steps, run, runs = triton_forward_plan(like.shape, like.element_size(), _sms(like), 4)
    out = torch.empty_like(like, memory_format=torch.channels_last)
    _d._kernel(_kcs.centroid_grad, like)[(N * groups, runs)](
        grad.float(), stats.contiguous(), out, H * W, W, C, N * C, run, 2.0 / W, 2.0 / H, which, ROWS=rows,
        STEPS=steps, CB=cb, num_warps=_kcs.WARPS)
    return out


def _setup_context_triton(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    # DMFN_CENTROID_TRITON=2 or 3: the backward by centroid_grad too (its maps are dense channels-last)
    ctx.triton_grad = plan_switch("DMFN_CENTROID_TRITON", default_plan(inputs[0])) in ("2", "3")


if _kcs is not None:
    _fwd_triton = _d._define("centroid_align_fwd_triton", _fwd_triton_fn, _backward, _setup_context_triton)
    _bwd_triton = _d._define("centroid_align_bwd_triton", _bwd_triton_fn)


# ---------------------------------------------------------------- public entry point

def _fast_why_not(f_out: torch.Tensor) -> str:
    if f_out.dim() != 4:
        return f"feature map must be [N, C, H, W], got shape {tuple(f_out.shape)}"
    if f_out.numel() == 0:
        return "empty feature map"
    if f_out.dtype not in _FAST_DTYPES:
        return f"dtype {f_out.dtype} is not one of {_FAST_DTYPES}"
    if extension_available() and not has_kernel(f_out.device.type):
        return f"the dmfn_fast extension has no kernel for device {f_out.device.type} (built without it?)"
    return ""


def _missing() -> str:
    if extension_available():
        return ""
    return (f"the dmfn_fast C++ extension is unavailable ({_ext_state['why']}); build it with "
            "pip install --no-build-isolation -e .")


def centroid_align_loss(f_out: torch.Tensor, f_tgt: torch.Tensor, impl: str = "auto",
                        grid: str = "paper") -> torch.Tensor:
    """The alignment loss on the `grid` ("paper" or "authors", see the module docstring).
    `impl` (dmfn_fast.ops._impl.resolve):

    - "reference" (or DMFN_IMPL=reference): centroid_align_loss_reference; the extension is never loaded.
    - "auto": the extension for fp32/fp16/bf16/float64 maps on any device it has kernels for (CPU always,
      CUDA when built with it): faster in every case measured (benchmarks/RESULTS.md: CPU fp32 7-47x,
      H200 bf16 3.8x per call). Other dtypes: the reference. Extension missing (not built, JIT build
      failed): the reference, with one warning.
    - "fast": the extension, or a RuntimeError saying why not.
    Maps of different dtypes are promoted first, as the reference would."""
    _check_grid(grid)
    if f_out.shape != f_tgt.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(f_out.shape)} vs {tuple(f_tgt.shape)}")
    if f_out.dtype != f_tgt.dtype:  # e.g. bf16 autocast features vs fp32: same promotion as the reference
        dtype = torch.promote_types(f_out.dtype, f_tgt.dtype)
        f_out, f_tgt = f_out.to(dtype), f_tgt.to(dtype)
    if f_out.device != f_tgt.device:
        raise ValueError(f"feature maps on different devices: {f_out.device} vs {f_tgt.device}")
    if _impl.resolve(impl, lambda: _fast_why_not(f_out), op="centroid alignment loss", missing=_missing):
        if grid == "authors":
            # Their cy equals cx, and cx depends only on the column sums: the op on the maps averaged
            # over H (one row, whose cy is the same constant for both) gives half their loss.
            acc = torch.float64 if f_out.dtype == torch.float64 else torch.float32
            f_out, f_tgt = (f.mean(2, keepdim=True, dtype=acc) for f in (f_out, f_tgt))
            return 2 * _forward(f_out, f_tgt)[0]
        return _forward(f_out, f_tgt)[0]
    return centroid_align_loss_reference(f_out, f_tgt, grid)


def _forward(f_out: torch.Tensor, f_tgt: torch.Tensor):
    """(loss, stats) by the C++ op, or by the Triton forward where DMFN_CENTROID_TRITON is 1 to 4 (set, or a
    measured plan's) and it takes the maps (its backward: the C++ one at 1 and 4, the Triton one at 2 and 3)."""
    plan = default_plan(f_out)
    triton = plan_switch("DMFN_CENTROID_TRITON", plan)
    if triton != "0" and not triton_forward_why_not(f_out, f_tgt):
        return _fwd_triton(f_out, f_tgt)
    # maps a measured Triton plan cannot take: the C++ op's defaults (-1 reads the switches, none set)
    return torch.ops.dmfn_fast.centroid_align_fwd(f_out, f_tgt, -1 if triton != "0" else cpp_plan(plan))
