"""Instance norm (affine=False, biased variance) over channels-last [N, H*W, C] tensors, fused with
ReLU or a residual add, from per-(n, c) sums and sums of squares; and its backward."""
import triton
import triton.language as tl

# Relaxed atomics: the partial sums are read only by later launches, so no ordering is needed
# (the default acq_rel adds memory barriers around each atomic).

# Elementwise/reduction tiles: one config is enough (memory bound), no autotuning.
BLOCK_P = 64
BLOCK_C = 64
NUM_WARPS = 4
# The reductions (in_stats, in_bwd_reduce) give each program a run of pixel tiles and add one partial per
# program, about this many programs per launch. One tile per program ran at 57% of copy bandwidth in bf16 on
# an H200 against 85-94% in fp32; runs of 4 tiles, the same (s7: statistics 16.7 us for 33.5 MB, 48%). The
# sm_90 SASS of that loop showed why: its 4 loads per thread all went to the same registers, each waiting
# for the last one's sums (64 registers hold the 2-D accumulators), so a thread had one 16-byte load in
# flight. Each loop step now loads the next tile before summing the current one (_tile_at).
TARGET_PROGRAMS = 1024
# The elementwise kernels (in_apply, in_bwd_apply) on fp16/bf16: pixels per program. On an H200 (s7) the
# bf16 apply ran at about 66% of copy bandwidth, fp32 at 84% with the same 64 x 64 tile (twice the bytes
# per program); gpu_breakdown.py times 128 against this, which stays until a GPU says otherwise.
APPLY_PIXELS_2BYTE = 64


@triton.jit
def _run_of(HW, C, PIX_PER_SPLIT, BLOCK_C: tl.constexpr):
    """A reduction program's image n, its run of pixels [p0, p_end) and its channels c (mask cm)."""
    splits = tl.cdiv(HW, PIX_PER_SPLIT)
    n = tl.program_id(0) // splits
    p0 = (tl.program_id(0) % splits) * PIX_PER_SPLIT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, p0, tl.minimum(p0 + PIX_PER_SPLIT, HW), c, c < C


@triton.jit
def _tile_at(ptr, p1, p_end, c, cm, C, BLOCK_P: tl.constexpr):
    """The [BLOCK_P, BLOCK_C] tile of pixels p1.. (those before p_end) in fp32, zero elsewhere, and its mask.
    Past the run (p1 >= p_end) every lane is masked off: no memory is read."""
    p = p1 + tl.arange(0, BLOCK_P)
    m = (p < p_end)[:, None] & cm[None, :]
    return tl.load(ptr + p[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32), m


@triton.jit
def _add_partials(a_ptr, b_ptr, acc_a, acc_b, off, cm):
    """One program's partial sums, added once (fp32 atomics)."""
    tl.atomic_add(a_ptr + off, tl.sum(acc_a, 0), mask=cm, sem="relaxed")
    tl.atomic_add(b_ptr + off, tl.sum(acc_b, 0), mask=cm, sem="relaxed")


@triton.jit
def in_stats(x_ptr, shift_ptr, sum_ptr, sumsq_ptr, HW, C, PIX_PER_SPLIT,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum_ptr[n, c] += sum over a run of PIX_PER_SPLIT pixels (a multiple of BLOCK_P) of (x - shift),
    sumsq_ptr of its square (fp32 atomics, one per program). The shift, x at the image's first pixel, keeps
    E[d^2] - E[d]^2 exact when |mean| >> std; the first run stores it for in_apply."""
    n, p0, p_end, c, cm = _run_of(HW, C, PIX_PER_SPLIT, BLOCK_C)
    base = x_ptr + n.to(tl.int64) * HW * C
    shift = tl.load(base + c, mask=cm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    x, m = _tile_at(base, p0, p_end, c, cm, C, BLOCK_P)
    for p1 in range(p0 + BLOCK_P, p_end + BLOCK_P, BLOCK_P):
        x_next, m_next = _tile_at(base, p1, p_end, c, cm, C, BLOCK_P)  # in flight while x is summed
        d = tl.where(m, x - shift[None, :], 0.0)
        acc += d
        acc2 += d * d
        x, m = x_next, m_next
    _add_partials(sum_ptr, sumsq_ptr, acc, acc2, n * C + c, cm)
    if p0 == 0:
        tl.store(shift_ptr + n * C + c, shift, mask=cm)


@triton.jit
def in_apply(x_ptr, res_ptr, y_ptr, shift_ptr, sum_ptr, sumsq_ptr, mean_ptr, rstd_ptr, HW, C, eps,
              RELU: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = relu?((x - mean) * rstd) (+ res), from sums of x - shift and their squares; the first pixel
    tile of each image also writes mean and rstd."""
    tiles = tl.cdiv(HW, BLOCK_P)
    n = tl.program_id(0) // tiles
    t = tl.program_id(0) % tiles
    p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    m = (p < HW)[:, None] & cm[None, :]
    d1 = tl.load(sum_ptr + n * C + c, mask=cm, other=0.0) / HW
    d2 = tl.load(sumsq_ptr + n * C + c, mask=cm, other=0.0) / HW
    mean = tl.load(shift_ptr + n * C + c, mask=cm, other=0.0) + d1
    var = tl.maximum(d2 - d1 * d1, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    if t == 0:
        tl.store(mean_ptr + n * C + c, mean, mask=cm)
        tl.store(rstd_ptr + n * C + c, rstd, mask=cm)
    off = n.to(tl.int64) * HW * C + p[:, None] * C + c[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * rstd[None, :]
    if RELU:
        y = tl.maximum(y, 0.0)
    if RESIDUAL:
        y += tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def in_bwd_reduce(dy_ptr, x_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, HW, C, PIX_PER_SPLIT,
                  RELU: tl.constexpr, FROM_Y: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sa += sum dz, sb += sum dz * xhat over a run of PIX_PER_SPLIT pixels, as in_stats, with dz = dy
    (masked by xhat > 0 under ReLU). FROM_Y: x_ptr holds y = relu(xhat), which equals xhat wherever dz is
    non-zero."""
    n, p0, p_end, c, cm = _run_of(HW, C, PIX_PER_SPLIT, BLOCK_C)
    if not FROM_Y:
        mean = tl.load(mean_ptr + n * C + c, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + n * C + c, mask=cm, other=0.0)
    base = n.to(tl.int64) * HW * C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dy, _ = _tile_at(dy_ptr + base, p0, p_end, c, cm, C, BLOCK_P)
    x, _ = _tile_at(x_ptr + base, p0, p_end, c, cm, C, BLOCK_P)
    for p1 in range(p0 + BLOCK_P, p_end + BLOCK_P, BLOCK_P):
        # the next tiles in flight while these are summed (masked lanes load zeros: they add nothing)
        dy_next, _ = _tile_at(dy_ptr + base, p1, p_end, c, cm, C, BLOCK_P)
        x_next, _ = _tile_at(x_ptr + base, p1, p_end, c, cm, C, BLOCK_P)
        if FROM_Y:
            xh = x
        else:
            xh = (x - mean[None, :]) * rstd[None, :]
        dz = dy
        if RELU:
            dz = tl.where(xh > 0, dy, 0.0)
        acc += dz
        acc2 += dz * xh
        dy, x = dy_next, x_next
    _add_partials(sa_ptr, sb_ptr, acc, acc2, n * C + c, cm)


@triton.jit
def in_bwd_apply(dy_ptr, x_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, dx_ptr, HW, C,
                  RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = rstd * (dz - mean(dz) - xhat * mean(dz * xhat))."""
    tiles = tl.cdiv(HW, BLOCK_P)
    n = tl.program_id(0) // tiles
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    m = (p < HW)[:, None] & cm[None, :]
    off = n.to(tl.int64) * HW * C + p[:, None] * C + c[None, :]
    mean = tl.load(mean_ptr + n * C + c, mask=cm, other=0.0)
    rstd = tl.load(rstd_ptr + n * C + c, mask=cm, other=0.0)
    ga = tl.load(sa_ptr + n * C + c, mask=cm, other=0.0) / HW
    gb = tl.load(sb_ptr + n * C + c, mask=cm, other=0.0) / HW
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    xh = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
    dz = dy
    if RELU:
        dz = tl.where(xh > 0, dy, 0.0)
    dx = rstd[None, :] * (dz - ga[None, :] - xh * gb[None, :])
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
