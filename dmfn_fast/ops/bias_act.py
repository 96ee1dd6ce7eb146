"""A convolution's bias and activation in one pass: conv_bias_act(conv, x, act) = act(conv(x)), for the
convolutions no norm follows (the frozen VGG's sixteen, the generator's first). The convolution runs without
its bias and the Triton kernel kernels/bias_act.py adds it under the activation, one vectorized pass over
the output where ATen makes two, the first a broadcast add that does not vectorize on channels-last tensors.

Op `dmfn_fast::bias_act(x, b, act, slope) -> act(x + b)`, registered with fake and autograd at import through
the DMFB ops' machinery (dmfb._define: traced by torch.compile, checked by opcheck; plain eager calls skip the
dispatcher). Backward is ATen's ReLU / leaky-ReLU backward from the output, and the bias gradient a sum in
fp32. Where to use it is use_fast's call, made once per model call: never under torch.compile, whose Inductor
fuses the bias and activation itself."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _impl
from . import dmfb as _d

ACTS = ("none", "relu", "lrelu")
# impl="auto" takes the kernel as DMFN_BIAS_ACT says, by default in a CUDA-graph step only: on the H200 the VGG's
# fwd+bwd took 1.40 ms less GPU time with it but 2.76 ms more per call (s10; s15: 1.44 less, 5.46 more). impl="fast"
# takes it.
_AUTO = _impl.env_switch("DMFN_BIAS_ACT")  # "graphs", "1" or "0": _impl.switch_on


def bias_act_reference(x: torch.Tensor, b: Optional[torch.Tensor], act: str = "relu",
                       slope: float = 0.2) -> torch.Tensor:
    """act(x + b[c]) for [N, C, H, W] x, in PyTorch (b None: act(x))."""
    y = x if b is None else x + b.to(x.dtype).view(1, -1, 1, 1)
    if act == "relu":
        return F.relu(y)
    if act == "lrelu":
        return F.leaky_relu(y, slope)
    return y


_kba = _d.import_kernel_module("bias_act", "bias + activation kernel", "the plain layers run")


def _bias_act_fn(x: torch.Tensor, b: Optional[torch.Tensor], act: int, slope: float) -> torch.Tensor:
    x = _d._cl(x)
    N, C, H, W = x.shape
    y = _d._empty_cl(N, C, H, W, x)
    P = N * H * W
    grid = (_d._cdiv(P, _kba.BLOCK_P), _d._cdiv(C, _kba.BLOCK_C))
    _d._kernel(_kba.bias_act, x)[grid](
        x, x if b is None else b.contiguous(), y, P, C, slope, HAS_BIAS=b is not None, ACT=act,
        BLOCK_P=_kba.BLOCK_P, BLOCK_C=_kba.BLOCK_C, num_warps=_kba.NUM_WARPS)
    return y


def _setup(ctx, inputs, output):
    _, b, act, slope = inputs
    ctx.save_for_backward(output)
    ctx.act, ctx.slope = act, slope
    ctx.b_dtype = None if b is None else b.dtype


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    if ctx.act == 1:
        dz = torch.ops.aten.threshold_backward(dy, y, 0)
    elif ctx.act == 2:
        dz = torch.ops.aten.leaky_relu_backward(dy, y, ctx.slope, True)  # y's sign is its input's
    else:
        dz = dy
    db = None
    if ctx.b_dtype is not None and ctx.needs_input_grad[1]:
        db = dz.sum((0, 2, 3), dtype=torch.float32).to(ctx.b_dtype)
    return dz, db, None, None


if _kba is not None:
    _op = _d._define("bias_act", _bias_act_fn, _backward, _setup)


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor], act: str = "relu", slope: float = 0.2) -> torch.Tensor:
    """act(x + b[c]) by the Triton kernel, channels-last out (b cast to x's dtype first, as autocast casts a
    convolution's bias). For tensors fast_why_not accepts."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    return _op(_d._cl(x), None if b is None else b.to(x.dtype), ACTS.index(act), float(slope))


def available() -> bool:
    """Whether Triton and the kernel imported."""
    return _kba is not None


def fast_why_not(x: torch.Tensor) -> str:
    """"" when the kernel can run on x (given that Triton imported), else why not."""
    return _d.kernels_why_not(x, "the fused bias and activation")


def use_fast(x: torch.Tensor, impl: str = "auto") -> bool:
    """Whether the callers (the VGG, the generator) take the kernel for x's convolutions under `impl`: only
    where it can run (imported, CUDA, float; never while torch.compile traces), so impl="fast", which they
    also pass to ops that run elsewhere, raises nothing here. auto: as DMFN_BIAS_ACT says (_impl.switch_on:
    by default in a CUDA-graph step only; slower per call on the host-bound eager path), then as the DMFB
    decides (dmfb.auto_prefers_fused: fp16/bf16, autocast included); fast: always."""
    if torch.compiler.is_compiling() or not available() or fast_why_not(x):
        return False
    return _impl.resolve(impl, lambda: "", op="convolution bias and activation",
                         prefer_fast=lambda: _impl.switch_on(_AUTO) and _d.auto_prefers_fused(x))


def fusable(conv: nn.Module) -> bool:
    """conv is a plain nn.Conv2d (zero padding, no hooks) whose bias the kernel can add."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not _impl.has_hooks(conv))


def conv_bias_act(conv: nn.Conv2d, x: torch.Tensor, act: str = "relu", slope: float = 0.2) -> torch.Tensor:
    """act(conv(x)) ("relu", "lrelu" with `slope`, or "none"), the bias added by the kernel where `conv` is
    fusable, else the module and F.relu / F.leaky_relu. For x where the caller's use_fast said yes: asked
    once per call of the model, not per convolution."""
    if fusable(conv):
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return bias_act(y, conv.bias, act, slope)
    return bias_act_reference(conv(x), None, act, slope) if act != "none" else conv(x)
