"""The losses' L1 terms, mean |a*g - b*g| (or mean |a - b|), forward and backward in one pass each.

ATen runs the guided term as six elementwise passes over full-size tensors forward (a*g and b*g, both
broadcasting g over the channels on its slow strided path, their difference, the norm, the sign, its int8
copy) and three backward: about 2.3 GB at relu1_1 of a batch of 16 at 256 px, against 0.5 GB here (read a
and b, write the int8 sign; read the sign, write the gradient).

A tensor is a [R, K] matrix in memory order: channels-last, R pixels of K = C channels, g one value per
row; contiguous (NCHW), R = N*C planes of K = H*W pixels, g indexed by (row // C, column). Each step of the
forward rounds as ATen's ops round: a*g and b*g each to the tensor's dtype, then their difference, so the
sign (the backward's) and |d| are ATen's. Only the sum's order differs.
"""
import triton
import triton.language as tl

TILE = 2048  # elements per program step: 16 per thread of 4 warps, two 16-byte loads of a 16-bit tensor
MAX_BLOCK_K = 128
NUM_WARPS = 4
PROGRAMS_PER_SM = 8  # the forward's programs (each adds its steps into one partial sum)


@triton.jit
def _product(x, g, RN: tl.constexpr):
    # An fp32 product by inline mul.rn, opaque to LLVM: a plain one (even rounded to 16 bits right after) is
    # narrowed and contracted with the subtraction into one FMA (fma.rn.bf16x2 in the sm_90 PTX), whose
    # unrounded a*g leaves a nonzero d, and a sign, where a == b. mul.rn also keeps denormals (libdevice's
    # mul_rn flushes them). For 16-bit inputs the fp32 product is exact, then rounded. The interpreter has
    # no FMA (and no inline PTX).
    if RN:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, g], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return x * g


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _g_rows(g_ptr, r64, R):
    """G_MODE 1: one g per row, [BLOCK_R, 1] in fp32."""
    return tl.load(g_ptr + r64, mask=r64 < R, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _g_planes(g_ptr, r64, k, m, K, C):
    """G_MODE 2: g[(row // C) * K + col] at each element, fp32."""
    return tl.load(g_ptr + (r64 // C)[:, None] * K + k[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _tile(t, R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile t of the [R, K] matrix, row-major over [cdiv(R, BLOCK_R), cdiv(K, BLOCK_K)] tiles: its rows (int64),
    columns, mask and offsets. A t past the last tile gives rows past R: all masked."""
    kt = tl.cdiv(K, BLOCK_K)
    rb = t // kt
    r = rb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = (t - rb * kt) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (r < R)[:, None] & (k < K)[None, :]
    return r, k, m, r[:, None] * K + k[None, :]


@triton.jit
def l1_sign_fwd(a_ptr, b_ptr, g_ptr, sign_ptr, part_ptr, R, K, C, ITERS,
                G_MODE: tl.constexpr, RN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[pid] = sum |d| over this program's tiles, sign = sign(d) as int8 (0 where d is 0 or NaN), with
    d = a*g - b*g (G_MODE 1: g[row]; 2: g[(row // C) * K + col]) or a - b (G_MODE 0), rounded as ATen's.
    Program pid takes tiles pid, pid + programs, ... (ITERS of them; the last ones may be past the end), so an
    NCHW tensor of few planes still spreads over every program."""
    pid = tl.program_id(0)
    dtype = a_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for i in range(ITERS):
        r, k, m, off = _tile(pid + i * tl.num_programs(0), R, K, BLOCK_R, BLOCK_K)
        a = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=m, other=0.0).to(tl.float32)
        if G_MODE == 0:
            d = _rounded(a - b, dtype)
        else:
            if G_MODE == 1:
                g = _g_rows(g_ptr, r, R)
            else:
                g = _g_planes(g_ptr, r, k, m, K, C)
            d = _rounded(_rounded(_product(a, g, RN), dtype) - _rounded(_product(b, g, RN), dtype), dtype)
        acc += tl.abs(d)  # masked elements: 0 - 0
        s = tl.where(d > 0, 1, 0) - tl.where(d < 0, 1, 0)
        tl.store(sign_ptr + off, s.to(tl.int8), mask=m)
    tl.store(part_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def l1_sign_bwd(sign_ptr, g_ptr, scale_ptr, ga_ptr, R, K, C,
                G_MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """ga = sign * scale (* g), scale the loss's gradient over the element count in ga's dtype: sign * scale
    is exact, so the one rounding is ATen's mul by g. One tile per program (a 1-D grid: no axis limit)."""
    r, k, m, off = _tile(tl.program_id(0), R, K, BLOCK_R, BLOCK_K)
    v = tl.load(sign_ptr + off, mask=m, other=0).to(tl.float32) * tl.load(scale_ptr).to(tl.float32)
    if G_MODE == 1:
        v = v * _g_rows(g_ptr, r, R)
    elif G_MODE == 2:
        v = v * _g_planes(g_ptr, r, k, m, K, C)
    tl.store(ga_ptr + off, v.to(ga_ptr.dtype.element_ty), mask=m)
