"""The DMFB: its PyTorch reference (dmfb_block_reference) and its fused fast path (dmfb_block_fused),
chosen by dmfb_block(x, params, impl). The fast path is Triton kernels (kernels/, installed as
dmfn_fast.kernels) behind torch.library custom ops, registered (fake and autograd too) at import.
torch.compile, opcheck and tracing use those ops; plain eager calls run the same code through
torch.autograd.Functions instead, which skip the ops' dispatch layers: the whole block as one node
(_DMFBEager), the branch op from its raw parameters (_BranchesInReluEager), the other ops one each (_Op).

Ops (namespace `dmfn_fast`), each with a Triton backward registered through register_autograd:
- dmfb_branches(h, w, b, dilations) -> cat[k1..k4], k_j = d_1(h) + ... + d_j(h)
- dmfb_branches_in_relu(h, w, b, dilations) -> (relu(IN(cat)), mean, rstd)
- instance_norm_act(x, res, relu) -> (relu?(IN(x)) (+ res), mean, rstd)
Weights are packed as w[j, 3*ky + kx, ci, co] (`pack_branches`). Activations are channels-last;
NCHW inputs are converted. The fused DMFB saves h, the pre-norm c1/c2 outputs and the block's
tensors the convolutions keep anyway; never d1..d4 or the cat (the backward recomputes the cat).
A convolution whose output feeds an instance norm runs without its bias (see conv_before_norm).
"""
import contextlib
import functools
import importlib
import os
import threading
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _impl

EPS = 1e-5
DILATIONS = (1, 2, 4, 8)


def _import_kernels():
    """(triton, dmfn_fast.kernels.dmfb_branches, dmfn_fast.kernels.instance_norm, None), or Nones and why not.
    Triton not installed is the common case; anything else (a broken triton, an error in kernels/) is
    reported with its own message."""
    try:
        import triton
    except ImportError as e:
        if e.name == "triton":
            return None, None, None, f"triton is not installed ({e}); pip install 'dmfn-fast[triton]'"
        return None, None, None, f"triton failed to import: {type(e).__name__}: {e}"
    except Exception as e:  # a broken triton install
        return None, None, None, f"triton failed to import: {type(e).__name__}: {e}"
    try:
        # dmfn_fast.kernels is the top-level kernels/ folder of the repository (setup.py's package_dir).
        from dmfn_fast.kernels import dmfb_branches as kb
        from dmfn_fast.kernels import instance_norm as kn
    except Exception as e:
        return None, None, None, f"the Triton kernels (dmfn_fast.kernels, kernels/) failed to import: " \
                                 f"{type(e).__name__}: {e}"
    return triton, kb, kn, None


triton, _kb, _kn, _TRITON_ERROR = _import_kernels()


def import_kernel_module(name, what, fallback):
    """dmfn_fast.kernels.<name> (kernels/<name>.py), or None: without Triton (triton_unavailable_reason says
    why), or where it fails to import (one warning naming `what` and the `fallback` that runs instead: a
    broken kernels/ file must not break the model)."""
    if triton is None:
        return None
    try:
        return importlib.import_module(f"dmfn_fast.kernels.{name}")
    except Exception as e:
        _impl.warn_once(("import", name), f"dmfn_fast: the {what} failed to import ({type(e).__name__}: {e}); "
                        f"{fallback}")
        return None

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests); otherwise they need CUDA.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# How torch.compile sees the ops. Default: triton_ops, which Inductor traces into (torch >= 2.6; never
# under the interpreter, whose kernels wrap_triton cannot trace). DMFN_TRITON_OP=0: opaque custom ops (the
# compiled graph calls each op's Python, which launches the same kernels as eager). On an H200 (torch
# 2.11, Triton 3.6) the traced path once gave wrong bf16 gradients: Inductor miscompiled the instance-norm
# sums, views of one zeroed base (see _sums32, separate when traced). Since that fix the traced ops match
# eager op by op and in the generator, fp32 and bf16, and the compiled training step is 8% faster than
# with opaque ops (benchmarks/RESULTS.md, fourth session).
_USE_TRITON_OP = (_impl.env_switch("DMFN_TRITON_OP") == "1" and hasattr(torch.library, "triton_op")
                  and hasattr(torch.library, "wrap_triton") and not INTERPRET)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Under torch.compile the generator's encoder and decoder norms run these ops too (each [norm, ReLU, conv]
# traced as instance_norm_act and a bias-free convolution), not Inductor's decomposition of
# nn.InstanceNorm2d. DMFN_COMPILED_NORMS=0: Inductor's. The H200 (s7) measured, besides the convolutions and
# the DMFB kernels, 7.8 ms of GPU time per generator fwd+bwd with Inductor's norms and about 2.3 ms with
# these in eager (benchmarks/RESULTS.md); the compiled comparison is the next lease's.
COMPILED_NORMS = _impl.env_switch("DMFN_COMPILED_NORMS") == "1"


# ----------------------------------------------------------------------------- references


def dmfb_branches_reference(h, weights, biases, dilations=DILATIONS):
    """cat[k1..k4] with PyTorch convolutions; the ground truth for `dmfb_branches`."""
    ks, k = [], None
    for w, b, d in zip(weights, biases, dilations):
        y = F.conv2d(h, w, b, 1, d, d)
        k = y if k is None else k + y
        ks.append(k)
    return torch.cat(ks, 1)


def instance_norm_act_reference(x, res=None, relu=False):
    y = F.instance_norm(x, eps=EPS)
    if relu:
        y = F.relu(y)
    return y if res is None else res + y


# ----------------------------------------------------------------------------- launch helpers


class _Skip:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _Tuned:
    """An autotuned kernel that, once Triton's Autotuner has picked a config for a key, launches that
    config's JIT function directly. Autotuner.run rebuilds dicts of every argument and the key's dtype
    strings on each launch: 28 against 5 us per launch on the dev CPU with the launch itself stubbed out
    (the fused DMFB is host-bound, see _Op). The key is the Autotuner's own (its key arguments and the
    argument dtypes), so a new shape or dtype goes through the Autotuner again."""

    def __init__(self, tuner):
        self.tuner, self.fn, self.best = tuner, tuner.fn, {}
        names = list(tuner.arg_names)
        self.key_pos = [names.index(k) for k in tuner.keys]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = tuple(args[i] if i < len(args) else kwargs[self.tuner.arg_names[i]] for i in self.key_pos)
            key += tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            cfg = self.best.get(key)
            if cfg is not None:
                return self.fn[grid](*args, **kwargs, **cfg)
            out = self.tuner[grid](*args, **kwargs)
            if self.tuner.best_config.pre_hook is None:  # a config hook must run per launch: keep Triton's path
                self.best[key] = self.tuner.best_config.all_kwargs()
            return out
        return launch


_TUNED = {}


def _kernel(k, *tensors):
    """k, ready for k[grid](...). triton_op: wrapped while tracing (torch.compile, make_fx, fake or
    functional modes), the kernel itself in plain eager: wrap_triton's wrapper sends every eager launch
    through a higher-order op, which took the fused DMFB's host time from 4 to 9 ms per forward+backward
    on an H200 (benchmarks/RESULTS.md). Opaque custom op: launches nothing on fake tensors (its fake impl
    is the same function). Eager launches of an autotuned kernel go through _Tuned."""
    if _USE_TRITON_OP and (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()):
        return torch.library.wrap_triton(k)
    if not _USE_TRITON_OP:
        from torch._subclasses.fake_tensor import is_fake

        if any(is_fake(t) for t in tensors):
            return _Skip()
    return _eager_kernel(k)


def _eager_kernel(k):
    """k, ready for an eager launch k[grid](...) on real tensors (an autotuned kernel through _Tuned), whatever
    dispatch modes are active: for eager autograd Functions that may run under one (a selective checkpoint's)."""
    if isinstance(k, triton.runtime.Autotuner):
        tuned = _TUNED.get(k)
        if tuned is None:
            tuned = _TUNED[k] = _Tuned(k)
        return tuned
    return k


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last)


def _empty_cl(n, c, h, w, like, dtype=None):
    return torch.empty((n, c, h, w), device=like.device, dtype=dtype or like.dtype,
                       memory_format=torch.channels_last)


def dot_flags(dtype):
    """A kernel's dot flags for `dtype`: fp16/bf16 on tensor cores; fp32 as cuDNN's convolutions run it, with TF32
    tensor cores when torch.backends.cudnn.allow_tf32 (PyTorch's default), else IEEE; under the interpreter,
    IEEE, and 16-bit dots upcast to fp32 (its own are unreliable)."""
    lowp = dtype != torch.float32
    tf32 = lowp or torch.backends.cudnn.allow_tf32
    return dict(UPCAST=lowp and INTERPRET, PREC="tf32" if tf32 and not INTERPRET else "ieee")


def _conv_kernel(name, dtype, pixels, C):
    """(kernel, launch kwargs) for one of the branch kernels ("fwd", "grad", "dgrad", "wgrad", "wgrad9",
    "fwd_tma", "grad_tma", "dgrad_tma").

    Compiled: the autotuned variant for the dtype class (tensor cores for fp16/bf16; fp32 with TF32 dots
    when torch.backends.cudnn.allow_tf32 is on, IEEE dots when it is off).
    Interpreter: the plain kernel with one tile as big as the image and the channels, because the
    interpreter's cost is per op and per program and its autotuner cannot benchmark; its bf16/fp16
    dots are unreliable, so they run in fp32 there."""
    lowp = dtype != torch.float32
    # The TMA kernels take neither flag (fp16/bf16 on the GPU; fp32 tiles as they are under the interpreter).
    flags = {} if name.endswith("_tma") else dot_flags(dtype)
    if not INTERPRET:
        return getattr(_kb, f"branches_{name}_{'lowp' if lowp else 'f32'}"), flags
    raw = {"fwd": _kb.branches_fwd, "grad": _kb.branches_grad, "dgrad": _kb.branches_dgrad,
           "wgrad": _kb.branches_wgrad, "wgrad9": _kb.branches_wgrad9, "fwd_tma": _kb.branches_fwd_tma,
           "grad_tma": _kb.branches_grad_tma, "dgrad_tma": _kb.branches_dgrad_tma,
           "wgrad_tma": _kb.branches_wgrad_tma}[name]
    bp, bc = min(4096, triton.next_power_of_2(pixels)), max(16, triton.next_power_of_2(C))
    # the grad kernels' epilogue with the suffix sums in registers (EPI 2: the most code of its three forms)
    extra = {"dgrad_tma": {"FLAT": 1}, "grad": {"EPI": 2}, "grad_tma": {"EPI": 2}}.get(name, {})
    if name == "wgrad_tma":  # 8 x 8 tiles in 2 runs (the stepping from tile to tile and image to image), 3 taps
        return raw, dict(TH=8, TW=8, BLOCK_CI=C, BLOCK_CO=C, SPLITS=2, TAPS=3)
    if name.endswith("_tma"):  # one 16 x 16 tile (TMA boxes hold at most 256 per side); C a power of two
        return raw, dict(TH=16, TW=16, BLOCK_N=C, BLOCK_K=C, **extra)
    tiles = dict(BLOCK_CI=bc, BLOCK_CO=bc) if name.startswith("wgrad") else dict(BLOCK_N=bc, BLOCK_K=bc)
    return raw, dict(flags, BLOCK_P=bp, **tiles, **extra)


def _zeros32(*shape, like):
    """Zeroed fp32 sums for the kernels' atomics; inside _arena, a slice of its one zeroed buffer."""
    arena = getattr(_ARENA, "active", None)
    if arena is not None:
        part = arena.take(shape)
        if part is not None:
            return part
    return torch.zeros(shape, device=like.device, dtype=torch.float32)


class _Arena:
    """One zeroed fp32 buffer that an eager autograd Function's forward or backward carves all its sums
    from: one zeros launch instead of one per instance norm and per weight gradient (host time counts, see
    _Op). Only the eager Functions use it: a custom op's outputs may not alias each other. A request past
    the end gets its own torch.zeros (slower, still right)."""

    def __init__(self, numel, like):
        self.buf = torch.zeros(numel, device=like.device, dtype=torch.float32)
        self.used = 0

    def take(self, shape):
        n = 1
        for d in shape:
            n *= d
        if self.used + n > self.buf.numel():
            return None
        self.used += n
        return self.buf[self.used - n:self.used].view(shape)


_ARENA = threading.local()  # the autograd engine runs backward on its own threads


@contextlib.contextmanager
def _arena(numel, like):
    prev = getattr(_ARENA, "active", None)
    _ARENA.active = _Arena(numel, like)
    try:
        yield
    finally:
        _ARENA.active = prev


def _sums32(k, N, C, like):
    """k zeroed fp32 [N, C] sums. Eager: views of one allocation (host time counts, see _Op). Traced: one
    allocation each, because Inductor (torch 2.13, seen on 2.11) miscompiles a kernel-mutated view of a
    shared base: it clones the view's whole base extent from a buffer sized for the view alone, so the
    second sum started from stale memory and the compiled bf16 gradients were garbage (RESULTS.md)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return tuple(_zeros32(N, C, like=like) for _ in range(k))
    return _zeros32(k, N, C, like=like).unbind(0)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """The multiprocessors of t's GPU (its index, else the current device), cached per device: what the
    kernels' launch plans size their programs by (traced with fake tensors too)."""
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _cdiv(a, b):
    # Plain integer math: triton.cdiv is a ConstexprFunction in Triton >= 3.7, ~15 us a host call.
    return -(-a // b)


_TMA = _impl.env_switch("DMFN_TMA") == "1"


def _tma(h):
    """Whether the forward, grad and dgrad branch kernels take their pixel operand (h, or G for dgrad) by TMA
    in 2-D pixel tiles (branches_fwd_tma, branches_dgrad_tma) rather than as gathered rows: the default where
    they run (the H200's breakdown, s7: 228.8 us for the three against the row kernels' 240.2, bf16 at the
    training shape; DMFN_TMA=0 turns them off): fp16/bf16 on sm_90 or newer, C a multiple of 64, in eager
    only (traced by torch.compile, the row kernels stay: the descriptors' scratch memory in Inductor's
    launches is unverified)."""
    return (_TMA and not INTERPRET and h.dtype != torch.float32 and h.device.type == "cuda"
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()  # before data_ptr
            and h.shape[1] % 64 == 0 and h.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(h.device)[0] >= 9)


def _tma_scratch(device, size, alignment, stream):
    """Global memory for the kernels' TMA descriptors (made on the device at launch)."""
    return torch.empty(size, device=device, dtype=torch.int8)


def _branches_forward(h, w, b, dil, grad=None, tma=None):
    """Launch the branch kernel. grad=None: returns the cat [k1..k4].
    grad=(dt, mean, rstd, sa, sb): returns the suffix sums G of dk (MODE 1).
    tma: force (True) or refuse (False) the TMA kernels; None: _tma."""
    N, C, H, W = h.shape
    mode = 0 if grad is None else 1
    tma = _tma(h) if tma is None else tma
    kern, kw = _conv_kernel(("fwd" if mode == 0 else "grad") + ("_tma" if tma else ""), h.dtype, H * W, C)
    out = _empty_cl(N, 4 * C, H, W, h)
    if mode == 0:  # reads none of the gradient inputs: h and one fp32 placeholder stand in for them
        unused = torch.empty(1, device=h.device, dtype=torch.float32)
        grad = (h, unused, unused, unused, unused)
    dt, mean, rstd, sa, sb = grad
    grid = _conv_grid(N, C, H, W, tma, h.device)
    if mode == 0:
        kw = dict(kw, MODE=0, EPI=0)  # branches_grad(_tma) is MODE 1 by construction, EPI its autotuned epilogue
    _kernel(kern, h)[grid](
        h, w, b, out, dt, mean, rstd, sa, sb, N, H, W, C, D1=dil[0], D2=dil[1], D3=dil[2], D4=dil[3], **kw)
    return out


def _set_tma_allocator(device):
    """Triton's allocator for the TMA kernels' descriptors. It is per thread (a ContextVar), and the autograd
    engine runs backward on its own threads, so every launch sets it."""
    triton.set_allocator(functools.partial(_tma_scratch, device))


def _conv_grid(N, C, H, W, tma, device):
    """The launch grid of a forward, grad or dgrad branch kernel: pixel tiles (rows, or TMA's 2-D tiles) by
    channel tiles. The TMA kernels make their descriptors in global memory from triton's allocator."""
    if tma:
        _set_tma_allocator(device)
        return lambda META: (N * _cdiv(H, META["TH"]) * _cdiv(W, META["TW"]), _cdiv(C, META["BLOCK_N"]))
    return lambda META: (N * _cdiv(H * W, META["BLOCK_P"]), _cdiv(C, META["BLOCK_N"]))


def _branches_dgrad(w, G, dil, like, tma=None):
    """dh from the suffix sums G = [G_1..G_4]; `like` is h (shape, dtype, device). tma as _branches_forward's."""
    N, C, H, W = like.shape
    dh = _empty_cl(N, C, H, W, like)
    tma = (_tma(like) and G.data_ptr() % 16 == 0) if tma is None else tma
    grid = _conv_grid(N, C, H, W, tma, like.device)
    kern, kw = _conv_kernel("dgrad_tma" if tma else "dgrad", like.dtype, H * W, C)
    _kernel(kern, like)[grid](G, w, dh, N, H, W, C, D1=dil[0], D2=dil[1], D3=dil[2], D4=dil[3], **kw)
    return dh


def _taps9(dtype, device):
    """Whether the weight gradient runs branches_wgrad9 (a program per branch over its 9 taps) rather than
    branches_wgrad (a program per tap): opt-in with DMFN_WGRAD9=1 (the H200 timed it at 117.5 against 120.0
    us in s10, within the noise, and the TMA wgrad, 83.3, takes precedence on sm_90); fp16/bf16 on sm_90 or
    newer only (its 9 accumulators spill on sm_80)."""
    return (_WGRAD9 and not INTERPRET and dtype != torch.float32 and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


_WGRAD9 = _impl.env_switch("DMFN_WGRAD9") == "1"
# branches_wgrad_tma where _tma allows (sm_90): 83 against the row kernel's 120 us at the training shape (H200,
# s10, gpu_breakdown.py); DMFN_WGRAD_TMA=0 turns it off
_WGRAD_TMA = _impl.env_switch("DMFN_WGRAD_TMA") == "1"


def _branches_wgrad(h, G, dil, taps9=None, tma=None):
    """(dw fp32 [4, 9, C, C], db fp32 [4, C]) from h and the suffix sums G. taps9: force (True) or refuse
    (False) branches_wgrad9; None: _taps9. tma: the same for branches_wgrad_tma (None: where _tma allows, unless
    DMFN_WGRAD_TMA=0); it takes precedence over taps9."""
    N, C, H, W = h.shape
    # apart in the op path (a custom op's outputs may not alias); in the eager Functions, from their _arena
    dw = _zeros32(4, 9, C, C, like=h)
    db = _zeros32(4, C, like=h)
    NP = N * H * W
    if tma is None:
        tma = _WGRAD_TMA and _tma(h) and G.data_ptr() % 16 == 0
    if tma:
        kern, kw = _conv_kernel("wgrad_tma", h.dtype, NP, C)
        _set_tma_allocator(h.device)
        grid = lambda META: (META["SPLITS"], 4 * (9 // META["TAPS"]) + 4,  # noqa: E731
                             _cdiv(C, META["BLOCK_CI"]) * _cdiv(C, META["BLOCK_CO"]))
        _kernel(kern, h)[grid](h, G, dw, db, N, H, W, C, D1=dil[0], D2=dil[1], D3=dil[2], D4=dil[3], **kw)
        return dw, db
    taps9 = _taps9(h.dtype, h.device) if taps9 is None else taps9
    kern, kw = _conv_kernel("wgrad9" if taps9 else "wgrad", h.dtype, NP, C)
    # Split the pixel reduction into about 28 runs per (branch, tap): ~1000 programs on a big input
    # (one run under the interpreter); wgrad9, about 64 runs per branch: 256 programs of 8 warps each, one
    # per SM at a time. The run length is a multiple of every config's BLOCK_P.
    unit, runs = (kw["BLOCK_P"], 1) if INTERPRET else (128, 64 if taps9 else 28)
    pix_per_split = unit * max(1, _cdiv(_cdiv(NP, unit), runs))

    def wgrid(META):
        tiles_c = _cdiv(C, META["BLOCK_CI"]) * _cdiv(C, META["BLOCK_CO"])
        # weight programs: 36 per (branch, tap), or 4 per branch (wgrad9); then 4 bias programs
        return (_cdiv(NP, pix_per_split), 8 if taps9 else 40, tiles_c)

    _kernel(kern, h)[wgrid](h, G, dw, db, NP, H, W, C, pix_per_split, D1=dil[0], D2=dil[1], D3=dil[2], D4=dil[3], **kw)
    return dw, db


def _branches_backward(h, w, G, dil):
    """(dh, dw fp32, db fp32) from the suffix sums G = [G_1..G_4]."""
    return (_branches_dgrad(w, G, dil, h),) + _branches_wgrad(h, G, dil)


def _suffix(g):
    N, C4, H, W = g.shape
    out = torch.empty_like(g)
    NP = N * H * W
    C = C4 // 4
    _kernel(_kb.suffix_sum, g)[(_cdiv(NP, 64), _cdiv(C, 64))](g, out, NP, C, BLOCK_P=64, BLOCK_C=64)
    return out


def _in_grid(N, C, H, W, bp):
    return (N * _cdiv(H * W, bp), _cdiv(C, _kn.BLOCK_C))


def _apply_pixels(x):
    """Pixels per program of the elementwise norm kernels (in_apply, in_bwd_apply) on x's dtype."""
    return _kn.APPLY_PIXELS_2BYTE if x.element_size() == 2 else _kn.BLOCK_P


def _in_split(N, C, H, W):
    """(grid, pixels per program) of the reductions: about TARGET_PROGRAMS programs, each over whole tiles."""
    tiles, ct = _cdiv(H * W, _kn.BLOCK_P), _cdiv(C, _kn.BLOCK_C)
    pps = _cdiv(tiles, max(1, min(tiles, _cdiv(_kn.TARGET_PROGRAMS, N * ct)))) * _kn.BLOCK_P
    return (N * _cdiv(H * W, pps), ct), pps


def _in_forward(x, shift, s, ss, res, relu, out_dtype):
    """Normalize x from sums of x - shift and their squares (shift [N, C] fp32)."""
    N, C, H, W = x.shape
    y = _empty_cl(N, C, H, W, x, out_dtype)
    mean = torch.empty((N, C), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bp = _apply_pixels(x)
    _kernel(_kn.in_apply, x)[_in_grid(N, C, H, W, bp)](
        x, res if res is not None else x, y, shift, s, ss, mean, rstd, H * W, C, EPS,
        RELU=relu, RESIDUAL=res is not None, BLOCK_P=bp, BLOCK_C=_kn.BLOCK_C,
        num_warps=_kn.NUM_WARPS)
    return y, mean, rstd


def _in_backward_sums(dy, x, mean, rstd, relu, from_y):
    N, C, H, W = x.shape
    sa, sb = _sums32(2, N, C, like=x)
    grid, pps = _in_split(N, C, H, W)
    _kernel(_kn.in_bwd_reduce, x)[grid](
        dy, x, mean, rstd, sa, sb, H * W, C, pps, RELU=relu, FROM_Y=from_y,
        BLOCK_P=_kn.BLOCK_P, BLOCK_C=_kn.BLOCK_C, num_warps=_kn.NUM_WARPS)
    return sa, sb


# ----------------------------------------------------------------------------- custom ops


def _device_of(t: torch.Tensor):
    """The context that makes t's GPU the current one: Triton launches on the current device, so a model on
    cuda:1 would otherwise launch on cuda:0 with cuda:1 pointers."""
    real_cuda = t.device.type == "cuda" and not is_fake(t) and not torch.compiler.is_compiling()
    return torch.cuda.device(t.device) if real_cuda else contextlib.nullcontext()


def _on_input_device(fn):
    @functools.wraps(fn)  # keeps the signature: torch.library infers the op schema from it
    def run(*args, **kwargs):
        t = args[0]
        if t.device.type != "cuda" or (not is_fake(t) and t.device.index == torch.cuda.current_device()):
            return fn(*args, **kwargs)  # already there (or no GPU): skip the guard's host cost
        with _device_of(t):
            return fn(*args, **kwargs)
    return run



DEFINED = []  # the names of the ops _define registered (the opcheck tests check every one)


def _define(name, fn, backward=None, setup_context=None, twice=False):
    """The op `dmfn_fast::name`: a triton_op, or else an opaque custom_op whose fake impl is `fn`
    itself (its launches skip fake tensors). Returns an _Op. twice: its backward is itself differentiable (its
    eager Function's backward not marked once_differentiable)."""
    qualname = f"dmfn_fast::{name}"
    DEFINED.append(name)
    fn = _on_input_device(fn)
    if _USE_TRITON_OP:
        op = torch.library.triton_op(qualname, fn, mutates_args=())
    else:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return _Op(op, fn, backward, setup_context, twice)


def _plain_eager(args) -> bool:
    """Plain tensors, no compiler tracing and no dispatch mode (fake, functional, proxy) active."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(a) in (torch.Tensor, torch.nn.Parameter) for a in args if isinstance(a, torch.Tensor))


def _eager_autograd(tensors) -> bool:
    """Plain eager (see _plain_eager), and autograd will need a graph: take an eager autograd.Function."""
    tensors = [t for t in tensors if t is not None]
    return torch.is_grad_enabled() and _plain_eager(tensors) and any(t.requires_grad for t in tensors)


class _Op:
    """One DMFB op. torch.compile, opcheck and any tracing see the registered torch.library op; plain
    eager calls run the same Python (launches, autograd formulas) through a torch.autograd.Function.
    The fused path is host-bound in eager (benchmarks/RESULTS.md), and the op's dispatch layers are
    a third of its Python cost: with the launches stubbed, one DMFB forward+backward took 1.56 ms of
    host time through the ops and 1.09 ms this way (2-core dev CPU, median of 15 interleaved rounds)."""

    def __init__(self, op, fn, backward, setup_context, twice=False):
        self.op, self.fn = op, fn
        self.function = None
        if backward is not None:
            def forward(ctx, *args):  # ctx-style: apply() then skips binding a signature per call
                out = fn(*args)
                setup_context(ctx, args, out)
                if isinstance(out, tuple):  # (y, mean, rstd): the statistics take no gradient, so
                    ctx.mark_non_differentiable(*out[1:])  # backward gets None for them, not zeros
                    ctx.set_materialize_grads(False)
                return out

            self.function = type(f"{op._name}_eager", (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(backward if twice else torch.autograd.function.once_differentiable(backward)),
            })

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled():
            return self.function.apply(*args)
        return self.fn(*args)


def _branches_bwd_fn(h: torch.Tensor, w: torch.Tensor, g: torch.Tensor, dilations: list[int],
                     suffix: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    G = _suffix(_cl(g)) if suffix else _cl(g)
    return _branches_backward(_cl(h), w.contiguous(), G, dilations)


def _branches_fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dilations: list[int]) -> torch.Tensor:
    return _branches_forward(_cl(h), w.contiguous(), b.contiguous(), dilations)


def _branches_in_relu_fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dilations: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _in_act_fn(_branches_forward(_cl(h), w.contiguous(), b.contiguous(), dilations), None, True)


def _branches_in_relu_bwd_fn(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, t: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor, dt: torch.Tensor, dilations: list[int]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w, b, t, mean, rstd = _cl(h), w.contiguous(), b.contiguous(), _cl(t), mean.contiguous(), rstd.contiguous()
    dt = _cl(dt).to(h.dtype)
    sa, sb = _in_backward_sums(dt, t, mean, rstd, relu=True, from_y=True)
    G = _branches_forward(h, w, b, dilations, grad=(dt, mean, rstd, sa, sb))
    return _branches_backward(h, w, G, dilations)


def _in_stats(x):
    """(shift, sum, sum of squares) of channels-last x per (n, c), fp32 [N, C] each: what _in_forward takes."""
    N, C, H, W = x.shape
    s, ss, shift = _sums32(3, N, C, like=x)
    grid, pps = _in_split(N, C, H, W)
    _kernel(_kn.in_stats, x)[grid](
        x, shift, s, ss, H * W, C, pps, BLOCK_P=_kn.BLOCK_P, BLOCK_C=_kn.BLOCK_C, num_warps=_kn.NUM_WARPS)
    return shift, s, ss


def _in_act_fn(x: torch.Tensor, res: Optional[torch.Tensor], relu: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, res = _cl(x), None if res is None else _cl(res)
    shift, s, ss = _in_stats(x)
    out_dtype = x.dtype if res is None else torch.promote_types(x.dtype, res.dtype)
    return _in_forward(x, shift, s, ss, res, relu, out_dtype)


def _in_act_bwd_fn(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   relu: bool) -> torch.Tensor:
    N, C, H, W = x.shape
    dy, x, mean, rstd = _cl(dy), _cl(x), mean.contiguous(), rstd.contiguous()
    sa, sb = _in_backward_sums(dy, x, mean, rstd, relu=relu, from_y=False)
    dx = _empty_cl(N, C, H, W, x)
    bp = _apply_pixels(x)
    _kernel(_kn.in_bwd_apply, x)[_in_grid(N, C, H, W, bp)](
        dy, x, mean, rstd, sa, sb, dx, H * W, C, RELU=relu,
        BLOCK_P=bp, BLOCK_C=_kn.BLOCK_C, num_warps=_kn.NUM_WARPS)
    return dx


def _setup_branches(ctx, inputs, output):
    h, w, b, dil = inputs
    ctx.save_for_backward(h, w)
    ctx.dil = dil


def _bwd_branches(ctx, g):
    h, w = ctx.saved_tensors
    dh, dw, db = _branches_bwd_op(h, w, g, ctx.dil, True)
    return dh, dw.to(w.dtype), db.to(w.dtype), None


def _setup_branches_in_relu(ctx, inputs, output):
    h, w, b, dil = inputs
    t, mean, rstd = output
    ctx.save_for_backward(h, w, b, t, mean, rstd)
    ctx.dil = dil


def _bwd_branches_in_relu(ctx, dt, _dmean, _drstd):
    h, w, b, t, mean, rstd = ctx.saved_tensors
    dh, dw, db = _branches_in_relu_bwd_op(h, w, b, t, mean, rstd, dt, ctx.dil)
    return dh, dw.to(w.dtype), db.to(b.dtype), None


def _setup_in_act(ctx, inputs, output):
    x, res, relu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd)
    ctx.relu = relu
    ctx.res_dtype = None if res is None else res.dtype


def _bwd_in_act(ctx, dy, _dmean, _drstd):
    x, mean, rstd = ctx.saved_tensors
    dx = _in_act_bwd_op(dy, x, mean, rstd, ctx.relu)
    dres = None if ctx.res_dtype is None else dy.to(ctx.res_dtype)
    return dx, dres, None


if _kb is not None:
    _branches_bwd_op = _define("dmfb_branches_backward", _branches_bwd_fn)
    _branches_in_relu_bwd_op = _define("dmfb_branches_in_relu_backward", _branches_in_relu_bwd_fn)
    _in_act_bwd_op = _define("instance_norm_act_backward", _in_act_bwd_fn)
    _branches_op = _define("dmfb_branches", _branches_fn, _bwd_branches, _setup_branches)
    _branches_in_relu_op = _define("dmfb_branches_in_relu", _branches_in_relu_fn,
                                   _bwd_branches_in_relu, _setup_branches_in_relu)
    _in_act_op = _define("instance_norm_act", _in_act_fn, _bwd_in_act, _setup_in_act)


# ----------------------------------------------------------------------------- public API


def triton_unavailable_reason():
    """None when the Triton kernels can be used, else why not (the import's real error)."""
    return _TRITON_ERROR


def pack_branches(weights, biases, dtype):
    """Four [C, C, 3, 3] weights and [C] biases -> (w [4, 9, C, C] as (tap, ci, co), b [4, C]), in `dtype`.
    Without autograd (inference) the result is cached until a weight or bias changes: its tensor version
    moves, or any optimizer steps (torch's fused Adam updates in place without moving versions)."""
    params = list(weights) + list(biases)
    cacheable = (not torch.is_grad_enabled() or not any(p.requires_grad for p in params)) \
        and not torch.compiler.is_compiling()
    if cacheable:
        key = (dtype,) + tuple((id(p), p._version, p.data_ptr()) for p in params)
        hit = _PACKED.get(key)
        if hit is not None:
            return hit
    packed = _pack(weights, biases, dtype)
    if cacheable:
        if len(_PACKED) >= 64:  # a model's worth of blocks; drop the oldest beyond that
            _PACKED.pop(next(iter(_PACKED)))
        _PACKED[key] = packed
    return packed


_PACKED = {}
# Any optimizer's step drops the cache: fused optimizers (train.py's Adam on CUDA) write the parameters in
# place without bumping their versions, so validation between steps would pack stale weights.
register_optimizer_step_post_hook(lambda *_: _PACKED.clear())


def _pack(weights, biases, dtype):
    w = torch.stack(list(weights)).permute(0, 3, 4, 2, 1)  # [4, ky, kx, ci, co]
    w = w.reshape(4, 9, w.shape[-2], w.shape[-1])
    # .to() returns the permuted view itself when the dtype already matches: contiguous() makes the copy
    return w.to(dtype).contiguous(), torch.stack(list(biases)).to(dtype)


class _BranchesInReluEager(torch.autograd.Function):
    """Plain eager branches_in_relu with autograd, straight from the four branch weights and biases: the
    packing runs inside (no autograd nodes for its stack, permute and cast), and the backward unpacks the
    fp32 weight and bias sums straight into each parameter's dtype. Same kernels as the op; tests compare
    the two."""

    @staticmethod
    def forward(ctx, h, dilations, *params):
        w, b = _pack(params[:4], params[4:], h.dtype)
        N, C = h.shape[:2]
        with _arena(3 * N * 4 * C, h):  # the cat's instance-norm sums
            t, mean, rstd = _branches_in_relu_fn(h, w, b, dilations)
        ctx.save_for_backward(h, w, b, t, mean, rstd)
        ctx.dilations, ctx.dtypes = dilations, [p.dtype for p in params]
        return t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dt):
        h, w, b, t, mean, rstd = ctx.saved_tensors
        N, C = h.shape[:2]
        with _arena(_branch_bwd_sums(N, C), h):
            dh, dw, db = _branches_in_relu_bwd_fn(h, w, b, t, mean, rstd, dt, ctx.dilations)
        return (dh, None, *_unpack_grads(dw, db, ctx.dtypes))


def _branch_bwd_sums(N, C):
    """fp32 elements the branch op's backward accumulates into: the cat's instance-norm backward sums
    (2 x [N, 4C]), the weight and bias gradients ([4, 9, C, C], [4, C])."""
    return 2 * N * 4 * C + 36 * C * C + 4 * C


def _unpack_grads(dw, db, dtypes):
    """The packed fp32 sums dw [4, 9, C, C] (tap, ci, co) and db [4, C] as the four branch weights' and
    biases' gradients, each in its parameter's dtype (`dtypes`: weights, then biases)."""
    C = dw.shape[-1]
    dw = dw.view(4, 3, 3, C, C).permute(0, 4, 3, 1, 2)  # [4, co, ci, ky, kx]
    if len(set(dtypes[:4])) == 1 and len(set(dtypes[4:])) == 1:  # the usual case: one cast each, not eight
        dw, db = dw.to(dtypes[0], memory_format=torch.contiguous_format), db.to(dtypes[4])
        return list(dw.unbind(0)) + list(db.unbind(0))
    return [dw[j].to(dtypes[j], memory_format=torch.contiguous_format) for j in range(4)] + \
        [db[j].to(dtypes[4 + j]) for j in range(4)]


def _check_branches(h, weights, biases, dilations):
    if _kb is None:
        raise RuntimeError(triton_unavailable_reason())
    if h.dim() != 4 or h.dtype not in _FLOATS:
        raise ValueError(f"h must be a float32/16/bf16 [N, C, H, W] tensor, got {h.dtype} {tuple(h.shape)}")
    C = h.shape[1]
    if len(weights) != 4 or len(biases) != 4 or len(dilations) != 4:
        raise ValueError("need exactly four branch weights, biases and dilations")
    for w, b in zip(weights, biases):
        if tuple(w.shape) != (C, C, 3, 3) or tuple(b.shape) != (C,):
            raise ValueError(f"branch weights must be [{C}, {C}, 3, 3] with [{C}] biases, "
                             f"got {tuple(w.shape)} and {tuple(b.shape)}")
    if not (h.is_cuda or INTERPRET):
        raise RuntimeError("the Triton DMFB kernels need CUDA tensors")


def dmfb_branches(h, weights, biases, dilations=DILATIONS):
    """cat[k1, k2, k3, k4] with k_j = conv_1(h) + ... + conv_j(h), conv_j a 3x3 conv with dilation
    (and padding) dilations[j]. Channels-last output in h's dtype; differentiable in h, weights, biases."""
    _check_branches(h, weights, biases, dilations)
    w, b = pack_branches(weights, biases, h.dtype)
    return _branches_op(_cl(h), w, b, [int(d) for d in dilations])


def branches_in_relu(h, weights, biases, dilations=DILATIONS):
    """relu(instance_norm(dmfb_branches(h, ...))), the cat never stored for backward."""
    _check_branches(h, weights, biases, dilations)
    h, dil = _cl(h), [int(d) for d in dilations]
    if _eager_autograd([h, *weights, *biases]):
        return _BranchesInReluEager.apply(h, dil, *weights, *biases)
    w, b = pack_branches(weights, biases, h.dtype)
    return _branches_in_relu_op(h, w, b, dil)[0]


def instance_norm_act(x, res=None, relu=False):
    """relu?(instance_norm(x)) (+ res), affine-free, eps 1e-5, channels-last out; dtype of
    x, promoted with res's."""
    if res is not None:
        res = _cl(res)
    return _in_act_op(_cl(x), res, bool(relu))[0]


class DMFBParams(NamedTuple):
    """A DMFB's tensors: c1 (3x3, C -> inner), the four dilated 3x3 branches (inner -> inner), c2 (3x3,
    4*inner -> C). Biases may be None."""
    c1_weight: torch.Tensor
    c1_bias: Optional[torch.Tensor]
    branch_weights: Sequence[torch.Tensor]
    branch_biases: Sequence[torch.Tensor]
    c2_weight: torch.Tensor
    c2_bias: Optional[torch.Tensor]
    dilations: Sequence[int] = DILATIONS


def dmfb_block_reference(x: torch.Tensor, p: DMFBParams) -> torch.Tensor:
    """The DMFB in PyTorch, the ground truth: h = relu(IN(c1(x))); k_j = d_1(h) + ... + d_j(h);
    out = x + IN(c2(relu(IN(cat[k1..k4])))). Instance norms affine-free, eps 1e-5."""
    h = F.relu(F.instance_norm(F.conv2d(x, p.c1_weight, p.c1_bias, 1, 1)))
    t = F.relu(F.instance_norm(dmfb_branches_reference(h, p.branch_weights, p.branch_biases, p.dilations)))
    return x + F.instance_norm(F.conv2d(t, p.c2_weight, p.c2_bias, 1, 1))


def dmfb_block_fused(x: torch.Tensor, p: DMFBParams) -> torch.Tensor:
    """dmfb_block_reference with the branches and all three instance norms in Triton (the cat is never
    saved for backward); c1 and c2 stay cuDNN convolutions. Under autocast every kernel runs in the dtype
    of c1's output. Raises where the kernels cannot run (see fused_why_not)."""
    if _eager_autograd([x, p.c1_weight, p.c1_bias, p.c2_weight, p.c2_bias, *p.branch_weights, *p.branch_biases]):
        return _DMFBEager.apply(x, p.c1_weight, p.c1_bias, p.c2_weight, p.c2_bias, [int(d) for d in p.dilations],
                                *p.branch_weights, *p.branch_biases)
    h = instance_norm_act(_skip_bias(F.conv2d(x, p.c1_weight, None, 1, 1), p.c1_bias), relu=True)
    t = branches_in_relu(h, p.branch_weights, p.branch_biases, p.dilations)
    return instance_norm_act(_skip_bias(F.conv2d(t, p.c2_weight, None, 1, 1), p.c2_bias), res=x)


class _BiasBeforeNorm(torch.autograd.Function):
    """x unchanged, and a zero gradient for the bias of the convolution that made x: the instance norm after
    it cancels a per-channel bias exactly, so its true gradient is zero (the reference's is rounding noise).
    Keeps the bias in the graph (DDP expects a gradient for every parameter)."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.bias_like = (bias.shape, bias.dtype, bias.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.bias_like
        return g, torch.zeros(shape, dtype=dtype, device=device)


def _skip_bias(out, bias):
    """out, the output of a convolution run without `bias`, before an instance norm: the bias, which the
    norm cancels, only gets its zero gradient where autograd asks for one."""
    if bias is None or not (torch.is_grad_enabled() and bias.requires_grad):
        return out
    return _BiasBeforeNorm.apply(out, bias)


def _conv_no_bias(conv, x):
    """`conv` (an nn.Conv2d or nn.ConvTranspose2d with zero padding) on x without its bias."""
    if isinstance(conv, torch.nn.ConvTranspose2d):
        return F.conv_transpose2d(x, conv.weight, None, conv.stride, conv.padding, conv.output_padding,
                                  conv.groups, conv.dilation)
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_before_norm(conv, x):
    """conv(x) where an affine-free instance norm comes next: cuDNN convolutions take no bias, so ATen adds
    it in a pass of its own and sums its gradient in another, for a bias that the norm cancels exactly. Here
    the convolution runs without it; the norm's output is the reference's to rounding, and the bias gets a
    zero gradient. For modules without hooks; other padding modes run the module."""
    if conv.padding_mode != "zeros":
        return conv(x)
    return _skip_bias(_conv_no_bias(conv, x), conv.bias)


_CONV3X3 = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, out pad, groups


def _conv_backward(dy, x, w, has_bias, needs, spec=_CONV3X3):
    """(dx, dw, db) of a convolution (`spec` as aten.convolution takes it; default 3x3, stride 1, padding
    1); None where not needed."""
    mask = [needs[0], needs[1], has_bias and needs[2]]
    out_channels = w.shape[1] * spec[5] if spec[3] else w.shape[0]
    return torch.ops.aten.convolution_backward(dy, x, w, [out_channels] if has_bias else None, *spec, mask)


def _autocast_operands(device_type, *tensors):
    """tensors (None allowed) cast once to autocast's dtype, as autocast would cast a convolution's operands,
    when autocast is on for device_type and all are floating point; else as they are."""
    if torch.is_autocast_enabled(device_type) and all(v.dtype in _FLOATS for v in tensors if v is not None):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(None if v is None else v.to(dtype) for v in tensors)
    return tensors


def _cast(v, dtype):
    return None if v is None else v.to(dtype)


class _DMFBEager(torch.autograd.Function):
    """The whole fused DMFB as one autograd node, for plain eager calls that need gradients: the same
    convolutions and kernels as the op path (the ops serve torch.compile and tracing), with the convolution
    backward called directly. One node instead of two convolutions, three ops and the weight packing: with
    the launches stubbed, 22% less host time per forward+backward on the dev CPU, and the fused path is
    host-bound (benchmarks/RESULTS.md). Under autocast the convolutions run as autocast runs them, and the
    gradients return in each input's dtype, as autograd's casts would return them."""

    @staticmethod
    def forward(ctx, x, c1w, c1b, c2w, c2b, dilations, *branch):
        N, C, inner = x.shape[0], x.shape[1], c1w.shape[0]
        # cast once: the casts are kept for backward, and autocast would cast them again in each convolution
        x_c, c1w_c, c2w_c = _autocast_operands(x.device.type, x, c1w, c2w)
        with _arena(3 * N * (inner + 4 * inner + C), x):  # the three instance norms' sums
            a = F.conv2d(x_c, c1w_c, None, 1, 1)  # no bias: the norm cancels it (conv_before_norm)
            h, m1, r1 = _in_act_fn(a, None, True)
            _check_branches(h, branch[:4], branch[4:], dilations)
            w, b = _pack(branch[:4], branch[4:], h.dtype)
            t, m2, r2 = _branches_in_relu_fn(h, w, b, dilations)
            c = F.conv2d(t, c2w_c, None, 1, 1)
            out, m3, r3 = _in_act_fn(c, x, False)
        # the convolutions' operands as they ran (no-ops unless autocast cast what was not cast above)
        x_c, c1w_c, c2w_c = x_c.to(a.dtype), c1w_c.to(a.dtype), c2w_c.to(c.dtype)
        ctx.save_for_backward(x_c, c1w_c, a, h, m1, r1, w, b, t, m2, r2, c2w_c, c, m3, r3)
        ctx.dilations = dilations
        ctx.dtypes = [None if v is None else v.dtype for v in (x, c1w, c1b, c2w, c2b, *branch)]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x_c, c1w_c, a, h, m1, r1, w, b, t, m2, r2, c2w_c, c, m3, r3 = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, c1w, c1b, c2w, c2b, dilations, branch weights and biases
        dt_ = ctx.dtypes
        N, C, inner = c.shape[0], c.shape[1], a.shape[1]
        with _arena(2 * N * (C + inner) + _branch_bwd_sums(N, inner) + inner + C, c):
            # c1's and c2's biases, skipped before their norms, get zero gradients
            dc1b, dc2b = (_zeros32(n, like=c) if need[i] else None for n, i in ((inner, 2), (C, 4)))
            dc = _in_act_bwd_fn(g, c, m3, r3, False)  # in c's dtype
            dt, dc2w, _ = _conv_backward(dc, t, c2w_c, False, (True, need[3], False))
            dh, dw, db = _branches_in_relu_bwd_fn(h, w, b, t, m2, r2, dt, ctx.dilations)
            da = _in_act_bwd_fn(dh, a, m1, r1, True)
        dx, dc1w, _ = _conv_backward(da, x_c, c1w_c, False, (need[0], need[1], False))
        if dx is not None:
            dx = dx.to(dt_[0]) + g.to(dt_[0])  # the convolution path and the residual
        return (dx, _cast(dc1w, dt_[1]), _cast(dc1b, dt_[2]), _cast(dc2w, dt_[3]), _cast(dc2b, dt_[4]), None,
                *_unpack_grads(dw, db, dt_[5:]))


class _NormReluConvEager(torch.autograd.Function):
    """conv(relu(instance_norm(x))) as one autograd node (plain eager with gradients; the generator's
    encoder and decoder): the norm in the Triton kernels, channels-last, where nn.InstanceNorm2d makes a
    channels-last input contiguous and back; and it keeps x and the norm's sums, not the activation, which
    backward reapplies in one pass (bit-identical: the same sums), as the reference's selective checkpoint
    keeps the norm input and recomputes the rest. `spec`: the convolution's (stride, padding, dilation,
    transposed, output_padding, groups). Under autocast the convolution's operands are cast once, as
    autocast would cast them, and the gradients return in each input's dtype. `before_norm`: another
    instance norm comes after the convolution, so it runs without its bias (conv_before_norm)."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec, before_norm):
        N, C = x.shape[:2]
        w, b = _autocast_operands(x.device.type, weight, None if before_norm else bias)
        x = _cl(x)
        with _arena(3 * N * C, x):
            shift, s, ss = _in_stats(x)
        y = _in_forward(x, shift, s, ss, None, True, x.dtype)[0].to(w.dtype)
        out = torch.ops.aten.convolution(y, w, b, *spec)
        ctx.save_for_backward(x, shift, s, ss, w)
        ctx.spec, ctx.has_bias = spec, b is not None
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, shift, s, ss, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        y, mean, rstd = _in_forward(x, shift, s, ss, None, True, x.dtype)  # the activation, again
        dy, dw, db = _conv_backward(g.to(w.dtype), y.to(w.dtype), w, ctx.has_bias, need[:3], ctx.spec)
        dx = None
        if need[0]:
            with _arena(2 * x.shape[0] * x.shape[1], x):
                dx = _in_act_bwd_fn(dy.to(x.dtype), x, mean, rstd, True).to(ctx.dtypes[0])
        if need[2] and not ctx.has_bias:  # the bias skipped before the next norm
            db = torch.zeros(ctx.bias_shape, dtype=ctx.dtypes[2], device=w.device)
        return dx, _cast(dw, ctx.dtypes[1]), _cast(db, ctx.dtypes[2]), None, None


def norm_relu_conv(x: torch.Tensor, conv: torch.nn.Module, before_norm: bool = False) -> torch.Tensor:
    """conv(relu(instance_norm(x))) (affine-free norm, eps 1e-5; `conv` an nn.Conv2d or nn.ConvTranspose2d
    with zero padding) with the norm in the Triton kernels: one autograd node in plain eager with gradients
    (_NormReluConvEager), else instance_norm_act and then the module. before_norm: another such norm comes
    next, so the convolution skips its bias (conv_before_norm). For inputs where the fused DMFB runs (see
    use_fused)."""
    spec = (list(conv.stride), list(conv.padding), list(conv.dilation), isinstance(conv, torch.nn.ConvTranspose2d),
            list(getattr(conv, "output_padding", (0, 0))), conv.groups)
    if (conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and _eager_autograd([x, conv.weight, conv.bias])):
        return _NormReluConvEager.apply(x, conv.weight, conv.bias, spec, before_norm)
    y = instance_norm_act(x, relu=True)
    return conv_before_norm(conv, y) if before_norm else conv(y)


def kernels_why_not(x: torch.Tensor, what: str) -> str:
    """"" when the Triton kernels can take x (a float32/16/bf16 [N, C, H, W] CUDA tensor, or a CPU one under
    the interpreter), else why not; `what` names the caller in the message."""
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        return f"{what} runs on CUDA tensors, got a {x.device.type} tensor"
    if x.dim() != 4 or x.dtype not in _FLOATS:
        return f"expected a float32/16/bf16 [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}"
    return ""


def fused_why_not(x: torch.Tensor) -> str:
    """"" when the fused DMFB can run on x, else why not (given that Triton imported)."""
    why = kernels_why_not(x, "the fused DMFB")
    if why:
        return why
    if torch.are_deterministic_algorithms_enabled():
        # The statistics and weight gradients are summed with fp32 atomics: run to run they differ in
        # the last bits. Deterministic mode takes the reference instead.
        return ("torch.use_deterministic_algorithms(True) is on and the fused DMFB sums with atomics "
                "(not bit-reproducible); the reference runs instead")
    return ""


def auto_prefers_fused(x: torch.Tensor) -> bool:
    """The `impl="auto"` rule, from benchmarks/RESULTS.md (H200, N=16, 64x64, C=64, forward+backward):
    - fp16/bf16 (including autocast to them): fused. One DMFB forward+backward 2.54 ms per call (GPU
      1.35) against cuDNN's 2.72 (2.65) and torch.compile's 2.65 (1.54); the bf16 generator
      forward+backward 1.40x eager amp, the training step 1.05x.
    - fp32: reference. With TF32 dots the fp32 kernels took 2.07 ms of GPU time for the branch op + IN
      against cuDNN's 1.39 (TF32 allowed; IEEE dots were 2.5x slower), so impl="fast" runs them and auto
      does not.
    The dtype that counts is the one the kernels would run in: autocast's when it is on for the device."""
    dtype = x.dtype
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    return dtype in (torch.float16, torch.bfloat16)


def dmfb_block(x: torch.Tensor, p: DMFBParams, impl: str = "auto") -> torch.Tensor:
    """The DMFB on x with tensors p; `impl` picks the implementation (dmfn_fast.ops._impl.resolve):

    - "reference" (or DMFN_IMPL=reference): dmfb_block_reference, any device and dtype.
    - "auto": dmfb_block_fused for fp16/bf16 inputs (or autocast to them) on CUDA when Triton imports and
      deterministic algorithms are off; the reference for fp32 (slower fused, see auto_prefers_fused),
      float64, CPU tensors and deterministic mode. Triton missing: the reference, with one warning.
    - "fast": dmfb_block_fused in any of fp32/fp16/bf16 on CUDA, or a RuntimeError saying why not."""
    if use_fused(x, impl):
        return dmfb_block_fused(x, p)
    return dmfb_block_reference(x, p)


def use_fused(x: torch.Tensor, impl: str = "auto") -> bool:
    """Whether the fused Triton path runs on x under `impl` (the rule of dmfb_block; the generator's
    encoder and decoder norms follow it too)."""
    return _impl.resolve(impl, lambda: fused_why_not(x), op="DMFB", missing=lambda: _TRITON_ERROR or "",
                         prefer_fast=lambda: auto_prefers_fused(x))
