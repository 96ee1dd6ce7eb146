"""The centroid loss's forward in Triton, for dense channels-last maps: an A/B beside the C++ op's two-map
kernel (DMFN_CENTROID_TRITON=1, dmfn_fast/ops/centroid_align.py), which read at 2.0 TB/s on the H100 in every
plan where a Triton stream read the same bytes at 2.95 (s18). The C++ backward takes its stats, or with
DMFN_CENTROID_TRITON=2 centroid_grad (the C++ gradient wrote at 2.7 TB/s in bf16 where a Triton stream wrote
at 3.4, s18).

centroid_pair_sums: program (n * groups + g, r) takes CB channels (every channel where C <= CB) of run r of
image n's pixels in both maps, so a program's bytes are contiguous, as a stream's. Its 8 warps form ROWS rows,
each loading one pixel's CB channels at 16 bytes a thread; a step is STEPS such loads of ROWS consecutive
pixels in each map, one [STEPS * ROWS, CB] tensor a map, so all of a thread's loads are issued before its adds
(sm_90: 16 in fp32, 8 in 16 bits), which sum over STEPS in its registers. It adds x, x*u and x*v per channel
(u = 2w/W - 1, v = 2h/H - 1) and writes the run's sums to part[(r * 6 + map * 3 + k) * NC + plane]. APART
(DMFN_CENTROID_APART=1, in the whole-plane sums too): map b's pixels in the run's order rotated by half the run,
so the two maps are never read at the same offsets at once (the same pixels, added in another order).
INTERLEAVE (DMFN_CENTROID_INTERLEAVE=1): run r of R is steps r, r + R, ... of its image, so the programs in
flight read one dense window of each image, as a stream's do, not R places 1/R of an image apart.
ONE_MAP (DMFN_CENTROID_ONE_MAP=1): program (., r, m) reads map m alone, two steps in flight, so every
program streams one buffer; the grid's last axis is the map, so map a's programs are dispatched first, then
map b's, as a stream over both maps' bytes reads one map, then the other (the same partial sums; APART moot).
centroid_finish: a program per PLANES planes loads RUNS runs of their sums at once (one [RUNS, PLANES] tile of
each of the 6 sums: one round trip where a lane per plane took two, and 4x the programs), adds them over the
runs, chunk after chunk, then the reference's eps terms, and writes stats [2, NC, 3] (S0, cx, cy, as the C++
op's); each program's squared centroid differences go to loss_parts, which the last program to take the
ticket adds up in program order into the loss. Deterministic: fixed-order sums (a compiled reduction's tree),
no float atomics. centroid_pair_sums's first program zeroes the ticket, so no memset runs.
centroid_plane_sums (DMFN_CENTROID_TRITON=3 and 4): whole planes a program instead, 128 or 64 bytes of each pixel
over the image, its stats and a loss share written by itself; centroid_sum_shares adds the shares.
centroid_grad (DMFN_CENTROID_TRITON=2 and 3): the backward, written in the sums kernel's tiles from the stats."""
import triton
import triton.language as tl

MAX_GROUP_BYTES = 2048  # channels a program takes, in bytes of one pixel (512 fp32, 1024 16-bit)
WARPS = 8  # of the sums kernel: ROWS rows of warps, each row one pixel's CB channels at 16 bytes a thread
MAX_ROWS = 8  # (runs of pixels; whole planes take up to 64: 4 or 8 threads a pixel)
# loads of ROWS pixels of each map a thread issues before their adds, by bytes an element: 16 loads in fp32, 8
# in 16 bits (their unpacked values take as many registers; 16 took 185 on sm_90: one program an SM)
STEPS = {4: 8, 2: 4}
# planes a finish program: 128 programs at the training size (8192 planes), on 132 SMs, each loading its 16 runs'
# 24 KB at once (a lane per plane in 32 programs of 256 took two round trips of 48 KB an SM)
FINISH_PLANES = 64
FINISH_RUNS = 32  # at most, runs a finish program loads at once (the 16 of one wave: 6 16-byte loads a thread)
FINISH_WARPS = 8  # (4 warps' 12 loads a thread: ptxas put 4 of them after the first add)
PARTS = 1024  # loss parts the last finish program adds a step


@triton.jit
def _image_channels(C, CB: tl.constexpr):
    """Program (n * groups + g, run)'s image n and channels c, CB a group."""
    pid = tl.program_id(0)
    groups = tl.cdiv(C, CB)
    return pid // groups, (pid % groups) * CB + tl.arange(0, CB)


@triton.jit
def _step(p0, STEPS: tl.constexpr, ROWS: tl.constexpr, W, step_u, step_v):
    """A step's pixels from p0, [STEPS * ROWS, 1]: ROWS consecutive pixels a load (the rows of warps), STEPS loads
    a thread; and their u = 2w/W - 1, v = 2h/H - 1 in fp32. 2-D, not [STEPS, ROWS, 1]: Triton 3.6 broke the tie
    between the two pixel dims by putting warps along STEPS, so each step's sum crossed warps (171-255 registers)."""
    p = p0 + tl.arange(0, STEPS * ROWS)[:, None]
    u, v = _coords(p, W, step_u, step_v)
    return p, u, v


@triton.jit
def _coords(p, W, step_u, step_v):
    """Pixels p's u = 2w/W - 1 and v = 2h/H - 1 in fp32."""
    h = p // W
    return (p - h * W).to(tl.float32) * step_u - 1.0, h.to(tl.float32) * step_v - 1.0


@triton.jit
def _fold(x, STEPS: tl.constexpr, ROWS: tl.constexpr, CB: tl.constexpr):
    """[STEPS * ROWS, CB] -> [ROWS, CB], summed over STEPS: row s * ROWS + r sits in the thread of row r."""
    return tl.sum(tl.reshape(x, [STEPS, ROWS, CB]), 0)


@triton.jit
def _add_step(a, b, base, cm, p0, lo, hi, W, C, step_u, step_v, s0a, sxa, sya, s0b, sxb, syb, ROWS: tl.constexpr,
              STEPS: tl.constexpr, CB: tl.constexpr, APART: tl.constexpr):
    """One step's pixels from p0 (those below hi) added to the sums: one [STEPS * ROWS, CB] tensor a map, so all
    of a thread's loads are issued before its first add; summed over STEPS in its registers. APART: map b's
    pixels rotated by half of [lo, hi)."""
    p, u, v = _step(p0, STEPS, ROWS, W, step_u, step_v)
    m = cm & (p < hi)
    xa = tl.load(a + base + p.to(tl.int64) * C, mask=m, other=0.0).to(tl.float32)
    pb, ub, vb = p, u, v
    if APART:
        q = p + (hi - lo) // 2  # a bijection of [lo, hi): masked lanes stay masked
        pb = tl.where(q >= hi, q - (hi - lo), q)
        ub, vb = _coords(pb, W, step_u, step_v)
    xb = tl.load(b + base + pb.to(tl.int64) * C, mask=m, other=0.0).to(tl.float32)
    s0a += _fold(xa, STEPS, ROWS, CB)
    sxa += _fold(xa * u, STEPS, ROWS, CB)
    sya += _fold(xa * v, STEPS, ROWS, CB)
    s0b += _fold(xb, STEPS, ROWS, CB)
    sxb += _fold(xb * ub, STEPS, ROWS, CB)
    syb += _fold(xb * vb, STEPS, ROWS, CB)
    return s0a, sxa, sya, s0b, sxb, syb


@triton.jit
def _run_sums(a, b, n, c, r, RUN, HW, W, C, step_u, step_v, ROWS: tl.constexpr, STEPS: tl.constexpr,
              CB: tl.constexpr, APART: tl.constexpr, INTERLEAVE: tl.constexpr):
    """S0, Sx, Sy of map a, then of map b, over run r of RUN pixels of image n in channels c: [CB] each. APART:
    map b's pixels in the run's order rotated by half the run, so the two maps are never read at the same offsets
    at once (whichever programs are in flight). INTERLEAVE: run r is steps r, r + R, r + 2R, ... of the image, R
    its runs (the grid's), so an image's programs read adjacent steps at once; APART then rotates map b's pixels
    by half the image."""
    cm = (c < C)[None, :]
    base = n.to(tl.int64) * HW * C + c[None, :]
    z = tl.zeros([ROWS, CB], tl.float32)  # a row per pixel of a load
    s0a, sxa, sya, s0b, sxb, syb = z, z, z, z, z, z
    if INTERLEAVE:
        for p0 in range(r * (ROWS * STEPS), HW, tl.cdiv(HW, RUN) * (ROWS * STEPS)):
            s0a, sxa, sya, s0b, sxb, syb = _add_step(a, b, base, cm, p0, 0, HW, W, C, step_u, step_v, s0a, sxa, sya,
                                                     s0b, sxb, syb, ROWS, STEPS, CB, APART)
    else:
        start = r * RUN
        end = tl.minimum(start + RUN, HW)
        for p0 in range(start, end, ROWS * STEPS):
            s0a, sxa, sya, s0b, sxb, syb = _add_step(a, b, base, cm, p0, start, end, W, C, step_u, step_v, s0a, sxa,
                                                     sya, s0b, sxb, syb, ROWS, STEPS, CB, APART)
    return tl.sum(s0a, 0), tl.sum(sxa, 0), tl.sum(sya, 0), tl.sum(s0b, 0), tl.sum(sxb, 0), tl.sum(syb, 0)


@triton.jit
def _run_one(x, n, c, r, RUN, HW, W, C, step_u, step_v, ROWS: tl.constexpr, STEPS: tl.constexpr, CB: tl.constexpr,
             INTERLEAVE: tl.constexpr):
    """S0, Sx, Sy of one map over run r of image n in channels c ([CB] each), in _run_sums' orders, a step of
    2 * STEPS loads (the pair sums' loads of both maps) as one [2 * STEPS * ROWS, CB] tensor, its pixels'
    coordinates made after the load: sm_90, 11 of the 16 loads in fp32 before the first add (coordinates made
    before the load: 5; two loads of half a step: 8)."""
    cm = (c < C)[None, :]
    base = n.to(tl.int64) * HW * C + c[None, :]
    z = tl.zeros([ROWS, CB], tl.float32)
    s0, sx, sy = z, z, z
    step: tl.constexpr = 2 * STEPS * ROWS
    if INTERLEAVE:
        hi, first, stride = HW, r * step, tl.cdiv(HW, RUN) * step
    else:
        hi = tl.minimum(r * RUN + RUN, HW)
        first, stride = r * RUN, step
    for p0 in range(first, hi, stride):
        p = p0 + tl.arange(0, step)[:, None]
        xv = tl.load(x + base + p.to(tl.int64) * C, mask=cm & (p < hi), other=0.0).to(tl.float32)
        u, v = _coords(p, W, step_u, step_v)
        s0 += _fold(xv, 2 * STEPS, ROWS, CB)
        sx += _fold(xv * u, 2 * STEPS, ROWS, CB)
        sy += _fold(xv * v, 2 * STEPS, ROWS, CB)
    return tl.sum(s0, 0), tl.sum(sx, 0), tl.sum(sy, 0)


@triton.jit
def centroid_pair_sums(a, b, part, ticket, HW, W, C, NC, RUN, step_u, step_v, ROWS: tl.constexpr,
                       STEPS: tl.constexpr, CB: tl.constexpr, APART: tl.constexpr, INTERLEAVE: tl.constexpr,
                       ONE_MAP: tl.constexpr):
    n, c = _image_channels(C, CB)
    r = tl.program_id(1)
    q = part + r * 6 * NC + n * C + c
    cm = c < C
    if ONE_MAP:  # map program_id(2) alone
        m = tl.program_id(2)
        s0, sx, sy = _run_one(tl.where(m == 0, a, b), n, c, r, RUN, HW, W, C, step_u, step_v, ROWS, STEPS, CB,
                              INTERLEAVE)
        if (tl.program_id(0) == 0) & (r == 0) & (m == 0):
            tl.store(ticket, 0)
        q += m * 3 * NC
        tl.store(q, s0, mask=cm)
        tl.store(q + NC, sx, mask=cm)
        tl.store(q + 2 * NC, sy, mask=cm)
        return
    s0a, sxa, sya, s0b, sxb, syb = _run_sums(a, b, n, c, r, RUN, HW, W, C, step_u, step_v, ROWS, STEPS, CB, APART,
                                             INTERLEAVE)
    if (tl.program_id(0) == 0) & (r == 0):
        tl.store(ticket, 0)
    tl.store(q, s0a, mask=cm)
    tl.store(q + NC, sxa, mask=cm)
    tl.store(q + 2 * NC, sya, mask=cm)
    tl.store(q + 3 * NC, s0b, mask=cm)
    tl.store(q + 4 * NC, sxb, mask=cm)
    tl.store(q + 5 * NC, syb, mask=cm)


@triton.jit
def _centroids(s0, sx, sy, e0, ex, ey, stats, i, m):
    s0 = s0 + e0
    cx = tl.math.div_rn(sx + ex, s0)  # IEEE, as the C++ op's (Triton's / is div.full, within 2 ulp)
    cy = tl.math.div_rn(sy + ey, s0)
    tl.store(stats + i * 3, s0, mask=m)
    tl.store(stats + i * 3 + 1, cx, mask=m)
    tl.store(stats + i * 3 + 2, cy, mask=m)
    return cx, cy


@triton.jit
def _plane_pair(s0a, sxa, sya, s0b, sxb, syb, e0, ex, ey, stats, NC, i, m):
    """Both maps' stats of planes i into stats [2, NC, 3]; their squared centroid differences summed, fp64."""
    cxa, cya = _centroids(s0a, sxa, sya, e0, ex, ey, stats, i, m)
    cxb, cyb = _centroids(s0b, sxb, syb, e0, ex, ey, stats + NC * 3, i, m)
    dx = (cxa - cxb).to(tl.float64)
    dy = (cya - cyb).to(tl.float64)
    return tl.sum(tl.where(m, dx * dx + dy * dy, 0.0), 0)


@triton.jit
def _loss_from_parts(loss_parts, count, loss, NC, PARTS: tl.constexpr):
    """The loss: the count parts added in order (a fixed tree: deterministic), over the 2 * NC differences."""
    total = tl.zeros([PARTS], tl.float64)
    for j0 in range(0, count, PARTS):
        j = j0 + tl.arange(0, PARTS)
        total += tl.load(loss_parts + j, mask=j < count, other=0.0, volatile=True)
    tl.store(loss, (tl.sum(total, 0) / (2 * NC).to(tl.float64)).to(loss.dtype.element_ty))


@triton.jit
def centroid_finish(part, stats, loss_parts, ticket, loss, NC, SPLITS, e0, ex, ey, PLANES: tl.constexpr,
                    RUNS: tl.constexpr, PARTS: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * PLANES + tl.arange(0, PLANES)  # part has under 2^31 elements (the launcher checks)
    m = i < NC
    z = tl.zeros([PLANES], tl.float32)  # S0, Sx, Sy of both maps
    s0a, sxa, sya, s0b, sxb, syb = z, z, z, z, z, z
    for r0 in range(0, SPLITS, RUNS):
        r = r0 + tl.arange(0, RUNS)[:, None]
        mr = (r < SPLITS) & m[None, :]
        q = part + r * (6 * NC) + i[None, :]
        # all six tiles' loads before the first sum (its barriers would hold back the loads after it)
        x0 = tl.load(q, mask=mr, other=0.0)
        x1 = tl.load(q + NC, mask=mr, other=0.0)
        x2 = tl.load(q + 2 * NC, mask=mr, other=0.0)
        x3 = tl.load(q + 3 * NC, mask=mr, other=0.0)
        x4 = tl.load(q + 4 * NC, mask=mr, other=0.0)
        x5 = tl.load(q + 5 * NC, mask=mr, other=0.0)
        s0a += tl.sum(x0, 0)
        sxa += tl.sum(x1, 0)
        sya += tl.sum(x2, 0)
        s0b += tl.sum(x3, 0)
        sxb += tl.sum(x4, 0)
        syb += tl.sum(x5, 0)
    tl.store(loss_parts + pid, _plane_pair(s0a, sxa, sya, s0b, sxb, syb, e0, ex, ey, stats, NC, i, m))
    tl.debug_barrier()  # every lane's stores before the ticket (acq_rel: they are visible to its last taker)
    programs = tl.num_programs(0)
    if tl.atomic_add(ticket, 1, sem="acq_rel") == programs - 1:
        _loss_from_parts(loss_parts, programs, loss, NC, PARTS)


@triton.jit
def centroid_plane_sums(a, b, stats, loss_parts, HW, W, C, NC, step_u, step_v, e0, ex, ey, ROWS: tl.constexpr,
                        STEPS: tl.constexpr, CB: tl.constexpr, APART: tl.constexpr):
    # DMFN_CENTROID_TRITON=3 and 4: program n * groups + g sums CB channels (128 or 64 bytes of a pixel) over every
    # pixel of image n, so it finishes its own planes: stats and a loss share, no partial sums, no finish
    # kernel (the C++ op's block finish, its fastest fp32 plan in s18). The order of the column_read rows.
    n, c = _image_channels(C, CB)
    s0a, sxa, sya, s0b, sxb, syb = _run_sums(a, b, n, c, 0, HW, HW, W, C, step_u, step_v, ROWS, STEPS, CB, APART,
                                             False)
    share = _plane_pair(s0a, sxa, sya, s0b, sxb, syb, e0, ex, ey, stats, NC, n * C + c, c < C)
    tl.store(loss_parts + tl.program_id(0), share)


@triton.jit
def centroid_sum_shares(loss_parts, loss, count, NC, PARTS: tl.constexpr):
    # one program: centroid_plane_sums's loss shares into the loss
    _loss_from_parts(loss_parts, count, loss, NC, PARTS)


@triton.jit
def centroid_grad(grad, stats, out, HW, W, C, NC, RUN, step_u, step_v, WHICH, ROWS: tl.constexpr,
                  STEPS: tl.constexpr, CB: tl.constexpr):
    # d loss / d f[n, c, h, w] = a*u[w] + b*v[h] + k for map WHICH (the C++ op's grad_coeffs), written over a run
    # of one image's pixels in the sums kernel's tiles: a stream of stores
    n, c = _image_channels(C, CB)
    cm1 = c < C
    i = n * C + c
    so = stats + i * 3
    st = stats + (NC + i) * 3
    mine = stats + (WHICH * NC + i) * 3
    gl = tl.load(grad).to(tl.float32)
    gl = tl.math.div_rn(tl.where(WHICH == 1, -gl, gl), NC.to(tl.float32))
    gx = gl * (tl.load(so + 1, mask=cm1, other=0.0) - tl.load(st + 1, mask=cm1, other=0.0))
    gy = gl * (tl.load(so + 2, mask=cm1, other=0.0) - tl.load(st + 2, mask=cm1, other=0.0))
    s0 = tl.load(mine, mask=cm1, other=1.0)
    a = tl.math.div_rn(gx, s0)[None, :]
    b = tl.math.div_rn(gy, s0)[None, :]
    k = tl.math.div_rn(-(gx * tl.load(mine + 1, mask=cm1, other=0.0) + gy * tl.load(mine + 2, mask=cm1, other=0.0)),
                       s0)[None, :]
    cm = cm1[None, :]
    base = n.to(tl.int64) * HW * C + c[None, :]
    start = tl.program_id(1) * RUN
    end = tl.minimum(start + RUN, HW)
    for p0 in range(start, end, ROWS * STEPS):
        p, u, v = _step(p0, STEPS, ROWS, W, step_u, step_v)
        tl.store(out + base + p.to(tl.int64) * C, (a * u + b * v + k).to(out.dtype.element_ty), mask=cm & (p < end))
