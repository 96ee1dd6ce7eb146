"""A convolution of a thin input (1, 2, 3, 4 or 8 channels) with its bias and activation in one Triton kernel:
thin_conv(x, w, b, stride, padding, act) = act(conv2d(x, w, b, stride, padding)). Where it runs: the
generator's 4-channel 5x5 input convolution and the ReLU after it, and the discriminator's two 3-channel 5x5
stride-2 input convolutions (kernels/thin_conv.py: cuDNN runs these layers at a fraction of their floor; a
3-channel input runs as 4, with a zero channel).

Ops (namespace `dmfn_fast`, registered with fake kernels through the DMFB ops' machinery, dmfb._define, so
torch.compile can trace them and opcheck checks them):
- thin_conv(x, w, b, stride, padding, act, slope) -> y, with autograd;
- thin_conv_wgrad(x, y, dy, w, stride, padding, act, slope) -> (dw, db): the weight and bias gradient, summed
  in fp32 by one kernel from the activation's output y (the input gradient, when x needs one, is ATen's
  activation backward and cuDNN's dgrad).
Plain eager calls, and calls inside a selective checkpoint (the generator's training regions, whose dispatch
mode is not a trace), run the same Python through _ThinConvEager with the kernels launched directly.
impl="auto" takes it as use_fast says (the generator's anywhere, the discriminator's in a CUDA-graph step, by
default); impl="fast" takes it, eager and compiled."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from . import _impl
from . import dmfb as _d
from .bias_act import ACTS, bias_act_reference

_AUTO = _impl.env_switch("DMFN_THIN_CONV")  # "graphs", "1" or "0": _impl.switch_on
# input channels: vector gathers; 3 (an image: the discriminator's first convolutions) run as 4, a zero channel
# added to the input and the weight (3-channel gathers were scalar and spilled, kernels/thin_conv.py)
CHANNELS = (1, 2, 3, 4, 8)
MAX_OUT = 128  # output channels: one tile of them
MAX_K = 128  # taps x channels in the one dot (5x5 x 4: 100)


def thin_conv_reference(x, w, b=None, stride=1, padding=0, act="relu", slope=0.2):
    """act(conv2d(x, w, b, stride, padding)) in PyTorch: the ground truth."""
    return bias_act_reference(F.conv2d(x, w, b, stride, padding), None, act, slope)


_ktc = _d.import_kernel_module("thin_conv", "thin-input convolution kernel", "the plain layers run")


def _kernel_channels(c):
    return 4 if c == 3 else c


def _padded(x, w):
    """(x, w) with 3 input channels padded to 4 by a zero channel (x channels-last): what the kernels take."""
    if x.shape[1] != 3:
        return x, w
    return _d._cl(F.pad(x, (0, 0, 0, 0, 0, 1))), F.pad(w, (0, 0, 0, 0, 0, 1))  # one copy, channels-last kept


def _shape(x, w, stride, padding):
    """(N, C, H, W, O, KH, KW, OH, OW, constexprs shared by both kernels)."""
    N, C, H, W = x.shape
    O, _, KH, KW = w.shape
    OH, OW = (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1
    pow2 = _d.triton.next_power_of_2
    cx = dict(C=C, KH=KH, KW=KW, STRIDE=stride, PAD=padding, BLOCK_O=max(16, pow2(O)),
              BLOCK_K=max(16, pow2(KH * KW * C)))
    return N, C, H, W, O, KH, KW, OH, OW, cx


def _forward(x, w, b, stride, padding, act, slope, launch):
    """y = act(conv(x) + b), channels-last. launch(kernel, *tensors) -> kernel ready for [grid](...)."""
    x, w = _padded(_d._cl(x), w)
    N, C, H, W, O, KH, KW, OH, OW, cx = _shape(x, w, stride, padding)
    y = _d._empty_cl(N, O, OH, OW, x)
    M = N * OH * OW
    if _d.INTERPRET:  # one raw kernel, small tiles: several programs and a partial last tile in the tests
        kern, tiles = _ktc.thin_conv_fwd, dict(BLOCK_M=32)
    else:
        kern, tiles = _ktc.TUNED["fwd", "f32" if x.dtype == torch.float32 else "lowp"], {}
    grid = lambda META: (_d._cdiv(M, META["BLOCK_M"]),)  # noqa: E731
    # [K, O] rows, (ky * KW + kx) * C + c (a 25 KB copy; with one channel the reshape alone is a strided view)
    wp = w.permute(2, 3, 1, 0).reshape(KH * KW * C, O).contiguous()
    launch(kern, x)[grid](x, wp, x if b is None else b, y, M, H, W, OH, OW, O, float(slope),
                          HAS_BIAS=b is not None, ACT=act, **cx, **_d.dot_flags(x.dtype), **tiles)
    return y


def _wgrad(x, y, dy, w, stride, padding, act, slope, launch):
    """(dw in w's layout and dtype, db [O] in w's dtype) from the output y and its gradient dy."""
    x, y, dy = _d._cl(x), _d._cl(y), _d._cl(dy)
    x, w_k = _padded(x, w)
    N, C, H, W, O, KH, KW, OH, OW, cx = _shape(x, w_k, stride, padding)
    M = N * OH * OW
    dw32 = torch.zeros(cx["BLOCK_K"], O, device=x.device, dtype=torch.float32)
    db32 = torch.zeros(O, device=x.device, dtype=torch.float32)
    if _d.INTERPRET:  # 3 programs over tiles of 16 pixels: runs of several tiles, some programs idle
        kern, tiles, programs = _ktc.thin_conv_wgrad, dict(BLOCK_M=16), 3
    else:
        kern, tiles = _ktc.TUNED["wgrad", "f32" if x.dtype == torch.float32 else "lowp"], {}
        # two per SM, each summing a run of pixel tiles; traced (fake tensors) too: the compiled graph launches
        # with the number it records here
        programs = 2 * _d.sm_count(x)
    launch(kern, x)[(programs,)](x, y, dy, dw32, db32, M, H, W, OH, OW, O, float(slope), programs, ACT=act, **cx,
                                 **_d.dot_flags(x.dtype), **tiles)
    # rows k = (ky * KW + kx) * C + c -> [O, C, KH, KW] (a padded channel dropped), in w's dtype and strides (no
    # copy when accumulated)
    dw = torch.empty_like(w).copy_(dw32[:KH * KW * C].view(KH, KW, C, O).permute(3, 2, 0, 1)[:, :w.shape[1]])
    return dw, db32.to(w.dtype, copy=True)


def _act_backward(dy, y, act, slope):
    if act == 1:
        return torch.ops.aten.threshold_backward(dy, y, 0)
    if act == 2:
        return torch.ops.aten.leaky_relu_backward(dy, y, slope, True)  # y's sign is its input's
    return dy


def _grads(needs, dy, x, w, y, has_bias, spec, wgrad):
    """(dx, dw, db) for the inputs that need them; wgrad(x, y, dy, w, *spec) -> (dw, db). Under
    torch.use_deterministic_algorithms(True) the weight and bias gradients are ATen's too (the kernel sums
    with atomics)."""
    stride, padding, act, slope = spec
    need_w = needs[1] or (has_bias and needs[2])
    deterministic = torch.are_deterministic_algorithms_enabled()
    dx = dw = db = None
    if need_w and not deterministic:
        dw, db = wgrad(x, y, dy, w, *spec)
    if needs[0] or (need_w and deterministic):
        dz = _act_backward(dy, y, act, slope)
        mask = [bool(needs[0]), bool(need_w and deterministic), bool(has_bias and need_w and deterministic)]
        dx, dw_aten, db_aten = torch.ops.aten.convolution_backward(
            dz, x, w, [w.shape[0]] if mask[2] else None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, mask)
        if mask[1]:
            dw, db = dw_aten, db_aten
    return dx, dw if needs[1] else None, db if has_bias and needs[2] else None


def _eager_launch(kernel, *tensors):
    return _d._eager_kernel(kernel)


def _thin_conv_fn(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: int, padding: int, act: int,
                  slope: float) -> torch.Tensor:
    return _forward(x, w, b, stride, padding, act, slope, _d._kernel)


def _thin_conv_wgrad_fn(x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, stride: int,
                        padding: int, act: int, slope: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _wgrad(x, y, dy, w, stride, padding, act, slope, _d._kernel)


def _setup(ctx, inputs, output):
    x, w, b, stride, padding, act, slope = inputs
    ctx.save_for_backward(x, w, output)
    ctx.spec, ctx.has_bias = (stride, padding, act, slope), b is not None


def _backward(ctx, dy):
    x, w, y = ctx.saved_tensors
    return _grads(ctx.needs_input_grad, dy, x, w, y, ctx.has_bias, ctx.spec, _wgrad_op) + (None,) * 4


if _ktc is not None:
    _op = _d._define("thin_conv", _thin_conv_fn, _backward, _setup)
    _wgrad_op = _d._define("thin_conv_wgrad", _thin_conv_wgrad_fn)


class _ThinConvEager(torch.autograd.Function):
    """thin_conv's forward and backward with the kernels launched directly (no dispatcher, no tracing): plain
    eager calls with gradients, and calls under a selective checkpoint's dispatch mode, where the ops'
    launches would take the traced path."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, act, slope):
        with _d._device_of(x):
            y = _forward(x, w, b, stride, padding, act, slope, _eager_launch)
        ctx.save_for_backward(x, w, y)
        ctx.spec, ctx.has_bias = (stride, padding, act, slope), b is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, y = ctx.saved_tensors

        def wgrad(*args):
            with _d._device_of(x):
                return _wgrad(*args, _eager_launch)
        return _grads(ctx.needs_input_grad, dy, x, w, y, ctx.has_bias, ctx.spec, wgrad) + (None,) * 4


# a selective checkpoint's modes record and replay ATen ops and leave a direct launch alone; any other mode (a
# trace such as make_fx, a FLOP counter, ...) must see the op
_CHECKPOINT_MODES = tuple(getattr(torch.utils.checkpoint, n) for n in ("_CachingTorchDispatchMode",
                                                                      "_CachedTorchDispatchMode")
                          if hasattr(torch.utils.checkpoint, n))


def _real(tensors) -> bool:
    """Real tensors, not compiled, and no dispatch mode active but a selective checkpoint's: the eager path
    may launch directly."""
    if torch.compiler.is_compiling():
        return False
    if any(not isinstance(m, _CHECKPOINT_MODES) for m in _get_current_dispatch_mode_stack()):
        return False
    return all(type(t) in (torch.Tensor, nn.Parameter) and not is_fake(t) for t in tensors if t is not None)


def thin_conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None, stride: int = 1,
              padding: int = 0, act: str = "relu", slope: float = 0.2) -> torch.Tensor:
    """act(conv2d(x, w, b, stride, padding)) by the Triton kernels, channels-last out. Under autocast the
    operands are cast as autocast casts a convolution's; w and b are then taken in x's dtype. Takes x [N, C,
    H, W] with C in CHANNELS and w [O, C, KH, KW] with O <= MAX_OUT and KH * KW * C <= MAX_K (C = 3 counts as
    4; a ValueError otherwise), where the kernels can run (fast_why_not; a RuntimeError saying why not)."""
    if not available():
        raise RuntimeError(f"thin_conv needs Triton and its kernel: {_d.triton_unavailable_reason()}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if x.dim() != 4 or w.dim() != 4 or x.shape[1] != w.shape[1] or x.shape[1] not in CHANNELS \
            or w.shape[0] > MAX_OUT or w.shape[2] * w.shape[3] * _kernel_channels(w.shape[1]) > MAX_K:
        raise ValueError(f"thin_conv takes x [N, C, H, W] with C in {CHANNELS} and w [O, C, KH, KW] with O <= "
                         f"{MAX_OUT} and KH * KW * C <= {MAX_K}; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    why = fast_why_not(x)
    if why:
        raise RuntimeError(f"thin_conv cannot run: {why}")
    x, w, b = _d._autocast_operands(x.device.type, x, w, b)
    x = _d._cl(x)
    w = w.to(x.dtype)
    b = None if b is None else b.to(x.dtype)
    args = (x, w, b, int(stride), int(padding), ACTS.index(act), float(slope))
    if not _real((x, w, b)):
        return _op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
        return _ThinConvEager.apply(*args)
    with _d._device_of(x):
        return _forward(*args, _eager_launch)


def available() -> bool:
    """Whether Triton and the kernel imported."""
    return _ktc is not None


def fast_why_not(x: torch.Tensor) -> str:
    """"" when the kernels can run on x (given that Triton imported), else why not. Deterministic mode is no
    reason: the gradients are then ATen's (_grads)."""
    return _d.kernels_why_not(x, "the thin-input convolution")


def fits(conv: nn.Module) -> bool:
    """conv is a plain nn.Conv2d the kernel computes: 1, 2, 3, 4 or 8 input and at most 128 output channels, a
    square kernel whose taps x channels fit one dot, one stride and one zero padding for both axes, no
    dilation or groups, no hooks."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    kh, kw = conv.kernel_size
    return (conv.in_channels in CHANNELS and conv.out_channels <= MAX_OUT and kh == kw
            and kh * kw * _kernel_channels(conv.in_channels) <= MAX_K and conv.stride[0] == conv.stride[1]
            and conv.padding[0] == conv.padding[1] and conv.dilation == (1, 1) and conv.groups == 1
            and not _impl.has_hooks(conv))


def use_fast(x: torch.Tensor, impl: str = "auto", per_call_wins: bool = False) -> bool:
    """Whether a model takes the kernel for its input convolution on x under `impl` (asked once per call of
    the model): where it runs (imported, CUDA or the interpreter, float). Compiled too: Inductor would call
    the same cuDNN convolution and only fuse the bias and ReLU after it. auto: as DMFN_THIN_CONV says
    (_impl.switch_on: by default in a CUDA-graph step only), or, for a caller whose rows won per call too
    (per_call_wins: the generator's, H200 s15, bf16: batch 64 forward 0.35 against cuDNN's 2.22 ms, batch 16
    forward+backward 0.98 against 1.02), anywhere unless DMFN_THIN_CONV=0; then as the DMFB decides
    (dmfb.auto_prefers_fused: fp16/bf16, autocast included); fast: always. The discriminator's rows lost per
    call (1.10 against 0.58 ms: host time) and won in GPU time (0.28 against 0.52)."""
    if not available() or fast_why_not(x):
        return False
    on = (lambda: _AUTO != "0") if per_call_wins else (lambda: _impl.switch_on(_AUTO))
    return _impl.resolve(impl, lambda: "", op="thin-input convolution",
                         prefer_fast=lambda: on() and _d.auto_prefers_fused(x))


def conv_act(conv: nn.Conv2d, x: torch.Tensor, act: str = "relu", slope: float = 0.2) -> torch.Tensor:
    """act(conv(x)) by the kernel, for a conv that fits() and x where use_fast said yes."""
    return thin_conv(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0], act, slope)
