"""End-to-end benchmark plumbing: the four variants, model FLOPs, the card's peak, CUDA-synchronized timing."""
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# variant -> (autocast dtype or None, channels_last, impl, compile: False, True or a torch.compile mode)
VARIANTS = {
    "baseline": (None, False, "reference", False),
    "amp": (torch.bfloat16, True, "reference", False),
    "amp+compile": (torch.bfloat16, True, "reference", True),
    "fast": (torch.bfloat16, True, "auto", False),
    "fast+compile": (torch.bfloat16, True, "auto", True),
    # CUDA graphs of the compiled graphs (cudagraph trees): no host cost per call
    "amp+compile-ro": (torch.bfloat16, True, "reference", "reduce-overhead"),
    "fast+compile-ro": (torch.bfloat16, True, "auto", "reduce-overhead"),
}


def compiled(G, compile_):
    if not compile_:
        return G
    return torch.compile(G, mode=compile_ if isinstance(compile_, str) else None)


# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets), matched on the device name.
BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0)]


def bf16_peak(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in BF16_PEAK_TFLOPS if key in name), None)


def kernel_ms(fn, steps=3):
    """GPU time per call of each kernel fn launches, in ms: the kernels' own durations (torch.profiler), host
    time excluded."""
    return kernel_and_op_ms(fn, steps)[0]


def kernel_and_op_ms(fn, steps=3, ops=0):
    """(kernel_ms's dict, the `ops` ATen ops with their input shapes whose own launches took the most GPU time,
    as top_ops gives them: which op launched a library's generic kernel). ops=0 profiles the GPU alone."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if ops else [])
    with profile(activities=acts, record_shapes=bool(ops)) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = device_kernel_ms(prof.key_averages(), steps)
    return kernels, top_ops(prof.key_averages(group_by_input_shape=True), ops, steps) if ops else []


def device_kernel_ms(averages, steps):
    """{name: ms per call} of the device events among torch.profiler averages, without the user annotations:
    with CPU activity on, each record_function range (train_step's regions, the VGG, a compiled graph's
    "## Call CompiledFxGraph ##") is also a device event whose time spans the kernels inside it, which
    summed with the kernels counted them twice (s10: a training step's 35 ms of kernels read as 77)."""
    return {e.key: e.self_device_time_total / 1e3 / steps for e in averages
            if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)}


def top_ops(averages, n, steps):
    """[op, input shapes, ms per call] of the n host-side ops (torch.profiler averages grouped by input shape)
    whose own kernel launches took the most GPU time; graph replays and Triton launches own none."""
    own = [e for e in averages if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
    own.sort(key=lambda e: -e.self_device_time_total)
    return [[e.key, str(e.input_shapes)[:160], round(e.self_device_time_total / 1e3 / steps, 3)] for e in own[:n]]


def count_flops(fn):
    """Model FLOPs of one call of fn (forward and any backward it runs), from torch's op counter."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(benchmark, fn, device, rounds, warmup):
    """pytest-benchmark pedantic run with the device synchronized inside each timed call."""

    def call():
        fn()
        sync(device)

    for _ in range(warmup):
        call()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None
    return benchmark.stats.stats.median, peak


def median_time(fn, device, rounds=5, warmup=1):
    """Median seconds of fn() outside pytest-benchmark (profiles, scripts)."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def build_generator(variant, nf, n_blocks, device):
    """(G, G or torch.compile(G), autocast dtype or None, memory format) for one variant, fixed weights."""
    from dmfn_fast.training import build

    dtype, channels_last, impl, compile_ = VARIANTS[variant]
    mf = torch.channels_last if channels_last else torch.contiguous_format
    G = build.generator(nf, n_blocks, impl, device, mf, seed=0)
    return G, compiled(G, compile_), dtype, mf


def build_training(variant, size, batch, nf, n_blocks, d_nf, device, seed=0, read_flags=True, graphs=False):
    """Everything one training step needs, for one variant, built as train.py builds it (the paper's
    optimizers, a random VGG), from fixed weights and a fixed batch. Returns step() -> (terms, ok).
    read_flags=False: the step takes every loss as finite without reading it, so the host never waits for
    the GPU inside a step (what its flag reads cost; not a way to train). graphs: the step as one CUDA graph
    replay after 3 eager steps (train.py --cuda-graphs; on a CPU its graph's body runs eagerly)."""
    from dmfn_fast.training import build
    from dmfn_fast.training.graphed import GraphedStep
    from dmfn_fast.training.step import RealFake, train_step

    dtype, channels_last, impl, compile_ = VARIANTS[variant]
    mf = torch.channels_last if channels_last else torch.contiguous_format
    dev = torch.device(device).type
    G, D = build.models(nf, n_blocks, d_nf, impl, device, mf, seed)
    crit = build.criterion(build.vgg(random=True, quiet=True).to(device, memory_format=mf), impl)
    # bf16: the scaler stays off; fused Adam on CUDA (and for a graphed step anywhere)
    parts = build.optimizers(G, D, device_type=dev, amp_dtype=dtype, fused=True if graphs else None)
    g = torch.Generator().manual_seed(seed + 1)
    image = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device, memory_format=mf)
    mask = torch.zeros(batch, 1, size, size)
    q = size // 4
    mask[..., q:3 * q, q:3 * q] = 1
    mask = mask.to(device)
    box = torch.tensor([[q, q, 2 * q, 2 * q]] * batch)
    if dev == "cuda":  # as train.py's loader gives it: pinned, so its copy to the GPU does not wait
        box = box.pin_memory()
    # compiled as train.py --compile does: G, D (bare and the real+fake pair) and the loss with its VGG
    Gc, Dc, D_pair, crit = (compiled(m, compile_) for m in (G, D, RealFake(D), crit))
    autocast = build.autocast(dev, dtype)

    if graphs:  # 2 eager steps (gpu_e2e's first two calls, whose terms it keeps), then the capture
        graphed = GraphedStep(Gc, Dc, D_pair, crit, parts.opt_G, parts.opt_D, parts.scaler, dtype, warmup=2,
                              capture=dev == "cuda")
        return lambda: graphed(image, mask, box)

    def finite(loss):
        return build.all_ranks_finite(loss, ddp=False) if read_flags else True

    def step():
        if compile_ == "reduce-overhead":  # cudagraph trees: a new iteration, last one's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return train_step(Gc, Dc, D_pair, crit, parts.opt_G, parts.opt_D, parts.scaler, image, mask, box, autocast,
                          finite)

    return step


STEP_REGIONS = ("G forward", "D forward (G step)", "losses", "G backward", "D step", "optimizer")


def _profiled(step, device, steps, cuda=False):
    """torch.profiler's per-name averages over `steps` calls of step (CPU activity; CUDA too if asked)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    return prof.key_averages()


def host_ms_by_region(step, device, steps=3):
    """Host time per step in each labelled part of train_step, and the time it spent waiting for the GPU
    (reading a loss's finite flag: aten::_local_scalar_dense), in ms; the profiler's own overhead included,
    so compare the parts with each other, not with the step's time. "D step" holds the D update's forward,
    backward and flag read; "optimizer" both Adam steps."""
    out = {}
    for e in _profiled(step, device, steps):
        if e.key in STEP_REGIONS:
            out[e.key] = e.cpu_time_total / 1e3 / steps
        elif e.key == "aten::_local_scalar_dense":
            out["waiting for the GPU"] = e.cpu_time_total / 1e3 / steps
    return {k: round(v, 3) for k, v in out.items()}


def gpu_ms_by_region(step, device, steps=3):
    """GPU time per step under each labelled part of train_step, in ms: the device time torch.profiler
    puts under each annotation (the kernels its ops launched)."""
    out = {}
    for e in _profiled(step, device, steps, cuda=True):
        if e.key in STEP_REGIONS + ("VGG",):
            out[e.key] = round(e.device_time_total / 1e3 / steps, 3)
    return out


def profile_shares(step, device, steps=3):
    """Share of step time in each labelled part (G forward/backward, VGG, D, losses, optimizer)."""
    cuda = torch.device(device).type == "cuda"
    times = {}
    for e in _profiled(step, device, steps, cuda):
        if e.key in STEP_REGIONS + ("VGG",):
            times[e.key] = (e.device_time_total if cuda else e.cpu_time_total) / steps
    total = sum(v for k, v in times.items() if k != "VGG")  # VGG lies inside "losses"
    return {k: round(100 * v / total, 1) for k, v in times.items()} if total else {}
