"""Streaming kernels with nothing else to do: a read that sums each program's elements and a write of one
value. The breakdown's floor rows time them beside ATen's sum and fill_; the ncu case profiles the read beside
the centroid op's own kernels."""
import torch
import triton
import triton.language as tl


@triton.jit
def _read_sum(x, out, n, STREAMS, PER, BLOCK: tl.constexpr):
    # program i: block i % STREAMS of every PER, the (i // STREAMS)-th block of its stream (STREAMS 1, which the
    # launch specializes: block i, the same SASS as a plain stream's)
    i = tl.program_id(0)
    offs = ((i % STREAMS) * PER + i // STREAMS).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x + offs, mask=offs < n, other=0.0)
    tl.store(out + i, tl.sum(v.to(tl.float32), 0))


def stream_read(x, block, warps):
    """x's elements summed per program of `block`: a streaming read with nothing else to do (the floor rows'
    reader beside ATen's sum)."""
    return stream_read_strided(x, block, warps, 1)


def stream_read_strided(x, block, warps, streams):
    """stream_read's sums in another order: x as `streams` runs of whole blocks, the programs in flight each at
    the same block of another run, as the centroid pair sums' programs read their runs; stream_read's programs
    in flight read adjacent blocks. Slower than stream_read where reading many places at once costs."""
    blocks = triton.cdiv(x.numel(), block)
    if blocks % streams:
        raise ValueError(f"stream_read_strided takes whole runs: {blocks} blocks of {block} in {streams} streams")
    out = torch.empty(blocks, device=x.device, dtype=torch.float32)
    _read_sum[(blocks,)](x, out, x.numel(), streams, blocks // streams, BLOCK=block, num_warps=warps)
    return out


@triton.jit
def _read_pair(a, b, out, n, SHIFT, BLOCK: tl.constexpr):
    # program i: a's block i and b's block (i + SHIFT) mod the blocks, summed
    nb = tl.num_programs(0)
    i = tl.program_id(0)
    offs_a = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_b = ((i + SHIFT) % nb).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    va = tl.load(a + offs_a, mask=offs_a < n, other=0.0)
    vb = tl.load(b + offs_b, mask=offs_b < n, other=0.0)
    tl.store(out + i, tl.sum(va.to(tl.float32), 0) + tl.sum(vb.to(tl.float32), 0))


def flat(x):
    """A dense channels-last map's elements in memory order, as one 1-D view (no copy)."""
    return x.detach().permute(0, 2, 3, 1).reshape(-1)


def stream_read_pair(a, b, block, warps, shift=0):
    """Two buffers of a size read as stream_read reads one: program i sums a's block i and b's block i + shift
    (wrapping). shift 0 reads both at the same offsets at once, as every centroid pair kernel reads its two maps
    (which read at 2.0 TB/s on the H100 where one buffer of both streamed at 2.95, s18); shift = half the
    blocks reads them half a map apart. Same rates: reading two maps costs nothing; a slower shift 0: the maps'
    same offsets contend (their distance in memory is in the row)."""
    if a.numel() != b.numel():
        raise ValueError(f"stream_read_pair takes buffers of one size, got {a.numel()} and {b.numel()}")
    out = torch.empty(triton.cdiv(a.numel(), block), device=a.device, dtype=torch.float32)
    _read_pair[(out.numel(),)](a, b, out, a.numel(), shift % out.numel(), BLOCK=block, num_warps=warps)
    return out


def pair_shifts(shape, element_size, run, block):
    """{stream_read_pair's shift in blocks: the row's name} for a map of shape [N, C, H, W] channels-last: the
    same offsets; map b as far ahead as DMFN_CENTROID_APART takes it (half a run of `run` pixels of the Triton
    sums, half an image of the whole planes); half a map. A distance under a block rounds up to one; the first
    name of a shift is kept (tiny maps are one block: one row)."""
    N, C, H, W = (int(s) for s in shape)
    pixel, blocks = C * element_size, -(-N * C * H * W // block)
    shifts = {}
    for apart, how in ((0, "at the same offsets"), (run // 2 * pixel, "half a run of the Triton sums apart"),
                       (H * W // 2 * pixel, "half an image apart"), (N * H * W * pixel // 2, "half a map apart")):
        shift = max(round(apart / (block * element_size)), 1 if apart else 0) % blocks
        nbytes = shift * block * element_size
        size = f"{nbytes // 1024} KiB" if nbytes >= 1024 else f"{nbytes} B"
        shifts.setdefault(shift, f"{how}, {size}" if shift else how)
    return shifts


@triton.jit
def _write_value(out, n, value, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offs, tl.full([BLOCK], value, out.dtype.element_ty), mask=offs < n)


def stream_write(out, value, block, warps):
    """value into every element of out, `block` a program: the floor rows' writer beside ATen's fill_."""
    _write_value[(triton.cdiv(out.numel(), block),)](out, out.numel(), value, BLOCK=block, num_warps=warps)
    return out


@triton.jit
def _read_columns(a, b, out, HW, C, RUN, PIX: tl.constexpr, CH: tl.constexpr):
    # program (n, channel group, run of RUN pixels): CH channels of those pixels of image n in both [N, H*W, C]
    # maps, PIX pixels a step, summed per channel: the centroid pair kernel's sums with nothing else to do
    pid, run = tl.program_id(0), tl.program_id(1)
    n, g = pid // (C // CH), pid % (C // CH)
    rows = tl.arange(0, PIX)[:, None]
    offs = n.to(tl.int64) * HW * C + rows * C + g * CH + tl.arange(0, CH)[None, :]
    acc = tl.zeros([PIX, CH], tl.float32)
    for p0 in range(run * RUN, tl.minimum(run * RUN + RUN, HW), PIX):
        m = p0 + rows < HW
        acc += tl.load(a + offs + p0 * C, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(b + offs + p0 * C, mask=m, other=0.0).to(tl.float32)
    tl.store(out + (run * tl.num_programs(0) + pid) * CH + tl.arange(0, CH), tl.sum(acc, 0))


def _columns(a, b, runs, ch, pix):
    N, C, H, W = a.shape
    run = triton.cdiv(triton.cdiv(H * W, runs), pix) * pix
    out = torch.empty(runs, N * C, device=a.device, dtype=torch.float32)
    _read_columns[(N * (C // ch), runs)](a, b, out, H * W, C, run, PIX=pix, CH=ch, num_warps=8)
    return out.sum(0)


def column_read(a, b, runs=1):
    """Both channels-last maps summed per (image, channel) over the pixels, by columns of 128 bytes of channels
    (8 x 16-byte vectors) by 32 rows of pixels a program, each row taking 4 pixels a step (the pair kernel takes
    6 in fp32, 4 in 16 bits; Triton's tiles are powers of 2): the centroid forward's order of reads without its
    adds and finish. runs=1 is its grid at [16, 512, 32, 32] in fp32 (one program a column, about 2 an SM);
    more runs, more programs in flight (sm_90 cubin: 48 registers in fp32, 80 in bf16; 8 16-byte loads a
    step)."""
    ch = 128 // a.element_size()
    if a.shape[1] % ch:
        raise ValueError(f"column_read takes whole columns of {ch} channels, got {a.shape[1]}")
    return _columns(a, b, runs, ch, 128)


def pixel_read(a, b, runs):
    """The same sums over runs of whole pixels (every channel, C a power of 2, 16 KB of each map a step: 4
    16-byte loads a thread), so each program's bytes are contiguous, as a pixel-major pair kernel's would be."""
    C = a.shape[1]
    if C & (C - 1):
        raise ValueError(f"pixel_read takes a power-of-2 channel count, got {C}")
    return _columns(a, b, runs, C, max(1, 16384 // (C * a.element_size())))
