"""2x2 max pooling with stride 2 over a channels-last [P, C] view, forward and backward, with no indices.

ATen's max_pool2d on CUDA always computes the int64 index of each window's maximum, four times the bytes of
a bf16 output, and keeps it for backward: the frozen VGG's four pools took 1.02 ms of GPU time per training
step on the H200 (s10), about twice what reading their inputs and writing their outputs takes. Here the
forward writes the maxima only, and the backward finds each window's maximum again from the input. Both
pick ATen's element: the first in (0,0), (0,1), (1,0), (1,1) order that is greater than those before it,
or NaN (a later NaN wins), so values and gradients are ATen's to the bit. One exception, which a pool after
a ReLU (the VGG's) never meets: a window of four -inf gives its gradient to its first input here, as ATen's
CPU and NCHW CUDA kernels do; ATen's channels-last CUDA kernel drops it (its index starts at the image's
first pixel).
"""
import triton
import triton.language as tl

# [pixels, channels] tiles: the backward holds twice the forward's values per element (the window and its
# four gradients), so half the pixels keep it near the forward's registers (164 on sm_90 at 64 pixels: 2
# blocks per SM, too few loads in flight for a copy-bound kernel)
BLOCK_P = {"fwd": 64, "bwd": 32}
BLOCK_C = 64
NUM_WARPS = 4


@triton.jit
def _window(x_ptr, p, c, P, H, W, OH, OW, C):
    """The four inputs of each output pixel's window [BLOCK_P, BLOCK_C], their offsets (the first), the mask,
    and the index 0..3 of the one ATen picks."""
    OHW = OH * OW
    n = p // OHW
    r = p - n * OHW
    oy = r // OW
    ox = r - oy * OW
    m = (p < P)[:, None] & (c < C)[None, :]
    off = ((n.to(tl.int64) * H + 2 * oy) * W + 2 * ox)[:, None] * C + c[None, :]
    row = tl.cast(W, tl.int64) * C  # tl.cast: a traced launch may pass W as a plain int
    # compared in fp32 (exact for every input dtype): the interpreter compares bf16 by its bit patterns
    v0 = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    v1 = tl.load(x_ptr + off + C, mask=m, other=0.0).to(tl.float32)
    v2 = tl.load(x_ptr + off + row, mask=m, other=0.0).to(tl.float32)
    v3 = tl.load(x_ptr + off + row + C, mask=m, other=0.0).to(tl.float32)
    best = v0
    idx = tl.zeros(v0.shape, dtype=tl.int32)
    take = (v1 > best) | (v1 != v1)
    best = tl.where(take, v1, best)
    idx = tl.where(take, 1, idx)
    take = (v2 > best) | (v2 != v2)
    best = tl.where(take, v2, best)
    idx = tl.where(take, 2, idx)
    take = (v3 > best) | (v3 != v3)
    best = tl.where(take, v3, best)
    idx = tl.where(take, 3, idx)
    return best, idx, off, row, m


@triton.jit
def max_pool2x2_fwd(x_ptr, y_ptr, P, H, W, OH, OW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[p, c] = the maximum of output pixel p's 2x2 window of x (P = N * OH * OW; floor: an odd last row or
    column is left out, as ATen's)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    best, idx, off, row, m = _window(x_ptr, p, c, P, H, W, OH, OW, C)
    tl.store(y_ptr + p.to(tl.int64)[:, None] * C + c[None, :], best.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def max_pool2x2_bwd(x_ptr, dy_ptr, dx_ptr, P, H, W, OH, OW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = dy at each window's maximum (found again from x), 0 at its other three inputs. Inputs outside every
    window (an odd last row or column) are not written: the caller zeroes dx then."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    best, idx, off, row, m = _window(x_ptr, p, c, P, H, W, OH, OW, C)
    g = tl.load(dy_ptr + p.to(tl.int64)[:, None] * C + c[None, :], mask=m, other=0.0)
    zero = tl.zeros_like(g)
    tl.store(dx_ptr + off, tl.where(idx == 0, g, zero), mask=m)
    tl.store(dx_ptr + off + C, tl.where(idx == 1, g, zero), mask=m)
    tl.store(dx_ptr + off + row, tl.where(idx == 2, g, zero), mask=m)
    tl.store(dx_ptr + off + row + C, tl.where(idx == 3, g, zero), mask=m)
