"""The DMFB's four dilated 3x3 branches and their prefix sums, forward and backward, in Triton.

Layout: every activation is channels-last contiguous, seen as [N, H*W, C]. Weights are packed as
wp[j, tap, ci, co] (branch j, tap = 3*ky + kx) so that a tap is a [C_in, C_out] matrix for tl.dot.
All dots accumulate in fp32; fp32 inputs use TF32 dots where cuDNN may (torch.backends.cudnn.allow_tf32),
else IEEE dots.
"""
import triton
import triton.language as tl

# Relaxed atomics: the partial sums are read only by later launches, so no ordering is needed
# (the default acq_rel adds memory barriers around each atomic).


def _cfg(bp, bn, bk, warps, stages, **extra):
    return triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=warps,
                         num_stages=stages)


def _tcfg(th, tw, warps, stages, **extra):
    return triton.Config({"TH": th, "TW": tw, "BLOCK_N": 64, "BLOCK_K": 64, **extra}, num_warps=warps,
                         num_stages=stages)


def _wtcfg(th, tw, warps, stages, splits, taps):
    return triton.Config({"TH": th, "TW": tw, "BLOCK_CI": 64, "BLOCK_CO": 64, "SPLITS": splits, "TAPS": taps},
                         num_warps=warps, num_stages=stages)


def _wcfg(bp, bci, bco, warps, stages):
    return triton.Config({"BLOCK_P": bp, "BLOCK_CI": bci, "BLOCK_CO": bco}, num_warps=warps, num_stages=stages)


# Autotune configs per kernel and dtype class ("lowp": fp16/bf16 on tensor cores, "f32": fp32 with TF32
# tensor-core or IEEE dots).
# Each was checked to compile without register spills for sm_80 and sm_90 (tests/test_dmfb_compile.py).
CONFIGS = {
    # the H200's ncu read the forward as latency-bound (12% occupancy): deeper pipelines to choose from
    "fwd_lowp": [_cfg(64, 64, 64, 4, 3), _cfg(128, 64, 64, 8, 3), _cfg(128, 64, 64, 8, 4), _cfg(64, 64, 64, 4, 4)],
    "fwd_f32": [_cfg(64, 64, 32, 4, 2)],
    # 64 channels with 8 warps: each pixel tile gathers h once, not twice (126 registers on sm_90)
    # EPI (branches_grad's epilogue): 0 loads dt after each branch's loop, 1 before it, 2 also keeps the suffix
    # sums in registers (254 registers: 8 warps only)
    "grad_lowp": [_cfg(64, 32, 64, 4, 3, EPI=e) for e in (0, 1)] + [_cfg(64, 64, 64, 8, 3, EPI=e) for e in (0, 1, 2)],
    "grad_f32": [_cfg(64, 32, 32, 4, 2, EPI=e) for e in (0, 1)],
    "dgrad_lowp": [_cfg(64, 64, 64, 4, 3), _cfg(128, 64, 64, 4, 3)],
    "dgrad_f32": [_cfg(64, 64, 32, 8, 2)],  # 4 warps spill with TF32 dots on sm_80
    # the H200 ran the 64-pixel config at 160 TFLOP/s (s7), half the dgrad's rate: 128-pixel steps halve the
    # loop's overhead per HGMMA, and 4 stages keep more tiles in flight; the autotuner picks on the card
    "wgrad_lowp": [_wcfg(64, 64, 64, 4, 3), _wcfg(128, 64, 64, 4, 3), _wcfg(128, 64, 64, 8, 3),
                   _wcfg(64, 64, 64, 4, 4)],
    "wgrad_f32": [_wcfg(32, 64, 64, 4, 2)],
    # sm_90 only (9 fp32 accumulators: 210-221 registers with 8 warps; on sm_80 they spill). 160/120/160 KB
    # of shared memory: 64-pixel tiles with 3 stages would need 240 KB, over the 227 KB a block may have.
    # sm_90, fp16/bf16 (branches_fwd_tma): 2-D pixel tiles TH x TW
    "fwd_tma_lowp": [_tcfg(8, 8, 4, 3), _tcfg(8, 16, 8, 3), _tcfg(16, 8, 8, 3), _tcfg(8, 8, 4, 4)],
    "grad_tma_lowp": [_tcfg(8, 8, 4, 3, EPI=e) for e in (0, 1)] + [_tcfg(8, 16, 8, 3, EPI=e) for e in (0, 1)]
    + [_tcfg(8, 8, 8, 3, EPI=e) for e in (0, 1, 2)],
    # FLAT: one loop through the 36 (branch, tap) steps, pipelined across branches (132-134 instructions per
    # step on sm_90), or a loop per branch that drains between branches (119-120): the autotuner decides
    # 16 x 16 (s11): 2 programs per SM (122 registers, 90 KB), 256 programs at N=16, 64x64: one wave on 132
    # SMs, where the 8 x 16 winner (s10) ran 512 programs at 3 per SM, 1.3 waves
    "dgrad_tma_lowp": [_tcfg(8, 8, 4, 3, FLAT=0), _tcfg(8, 8, 4, 3, FLAT=1), _tcfg(8, 16, 8, 3, FLAT=0),
                       _tcfg(8, 16, 8, 3, FLAT=1), _tcfg(8, 8, 4, 4, FLAT=1), _tcfg(16, 16, 8, 3, FLAT=1)],
    # sm_90, fp16/bf16 (branches_wgrad_tma): tile shape, warps, stages, runs per weight program's taps
    # (SPLITS: how well the programs fill the SMs is measured, not modelled) and taps per program (3 read
    # each G_j tile once for 3 dots: 4 loads per 3 MMAs, not 6). With TAPS 3 there are 12 * SPLITS weight
    # programs, 3 per SM (72 KB of shared memory each): the s10 winner, 48, makes 1.45 waves on 132 SMs and
    # beat 32 (one wave); 66 (s11) makes 2 whole waves, with shorter runs but more weight atomics
    "wgrad_tma_lowp": [_wtcfg(th, tw, w, st, sp, taps) for th, tw, w, st, sp, taps in (
        (8, 8, 4, 3, 16, 1), (8, 8, 4, 4, 32, 1), (8, 16, 8, 3, 16, 1), (16, 8, 8, 3, 32, 1),
        (8, 8, 4, 3, 32, 3), (8, 8, 4, 3, 48, 3), (8, 16, 8, 3, 32, 3), (8, 16, 8, 2, 48, 3),
        (8, 8, 4, 3, 66, 3))],
    "wgrad9_lowp": [_wcfg(64, 64, 64, 8, 2), _wcfg(32, 64, 64, 8, 3), _wcfg(32, 64, 64, 8, 4)],
}


@triton.jit
def _dilation(j, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr):
    return tl.where(j == 0, D1, tl.where(j == 1, D2, tl.where(j == 2, D3, D4)))


@triton.jit
def _next_k(tap, k0, C, BLOCK_K: tl.constexpr):
    """The K loop's next (tap, channel offset): stepped, not divided out of the loop counter (an integer
    division by a run-time value costs about 20 instructions)."""
    k0 += BLOCK_K
    tap = tl.where(k0 >= C, tap + 1, tap)
    return tap, tl.where(k0 >= C, 0, k0)


@triton.jit
def _pixel_rows(H, W, BLOCK_P: tl.constexpr):
    """Program (pixel tile, channel tile)'s image n and its BLOCK_P pixels p of that image (tiles of one image
    each), their mask and (y, x): the pointer kernels' 1-D strips."""
    HW = H * W
    tiles = tl.cdiv(HW, BLOCK_P)
    pid_p = tl.program_id(0)
    p = (pid_p % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    return pid_p // tiles, p, p < HW, p // W, p % W


@triton.jit
def branches_fwd(
    h_ptr, w_ptr, b_ptr, out_ptr,
    dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr,
    N, H, W, C,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    MODE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI: tl.constexpr,
):
    """k_j = d_1(h) + ... + d_j(h), written as out[..., j*C:(j+1)*C].

    MODE 0: write k. (The instance norm's statistics come from a separate pass over k: on an H200 an
    atomics epilogue here cost 58 us of 134, while one read of the cat at N=16, 64x64 is 33.5 MB, about
    8 us at the measured copy rate; and that pass shifts by the first pixel, which keeps the variance
    exact when a channel's mean is large against its spread.)
    MODE 1 (backward of IN + ReLU after the branches): recompute k, turn the incoming gradient dt of
    relu(IN(k)) into dk, and write the suffix sums G_j = dk_j + ... + dk_4, with the epilogue EPI
    (branches_grad); MODE 0 takes EPI 0.
    """
    n, p, pmask, y, x = _pixel_rows(H, W, BLOCK_P)
    HW = H * W
    C4 = 4 * C
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = co < C
    ks = tl.arange(0, BLOCK_K)
    h_base = h_ptr + n.to(tl.int64) * HW * C
    o_rows = n.to(tl.int64) * HW * C4 + p[:, None] * C4
    omask = pmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if EPI == 2:  # MODE 1 only (branches_grad); the branch loop unrolled, the four dk tiles in a tuple
        dks = ()
        for j in tl.static_range(4):
            acc, dk = _grad_branch_rows(acc, j, h_base, w_ptr, b_ptr, dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr,
                                        n, y, x, pmask, co, cmask, ks, o_rows, omask, H, W, C, D1, D2, D3, D4,
                                        UPCAST, PREC, BLOCK_K, out_ptr.dtype.element_ty)
            dks = dks + (dk,)
        _suffix_store(out_ptr, o_rows, co, omask, C, dks[0], dks[1], dks[2], dks[3])
    else:
        # A runtime loop over the branches keeps the code (and compile time) small.
        for j in range(4):
            dt = _dt_early(dt_ptr, o_rows, j, C, co, omask, EPI)
            acc = _rows_loop(acc, j, h_base, w_ptr, y, x, pmask, co, cmask, ks, H, W, C, D1, D2, D3, D4, UPCAST,
                             PREC, BLOCK_K)
            acc = _branch_out(acc, j, b_ptr, out_ptr, dt_ptr, dt, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n, o_rows, co,
                              cmask, omask, HW, C, MODE, EPI)
        if MODE == 1:
            _suffix_in_place(out_ptr, o_rows, co, omask, C)


@triton.jit
def _rows_loop(acc, j, h_base, w_ptr, y, x, pmask, co, cmask, ks, H, W, C, D1: tl.constexpr, D2: tl.constexpr,
               D3: tl.constexpr, D4: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += branch j's dilated conv of h (no bias) at the row tile's pixels: 9 taps x the K steps."""
    D = _dilation(j, D1, D2, D3, D4)
    w_base = w_ptr + j * 9 * C * C
    tap = 0
    k0 = 0
    for it in range(0, 9 * tl.cdiv(C, BLOCK_K)):
        kk = k0 + ks
        dy = (tap // 3 - 1) * D
        dx = (tap % 3 - 1) * D
        yy = y + dy
        xx = x + dx
        valid = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        kmask = kk < C
        a = tl.load(h_base + (yy * W + xx)[:, None] * C + kk[None, :],
                    mask=valid[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_base + (tap * C + kk)[:, None] * C + co[None, :],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        tap, k0 = _next_k(tap, k0, C, BLOCK_K)
    return acc


@triton.jit
def _grad_branch_rows(acc, j: tl.constexpr, h_base, w_ptr, b_ptr, dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n,
                      y, x, pmask, co, cmask, ks, o_rows, omask, H, W, C, D1: tl.constexpr, D2: tl.constexpr,
                      D3: tl.constexpr, D4: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """Branch j of the EPI 2 grad: (acc + branch j's conv + bias, dk_j in the output dtype), dk_j not stored.
    The tile of dt is loaded before the conv's loop, so its latency hides under the dots."""
    dt = tl.load(dt_ptr + o_rows + j * C + co[None, :], mask=omask, other=0.0)
    acc = _rows_loop(acc, j, h_base, w_ptr, y, x, pmask, co, cmask, ks, H, W, C, D1, D2, D3, D4, UPCAST, PREC,
                     BLOCK_K)
    return _branch_dk(acc, j, b_ptr, dt, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n, co, cmask, H * W, C, dtype)


@triton.jit
def _dt_early(dt_ptr, o_rows, j, C, co, omask, EPI: tl.constexpr):
    """EPI 1: branch j's tile of dt, loaded before the branch's conv loop; else nothing (a placeholder)."""
    if EPI == 1:
        return tl.load(dt_ptr + o_rows + j * C + co[None, :], mask=omask, other=0.0)
    else:
        return 0.0


@triton.jit
def _branch_out(acc, j, b_ptr, out_ptr, dt_ptr, dt_early, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n, o_rows, co,
                cmask, omask, HW, C, MODE: tl.constexpr, EPI: tl.constexpr):
    """Branch j's epilogue: acc (k_j without biases) plus bias_j; MODE 0 stores k_j, MODE 1 dk_j (the IN +
    ReLU backward) from dt_early (EPI 1) or dt's tile loaded now (EPI 0). Returns acc with the bias, for the
    next branch's sum."""
    if MODE == 0:
        acc, k = _branch_k(acc, j, b_ptr, co, cmask, C, out_ptr.dtype.element_ty)
        tl.store(out_ptr + o_rows + j * C + co[None, :], k, mask=omask)
    else:
        if EPI == 1:
            dt = dt_early
        else:
            dt = tl.load(dt_ptr + o_rows + j * C + co[None, :], mask=omask, other=0.0)
        acc, dk = _branch_dk(acc, j, b_ptr, dt, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n, co, cmask, HW, C,
                             out_ptr.dtype.element_ty)
        tl.store(out_ptr + o_rows + j * C + co[None, :], dk, mask=omask)
    return acc


@triton.jit
def _branch_k(acc, j, b_ptr, co, cmask, C, dtype: tl.constexpr):
    """(acc + bias_j, k_j = that rounded to dtype). Rounded as the stored output is, so that the backward's
    recomputation sees exactly the values the instance norm reads."""
    bias = tl.load(b_ptr + j * C + co, mask=cmask, other=0.0).to(tl.float32)
    acc += bias[None, :]
    return acc, acc.to(dtype)


@triton.jit
def _branch_dk(acc, j, b_ptr, dt, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n, co, cmask, HW, C, dtype: tl.constexpr):
    """(acc + bias_j, dk_j in dtype): the IN + ReLU backward of branch j's tile from dt, its incoming gradient."""
    acc, k = _branch_k(acc, j, b_ptr, co, cmask, C, dtype)
    s_off = n * (4 * C) + j * C + co
    mean = tl.load(mean_ptr + s_off, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + s_off, mask=cmask, other=0.0)
    ga = tl.load(sa_ptr + s_off, mask=cmask, other=0.0) / HW
    gb = tl.load(sb_ptr + s_off, mask=cmask, other=0.0) / HW
    xh = (k.to(tl.float32) - mean[None, :]) * rstd[None, :]
    dz = tl.where(xh > 0, dt.to(tl.float32), 0.0)
    dk = rstd[None, :] * (dz - ga[None, :] - xh * gb[None, :])
    return acc, dk.to(dtype)


@triton.jit
def _suffix_in_place(out_ptr, o_rows, co, omask, C):
    """G_j = dk_j + ... + dk_4 over the tile's four chunks, in place. The barrier makes this CTA's stores
    before it visible to all its threads."""
    tl.debug_barrier()
    g = tl.load(out_ptr + o_rows + 3 * C + co[None, :], mask=omask, other=0.0).to(tl.float32)
    for jj in tl.static_range(3):
        j = 2 - jj
        ptrs = out_ptr + o_rows + j * C + co[None, :]
        g += tl.load(ptrs, mask=omask, other=0.0).to(tl.float32)
        tl.store(ptrs, g.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _suffix_store(out_ptr, o_rows, co, omask, C, d0, d1, d2, d3):
    """G_j = dk_j + ... + dk_4 from the four dk tiles held in registers: _suffix_in_place's sums, in its
    order and rounding, without its barrier, reloads and second stores."""
    g = d3.to(tl.float32)
    tl.store(out_ptr + o_rows + 3 * C + co[None, :], d3, mask=omask)
    g += d2.to(tl.float32)
    tl.store(out_ptr + o_rows + 2 * C + co[None, :], g.to(out_ptr.dtype.element_ty), mask=omask)
    g += d1.to(tl.float32)
    tl.store(out_ptr + o_rows + C + co[None, :], g.to(out_ptr.dtype.element_ty), mask=omask)
    g += d0.to(tl.float32)
    tl.store(out_ptr + o_rows + co[None, :], g.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _tile_2d(H, W, TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr):
    """A TMA kernel's program: its image n, its tile's corner (y0, x0) and pixels (y, x), its first channel."""
    tiles_x = tl.cdiv(W, TW)
    t = tl.program_id(0) % (tiles_x * tl.cdiv(H, TH))
    y0 = t // tiles_x * TH
    x0 = t % tiles_x * TW
    r = tl.arange(0, TH * TW)
    return tl.program_id(0) // (tiles_x * tl.cdiv(H, TH)), y0, x0, y0 + r // TW, x0 + r % TW, tl.program_id(1) * BLOCK_N


@triton.jit
def branches_fwd_tma(
    h_ptr, w_ptr, b_ptr, out_ptr,
    dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr,
    N, H, W, C,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    MODE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EPI: tl.constexpr,
):
    """branches_fwd (both modes) on sm_90 with a 2-D tile of TH x TW pixels whose h operand comes by TMA:
    for each tap one box [1, TH, TW, BLOCK_K] of h seen as [N, H, W, C], at the tile shifted by the tap,
    the part outside the image zero-filled by the copy engine (the padding, with no index or mask
    arithmetic), and the weights' [BLOCK_K, BLOCK_N] tile by TMA too. C must be a multiple of BLOCK_K
    (the weight rows of one tap end where the next tap's begin) and of 8 (16-byte TMA strides)."""
    BLOCK_P: tl.constexpr = TH * TW
    HW = H * W
    n, y0, x0, y, x, n0 = _tile_2d(H, W, TH, TW, BLOCK_N)
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, H, W, C], strides=[HW * C, W * C, C, 1],
                                       block_shape=[1, TH, TW, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[36 * C, C], strides=[C, 1], block_shape=[BLOCK_K, BLOCK_N])
    co = n0 + tl.arange(0, BLOCK_N)
    cmask = co < C
    o_rows = (n.to(tl.int64) * HW + y * W + x)[:, None] * (4 * C)
    omask = ((y < H) & (x < W))[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if EPI == 2:  # MODE 1 only (branches_grad_tma); as branches_fwd's
        dks = ()
        for j in tl.static_range(4):
            acc, dk = _grad_branch_tma(acc, j, h_desc, w_desc, b_ptr, dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr,
                                       n, y0, x0, n0, co, cmask, o_rows, omask, HW, C, D1, D2, D3, D4, BLOCK_P,
                                       BLOCK_K, out_ptr.dtype.element_ty)
            dks = dks + (dk,)
        _suffix_store(out_ptr, o_rows, co, omask, C, dks[0], dks[1], dks[2], dks[3])
    else:
        for j in range(4):
            dt = _dt_early(dt_ptr, o_rows, j, C, co, omask, EPI)
            acc = _tma_loop(acc, j, h_desc, w_desc, n, y0, x0, n0, C, D1, D2, D3, D4, BLOCK_P, BLOCK_K)
            acc = _branch_out(acc, j, b_ptr, out_ptr, dt_ptr, dt, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n, o_rows, co,
                              cmask, omask, HW, C, MODE, EPI)
        if MODE == 1:
            _suffix_in_place(out_ptr, o_rows, co, omask, C)


@triton.jit
def _tma_loop(acc, j, h_desc, w_desc, n, y0, x0, n0, C, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
              D4: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += branch j's dilated conv of h (no bias) at the 2-D tile: 9 taps x the K steps, by TMA."""
    D = _dilation(j, D1, D2, D3, D4)
    tap = 0
    k0 = 0
    for it in range(0, 9 * (C // BLOCK_K)):
        a = h_desc.load([n, y0 + (tap // 3 - 1) * D, x0 + (tap % 3 - 1) * D, k0]).reshape(BLOCK_P, BLOCK_K)
        b = w_desc.load([(j * 9 + tap) * C + k0, n0])
        acc = tl.dot(a, b, acc)
        tap, k0 = _next_k(tap, k0, C, BLOCK_K)
    return acc


@triton.jit
def _grad_branch_tma(acc, j: tl.constexpr, h_desc, w_desc, b_ptr, dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n,
                     y0, x0, n0, co, cmask, o_rows, omask, HW, C, D1: tl.constexpr, D2: tl.constexpr,
                     D3: tl.constexpr, D4: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                     dtype: tl.constexpr):
    """_grad_branch_rows with the TMA loop."""
    dt = tl.load(dt_ptr + o_rows + j * C + co[None, :], mask=omask, other=0.0)
    acc = _tma_loop(acc, j, h_desc, w_desc, n, y0, x0, n0, C, D1, D2, D3, D4, BLOCK_P, BLOCK_K)
    return _branch_dk(acc, j, b_ptr, dt, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, n, co, cmask, HW, C, dtype)


@triton.jit
def branches_grad_tma(
    h_ptr, w_ptr, b_ptr, out_ptr,
    dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr,
    N, H, W, C,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI: tl.constexpr,
):
    """branches_fwd_tma's MODE 1 as a kernel of its own (as branches_grad)."""
    branches_fwd_tma(h_ptr, w_ptr, b_ptr, out_ptr, dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, N, H, W, C,
                     D1, D2, D3, D4, 1, TH, TW, BLOCK_N, BLOCK_K, EPI)


@triton.jit
def _dgrad_tma_step(acc, g_desc, w_desc, n, y0, x0, n0, j, tap, k0, C, D1: tl.constexpr, D2: tl.constexpr,
                    D3: tl.constexpr, D4: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += G_j's box at the tile shifted back by the tap @ the tap's weights, transposed."""
    D = _dilation(j, D1, D2, D3, D4)
    a = g_desc.load([n, y0 - (tap // 3 - 1) * D, x0 - (tap % 3 - 1) * D, j * C + k0]).reshape(BLOCK_P, BLOCK_K)
    b = w_desc.load([(j * 9 + tap) * C + n0, k0])
    return tl.dot(a, b.T, acc)


@triton.jit
def branches_dgrad_tma(
    g_ptr, w_ptr, dh_ptr, N, H, W, C,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAT: tl.constexpr,
):
    """branches_dgrad on sm_90 with a 2-D tile of TH x TW pixels, as branches_fwd_tma: for each (branch,
    tap) one box [1, TH, TW, BLOCK_K] of G seen as [N, H, W, 4C], at the tile shifted back by the tap
    (zero-filled outside the image), and the weights' [BLOCK_N, BLOCK_K] tile (input channels, output
    channels), used transposed. One accumulator takes all 36 taps, with no epilogue between branches, so
    FLAT can run them as one loop. C must be a multiple of BLOCK_K and of 8."""
    BLOCK_P: tl.constexpr = TH * TW
    n, y0, x0, y, x, n0 = _tile_2d(H, W, TH, TW, BLOCK_N)
    C4 = 4 * C
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[N, H, W, C4], strides=[H * W * C4, W * C4, C4, 1],
                                       block_shape=[1, TH, TW, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[36 * C, C], strides=[C, 1], block_shape=[BLOCK_N, BLOCK_K])
    KT = C // BLOCK_K
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if FLAT:
        j = 0
        tap = 0
        k0 = 0
        for it in range(0, 36 * KT):
            acc = _dgrad_tma_step(acc, g_desc, w_desc, n, y0, x0, n0, j, tap, k0, C, D1, D2, D3, D4, BLOCK_P,
                                  BLOCK_K)
            tap, k0 = _next_k(tap, k0, C, BLOCK_K)
            j = tl.where(tap == 9, j + 1, j)
            tap = tl.where(tap == 9, 0, tap)
    else:
        for j in range(4):
            tap = 0
            k0 = 0
            for it in range(0, 9 * KT):
                acc = _dgrad_tma_step(acc, g_desc, w_desc, n, y0, x0, n0, j, tap, k0, C, D1, D2, D3, D4, BLOCK_P,
                                      BLOCK_K)
                tap, k0 = _next_k(tap, k0, C, BLOCK_K)
    ci = n0 + tl.arange(0, BLOCK_N)
    dh = dh_ptr + (n.to(tl.int64) * H * W + y * W + x)[:, None] * C + ci[None, :]
    tl.store(dh, acc.to(dh_ptr.dtype.element_ty), mask=((y < H) & (x < W))[:, None] & (ci < C)[None, :])


@triton.jit
def branches_grad(
    h_ptr, w_ptr, b_ptr, out_ptr,
    dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr,
    N, H, W, C,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EPI: tl.constexpr,
):
    """branches_fwd's MODE 1 (recompute, IN + ReLU backward, suffix sums) as a kernel of its own: its own
    name in profiles, and its own JIT function under its autotuner (not the forward's).
    EPI 0: each branch's dk is stored after its conv loop, which the dt tile it needs is loaded after; then
    the suffix sums reload and rewrite the four tiles in place. EPI 1: dt's tile is loaded before the loop,
    its latency hidden under the dots. EPI 2: as 1, and the four dk tiles stay in registers (the branch loop
    unrolled, 4 copies of the conv loop), G stored once. The autotuner chooses."""
    branches_fwd(h_ptr, w_ptr, b_ptr, out_ptr, dt_ptr, mean_ptr, rstd_ptr, sa_ptr, sb_ptr, N, H, W, C,
                 D1, D2, D3, D4, 1, UPCAST, PREC, BLOCK_P, BLOCK_N, BLOCK_K, EPI)


@triton.jit
def branches_dgrad(
    g_ptr, w_ptr, dh_ptr, N, H, W, C,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dh = sum_j conv_transpose_j(G_j): a dilated conv of the suffix sums G_j with flipped,
    transposed weights. g_ptr holds G = [G_1..G_4] as [N, H*W, 4C]."""
    n, p, pmask, y, x = _pixel_rows(H, W, BLOCK_P)
    HW = H * W
    C4 = 4 * C
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cimask = ci < C
    ks = tl.arange(0, BLOCK_K)
    g_base = g_ptr + n.to(tl.int64) * HW * C4
    KT = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for j in range(4):
        D = _dilation(j, D1, D2, D3, D4)
        w_base = w_ptr + j * 9 * C * C
        # (tap, kk) divided out of it here, stepped in branches_fwd: stepped, this kernel's 128-pixel config
        # needs 177 registers on sm_90 (3 CTAs per SM -> 2) for 277 instructions per loop against 298
        for it in range(0, 9 * KT):
            tap = it // KT
            kk = (it % KT) * BLOCK_K + ks
            yy = y - (tap // 3 - 1) * D
            xx = x - (tap % 3 - 1) * D
            valid = pmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            kmask = kk < C
            a = tl.load(g_base + (yy * W + xx)[:, None] * C4 + j * C + kk[None, :],
                        mask=valid[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_base + (tap * C + ci[None, :]) * C + kk[:, None],
                        mask=kmask[:, None] & cimask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    dh = dh_ptr + n.to(tl.int64) * HW * C + p[:, None] * C + ci[None, :]
    tl.store(dh, acc.to(dh_ptr.dtype.element_ty), mask=pmask[:, None] & cimask[None, :])


@triton.jit
def _bias_sums(g_ptr, db_ptr, j, co, comask, C, NP, p_start, p_end, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr):
    """db_j[co] += sum of G_j[p, co] over pixels p_start..p_end (a bias program of the wgrad kernels)."""
    bacc = tl.zeros([BLOCK_CO], dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        g = tl.load(g_ptr + p.to(tl.int64)[:, None] * (4 * C) + j * C + co[None, :],
                    mask=(p < NP)[:, None] & comask[None, :], other=0.0)
        bacc += tl.sum(g.to(tl.float32), 0)
    tl.atomic_add(db_ptr + j * C + co, bacc, mask=comask, sem="relaxed")


@triton.jit
def branches_wgrad(
    h_ptr, g_ptr, dw_ptr, db_ptr, NP, H, W, C, PIX_PER_SPLIT,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """dW_j[tap, ci, co] = sum_p h[p + off_j(tap), ci] * G_j[p, co] and db_j = sum_p G_j[p],
    each program summing PIX_PER_SPLIT pixels (a multiple of BLOCK_P) in fp32 and adding the partial
    atomically into dw/db (fp32). Grid: (pixel splits, 40, ci tiles * co tiles): axis 1 below 36 is
    branch * 9 + tap (weights), 36..39 the branch's bias. The bias sums used to run inside every weight
    program's loop (1 in 9 kept them): 547 instructions per iteration on sm_90 against 4 HGMMA."""
    pid_s = tl.program_id(0)
    jt = tl.program_id(1)
    pid_c = tl.program_id(2)
    n_ci = tl.cdiv(C, BLOCK_CI)
    co = (pid_c // n_ci) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < C
    HW = H * W
    C4 = 4 * C
    p_end = tl.minimum((pid_s + 1) * PIX_PER_SPLIT, NP)
    if jt < 36:
        j = jt // 9
        tap = jt % 9
        D = _dilation(j, D1, D2, D3, D4)
        dy = (tap // 3 - 1) * D
        dx = (tap % 3 - 1) * D
        ci = (pid_c % n_ci) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        cimask = ci < C
        acc = tl.zeros([BLOCK_CI, BLOCK_CO], dtype=tl.float32)
        # unsigned division: fewer instructions (p >= 0). tl.cast, not .to: Inductor's TTIR pass (torch
        # 2.11) can hand W in as a plain int, which has no .to
        HWu, Wu = tl.cast(HW, tl.uint32), tl.cast(W, tl.uint32)
        for p0 in range(pid_s * PIX_PER_SPLIT, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < NP
            pu = p.to(tl.uint32)
            n = pu // HWu
            r = pu - n * HWu
            q = r // Wu
            yy = q.to(tl.int32) + dy
            xx = (r - q * Wu).to(tl.int32) + dx
            valid = pm & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            src = (n.to(tl.int64) * HW + yy * W + xx) * C
            a = tl.load(h_ptr + src[:, None] + ci[None, :], mask=valid[:, None] & cimask[None, :], other=0.0)
            g = tl.load(g_ptr + p.to(tl.int64)[:, None] * C4 + j * C + co[None, :],
                        mask=pm[:, None] & comask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                g = g.to(tl.float32)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PREC)
        w_off = (jt * C + ci[:, None]) * C + co[None, :]
        tl.atomic_add(dw_ptr + w_off, acc, mask=cimask[:, None] & comask[None, :], sem="relaxed")
    elif pid_c % n_ci == 0:  # one bias program per co tile
        _bias_sums(g_ptr, db_ptr, jt - 36, co, comask, C, NP, pid_s * PIX_PER_SPLIT, p_end, BLOCK_P, BLOCK_CO)


@triton.jit
def branches_wgrad_tma(
    h_ptr, g_ptr, dw_ptr, db_ptr, N, H, W, C,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, SPLITS: tl.constexpr,
    TAPS: tl.constexpr,
):
    """branches_wgrad on sm_90 over 2-D pixel tiles by TMA: a program sums the weight gradient of TAPS taps
    of one branch (1, or 3: a row of the 3x3 kernel, which share each G_j tile) over a run of TH x TW tiles,
    h's box shifted by each tap (zero-filled outside the image: the padding) and G_j's box at the tile, with
    no per-pixel index or mask work (the row kernel spends 80 instructions per HGMMA on it). Grid: (SPLITS,
    4 * 9 / TAPS weight programs + 4 bias programs, ci tiles * co tiles). The bias programs sum a run of
    whole 64-pixel blocks of the flat pixels each. C must be a multiple of BLOCK_CI, BLOCK_CO and 8."""
    GROUPS: tl.constexpr = 9 // TAPS
    pid_s = tl.program_id(0)
    jt = tl.program_id(1)
    pid_c = tl.program_id(2)
    n_ci = tl.cdiv(C, BLOCK_CI)
    co0 = (pid_c // n_ci) * BLOCK_CO
    if jt < 4 * GROUPS:
        BLOCK_P: tl.constexpr = TH * TW
        j = jt // GROUPS
        tap0 = (jt % GROUPS) * TAPS  # TAPS 3: taps 3 ky .. 3 ky + 2, dx = -D, 0, D
        D = _dilation(j, D1, D2, D3, D4)
        dy = (tap0 // 3 - 1) * D
        dx = (tap0 % 3 - 1) * D
        ci0 = (pid_c % n_ci) * BLOCK_CI
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[N, H, W, C], strides=[H * W * C, W * C, C, 1],
                                           block_shape=[1, TH, TW, BLOCK_CI])
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[N, H, W, 4 * C],
                                           strides=[H * W * 4 * C, W * 4 * C, 4 * C, 1],
                                           block_shape=[1, TH, TW, BLOCK_CO])
        tiles_x = tl.cdiv(W, TW)
        tiles_img = tl.cdiv(H, TH) * tiles_x
        per = tl.cdiv(N * tiles_img, SPLITS)
        t0 = pid_s * per
        t1 = tl.minimum(t0 + per, N * tiles_img)
        # the run's first tile; later ones are stepped (x, then y, then the image), not divided out
        n = t0 // tiles_img
        y0 = (t0 % tiles_img) // tiles_x * TH
        x0 = (t0 % tiles_x) * TW
        acc0 = tl.zeros([BLOCK_CI, BLOCK_CO], dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        for t in range(t0, t1):
            g = g_desc.load([n, y0, x0, j * C + co0]).reshape(BLOCK_P, BLOCK_CO)
            a = h_desc.load([n, y0 + dy, x0 + dx, ci0]).reshape(BLOCK_P, BLOCK_CI)
            acc0 = tl.dot(tl.trans(a), g, acc0)
            if TAPS == 3:
                a = h_desc.load([n, y0 + dy, x0 + dx + D, ci0]).reshape(BLOCK_P, BLOCK_CI)
                acc1 = tl.dot(tl.trans(a), g, acc1)
                a = h_desc.load([n, y0 + dy, x0 + dx + 2 * D, ci0]).reshape(BLOCK_P, BLOCK_CI)
                acc2 = tl.dot(tl.trans(a), g, acc2)
            x0 += TW
            row_end = x0 >= W
            x0 = tl.where(row_end, 0, x0)
            y0 = tl.where(row_end, y0 + TH, y0)
            img_end = y0 >= H
            y0 = tl.where(img_end, 0, y0)
            n = tl.where(img_end, n + 1, n)
        ci = ci0 + tl.arange(0, BLOCK_CI)
        co = co0 + tl.arange(0, BLOCK_CO)
        w_ptrs = dw_ptr + ((j * 9 + tap0) * C + ci[:, None]) * C + co[None, :]
        wmask = (ci < C)[:, None] & (co < C)[None, :]
        tl.atomic_add(w_ptrs, acc0, mask=wmask, sem="relaxed")
        if TAPS == 3:
            tl.atomic_add(w_ptrs + C * C, acc1, mask=wmask, sem="relaxed")
            tl.atomic_add(w_ptrs + 2 * C * C, acc2, mask=wmask, sem="relaxed")
    elif pid_c % n_ci == 0:  # one bias program per co tile
        co = co0 + tl.arange(0, BLOCK_CO)
        NP = N * H * W
        pps = tl.cdiv(tl.cdiv(NP, SPLITS), 64) * 64  # _bias_sums' loop steps 64 pixels to each run's end
        _bias_sums(g_ptr, db_ptr, jt - 4 * GROUPS, co, co < C, C, NP, pid_s * pps,
                   tl.minimum((pid_s + 1) * pps, NP), 64, BLOCK_CO)


@triton.jit
def _wgrad_tap(acc, h_ptr, src, y, x, pm, ci, cimask, g, dy, dx, H, W, C, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc += h[p + (dy, dx), ci]^T @ g: one tap of branches_wgrad9. The tap's offset is one scalar on the
    pixel's own address; only the padding mask is per pixel."""
    yy, xx = y + dy, x + dx
    valid = pm & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    a = tl.load(h_ptr + (src + (dy * W + dx) * C)[:, None] + ci[None, :], mask=valid[:, None] & cimask[None, :],
                other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    return tl.dot(tl.trans(a), g, acc, input_precision=PREC)


@triton.jit
def branches_wgrad9(
    h_ptr, g_ptr, dw_ptr, db_ptr, NP, H, W, C, PIX_PER_SPLIT,
    D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """branches_wgrad with one program per branch over all 9 taps: each pixel block decodes its pixels and
    loads G_j's tile once for 9 dots into 9 accumulators, where branches_wgrad repeats both per tap (its
    sm_90 loop: 326 instructions for 4 HGMMA, mostly that index work). Grid: (pixel splits, 8, ci tiles *
    co tiles): axis 1 below 4 is the branch (weights), 4..7 the branch's bias."""
    pid_s = tl.program_id(0)
    jt = tl.program_id(1)
    pid_c = tl.program_id(2)
    n_ci = tl.cdiv(C, BLOCK_CI)
    co = (pid_c // n_ci) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < C
    C4 = 4 * C
    p_end = tl.minimum((pid_s + 1) * PIX_PER_SPLIT, NP)
    if jt < 4:
        j = jt
        D = _dilation(j, D1, D2, D3, D4)
        ci = (pid_c % n_ci) * BLOCK_CI + tl.arange(0, BLOCK_CI)
        cimask = ci < C
        a0 = tl.zeros([BLOCK_CI, BLOCK_CO], dtype=tl.float32)
        a1, a2, a3, a4, a5, a6, a7, a8 = a0, a0, a0, a0, a0, a0, a0, a0
        HWu, Wu = tl.cast(H * W, tl.uint32), tl.cast(W, tl.uint32)  # unsigned division (p >= 0)
        for p0 in range(pid_s * PIX_PER_SPLIT, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < NP
            r = p.to(tl.uint32) % HWu
            q = r // Wu
            y = q.to(tl.int32)
            x = (r - q * Wu).to(tl.int32)
            src = p.to(tl.int64) * C  # pixel p's own address: a tap adds (dy * W + dx) * C
            g = tl.load(g_ptr + p.to(tl.int64)[:, None] * C4 + j * C + co[None, :],
                        mask=pm[:, None] & comask[None, :], other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
            a0 = _wgrad_tap(a0, h_ptr, src, y, x, pm, ci, cimask, g, -D, -D, H, W, C, UPCAST, PREC)
            a1 = _wgrad_tap(a1, h_ptr, src, y, x, pm, ci, cimask, g, -D, 0, H, W, C, UPCAST, PREC)
            a2 = _wgrad_tap(a2, h_ptr, src, y, x, pm, ci, cimask, g, -D, D, H, W, C, UPCAST, PREC)
            a3 = _wgrad_tap(a3, h_ptr, src, y, x, pm, ci, cimask, g, 0, -D, H, W, C, UPCAST, PREC)
            a4 = _wgrad_tap(a4, h_ptr, src, y, x, pm, ci, cimask, g, 0, 0, H, W, C, UPCAST, PREC)
            a5 = _wgrad_tap(a5, h_ptr, src, y, x, pm, ci, cimask, g, 0, D, H, W, C, UPCAST, PREC)
            a6 = _wgrad_tap(a6, h_ptr, src, y, x, pm, ci, cimask, g, D, -D, H, W, C, UPCAST, PREC)
            a7 = _wgrad_tap(a7, h_ptr, src, y, x, pm, ci, cimask, g, D, 0, H, W, C, UPCAST, PREC)
            a8 = _wgrad_tap(a8, h_ptr, src, y, x, pm, ci, cimask, g, D, D, H, W, C, UPCAST, PREC)
        w_off = ((j * 9) * C + ci[:, None]) * C + co[None, :]
        wmask = cimask[:, None] & comask[None, :]
        CC = C * C
        tl.atomic_add(dw_ptr + w_off, a0, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + CC, a1, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + 2 * CC, a2, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + 3 * CC, a3, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + 4 * CC, a4, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + 5 * CC, a5, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + 6 * CC, a6, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + 7 * CC, a7, mask=wmask, sem="relaxed")
        tl.atomic_add(dw_ptr + w_off + 8 * CC, a8, mask=wmask, sem="relaxed")
    elif pid_c % n_ci == 0:  # one bias program per co tile
        _bias_sums(g_ptr, db_ptr, jt - 4, co, comask, C, NP, pid_s * PIX_PER_SPLIT, p_end, BLOCK_P, BLOCK_CO)


@triton.jit
def suffix_sum(g_ptr, out_ptr, NP, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """G_j = g_j + ... + g_4 over the four C-channel chunks of [NP, 4C]."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (p < NP)[:, None] & (c < C)[None, :]
    rows = p.to(tl.int64)[:, None] * (4 * C) + c[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for jj in tl.static_range(4):
        j = 3 - jj
        acc += tl.load(g_ptr + rows + j * C, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows + j * C, acc.to(out_ptr.dtype.element_ty), mask=m)


def _autotuned(fn, name, key, reset=()):
    return triton.autotune(configs=CONFIGS[name], key=key, reset_to_zero=list(reset) or None)(fn)


# Autotune keys: everything that changes the work or the code. The best tile depends on the batch too
# (N: how many programs fill the GPU), and PREC (TF32 or IEEE dots) switches with cudnn.allow_tf32 at run
# time within one dtype class. The forward always runs MODE 0 (branches_grad is MODE 1). The kernels do not
# read N; it is passed for the key. (Tensor dtypes are part of every key already.)
_CONV_KEY = ["N", "H", "W", "C", "PREC"]
_DGRAD_KEY = _CONV_KEY
_WGRAD_KEY = ["NP", "H", "W", "C", "PREC"]
branches_fwd_lowp = _autotuned(branches_fwd, "fwd_lowp", _CONV_KEY)
branches_fwd_f32 = _autotuned(branches_fwd, "fwd_f32", _CONV_KEY)
branches_grad_lowp = _autotuned(branches_grad, "grad_lowp", _CONV_KEY)
branches_grad_f32 = _autotuned(branches_grad, "grad_f32", _CONV_KEY)
branches_dgrad_lowp = _autotuned(branches_dgrad, "dgrad_lowp", _DGRAD_KEY)
branches_dgrad_f32 = _autotuned(branches_dgrad, "dgrad_f32", _DGRAD_KEY)
branches_wgrad_lowp = _autotuned(branches_wgrad, "wgrad_lowp", _WGRAD_KEY, ("dw_ptr", "db_ptr"))
branches_wgrad_f32 = _autotuned(branches_wgrad, "wgrad_f32", _WGRAD_KEY, ("dw_ptr", "db_ptr"))
branches_fwd_tma_lowp = _autotuned(branches_fwd_tma, "fwd_tma_lowp", _CONV_KEY[:-1])  # no PREC: bf16/fp16 only
branches_grad_tma_lowp = _autotuned(branches_grad_tma, "grad_tma_lowp", _CONV_KEY[:-1])
branches_dgrad_tma_lowp = _autotuned(branches_dgrad_tma, "dgrad_tma_lowp", _CONV_KEY[:-1])
branches_wgrad_tma_lowp = _autotuned(branches_wgrad_tma, "wgrad_tma_lowp", _CONV_KEY[:-1], ("dw_ptr", "db_ptr"))
branches_wgrad9_lowp = _autotuned(branches_wgrad9, "wgrad9_lowp", _WGRAD_KEY, ("dw_ptr", "db_ptr"))
