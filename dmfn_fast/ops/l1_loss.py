"""The losses' L1 terms in Triton: l1_mean(a, b, g) = mean |a*g - b*g| (g None: mean |a - b|), for a with
gradient, b and g without, g [N, 1, H, W] shared by the channels. Where it runs: DMFNLoss's guided and
feature-matching terms on the VGG's and the discriminator's features (kernels/l1_loss.py says why).

Ops `dmfn_fast::l1_mean_sign(a, b, g) -> (loss, sign)` (with autograd; sign, int8, is what backward keeps)
and `dmfn_fast::l1_mean_sign_backward(sign, g, scale) -> grad_a`, registered with fake kernels through the
DMFB ops' machinery (dmfb._define: opcheck checks them; plain eager calls skip the dispatcher). The loss and
the gradient are the reference's, (a*g - b*g).abs().mean(), but for the order of the sum and the loss's dtype
(loss_dtype: fp32 under autocast, as _L1Mean's): every element's difference and sign, and so the gradient,
are ATen's to the bit on a GPU (the interpreter's bf16 rounding truncates). impl="auto" takes the kernels as
DMFN_L1_KERNEL says (by default in a CUDA-graph step only: _impl.switch_on); impl="fast" takes them; never
under torch.compile, whose Inductor fuses the reference itself. Twice differentiable, as the formula (the
gradient is linear in the loss's gradient)."""
from typing import Optional, Tuple

import torch

from . import _impl
from . import dmfb as _d

_AUTO = _impl.env_switch("DMFN_L1_KERNEL")  # "graphs", "1" or "0": _impl.switch_on


def l1_mean_reference(a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean |a*g - b*g| (g None: mean |a - b|) in PyTorch: the ground truth."""
    return (a * g - b * g).abs().mean() if g is not None else (a - b).abs().mean()


_kl1 = _d.import_kernel_module("l1_loss", "L1 loss kernel", "the losses' PyTorch formula runs")


def _matrix(a, g):
    """(R, K, C, G_MODE) of a's [R, K] matrix in memory order (kernels/l1_loss.py). A tensor both contiguous and
    channels-last (one channel, or one pixel) is read as contiguous: the two orders are the same."""
    N, C, H, W = a.shape
    if a.is_contiguous():
        return N * C, H * W, C, 0 if g is None else 2
    return N * H * W, C, C, 0 if g is None else 1


def _format(a):
    return torch.contiguous_format if a.is_contiguous() else torch.channels_last


def _blocks(K):
    # int(): a traced K (dynamic shapes) specializes here; next_power_of_2's bit twiddling on a symbolic K
    # built expressions that took opcheck's dynamic-shape test minutes
    bk = min(_d.triton.next_power_of_2(max(int(K), 1)), _kl1.MAX_BLOCK_K)
    return _kl1.TILE // bk, bk


def _l1_mean_sign_fn(a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    b = b.contiguous(memory_format=_format(a))
    g = None if g is None else g.contiguous()
    R, K, C, mode = _matrix(a, g)
    sign = torch.empty_like(a, dtype=torch.int8)
    br, bk = _blocks(K)
    tiles = _d._cdiv(R, br) * _d._cdiv(K, bk)
    if _d.INTERPRET:  # few programs: several tiles each, some past the end
        programs = min(tiles, 3)
    else:  # traced (fake tensors) too: the compiled graph launches with the number it records here
        programs = min(tiles, _kl1.PROGRAMS_PER_SM * _d.sm_count(a))
    part = torch.empty(max(programs, 1), device=a.device, dtype=torch.float32)
    if R and K:
        _d._kernel(_kl1.l1_sign_fwd, a)[(programs,)](
            a, b, a if g is None else g, sign, part, R, K, C, _d._cdiv(tiles, programs), G_MODE=mode,
            RN=not _d.INTERPRET, BLOCK_R=br, BLOCK_K=bk, num_warps=_kl1.NUM_WARPS)
    else:  # an empty tensor: ATen's mean is NaN
        part.fill_(float("nan"))
    # the fp32 sum divided, in fp32: l1_mean rounds it once to loss_dtype (rounded before the division, an fp16
    # sum over 65504 was inf: the H200's [16, 64, 256, 256] test, s15)
    return part.sum() / a.numel(), sign


def _l1_mean_sign_backward_fn(sign: torch.Tensor, g: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    g = None if g is None else g.contiguous()
    R, K, C, mode = _matrix(sign, g)
    ga = torch.empty_like(sign, dtype=scale.dtype)
    br, bk = _blocks(K)
    if R and K:
        _d._kernel(_kl1.l1_sign_bwd, sign)[(_d._cdiv(R, br) * _d._cdiv(K, bk),)](
            sign, sign if g is None else g, scale, ga, R, K, C, G_MODE=mode, BLOCK_R=br, BLOCK_K=bk,
            num_warps=_kl1.NUM_WARPS)
    return ga


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2])
    ctx.dtype = inputs[0].dtype


def _backward(ctx, grad, _sign_grad):
    sign, g = ctx.saved_tensors
    # _L1Mean's backward: grad / numel rounded once to a's dtype, then abs's and g's products
    return _backward_op(sign, g, (grad.float() / sign.numel()).to(ctx.dtype)), None, None


def _setup_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.scale_dtype = inputs[2].dtype


def _backward_backward(ctx, dga):
    """The gradient is linear in scale (a gradient of the gradient: create_graph=True, as the formula allows)."""
    sign, g = ctx.saved_tensors
    v = dga.float() * sign
    return None, None, (v if g is None else v * g.float()).sum().to(ctx.scale_dtype)


if _kl1 is not None:
    _op = _d._define("l1_mean_sign", _l1_mean_sign_fn, _backward, _setup, twice=True)
    _backward_op = _d._define("l1_mean_sign_backward", _l1_mean_sign_backward_fn, _backward_backward,
                              _setup_backward)


def l1_mean(a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mean |a*g - b*g| (g None: mean |a - b|) by the Triton kernels, where they can run (fast_why_not; a
    RuntimeError saying why not)."""
    if not available():
        raise RuntimeError(f"l1_mean needs Triton and its kernels: {_d.triton_unavailable_reason()}")
    why = fast_why_not(a, b, g)
    if why:
        raise RuntimeError(f"l1_mean cannot run: {why}")
    return _op(a, b, g)[0].to(loss_dtype(a))


def loss_dtype(a: torch.Tensor) -> torch.dtype:
    """The L1 terms' loss dtype (both paths): fp32 for 16-bit features under autocast, where ATen's
    vector_norm, which _L1Mean used, autocasts to fp32 (the H200's s15 steps logged fp32 terms); else a's."""
    if a.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(a.device.type):
        return torch.float32
    return a.dtype


def available() -> bool:
    """Whether Triton and the kernels imported."""
    return _kl1 is not None


def fast_why_not(a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor] = None) -> str:
    """"" when the kernels can run on (a, b, g) (given that Triton imported), else why not."""
    why = _d.kernels_why_not(a, "the L1 loss kernel")
    if why:
        return why
    if a.is_cuda and torch.version.hip:
        return "the L1 loss kernel's products are inline PTX (NVIDIA GPUs only)"
    if b.shape != a.shape or b.dtype != a.dtype or b.device != a.device:
        return (f"b must match a in shape, dtype and device, got {b.dtype} {tuple(b.shape)} for "
                f"{a.dtype} {tuple(a.shape)}")
    if not (a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last)):
        return "a must be contiguous or channels-last"
    if b.requires_grad or (g is not None and g.requires_grad):
        return "b and g must not need gradients"
    if g is not None:
        N, _, H, W = a.shape
        if tuple(g.shape) != (N, 1, H, W) or g.dtype != a.dtype or g.device != a.device:
            return f"g must be [{N}, 1, {H}, {W}] in a's dtype, got {g.dtype} {tuple(g.shape)}"
    return ""


def use_fast(a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor] = None, impl: str = "auto") -> bool:
    """Whether the loss takes the kernels for this term under `impl` (asked per call): where they run (imported,
    CUDA or the interpreter, the layouts above; never while torch.compile traces). auto: as DMFN_L1_KERNEL says
    (_impl.switch_on), then fp16/bf16 only (dmfb.auto_prefers_fused: timed in bf16 alone); fast: always.
    Elsewhere the loss's own formula runs, as for the VGG's kernels."""
    if torch.compiler.is_compiling() or not available() or fast_why_not(a, b, g):
        return False
    return _impl.resolve(impl, lambda: "", op="L1 loss",
                         prefer_fast=lambda: _impl.switch_on(_AUTO) and _d.auto_prefers_fused(a))
