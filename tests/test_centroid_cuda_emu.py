"""The centroid op's CUDA kernels (csrc/centroid_align_kernel.cu) run on the CPU, against float64.

tests/cuda_emu/include stands in for the CUDA headers: every CUDA thread is a fiber, a block's threads take
turns at __syncthreads and warp shuffles in a random order, blocks run in a random order, and the build uses
AddressSanitizer. It checks each launch path's numerics, its barriers and tickets, and its bounds, on a
machine without a GPU; the same kernels' speed, and their memory ordering between blocks, are for the GPU
(test_centroid_align.py's CUDA tests, benchmarks/gpu_check.sh)."""
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
KERNEL = os.path.join(ROOT, "csrc", "centroid_align_kernel.cu")
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
EPS = 1e-7
CXX = ["g++", "-std=c++17", "-O1", f"-I{EMU}/include", f"-I{ROOT}/csrc"]  # the stand-in headers first

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH: the CUDA emulation needs it")


def cpu_launches(src: str) -> tuple[str, int]:
    """The .cu as the CPU stand-in compiles it: kernel<T><<<grid, block, smem, stream>>>(args) ->
    ::emu::launch(kernel<T>, ::emu::config(grid, ...), args); and after each `__shared__ T name[...];` a call
    that fills it with 0xFF bytes once per block (a GPU's shared memory starts as garbage; the stand-in's is
    one static copy that would otherwise keep the last block's values). Returns (source, launches found)."""
    pat = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)
    src, launches = pat.subn(lambda m: f"::emu::launch({m.group(1)}, ::emu::config({m.group(2)}), ", src)
    shared = re.compile(r"(__shared__\s+[^;]+?\s(\w+)\s*(?:\[[^\]]*\]\s*)*;)")
    src, declared = shared.subn(lambda m: f"{m.group(1)} ::emu::poison_once(&{m.group(2)}, sizeof({m.group(2)}));", src)
    assert declared >= 5, "the kernel file's __shared__ declarations were not all found"
    return src, launches


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_emu")
    with open(KERNEL) as f:
        src, launches = cpu_launches(f.read())
    assert launches >= 8, "the kernel file's <<<...>>> launches were not all found"
    with open(d / "kernel.cpp", "w") as f:
        f.write(f'#line 1 "{KERNEL}"\n' + src)
    cxx = CXX + ["-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    objs = []
    procs = []
    for name, path in (("kernel", d / "kernel.cpp"), ("driver", os.path.join(EMU, "centroid_driver.cpp"))):
        obj = d / f"{name}.o"
        objs.append(str(obj))
        procs.append(subprocess.Popen([*cxx, "-c", str(path), "-o", str(obj)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out = p.communicate()[0]
        assert p.returncode == 0, out
    exe = d / "driver"
    r = subprocess.run([*cxx, *objs, "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(exe), d


def run(driver, args):
    exe, _ = driver
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"driver failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-4000:]}"
    return r.stdout


def make_map(shape, layout, dtype, seed):
    """A map in one of the layouts the kernels walk, as (base storage, element offset, strides, the view).
    Values are positive, like ReLU features, with a few exact zeros."""
    N, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "nchw":
        base_shape, perm, crop = (N, C, H, W), (0, 1, 2, 3), (0, 0, 0)
    elif layout == "channels_last":
        base_shape, perm, crop = (N, H, W, C), (0, 3, 1, 2), (0, 0, 0)
    elif layout == "cl_offset":  # channels last, one element in: the 16-byte loads do not apply
        base_shape, perm, crop = (N, H, W, C), (0, 3, 1, 2), (1, 0, 0)
    elif layout == "cl_padded":  # channels last with spare channels per pixel (a crop of a wider map)
        base_shape, perm, crop = (N, H, W, C + 3), (0, 3, 1, 2), (0, 0, 3)
    elif layout == "cropped":  # unit-stride rows inside a bigger NCHW map
        base_shape, perm, crop = (N, C, H + 1, W + 2), (0, 1, 2, 3), (0, 2, 0)
    else:
        raise ValueError(layout)
    numel = 1
    for s in base_shape:
        numel *= s
    base = torch.rand(numel + crop[0], generator=g, dtype=torch.float64) * 2
    base[torch.rand(numel + crop[0], generator=g) < 0.05] = 0
    base = base.to(dtype)
    full = base[crop[0]:].view(base_shape)
    if crop[1]:
        full = full[:, :, :H, :W]
    if crop[2]:
        full = full[..., :C]
    view = full.permute(*perm)
    assert view.shape == (N, C, H, W)
    return base, view.storage_offset(), view.stride(), view


def write(t, path):
    (t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t).contiguous().numpy().tofile(path)


def read(path, dtype, shape):
    raw = torch.from_file(str(path), size=int(torch.tensor(shape).prod()) if shape else 1,
                          dtype=torch.int16 if dtype in (torch.float16, torch.bfloat16) else dtype)
    return raw.view(dtype).view(shape) if dtype in (torch.float16, torch.bfloat16) else raw.view(shape)


def reference(a, b):
    """float64 stats [2, N, C, 3] = (S0, cx, cy) and the loss, from the maps' own (rounded) values."""
    out = []
    for f in (a.double(), b.double()):
        H, W = f.shape[-2:]
        u = torch.arange(W, dtype=torch.float64) * (2.0 / W) - 1
        v = torch.arange(H, dtype=torch.float64) * (2.0 / H) - 1
        f = f + EPS
        s0 = f.sum((2, 3))
        out.append(torch.stack([s0, (f * u).sum((2, 3)) / s0, (f * v[:, None]).sum((2, 3)) / s0], -1))
    stats = torch.stack(out)
    return stats, (stats[0, ..., 1:] - stats[1, ..., 1:]).pow(2).mean()


def emu_forward(driver, a_map, b_map, dtype, sms=4, occ=2, seed=0, block=False, pixels=False, grids=False):
    """The forward's (stats, loss) on `sms` multiprocessors of `occ` blocks each; block: each block of the
    two-map kernel finishes its own planes where a column of blocks is one run; pixels: its blocks take every
    channel vector of their pixels. grids: also each launch's (grid x, grid y)."""
    _, d = driver
    (ba, oa, sa, a), (bb, ob, sb, b) = a_map, b_map
    write(ba, d / "a.bin")
    write(bb, d / "b.bin")
    N, C, H, W = a.shape
    out = run(driver, ["forward", CODES[dtype], N, C, H, W, sms, occ, int(block), int(pixels), seed,
                       d / "a.bin", oa, *sa, d / "b.bin", ob, *sb, d / "stats.bin", d / "loss.bin"])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    result = read(d / "stats.bin", acc, (2, N, C, 3)).clone(), read(d / "loss.bin", acc, ()).clone()
    if grids:
        line = re.search(r"grids:(.*)", out).group(1)
        result = (*result, [tuple(map(int, g.split(","))) for g in line.split()])
    return result


def emu_grad(driver, g, stats, like, which, channels_last, seed=0, rows=4):
    """rows: image rows per block of the channels-last 16-byte gradient kernel (DMFN_CENTROID_GRAD_ROWS)."""
    _, d = driver
    write(g.reshape(1), d / "g.bin")
    write(stats, d / "st.bin")
    N, C, H, W = like.shape
    run(driver, ["grad", CODES[like.dtype], N, C, H, W, which, int(channels_last), seed, d / "g.bin", d / "st.bin",
                 d / "out.bin", rows])
    out = read(d / "out.bin", like.dtype, (N, H, W, C) if channels_last else (N, C, H, W)).clone()
    return out.permute(0, 3, 1, 2) if channels_last else out


def check_forward(stats, loss, a, b, dtype):
    want_stats, want_loss = reference(a, b)
    # fp32 sums over a few thousand values: 1e-5 relative (float64 maps: 1e-12)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(stats.double(), want_stats, rtol=tol, atol=tol)
    torch.testing.assert_close(loss.double(), want_loss, rtol=tol * 10, atol=1e-14)


def check_grads(driver, stats, a, b, dtype, channels_last, seed):
    g = torch.tensor(0.75, dtype=stats.dtype)
    ref = [t.double().requires_grad_() for t in (a, b)]
    _, loss = reference(*ref)
    want = torch.autograd.grad(loss * 0.75, ref)
    for which, w in enumerate(want):
        got = emu_grad(driver, g, stats, (a, b)[which], which, channels_last, seed)
        assert torch.isfinite(got.double()).all(), "a gradient element was never written"
        scale = w.abs().max().item()
        tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), w, rtol=tol, atol=tol * scale)


# (shape, layout of a, layout of b): which launch path each takes is in the comment
FORWARD_CASES = {
    # both channels last with 16-byte loads: pair_sums_vec; pixels split into runs (the last partial) and a
    # partial channel group (40 channels: 5 vectors of 8 in bf16, 10 of 4 in fp32)
    "pair-runs-partial-group": ((2, 40, 9, 15), "channels_last", "channels_last"),
    "pair-N1-one-run": ((1, 16, 3, 5), "channels_last", "channels_last"),
    "pair-many-runs": ((3, 8, 17, 19), "channels_last", "channels_last"),
    # a thread's pixels step by 32 (its thread rows): rows wider than that, exactly that, one column
    "pair-wide-rows": ((1, 16, 5, 37), "channels_last", "channels_last"),
    "pair-rows-of-32": ((1, 8, 6, 32), "channels_last", "channels_last"),
    "pair-one-column": ((2, 8, 45, 1), "channels_last", "channels_last"),
    # one map each: channel_sums_vec (16-byte loads) and plane_sums with 16-byte rows (W = 16)
    "cl-vec-and-nchw-vec": ((2, 24, 5, 16), "channels_last", "nchw"),
    # channel_sums (no 16-byte loads: an offset start, spare channels) and plane_sums without (odd W, crop)
    "cl-offset-and-cropped": ((2, 40, 5, 7), "cl_offset", "cropped"),
    "cl-padded-and-nchw-odd": ((1, 33, 4, 9), "cl_padded", "nchw"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_and_grads_match_float64(driver, case, dtype):
    shape, la, lb = FORWARD_CASES[case]
    seed = sum(map(ord, case)) + CODES[dtype]
    a_map, b_map = make_map(shape, la, dtype, seed), make_map(shape, lb, dtype, seed + 1)
    a, b = a_map[3], b_map[3]
    stats, loss = emu_forward(driver, a_map, b_map, dtype, seed=seed)
    check_forward(stats, loss, a, b, dtype)
    # the gradient in both layouts (16-byte stores where C or W allows, else one element at a time)
    for cl in (True, False):
        check_grads(driver, stats, a, b, dtype, cl, seed)


def test_forward_is_deterministic_across_block_and_thread_orders(driver):
    """Fixed-order sums: other orders of blocks and threads give the same bits."""
    shape = (2, 40, 9, 15)
    maps = [make_map(shape, "channels_last", torch.bfloat16, s) for s in (5, 6)]
    first = emu_forward(driver, *maps, torch.bfloat16, seed=1)
    for seed in (2, 3):
        again = emu_forward(driver, *maps, torch.bfloat16, seed=seed)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("sms,occ", [(1, 1), (3, 2), (200, 4)])
def test_forward_plans_for_other_cards(driver, sms, occ):
    """The pixel runs per block follow the card's multiprocessors and the blocks that fit on one (one run per
    column of blocks up to 9 here)."""
    shape, dtype = (2, 16, 11, 13), torch.float32
    a_map, b_map = make_map(shape, "channels_last", dtype, 7), make_map(shape, "channels_last", dtype, 8)
    stats, loss = emu_forward(driver, a_map, b_map, dtype, sms=sms, occ=occ)
    check_forward(stats, loss, a_map[3], b_map[3], dtype)


PAIR_CASES = [c for c in FORWARD_CASES if c.startswith("pair-")]


# DMFN_CENTROID_BLOCK_FINISH, where a column of blocks is one run (the card's blocks, sms * occ, no more than
# the columns: here one SM for one block): the pair cases, and whole-pixel blocks of 32 vectors (24 of them busy,
# 2 of 3 images' planes in a block) with more planes than finish_pairs' 256 a block in fp32 and 16 bits
BLOCK_CASES = {**{c: (FORWARD_CASES[c][0], False) for c in PAIR_CASES}, "pixels-24-vectors": (None, True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_finish_matches_the_default(driver, case, dtype):
    """Each block turns its whole planes' sums into stats and a loss share, and sum_shares (one block) adds the
    shares in column order: against float64; the default's stats bit for bit (the same adds in the same order),
    its loss to rounding (the double shares add in another order); the same bits in other block orders. Its
    launches: the pair kernel, then one block where finish_pairs took its own."""
    shape, pixels = BLOCK_CASES[case]
    if shape is None:
        shape = (3, 24 * 16 // torch.empty((), dtype=dtype).element_size(), 5, 7)
    seed = sum(map(ord, case)) + CODES[dtype]
    a_map, b_map = make_map(shape, "channels_last", dtype, seed), make_map(shape, "channels_last", dtype, seed + 1)
    plain = emu_forward(driver, a_map, b_map, dtype, sms=1, occ=1, seed=seed, pixels=pixels, grids=True)
    blocks = emu_forward(driver, a_map, b_map, dtype, sms=1, occ=1, seed=seed + 1, pixels=pixels, block=True,
                         grids=True)
    check_forward(*blocks[:2], a_map[3], b_map[3], dtype)
    columns = plain[2][0][0]
    assert plain[2][0] == (columns, 1), "the plan gave a column more than one run"
    assert blocks[2] == [(columns, 1), (1, 1)], blocks[2]
    assert torch.equal(blocks[0], plain[0]), "finishing in the blocks changed a plane's stats"
    torch.testing.assert_close(blocks[1], plain[1], rtol=1e-6 if dtype != torch.float64 else 1e-14, atol=0)
    again = emu_forward(driver, a_map, b_map, dtype, sms=1, occ=1, seed=seed + 2, pixels=pixels, block=True)
    assert torch.equal(again[0], blocks[0]) and torch.equal(again[1], blocks[1])


def test_block_finish_needs_one_run_per_column(driver):
    """Where a column of blocks has several runs (4 SMs of 2 blocks for 4 columns: 2 runs of 192 pixels each),
    DMFN_CENTROID_BLOCK_FINISH keeps the default's plan: its launches and its bits."""
    shape, dtype = (2, 40, 17, 19), torch.float32
    maps = make_map(shape, "channels_last", dtype, 43), make_map(shape, "channels_last", dtype, 44)
    plain = emu_forward(driver, *maps, dtype, grids=True)
    blocks = emu_forward(driver, *maps, dtype, seed=1, block=True, grids=True)
    assert plain[2][0][1] > 1, plain[2]
    assert blocks[2] == plain[2]
    assert torch.equal(blocks[0], plain[0]) and torch.equal(blocks[1], plain[1])


# DMFN_CENTROID_PIXELS: (channels, the block's vectors in fp32, bf16, fp64), C a multiple of 8 with
# 17..256 vectors in each dtype where it is listed: blocks of 32, 64, 128 and 256 vectors, most with idle lanes,
# and blocks of more than 256 channels
PIXEL_CASES = {72: (32, None, 64), 136: (64, 32, 128), 264: (128, 64, 256), 520: (256, 128, None),
               1032: (None, 256, None)}
PIXEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}


@pytest.mark.parametrize("dtype", list(PIXEL_DTYPES))
@pytest.mark.parametrize("C", list(PIXEL_CASES))
def test_whole_pixel_blocks_match_float64(driver, C, dtype):
    """Blocks of every channel vector of a run of pixels: against float64; one column of blocks an image, cut
    into runs; the same bits in other block and thread orders; blocks of more than 32 vectors take no block
    finish (the same launches and bits); the gradient from its stats. A map with 16 vectors or fewer, or more
    than 256, keeps the default's plan (its launches and bits)."""
    vecs = PIXEL_CASES[C][PIXEL_DTYPES[dtype]]
    shape = (2, C, 5, 7)
    seed = C + CODES[dtype]
    a_map, b_map = make_map(shape, "channels_last", dtype, seed), make_map(shape, "channels_last", dtype, seed + 1)
    plain = emu_forward(driver, a_map, b_map, dtype, sms=3, seed=seed, grids=True)
    pix = emu_forward(driver, a_map, b_map, dtype, sms=3, seed=seed + 1, pixels=True, grids=True)
    if vecs is None:
        assert pix[2] == plain[2] and torch.equal(pix[0], plain[0]) and torch.equal(pix[1], plain[1])
        return
    check_forward(*pix[:2], a_map[3], b_map[3], dtype)
    # 6 blocks (3 SMs, 2 each) over 2 images: 3 runs an image of whole thread rows, each at least one step of
    # the kernel's pixels in flight (6 a thread in fp32, else 4), the last partial
    rows = 256 // vecs
    step = (6 if dtype == torch.float32 else 4) * rows
    runs = min(math.ceil(35 / step), 3)
    run = math.ceil(math.ceil(35 / runs) / rows) * rows
    assert pix[2][0] == (2, math.ceil(35 / run)), pix[2]
    again = emu_forward(driver, a_map, b_map, dtype, sms=3, seed=seed + 2, pixels=True)
    assert torch.equal(again[0], pix[0]) and torch.equal(again[1], pix[1])
    if vecs > 32:
        others = emu_forward(driver, a_map, b_map, dtype, sms=3, seed=seed + 4, pixels=True, block=True, grids=True)
        assert others[2] == pix[2], "a block-finish launch for whole pixels of more than 32 vectors"
        assert torch.equal(others[0], pix[0]) and torch.equal(others[1], pix[1])
    check_grads(driver, pix[0], a_map[3], b_map[3], dtype, True, seed)


def test_whole_pixel_blocks_with_one_run_an_image(driver):
    """One block an image (1 SM), runs of every pixel: whole-pixel blocks still take finish_pairs, not the
    block finish, and match float64."""
    shape, dtype = (2, 264, 4, 9), torch.float32
    maps = make_map(shape, "channels_last", dtype, 51), make_map(shape, "channels_last", dtype, 52)
    got = emu_forward(driver, *maps, dtype, sms=1, occ=1, pixels=True, block=True, grids=True)
    assert got[2] == [(2, 1), (3, 1)], got[2]  # finish_pairs: 528 planes, 256 a block
    check_forward(*got[:2], maps[0][3], maps[1][3], dtype)


def test_finish_adds_many_runs_a_plane(driver):
    """More runs a plane than finish_pairs' thread loads at once (16): blocks of 256 vectors (520 fp32
    channels, one pixel a thread row, steps of 6) over 135 pixels on 20 SMs of 2 blocks make 23 runs an
    image. Against float64, and the same bits in another block and thread order."""
    shape, dtype = (1, 520, 9, 15), torch.float32
    maps = make_map(shape, "channels_last", dtype, 53), make_map(shape, "channels_last", dtype, 54)
    got = emu_forward(driver, *maps, dtype, sms=20, pixels=True, grids=True)
    assert got[2][0] == (1, 23), got[2]
    check_forward(*got[:2], maps[0][3], maps[1][3], dtype)
    other = emu_forward(driver, *maps, dtype, sms=20, seed=1, pixels=True)
    assert torch.equal(other[0], got[0]) and torch.equal(other[1], got[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["pair-runs-partial-group", "pair-wide-rows", "pair-many-runs"])
def test_gradient_rows_per_block_change_no_bit(driver, case, dtype):
    """DMFN_CENTROID_GRAD_ROWS: 1 or 2 image rows per block of the 16-byte channels-last gradient (more blocks)
    write what 4 write, bit for bit (each element's arithmetic is its own), H not a multiple of the rows."""
    shape, la, lb = FORWARD_CASES[case]
    a_map, b_map = make_map(shape, la, dtype, 31), make_map(shape, lb, dtype, 32)
    stats, _ = emu_forward(driver, a_map, b_map, dtype)
    g = torch.tensor(0.75, dtype=stats.dtype)
    four = emu_grad(driver, g, stats, a_map[3], 0, True)
    for rows in (1, 2):
        assert torch.equal(emu_grad(driver, g, stats, a_map[3], 0, True, seed=rows, rows=rows), four)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_16_bit_conversions_round_as_torch(driver, dtype):
    """The stand-in's float -> half / bfloat16 (round to nearest even) and back, against torch's, on values
    that stress it: ties, subnormals, the largest finite values, overflow, signed zeros, infinities, NaN."""
    _, d = driver
    g = torch.Generator().manual_seed(3)
    info = torch.finfo(dtype)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
    ties = (bits[:-1] + bits[1:]) / 2  # halfway between neighbours (where both are finite)
    x = torch.cat([bits, ties, torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,),
                   generator=g), torch.tensor([0.0, -0.0, info.max, -info.max, info.max * 1.001, info.tiny,
                                               info.tiny / 3, 1e-8, 65519.0, 65520.0, float("inf"), float("nan")])])
    x.numpy().tofile(d / "x.bin")
    run(driver, ["round", CODES[dtype], d / "x.bin", d / "r.bin"])
    raw = torch.from_file(str(d / "r.bin"), size=x.numel() * 6, dtype=torch.uint8)
    got_bits = raw[: x.numel() * 2].view(torch.int16)
    got_back = raw[x.numel() * 2:].clone().view(torch.float32)
    want = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.isnan(got_back[nan]).all()
    assert torch.equal(got_bits[~nan], want.view(torch.int16)[~nan])
    assert torch.equal(got_back[~nan], want.float()[~nan])


def test_emulator_reports_a_read_past_the_map(driver):
    """The emulation is worth trusting only if it catches a bad bound: a view whose strides reach past its
    storage must fail under AddressSanitizer."""
    shape = (1, 8, 4, 4)
    (base, off, strides, view) = make_map(shape, "channels_last", torch.float32, 9)
    short = base[: base.numel() - 4]  # the last pixel's channels are cut off
    with pytest.raises(AssertionError, match="AddressSanitizer|heap-buffer-overflow"):
        emu_forward(driver, (short, off, strides, view), make_map(shape, "channels_last", torch.float32, 10),
                    torch.float32)


def _broken_driver(driver, tmp_path, pattern, replacement):
    """A driver built (without sanitizers) from the kernel file with one mutation, for the tests that show the
    emulation catches what it claims to."""
    with open(KERNEL) as f:
        broken, n = re.subn(pattern, replacement, f.read())
    assert n == 1, f"the mutation's anchor moved: {pattern!r}"
    with open(tmp_path / "kernel.cpp", "w") as f:
        f.write(cpu_launches(broken)[0])
    r = subprocess.run([*CXX, str(tmp_path / "kernel.cpp"), os.path.join(EMU, "centroid_driver.cpp"),
                        "-o", str(tmp_path / "broken")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(tmp_path / "broken"), driver[1]


def test_emulator_reports_a_missing_barrier(driver, tmp_path):
    """A block-wide sum read before __syncthreads must fail here (a wrong result or a wrong order), or the
    random thread order would hide the bugs it exists to find."""
    broken = _broken_driver(driver, tmp_path,
                            r"(part\[warp\]\[2\]\[lane \* V \+ j\] = sy\[j\];\n    \}\n  \}\n)  __syncthreads\(\);", r"\1")
    shape = (2, 24, 5, 16)
    maps = make_map(shape, "channels_last", torch.float32, 11), make_map(shape, "nchw", torch.float32, 12)
    stats, loss = emu_forward(broken, *maps, torch.float32, seed=4)
    with pytest.raises(AssertionError):
        check_forward(stats, loss, maps[0][3], maps[1][3], torch.float32)


def test_emulator_reports_an_early_ticket(driver, tmp_path):
    """finish_pairs' loss added by its first block to end (not its last) misses the shares of the blocks not
    yet run: a wrong loss here (their shares are garbage), as on a GPU, while every plane's stats stay right."""
    broken = _broken_driver(driver, tmp_path, r"last = atomicAdd\(fin\.ticket, 1u\) == gridDim\.x - 1;",
                            "last = atomicAdd(fin.ticket, 1u) == 0;")
    shape, dtype = (3, 200, 5, 7), torch.float32  # 600 planes: 3 finish_pairs blocks
    maps = make_map(shape, "channels_last", dtype, 17), make_map(shape, "channels_last", dtype, 18)
    want_stats, want_loss = reference(maps[0][3], maps[1][3])
    for seed in range(3):
        stats, loss = emu_forward(broken, *maps, dtype, sms=3, seed=seed)
        torch.testing.assert_close(stats.double(), want_stats, rtol=1e-5, atol=1e-5)
        with pytest.raises(AssertionError, match="not close"):
            torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-14)


def test_emulator_reports_a_misaligned_vector_load(driver, tmp_path):
    """16-byte loads from a map that starts 4 bytes in fault on a GPU; here too, if the launcher's alignment
    test were lost."""
    broken = _broken_driver(driver, tmp_path, r"return reinterpret_cast<unsigned long long>\(p\) % 16 == 0 && ",
                            "return ")
    shape = (2, 24, 5, 16)
    maps = make_map(shape, "cl_offset", torch.float32, 13), make_map(shape, "cl_offset", torch.float32, 14)
    with pytest.raises(AssertionError, match="misaligned load"):
        emu_forward(broken, *maps, torch.float32)


def test_emulator_gives_each_block_fresh_shared_memory(driver, tmp_path):
    """Shared memory a block reads but never wrote holds garbage on a GPU: here NaN, not the last block's
    values (which are often the right ones). The gradient kernel with only block 0 working out its
    coefficients must give a wrong gradient."""
    broken = _broken_driver(driver, tmp_path, r"if \(threadIdx\.x < kCh && ", "if (blockIdx.x == 0 && threadIdx.x < kCh && ")
    # one image in two blocks of rows: after block 0, block 1 would find the right coefficients left over
    shape, dtype = (1, 16, 8, 4), torch.float32
    a, b = make_map(shape, "channels_last", dtype, 15), make_map(shape, "channels_last", dtype, 16)
    stats, _ = emu_forward(driver, a, b, dtype)
    for seed in range(4):  # both block orders
        with pytest.raises(AssertionError):
            check_grads(broken, stats, a[3], b[3], dtype, True, seed=seed)
