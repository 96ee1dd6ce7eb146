"""Per-kernel breakdown of the fused DMFB and the centroid op against their baselines (one GPU run).

    python benchmarks/gpu_breakdown.py OUT_DIR          # CUDA: N=16, 64x64, C=64 (the 256x256 training shape)
    python benchmarks/gpu_breakdown.py OUT_DIR --dry    # CPU, kernels interpreted, tiny sizes: checks the script
    python benchmarks/gpu_breakdown.py OUT_DIR --centroid-only   # the ceilings and the centroid rows (~55 s)

Appends one JSON object per measurement to OUT_DIR/breakdown.jsonl as it goes (a timeout loses only what
had not run yet) and prints a line for each. Times are medians of triton.testing.do_bench (CUDA events,
after warm-up, so autotuning and compilation stay out); --dry times wall clock and means nothing.
Each row carries the FLOPs and the fewest bytes the step must move, and from them TFLOP/s and TB/s
against the card's ceilings measured in the same run (bf16 8192^3 matmul, device-to-device copy).
Baselines: cuDNN channels-last in the same dtype (eager), and torch.compile of the same reference.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from unittest import mock

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--dry", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
ap.add_argument("--no-centroid", action="store_true", help="skip the centroid op (needs the built extension)")
ap.add_argument("--centroid-only", action="store_true", help="the ceilings and the centroid op's rows alone")
args = ap.parse_args()
if args.dry:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dmfn_fast.models import DMFB  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import kernel_ms  # noqa: E402
from dmfn_fast.ops import centroid_align as ca  # noqa: E402
from dmfn_fast.ops import dmfb as ops  # noqa: E402

CUDA = torch.cuda.is_available() and not args.dry
DEV = "cuda" if CUDA else "cpu"
N, C, H, W = (16, 64, 64, 64) if CUDA else (2, 16, 9, 7)
CENTROID = (16, 512, 32, 32) if CUDA else (2, 8, 5, 6)
DIL = [1, 2, 4, 8]
os.makedirs(args.out, exist_ok=True)
LOG = os.path.join(args.out, "breakdown.jsonl")
torch.backends.cudnn.benchmark = True
ceil = {}


def bench_ms(fn):
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # --dry: one timed call, the times mean nothing there
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def gpu_ms(fn, iters=5):
    """Device time of one call: the kernels' own durations summed (torch.profiler), host time excluded, and
    each kernel's. do_bench's `ms` is the larger of host and device time per call when the host cannot keep
    ahead."""
    fn()
    torch.cuda.synchronize()
    per = kernel_ms(fn, iters)
    return sum(per.values()), per


def host_ms(fn, iters=20):
    """Host time to issue one call (no synchronization inside: what the CPU spends before the GPU runs it)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / iters * 1e3


def log_row(row):
    with open(LOG, "a") as f:
        f.write(json.dumps(row) + "\n")


def record(group, name, fn, flop=0, nbytes=0, **extra):
    """Time fn, write one JSON line; an error is recorded, not raised, so later rows still run."""
    row = dict(group=group, name=name, device=torch.cuda.get_device_name() if CUDA else "cpu (dry)")
    try:
        ms = bench_ms(fn)
        row.update(ms=ms, flop=flop, bytes=nbytes)
        if CUDA:
            row["gpu_ms"], per = gpu_ms(fn)
            if 1 < len(per) <= 12:  # which of a few kernels takes the time (the centroid op's launches, say)
                row["gpu_us_by_kernel"] = {k[:100]: round(v * 1e3, 2) for k, v in per.items()}
            row["host_ms"] = host_ms(fn)
        t = row.get("gpu_ms") or ms  # rates from device time where it was measured
        if flop:
            row["tflops"] = flop / t / 1e9
            if ceil.get("bf16_tflops"):
                row["pct_bf16_peak"] = 100 * row["tflops"] / ceil["bf16_tflops"]
        if nbytes:
            row["tbs"] = nbytes / t / 1e9
            if ceil.get("copy_tbs"):
                row["pct_copy_bw"] = 100 * row["tbs"] / ceil["copy_tbs"]
    except Exception as e:  # noqa: BLE001: a failed row must not stop the breakdown
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    row.update({k: v() if callable(v) else v for k, v in extra.items()})  # after the run: configs it chose
    log_row(row)
    msg = f"{row['ms']:9.4f} ms" if "ms" in row else "ERROR " + row["error"][:200]
    perf = "".join(f"  {k}={row[k]:.3g}" for k in ("gpu_ms", "host_ms", "tflops", "pct_bf16_peak", "tbs", "pct_copy_bw")
                   if k in row)
    print(f"[{group}] {name}: {msg}{perf}", flush=True)
    if name.startswith("extension") and row.get("gpu_us_by_kernel"):  # the centroid op's launches, each plan
        print("    us by kernel: " + ", ".join(f"{k[:40]} {v}" for k, v in row["gpu_us_by_kernel"].items()), flush=True)


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def grads(fn, inputs, gy):
    """fn(*inputs) then autograd.grad into every input: a forward+backward with no .grad accumulation."""
    def step():
        y = fn(*inputs)
        y = y[0] if isinstance(y, tuple) else y
        return torch.autograd.grad(y, inputs, gy)
    return step


# ----------------------------------------------------------------------------- ceilings
if CUDA:
    x8 = torch.empty(512 * 2 ** 20, device=DEV, dtype=torch.uint8)
    y8 = torch.empty_like(x8)
    ms = bench_ms(lambda: y8.copy_(x8))
    ceil["copy_tbs"] = 2 * x8.numel() / ms / 1e9
    del x8, y8
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    ceil["bf16_tflops"] = 2 * 8192 ** 3 / ms / 1e9
    del a, b
    # the GPU time of the smallest kernel (one element written): what each launch of a small op costs at least,
    # the floor under the centroid op's read share (gpu_summary.py's centroid_read_share_bound_*)
    one = torch.empty(1, device=DEV)
    ceil["tiny_kernel_us"] = 1e3 * gpu_ms(lambda: one.fill_(1.0))[0]
    del one
    log_row(dict(group="ceilings", name="measured", **ceil, device=torch.cuda.get_device_name(),
                 torch=torch.__version__))
    print(f"ceilings: copy {ceil['copy_tbs']:.2f} TB/s (read+write), bf16 matmul {ceil['bf16_tflops']:.0f} TFLOP/s, "
          f"smallest kernel {ceil['tiny_kernel_us']:.2f} us")

# ----------------------------------------------------------------------------- centroid op


def centroid_cases():
    for dt in (torch.bfloat16, torch.float32):
        for layout in ("channels_last", "nchw"):
            torch.manual_seed(3)
            a = torch.rand(*CENTROID, device=DEV).to(dt)
            t = torch.rand(*CENTROID, device=DEV).to(dt)
            if layout == "channels_last":
                a, t = cl(a), cl(t)
            yield dt, layout, a.requires_grad_(), t


from stream_kernels import (column_read, flat, pair_shifts, pixel_read, stream_read, stream_read_pair,  # noqa: E402
                            stream_read_strided, stream_write)

for dt, layout, a, t in ([] if args.no_centroid else centroid_cases()):
    tag = str(dt).replace("torch.", "")
    # the least the op moves: read both maps, write f_out's gradient (the sixth session's count; before it
    # counted f_out read again, which no kernel of the extension does)
    nbytes = 3 * a.numel() * a.element_size()
    g = f"centroid fwd+bwd {tag} {layout} {list(CENTROID)}"
    record(g, "torch formula", lambda: torch.autograd.grad(ca.centroid_align_loss_reference(a, t), a), 0, nbytes)
    if ca.extension_available() and ca.has_kernel(DEV):
        # the forward as planned by default, and on CUDA channels-last its A/B plans (DMFN_CENTROID_*, read per
        # call by the extension): two waves of shorter runs, the gradient written by more blocks of fewer rows,
        # each block finishing its own planes where a column of blocks is one run (no finish_pairs), and blocks
        # of whole pixels (each block's bytes contiguous: the pixel-by-pixel reader's order below). (The folded
        # finish, the async copies and 32-vector blocks, never faster on the H200 or the H100, are gone: s24.)
        plans = [({}, "extension")]
        # the C++ op's defaults (a switch set: no measured plan), where a measured plan is this card's default
        if CUDA and layout == "channels_last" and (ca._capability_major(a), a.dtype) in ca.MEASURED_PLANS:
            plans.append(({"TRITON": "0"}, "extension, the switches' defaults"))
        if CUDA and layout == "channels_last":
            plans += [({"WAVES": "2"}, "extension, two waves"),
                      ({"GRAD_ROWS": "2"}, "extension, gradient 2 rows a block"),
                      ({"GRAD_ROWS": "1"}, "extension, gradient 1 row a block"),
                      # one run per column (fp32 on 132 SMs; bf16 keeps two runs and finish_pairs, so its row
                      # repeats the default's plan: a measure of the rows' noise)
                      ({"BLOCK_FINISH": "1"}, "extension, finish in blocks"),
                      ({"PIXELS": "1"}, "extension, whole pixels"),
                      ({"PIXELS": "1", "WAVES": "2"}, "extension, whole pixels, two waves"),
                      # the forward by Triton kernels, whole pixels a program (DMFN_CENTROID_TRITON=1), two,
                      # four or eight programs an SM; the C++ backward, or (=2) the Triton one
                      ({"TRITON": "1"}, "extension, Triton forward"),
                      ({"TRITON": "1", "WAVES": "2"}, "extension, Triton forward, two waves"),
                      ({"TRITON": "1", "WAVES": "4"}, "extension, Triton forward, four waves"),
                      ({"TRITON": "2"}, "extension, Triton forward and backward"),
                      ({"TRITON": "2", "WAVES": "2"}, "extension, Triton forward and backward, two waves"),
                      # the sums reading map b's pixels half a run ahead of map a's, half the loads a step (the
                      # floor's paired rows: do the same offsets at once cost?)
                      ({"TRITON": "1", "APART": "1"}, "extension, Triton forward, maps apart"),
                      ({"TRITON": "2", "APART": "1"}, "extension, Triton forward and backward, maps apart"),
                      ({"TRITON": "4", "APART": "1"}, "extension, Triton whole planes, maps apart"),
                      # each run a step of every R of its image, so an image's programs read adjacent steps at
                      # once (the stream's dense window, against runs far apart: the floor's strided read)
                      ({"TRITON": "1", "INTERLEAVE": "1"}, "extension, Triton forward, interleaved runs"),
                      ({"TRITON": "2", "INTERLEAVE": "1"}, "extension, Triton forward and backward, interleaved runs"),
                      ({"TRITON": "1", "INTERLEAVE": "1", "APART": "1"},
                       "extension, Triton forward, interleaved runs, maps apart"),
                      # a program a map, map a's dispatched first: each program streams one buffer, as the
                      # stream over both maps' bytes (against the floor's two buffers read at once)
                      ({"TRITON": "1", "ONE_MAP": "1"}, "extension, Triton forward, one map a program"),
                      ({"TRITON": "2", "ONE_MAP": "1"}, "extension, Triton forward and backward, one map a program"),
                      ({"TRITON": "1", "ONE_MAP": "1", "INTERLEAVE": "1"},
                       "extension, Triton forward, one map a program, interleaved runs"),
                      # the forward in whole planes a program: the column_read rows' order, no partial sums, no
                      # finish kernel; with the Triton backward (3) or the C++ one (4)
                      ({"TRITON": "3"}, "extension, Triton whole planes and backward"),
                      ({"TRITON": "4"}, "extension, Triton whole planes")]
        for env, name in plans:
            with mock.patch.dict(os.environ):  # restored after each plan
                for k in ca.PLAN_SWITCHES:  # every centroid switch
                    os.environ.pop(k, None)
                switches = {f"DMFN_CENTROID_{k}": v for k, v in env.items()}
                os.environ.update(switches)
                # the plan's switches (the default's: MEASURED_PLANS'), for gpu_summary's centroid_plan_to_adopt
                record(g, name, lambda: torch.autograd.grad(ca.centroid_align_loss(a, t, impl="fast"), a), 0, nbytes,
                       switches=switches or dict(ca.default_plan(a)),
                       capability=list(torch.cuda.get_device_capability()) if CUDA else None)
    else:
        print(f"[{g}] extension not available: {ca._ext_state.get('why')}")
    if layout == "channels_last" and (CUDA or dt == torch.float32):  # the interpreter has no bf16 math
        # what ATen's own kernels take for the op's least traffic at this size, one launch each: both maps'
        # bytes read (one sum over a buffer of both maps' size) and one map's bytes written (a fill); with the
        # smallest kernel for autograd's seed, the floor gpu_summary.py compares the read share against
        both = torch.empty(2 * a.numel(), device=DEV, dtype=dt).uniform_()
        grad_like = torch.empty_like(a)
        fg = f"centroid floor {tag} {list(CENTROID)}"
        read_bytes = 2 * a.numel() * a.element_size()
        record(fg, "read both maps' bytes (torch.sum)", lambda: both.sum(), 0, read_bytes)
        record(fg, "write one map's bytes (fill_)", lambda: grad_like.fill_(0.5), 0, a.numel() * a.element_size())
        # the same read by a kernel with nothing else to do, in a few shapes: does ATen's sum read at the rate
        # this card reaches at this size? (s15: 3.14-3.18 TB/s, against a copy's 4.18)
        want = both.double().sum().item()
        for block, warps in ((4096, 4), (8192, 8), (16384, 8)):
            name = f"read both maps' bytes (Triton, {block} a program, {warps} warps)"
            got = stream_read(both, block, warps).double().sum().item()
            if abs(got - want) > 1e-4 * abs(want):
                log_row(dict(group=fg, name=name, error=f"its sum {got} is not the buffer's {want}"))
                continue
            record(fg, name, lambda block=block, warps=warps: stream_read(both, block, warps), 0, read_bytes)
        # the same blocks as runs, the programs in flight each in another: as the Triton pair sums' programs read
        # their runs (one a program, both maps: 512 runs of 128 KB in fp32 here), where the stream's programs
        # read adjacent blocks. Slower: many places read at once cost, and DMFN_CENTROID_INTERLEAVE is the remedy
        _, groups, _, _, _, runs = ca.triton_forward_plan(a.shape, a.element_size(), ca._sms(a))
        streams = math.gcd(-(-both.numel() // 8192), 2 * a.shape[0] * groups * runs)
        name = f"read both maps' bytes in {streams} run{'s' * (streams > 1)} at once (Triton, 8192 a program, 8 warps)"
        got = stream_read_strided(both, 8192, 8, streams).double().sum().item()
        if abs(got - want) > 1e-4 * abs(want):
            log_row(dict(group=fg, name=name, error=f"its sum {got} is not the buffer's {want}"))
        else:
            record(fg, name, lambda: stream_read_strided(both, 8192, 8, streams), 0, read_bytes,
                   run_bytes=both.numel() // streams * both.element_size())
        # the same stream over the op's two maps as allocated: both at the same offsets at once (as every pair
        # kernel reads them); map b as far ahead as DMFN_CENTROID_APART takes it (half a run of the Triton
        # sums, half an image of the whole planes: if the same offsets contend, do those distances clear
        # it?); half a map apart. The maps' distance in memory goes in the rows
        fa, ft = flat(a), flat(t)
        want = fa.double().sum().item() + ft.double().sum().item()
        run = ca.triton_forward_plan(a.shape, a.element_size(), ca._sms(a), apart=True)[4]
        block_bytes = 8192 * a.element_size()
        for shift, how in pair_shifts(a.shape, a.element_size(), run, 8192).items():
            name = f"read both maps as two buffers, {how} (Triton, 8192 a program, 8 warps)"
            got = stream_read_pair(fa, ft, 8192, 8, shift).double().sum().item()
            if abs(got - want) > 1e-4 * abs(want):
                log_row(dict(group=fg, name=name, error=f"its sum {got} is not the maps' {want}"))
                continue
            record(fg, name, lambda shift=shift: stream_read_pair(fa, ft, 8192, 8, shift), 0, read_bytes,
                   maps_apart_bytes=t.data_ptr() - a.data_ptr(), shift_bytes=shift * block_bytes)
        # the same bytes in the pair kernel's order (columns of 128 bytes of channels, pixel rows a step), with
        # nothing else to do: every plan of the pair kernel read at two thirds of the stream's rate (s18). At the
        # stream's rate, the order is not what costs; at the pair kernel's, it is (more runs: whether more
        # programs in flight help). Then pixel by pixel, every channel: each program's bytes contiguous, as a
        # pixel-major pair kernel's would be (16 runs an image: the pair kernel's 256 blocks at this size).
        want = (a.detach().double().sum(dim=(2, 3)) + t.double().sum(dim=(2, 3))).flatten()
        C = a.shape[1]
        readers = [(column_read, runs, f"read both maps in the pair kernel's order (Triton, {runs} run"
                    f"{'s' * (runs > 1)} a column)") for runs in ((1, 4) if C % (128 // a.element_size()) == 0
                                                                 else ())]
        readers += [(pixel_read, runs, f"read both maps pixel by pixel (Triton, {runs} runs an image)")
                    for runs in ((16, 64) if C & (C - 1) == 0 else ())]
        for reader, runs, name in readers:
            got = reader(a.detach(), t, runs).double()
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-3):
                log_row(dict(group=fg, name=name, error=f"sums off by {(got - want).abs().max().item():.3g}"))
                continue
            record(fg, name, lambda reader=reader, runs=runs: reader(a.detach(), t, runs), 0, read_bytes)
        # and the write by a kernel with nothing else to do (the bf16 fill wrote at 2.84 TB/s in s15, fp32's 4.13)
        for block, warps in ((4096, 4), (8192, 8)):
            name = f"write one map's bytes (Triton, {block} a program, {warps} warps)"
            if not bool((stream_write(grad_like, 0.25, block, warps) == 0.25).all()):
                log_row(dict(group=fg, name=name, error="it left an element unwritten"))
                continue
            record(fg, name, lambda block=block, warps=warps: stream_write(grad_like, 0.5, block, warps), 0,
                   a.numel() * a.element_size())
        del both, grad_like
if args.centroid_only:
    sys.exit(0)

# ----------------------------------------------------------------------------- branch op, piece by piece
CONV = 2 * N * H * W * C * C * 9  # one 3x3 conv C->C


def branch_inputs(dt, seed=0):
    torch.manual_seed(seed)
    h = cl(torch.randn(N, C, H, W, device=DEV).to(dt))
    ws = [cl((torch.randn(C, C, 3, 3, device=DEV) / (3 * C ** 0.5)).to(dt)) for _ in DIL]
    bs = [(0.1 * torch.randn(C, device=DEV)).to(dt) for _ in DIL]
    return h, ws, bs


@contextlib.contextmanager
def apply_pixels(bp):
    """The elementwise norm kernels' pixels per program on fp16/bf16, for the rows inside."""
    from dmfn_fast.kernels import instance_norm as kn

    old, kn.APPLY_PIXELS_2BYTE = kn.APPLY_PIXELS_2BYTE, bp
    try:
        yield
    finally:
        kn.APPLY_PIXELS_2BYTE = old


def best_configs(cls):
    if not CUDA:
        return {}
    from dmfn_fast.kernels import dmfb_branches as kb

    out = {}
    for k in ("fwd", "grad", "dgrad", "wgrad", "wgrad9", "fwd_tma", "grad_tma", "dgrad_tma", "wgrad_tma"):
        cfg = getattr(getattr(kb, f"branches_{k}_{cls}", None), "best_config", None)
        out[k] = None if cfg is None else str(cfg)
    return out


# The private launch helpers called directly go through wrap_triton's HOP dispatch (about 1 ms a call in
# eager); inside the ops triton_op turns it off, so turn it off here too.
try:
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:
    import contextlib

    set_wrap_triton_enabled = contextlib.nullcontext
_direct = set_wrap_triton_enabled(False)
_direct.__enter__()
for dt in (torch.bfloat16, torch.float32):
    tag = str(dt).replace("torch.", "")
    es = torch.empty((), dtype=dt).element_size()
    act = N * H * W * C * es  # bytes of one C-channel activation
    h, ws, bs = branch_inputs(dt)
    w, b = ops.pack_branches(ws, bs, dt)
    g = f"pieces {tag}"
    for d, wj, bj in zip(DIL, ws, bs):
        record(g, f"cudnn conv d{d}", lambda: F.conv2d(h, wj, bj, 1, d, d), CONV, 2 * act)
    record(g, "reference branches fwd (4 cudnn convs, adds, cat)", lambda: ops.dmfb_branches_reference(h, ws, bs),
           4 * CONV, 5 * act)
    try:
        # the default kernels' rows run them whatever DMFN_TMA / DMFN_WGRAD9 say; the opt-in ones follow
        sm90 = dt != torch.float32 and CUDA and torch.cuda.get_device_capability()[0] >= 9
        record(g, "fused fwd kernel", lambda: ops._branches_forward(h, w, b, DIL, tma=False), 4 * CONV, 5 * act)
        k = ops._branches_forward(h, w, b, DIL, tma=False)
        record(g, "IN stats on the cat", lambda: ops._in_stats(k), 0, 4 * act)
        record(g, "IN stats+apply+ReLU on the cat", lambda: ops._in_act_fn(k, None, True), 0, 12 * act)
        t, mean, rstd = ops._in_act_fn(k, None, True)
        dtg = cl(torch.randn_like(t))
        record(g, "IN backward on the cat (sums + apply)", lambda: ops._in_act_bwd_fn(dtg, k, mean, rstd, True),
               0, 20 * act)
        if dt != torch.float32:  # the elementwise norm kernels with 128-pixel programs (kn.APPLY_PIXELS_2BYTE)
            with apply_pixels(128):
                record(g, "IN stats+apply+ReLU on the cat, 128-pixel apply", lambda: ops._in_act_fn(k, None, True),
                       0, 12 * act)
                record(g, "IN backward on the cat (sums + apply), 128-pixel apply",
                       lambda: ops._in_act_bwd_fn(dtg, k, mean, rstd, True), 0, 20 * act)
        record(g, "IN backward sums", lambda: ops._in_backward_sums(dtg, t, mean, rstd, relu=True, from_y=True),
               0, 8 * act)
        sa, sb = ops._in_backward_sums(dtg, t, mean, rstd, relu=True, from_y=True)
        record(g, "fused grad kernel (recompute + IN/ReLU bwd + suffix)",
               lambda: ops._branches_forward(h, w, b, DIL, grad=(dtg, mean, rstd, sa, sb), tma=False),
               4 * CONV, 9 * act, configs=lambda: best_configs("lowp" if dt != torch.float32 else "f32"))
        G = ops._branches_forward(h, w, b, DIL, grad=(dtg, mean, rstd, sa, sb), tma=False)
        if sm90:
            # the TMA kernels (DMFN_TMA, the sm_90 default): 2-D pixel tiles, h by tensor descriptor
            record(g, "fused fwd kernel, TMA 2-D tiles", lambda: ops._branches_forward(h, w, b, DIL, tma=True),
                   4 * CONV, 5 * act, configs=lambda: best_configs("lowp"))
            record(g, "fused grad kernel, TMA 2-D tiles",
                   lambda: ops._branches_forward(h, w, b, DIL, grad=(dtg, mean, rstd, sa, sb), tma=True),
                   4 * CONV, 9 * act, configs=lambda: best_configs("lowp"))
        record(g, "suffix kernel (branches without IN)", lambda: ops._suffix(dtg), 0, 8 * act)
        record(g, "fused dgrad kernel", lambda: ops._branches_dgrad(w, G, DIL, h, tma=False), 4 * CONV, 5 * act)
        if sm90:
            record(g, "fused dgrad kernel, TMA 2-D tiles", lambda: ops._branches_dgrad(w, G, DIL, h, tma=True),
                   4 * CONV, 5 * act, configs=lambda: best_configs("lowp"))
        record(g, "fused wgrad kernel", lambda: ops._branches_wgrad(h, G, DIL, taps9=False, tma=False),
               4 * CONV, 5 * act, configs=lambda: best_configs("lowp" if dt != torch.float32 else "f32"))
        if sm90:  # branches_wgrad_tma (DMFN_WGRAD_TMA, the sm_90 default since s10): TMA tiles per (branch, tap)
            record(g, "fused wgrad kernel, TMA 2-D tiles", lambda: ops._branches_wgrad(h, G, DIL, tma=True),
                   4 * CONV, 5 * act, configs=lambda: best_configs("lowp"))
        if dt != torch.float32 and (not CUDA or torch.cuda.get_device_capability()[0] >= 9):
            # the opt-in branches_wgrad9 (DMFN_WGRAD9=1): one program per branch over its 9 taps
            record(g, "fused wgrad kernel, 9 taps per program",
                   lambda: ops._branches_wgrad(h, G, DIL, taps9=True, tma=False),
                   4 * CONV, 5 * act, configs=lambda: best_configs("lowp"))
        del k, t, dtg, G
    except Exception:  # noqa: BLE001
        traceback.print_exc()

_direct.__exit__(None, None, None)
# ----------------------------------------------------------------------------- ops, forward+backward


def in_relu_cl(x):
    """relu(instance_norm(x)) that keeps channels-last (F.instance_norm returns NCHW): fp32 statistics."""
    xf = x.float()
    var, mean = torch.var_mean(xf, (2, 3), unbiased=False, keepdim=True)
    return F.relu((xf - mean) * torch.rsqrt(var + ops.EPS)).to(x.dtype)


def ref_in_relu(h, *p):
    return ops.instance_norm_act_reference(ops.dmfb_branches_reference(h, p[:4], p[4:]), relu=True)


def ref_in_relu_cl(h, *p):
    return in_relu_cl(ops.dmfb_branches_reference(h, p[:4], p[4:]))


def fused_in_relu(h, *p):
    return ops.branches_in_relu(h, p[:4], p[4:])


def ref_branches(h, *p):
    return ops.dmfb_branches_reference(h, p[:4], p[4:])


def fused_branches(h, *p):
    return ops.dmfb_branches(h, p[:4], p[4:])


op_cases = {}  # dtype -> (group, inputs, output gradient, FLOPs), reused by the compile baselines
for dt in (torch.bfloat16, torch.float32):
    tag = str(dt).replace("torch.", "")
    h, ws, bs = branch_inputs(dt, seed=1)
    leaves = [x.detach().requires_grad_() for x in [h] + ws + bs]
    gy = cl(torch.randn(N, 4 * C, H, W, device=DEV).to(dt))
    flop = 3 * 4 * CONV  # forward, dgrad, wgrad
    g = f"op fwd+bwd {tag}" + (" (cudnn TF32 allowed)" if dt == torch.float32 else "")
    record(g, "branches_in_relu eager reference (F.instance_norm)", grads(ref_in_relu, leaves, gy), flop)
    record(g, "branches_in_relu eager reference (channels-last IN)", grads(ref_in_relu_cl, leaves, gy), flop)
    record(g, "branches_in_relu fused", grads(fused_in_relu, leaves, gy), flop)
    record(g, "branches eager reference", grads(ref_branches, leaves, gy), flop)
    record(g, "branches fused", grads(fused_branches, leaves, gy), flop)
    op_cases[dt] = (g, leaves, gy, flop)

# whole DMFB block, bf16 channels-last
torch.manual_seed(2)
# keyed by the record labels gpu_summary.py reads ("DMFB fused" is the impl="fast" block)
blocks = {label: DMFB(4 * C, C, impl=impl).to(DEV, torch.bfloat16).to(memory_format=torch.channels_last)
          for label, impl in (("reference", "reference"), ("fused", "fast"))}
blocks["fused"].load_state_dict(blocks["reference"].state_dict())
xb = cl(torch.randn(N, 4 * C, H, W, device=DEV, dtype=torch.bfloat16)).requires_grad_()
gb = cl(torch.randn_like(xb))
BLOCK_FLOP = 3 * (4 * CONV + 2 * N * H * W * 9 * (4 * C * C + 4 * C * 4 * C))  # c1 256->64, c2 256->256
for label, m in blocks.items():
    params = [xb] + list(m.parameters())
    record("block fwd+bwd bf16", f"DMFB {label}", grads(lambda x, *_, m=m: m(x), params, gb), BLOCK_FLOP)
    with torch.no_grad():
        record("block fwd bf16", f"DMFB {label}", lambda: m(xb), BLOCK_FLOP // 3)

# ----------------------------------------------------------------------------- VGG: bias + ReLU in one kernel
# The frozen VGG as the training step runs it (stages recomputed in backward), its sixteen convolutions'
# bias and ReLU by ATen (a broadcast add, then a ReLU) or by ops/bias_act.py; gpu_adopt.py's DMFN_BIAS_ACT.
from dmfn_fast.vgg import VGG19Features  # noqa: E402

VGG_DT = torch.bfloat16 if CUDA else torch.float32  # the interpreter has no bf16 math
VGG_SHAPE = (16, 3, 256, 256) if CUDA else (1, 3, 32, 32)
vgg_net = VGG19Features("random").to(DEV, VGG_DT, memory_format=torch.channels_last)
x_vgg = cl(torch.rand(VGG_SHAPE, device=DEV, dtype=VGG_DT) * 2 - 1).requires_grad_()
g_vgg = [torch.randn_like(f) for f in vgg_net(x_vgg.detach())]
for vgg_name, vgg_kw in (("ATen bias add, ReLU", {}), ("bias+ReLU kernel", dict(fused=True)),
                         ("max-pool kernels", dict(pool=True))):
    record(f"VGG19 fwd+bwd {str(VGG_DT).split('.')[-1]} {list(VGG_SHAPE)}", vgg_name,
           lambda kw=vgg_kw: torch.autograd.grad(vgg_net(x_vgg, recompute=True, **kw), x_vgg, g_vgg))
del vgg_net, x_vgg, g_vgg
# the VGG's first pool alone, forward+backward: ATen (int64 indices) or ops/max_pool.py (none)
from dmfn_fast.ops import max_pool as mpool  # noqa: E402

x_pool = cl(torch.randn(VGG_SHAPE[0], 64, VGG_SHAPE[2], VGG_SHAPE[3], device=DEV, dtype=VGG_DT)).requires_grad_()
g_pool = cl(torch.randn_like(mpool.max_pool2x2_reference(x_pool.detach())))
pool_bytes = x_pool.numel() * x_pool.element_size() * 3.5  # fwd: read x, write y; bwd: read x and dy, write dx
for pool_name, pool_fn in (("ATen max_pool2d", mpool.max_pool2x2_reference), ("max-pool kernels", mpool.max_pool2x2)):
    record(f"max pool 2x2 fwd+bwd {str(VGG_DT).split('.')[-1]} {list(x_pool.shape)}", pool_name,
           lambda fn=pool_fn: torch.autograd.grad(fn(x_pool), x_pool, g_pool), 0, pool_bytes)
del x_pool, g_pool

# ----------------------------------------------------------------------------- the losses' L1 terms
# DMFNLoss's guided (relu1_1, relu2_1, weighted by 1 + the error map) and feature-matching (relu3_1..relu5_1)
# terms on the VGG features of a training batch, forward+backward into the output's features: _L1Mean's ATen
# passes (impl="reference") or ops/l1_loss.py's two kernels per term; gpu_adopt.py's DMFN_L1_KERNEL.
from dmfn_fast import losses as dl  # noqa: E402

l1_n, l1_side = (VGG_SHAPE[0], VGG_SHAPE[2])
l1_fo = [cl(torch.relu(torch.randn(l1_n, c, l1_side >> k, l1_side >> k, device=DEV))).to(VGG_DT).requires_grad_()
         for k, c in enumerate((64, 128, 256, 512, 512))]
l1_ft = [(f.detach() + 0.1 * torch.relu(torch.randn_like(f))).contiguous(memory_format=torch.channels_last)
         for f in l1_fo]
l1_img = torch.rand(l1_n, 3, l1_side, l1_side, device=DEV) * 2 - 1
l1_out = l1_img + 0.1 * torch.randn_like(l1_img)
l1_bytes = 4 * sum(f.numel() * f.element_size() for f in l1_fo)  # read a, b; write, read the int8 sign; write the grad
for l1_name, l1_impl in (("ATen (the loss's formula)", "reference"), ("L1 kernels", "fast")):
    record(f"L1 loss terms fwd+bwd {str(VGG_DT).split('.')[-1]} (VGG features of {l1_n} x {l1_side} px)", l1_name,
           lambda impl=l1_impl: torch.autograd.grad(
               dl.self_guided_loss(l1_fo, l1_ft, l1_out, l1_img, impl=impl)
               + dl.feature_matching_loss(l1_fo, l1_ft, impl=impl), l1_fo), 0, l1_bytes)
del l1_fo, l1_ft, l1_img, l1_out

# ----------------------------------------------------------------------------- the generator's input convolution
# 4 -> 64 channels, 5x5, then ReLU: cuDNN (a channel-padding pass and an sm_80 tile kernel, s10), its bias add
# and the ReLU, or ops/thin_conv.py's one kernel (and its weight-gradient kernel); gpu_adopt.py's DMFN_THIN_CONV.
# Inference runs it at batch 64; training at batch 16, where its checkpointed region also reruns the forward.
from dmfn_fast.ops import thin_conv as tc  # noqa: E402

THIN_DT = VGG_DT
thin_g = f"G input conv {str(THIN_DT).split('.')[-1]}"
w_in = (torch.randn(64, 4, 5, 5, device=DEV) / 10).to(THIN_DT).requires_grad_()
b_in = torch.randn(64, device=DEV).to(THIN_DT).requires_grad_()
for batch, label in ((64, "fwd, batch 64"), (16, "fwd+bwd, batch 16")):
    side = 256 if CUDA else 16
    x_in = cl(torch.rand(batch if CUDA else 2, 4, side, side, device=DEV).to(THIN_DT))
    flop = 2 * x_in.shape[0] * side * side * 64 * 100
    nbytes = x_in.numel() * x_in.element_size() * 17  # the input once, the 64-channel output once
    plain = lambda x=x_in: F.relu(F.conv2d(x, w_in, b_in, 1, 2))  # noqa: E731
    kernel = lambda x=x_in: tc.thin_conv(x, w_in, b_in, 1, 2, "relu")  # noqa: E731
    for name, fn in ((f"{label}: cuDNN, bias, ReLU", plain), (f"{label}: thin conv kernel", kernel)):
        if label.startswith("fwd,"):
            def run(fn=fn):
                with torch.no_grad():
                    return fn()
            record(thin_g, name, run, flop, nbytes)
        else:
            gy = torch.randn_like(plain())
            record(thin_g, name, lambda fn=fn, gy=gy: torch.autograd.grad(fn(), (w_in, b_in), gy), 2 * flop,
                   3 * nbytes)
del w_in, b_in, x_in
# the discriminator's global input convolution, 3 -> 64 channels, 5x5, stride 2, as its training runs it (a batch
# norm after it): cuDNN (a generic kernel, 0.76 ms per step in s10) or the thin kernels (the image padded to 4
# channels); forward, then the input (the generator's step) and weight gradients; gpu_adopt.py's DMFN_THIN_CONV
# with the generator's rows
thin_d = f"D input conv {str(THIN_DT).split('.')[-1]}"
w_d = (torch.randn(64, 3, 5, 5, device=DEV) / 10).to(THIN_DT).requires_grad_()
b_d = torch.randn(64, device=DEV).to(THIN_DT).requires_grad_()
side = 256 if CUDA else 16
x_d = cl(torch.rand(16 if CUDA else 2, 3, side, side, device=DEV).to(THIN_DT)).requires_grad_()
flop = 2 * x_d.shape[0] * (side // 2) ** 2 * 64 * 75
gy = torch.randn_like(F.conv2d(x_d.detach(), w_d.detach(), None, 2, 2))
nbytes = x_d.numel() * x_d.element_size() * (1 + 64 / 12) * 3  # forward, dgrad, wgrad: the input and the output
for name, fn in (("D fwd+bwd, batch 16: cuDNN", lambda: F.conv2d(x_d, w_d, b_d, 2, 2)),
                 ("D fwd+bwd, batch 16: thin conv kernel", lambda: tc.thin_conv(x_d, w_d, b_d, 2, 2, "none"))):
    record(thin_d, name, lambda fn=fn: torch.autograd.grad(fn(), (x_d, w_d, b_d), gy), 3 * flop, nbytes)
del w_d, b_d, x_d, gy

# ----------------------------------------------------------------------------- TMA zero fill (design question)


def tma_zero_fill_check():
    """Does a TMA tensor-descriptor load zero-fill a box that starts at negative coordinates (the padding
    a TMA branch kernel would rely on)? Compares a [1, 8, 16, C] box at (0, -2, -3, 0) with a padded copy."""
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def box_load(desc, out_ptr, Y0, X0, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr):
        blk = desc.load([0, Y0, X0, 0]).reshape(TH * TW, BC)
        r = tl.arange(0, TH * TW)
        c = tl.arange(0, BC)
        tl.store(out_ptr + r[:, None] * BC + c[None, :], blk)

    x = torch.randn(1, 12, 20, 64, device=DEV, dtype=torch.bfloat16)
    desc = TensorDescriptor.from_tensor(x, [1, 8, 16, 64])
    out = torch.full((8 * 16, 64), float("nan"), device=DEV, dtype=torch.bfloat16)
    box_load[(1,)](desc, out, -2, -3, TH=8, TW=16, BC=64)
    ref = F.pad(x.permute(0, 3, 1, 2), (3, 0, 2, 0))[0, :, :8, :16].permute(1, 2, 0).reshape(128, 64)
    return bool(torch.equal(out, ref))


if CUDA:
    try:
        ok = tma_zero_fill_check()
        row = dict(group="design", name="TMA box load zero-fills negative coordinates", result=ok)
    except Exception as e:  # noqa: BLE001
        row = dict(group="design", name="TMA box load zero-fills negative coordinates",
                   error=f"{type(e).__name__}: {e}"[:500])
    log_row(row)
    print("[design]", row, flush=True)

# ----------------------------------------------------------------------------- torch.compile baselines (last: slowest)
if CUDA and not args.no_compile:
    g, leaves, gy, flop = op_cases[torch.bfloat16]
    record(g, "branches_in_relu torch.compile(reference)", grads(torch.compile(ref_in_relu), leaves, gy), flop)
    m = torch.compile(blocks["reference"])
    record("block fwd+bwd bf16", "DMFB torch.compile(reference)",
           grads(lambda x, *_: m(x), [xb] + list(blocks["reference"].parameters()), gb), BLOCK_FLOP)
    for dt, layout, a, t in ([] if args.no_centroid else centroid_cases()):
        if layout != "channels_last":
            continue
        tag = str(dt).replace("torch.", "")
        c = torch.compile(ca.centroid_align_loss_reference)
        record(f"centroid fwd+bwd {tag} {layout} {list(CENTROID)}", "torch.compile(torch formula)",
               lambda: torch.autograd.grad(c(a, t), a), 0, 4 * a.numel() * a.element_size())
print("breakdown done", flush=True)
sys.exit(0)
