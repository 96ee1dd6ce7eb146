"""A convolution of a thin input (C of 1, 2, 4 or 8 channels: the generator's 4-channel input convolution) with
its bias and activation, and its weight and bias gradient, as implicit GEMMs in Triton.

cuDNN runs such convolutions off its fast paths: the generator's 4 -> 64 5x5 input convolution took 1.31 ms of
16.1 at inference (batch 64, H200, s10; a channel-padding pass and an sm_80 tile kernel), 41 TFLOP/s for a
layer whose floor is writing its output (537 MB, about 0.14 ms), and the bias and ReLU after it were passes of
their own. Here one program computes a tile of output pixels against every output channel in one dot:
A[p, k] is the input around pixel p, k = (ky * KW + kx) * C + c over the KH x KW taps and the channels,
gathered straight from the channels-last input in C-element vectors (zero outside the image: the padding);
B[k, o] is the weight w[o, c, ky, kx], packed by the caller as [K, O] rows and loaded in 16-byte vectors (read
in place from [O, C, KH, KW], its loads were scalar, twice the gathers' load instructions). K = KH * KW * C
fits one dot (5x5 x 4 channels: 100 of BLOCK_K 128). The output is written once, channels-last, after the
bias and activation. C is a power of two: with 3 channels the gathers are scalar, each with its own address,
and the sm_90 cubins spilled 1.5-1.7 KB, so the op runs a 3-channel input (the discriminator's image) as 4,
a zero channel added to the input and the weight.
"""
import triton
import triton.language as tl

from .bias_act import add_bias_act


def _cfg(bm, warps):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=1)


# fwd: one tile per program (the weight tile, 16 KB, is re-read from L1 by every program of an SM); wgrad:
# a fixed number of programs, each summing a run of tiles into its fp32 accumulator. fp32 ("f32": TF32 or IEEE
# dots) in smaller tiles: its operands take twice the registers (the 128-pixel tiles spilled 8-10 KB with
# IEEE dots; the wgrad's 64-pixel one 400 bytes with TF32 dots on sm_80 in 4 warps, and its 32-pixel one
# 16 bytes with IEEE dots on sm_90 under Triton 3.6: 8 warps, 80-110 registers, no spills)
CONFIGS = {"fwd_lowp": [_cfg(128, 4), _cfg(256, 8), _cfg(64, 4)], "wgrad_lowp": [_cfg(64, 4), _cfg(128, 8)],
           "fwd_f32": [_cfg(32, 4)], "wgrad_f32": [_cfg(64, 8)]}


@triton.jit
def _gather(x_ptr, m, M, H, W, OH, OW, k, C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
            STRIDE: tl.constexpr, PAD: tl.constexpr):
    """A[m, k] of the implicit GEMM: x[n, oy * STRIDE - PAD + ky, ox * STRIDE - PAD + kx, c] (0 outside). The
    mask is constant over each pixel's C channels, so the loads are C-element vectors."""
    t = k // C
    c = k % C
    kmask = t < KH * KW
    ky = t // KW
    kx = t % KW
    OHW = OH * OW
    n = m // OHW
    r = m - n * OHW
    oy = r // OW
    ox = r - oy * OW
    iy = (oy * STRIDE - PAD)[:, None] + ky[None, :]
    ix = (ox * STRIDE - PAD)[:, None] + kx[None, :]
    valid = (m < M)[:, None] & kmask[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    off = ((n.to(tl.int64)[:, None] * H + iy) * W + ix) * C + c[None, :]
    return tl.load(x_ptr + off, mask=valid, other=0.0)


@triton.jit
def _weight(w_ptr, k, o, O, C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """B[k, o] of the weight packed as [KH * KW * C, O] (w[o, c, ky, kx] at row (ky * KW + kx) * C + c): rows
    of O contiguous outputs, loaded in 16-byte vectors (0 for k and o past the ends)."""
    return tl.load(w_ptr + k[:, None] * O + o[None, :], mask=(k < KH * KW * C)[:, None] & (o < O)[None, :],
                   other=0.0)


@triton.jit
def thin_conv_fwd(
    x_ptr, w_ptr, b_ptr, y_ptr, M, H, W, OH, OW, O, slope,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
    PAD: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, o] = act(sum_k A[m, k] B[k, o] + b[o]) for the BLOCK_M output pixels m of this program (M = N*OH*OW,
    channels-last: y is [M, O]). ACT 0 none, 1 ReLU, 2 leaky ReLU with `slope`; the fp32 sum is rounded
    once, to y's dtype, after the activation."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.arange(0, BLOCK_O)
    if PREC == "ieee" and not UPCAST:
        # IEEE fp32: K in a loop of KC, each dot's FMAs in k order after the last's, as one dot's. One K-deep
        # FMA dot drove ptxas to 32 registers and a 7 KB stack (sm_90, Triton 3.6's PTX and other tiles of 3.7's)
        KC: tl.constexpr = 32 if BLOCK_K > 32 else BLOCK_K
        acc = tl.zeros([BLOCK_M, BLOCK_O], tl.float32)
        for k0 in range(0, BLOCK_K, KC):
            k = k0 + tl.arange(0, KC)
            a = _gather(x_ptr, m, M, H, W, OH, OW, k, C, KH, KW, STRIDE, PAD)
            acc = tl.dot(a, _weight(w_ptr, k, o, O, C, KH, KW), acc, input_precision=PREC)
    else:
        k = tl.arange(0, BLOCK_K)
        a = _gather(x_ptr, m, M, H, W, OH, OW, k, C, KH, KW, STRIDE, PAD)
        b = _weight(w_ptr, k, o, O, C, KH, KW)
        if UPCAST:  # the interpreter's 16-bit dots are unreliable
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, input_precision=PREC)
    om = o < O
    acc = add_bias_act(acc, b_ptr, o, om, slope, HAS_BIAS, ACT)
    off = m.to(tl.int64)[:, None] * O + o[None, :]
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=(m < M)[:, None] & om[None, :])


@triton.jit
def thin_conv_wgrad(
    x_ptr, y_ptr, dy_ptr, dw_ptr, db_ptr, M, H, W, OH, OW, O, slope, PROGRAMS,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
    PAD: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[k, o] = sum_m A[m, k] dz[m, o] and db[o] = sum_m dz[m, o], dz = dy * act'(y) (rounded to dy's dtype,
    as ATen's activation backward rounds it). Each of the PROGRAMS programs sums a run of consecutive tiles
    of BLOCK_M pixels in fp32 and adds its partial atomically to dw [BLOCK_K, O] and db [O] (fp32, zeroed)."""
    k = tl.arange(0, BLOCK_K)
    o = tl.arange(0, BLOCK_O)
    om = o < O
    acc = tl.zeros([BLOCK_K, BLOCK_O], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_O], dtype=tl.float32)
    tiles = tl.cdiv(M, BLOCK_M)
    per = tl.cdiv(tiles, PROGRAMS)
    first = tl.program_id(0) * per
    for tile in range(first, tl.minimum(first + per, tiles)):
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        a = _gather(x_ptr, m, M, H, W, OH, OW, k, C, KH, KW, STRIDE, PAD)
        off = m.to(tl.int64)[:, None] * O + o[None, :]
        mask = (m < M)[:, None] & om[None, :]
        dz = tl.load(dy_ptr + off, mask=mask, other=0.0)
        if ACT != 0:  # y's sign compared in fp32: the interpreter compares bf16 by its bit patterns
            pos = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) > 0
            dz = tl.where(pos, dz, 0.0 if ACT == 1 else dz * slope).to(dy_ptr.dtype.element_ty)
        bacc += tl.sum(dz.to(tl.float32), 0)
        if UPCAST:
            a = a.to(tl.float32)
            dz = dz.to(tl.float32)
        acc = tl.dot(tl.trans(a), dz, acc, input_precision=PREC)
    tl.atomic_add(dw_ptr + k[:, None] * O + o[None, :], acc, mask=om[None, :], sem="relaxed")
    tl.atomic_add(db_ptr + o, bacc, mask=om, sem="relaxed")


# Autotune keys: everything that changes the work or the code (tensor dtypes are in every key already).
_KEY = ["M", "H", "W", "O", "C", "KH", "KW", "STRIDE", "PAD", "ACT", "PREC"]
TUNED = {}
for _cls in ("lowp", "f32"):
    TUNED["fwd", _cls] = triton.autotune(configs=CONFIGS["fwd_" + _cls], key=_KEY + ["HAS_BIAS"])(thin_conv_fwd)
    TUNED["wgrad", _cls] = triton.autotune(configs=CONFIGS["wgrad_" + _cls], key=_KEY + ["PROGRAMS"],
                                           reset_to_zero=["dw_ptr", "db_ptr"])(thin_conv_wgrad)
