"""2x2 max pooling with stride 2, without indices, forward and backward in Triton: max_pool2x2(x) =
F.max_pool2d(x, 2, 2), values and gradients to the bit. Where it runs: the frozen VGG's four pools in the
training step (kernels/max_pool.py says why).

Ops `dmfn_fast::max_pool2x2(x) -> y` (with autograd) and `dmfn_fast::max_pool2x2_backward(x, dy) -> dx`,
registered with fake kernels through the DMFB ops' machinery (dmfb._define: opcheck checks them; plain eager
calls skip the dispatcher). impl="auto" takes the kernels as DMFN_MAX_POOL says (by default in a CUDA-graph
step only: _impl.switch_on); impl="fast" takes them; never under torch.compile, whose Inductor writes its own
pooling kernel. Once differentiable (a gradient of the gradient raises; ATen's pooling has one)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _impl
from . import dmfb as _d

_AUTO = _impl.env_switch("DMFN_MAX_POOL")  # "graphs", "1" or "0": _impl.switch_on


def max_pool2x2_reference(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2, 2): the ground truth."""
    return F.max_pool2d(x, 2, 2)


_kmp = _d.import_kernel_module("max_pool", "max-pool kernel", "ATen's pooling runs")


def _launch(which, x, *args):
    N, C, H, W = x.shape
    OH, OW = H // 2, W // 2
    P = N * OH * OW
    if P and C:  # no launch for an empty batch (Triton refuses an empty grid)
        bp = _kmp.BLOCK_P[which]
        grid = (_d._cdiv(P, bp), _d._cdiv(C, _kmp.BLOCK_C))
        kernel = _kmp.max_pool2x2_fwd if which == "fwd" else _kmp.max_pool2x2_bwd
        _d._kernel(kernel, x)[grid](x, *args, P, H, W, OH, OW, C, BLOCK_P=bp, BLOCK_C=_kmp.BLOCK_C,
                                    num_warps=_kmp.NUM_WARPS)


def _max_pool_fn(x: torch.Tensor) -> torch.Tensor:
    x = _d._cl(x)
    N, C, H, W = x.shape
    y = _d._empty_cl(N, C, H // 2, W // 2, x)
    _launch("fwd", x, y)
    return y


def _max_pool_backward_fn(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    x, dy = _d._cl(x), _d._cl(dy)
    N, C, H, W = x.shape
    # an odd last row or column lies in no window: its gradient is 0, and the kernel does not write it
    dx = torch.zeros_like(x) if H % 2 or W % 2 else torch.empty_like(x)
    _launch("bwd", x, dy, dx)
    return dx


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _backward_op(x, dy)


if _kmp is not None:
    _op = _d._define("max_pool2x2", _max_pool_fn, _backward, _setup)
    _backward_op = _d._define("max_pool2x2_backward", _max_pool_backward_fn)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2, 2) by the Triton kernels, channels-last out, where they can run (fast_why_not; a
    RuntimeError saying why not). Like ATen's, refuses fewer than 2 rows or columns (an empty output)."""
    if not available():
        raise RuntimeError(f"max_pool2x2 needs Triton and its kernels: {_d.triton_unavailable_reason()}")
    if x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"max_pool2x2 takes [N, C, H, W] with H, W >= 2, got {tuple(x.shape)}")
    why = fast_why_not(x)
    if why:
        raise RuntimeError(f"max_pool2x2 cannot run: {why}")
    return _op(_d._cl(x))


def available() -> bool:
    """Whether Triton and the kernels imported."""
    return _kmp is not None


def fast_why_not(x: torch.Tensor) -> str:
    """"" when the kernels can run on x (given that Triton imported), else why not."""
    return _d.kernels_why_not(x, "the max-pool kernel")


def use_fast(x: torch.Tensor, impl: str = "auto") -> bool:
    """Whether the VGG takes the kernels for its pools on x under `impl` (asked once per call): where they run
    (imported, CUDA or the interpreter, float; never while torch.compile traces), for a channels-last x (as
    training's). auto: as DMFN_MAX_POOL says, then fp16/bf16 only (dmfb.auto_prefers_fused: timed in bf16
    alone); fast: always. Any float dtype: the result is ATen's to the bit."""
    if torch.compiler.is_compiling() or not available() or fast_why_not(x):
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):  # each pool would copy its NCHW input first
        return False
    return _impl.resolve(impl, lambda: "", op="max pooling",
                         prefer_fast=lambda: _impl.switch_on(_AUTO) and _d.auto_prefers_fused(x))


def fits(pool: nn.Module) -> bool:
    """pool is a plain 2x2, stride 2 nn.MaxPool2d (no padding, dilation, ceil mode, indices or hooks)."""
    def two(v):
        return v in (2, (2, 2))
    return (type(pool) is nn.MaxPool2d and two(pool.kernel_size) and two(pool.stride) and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1)) and not pool.ceil_mode and not pool.return_indices
            and not _impl.has_hooks(pool))
