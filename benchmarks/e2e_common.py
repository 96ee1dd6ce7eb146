"""End-to-end benchmark plumbing: the four variants, model FLOPs, the card's peak, CUDA-synchronized timing."""
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# variant -> (autocast dtype or None, channels_last, impl, compile)
VARIANTS = {
    "baseline": (None, False, "reference", False),
    "amp": (torch.bfloat16, True, "reference", False),
    "fast": (torch.bfloat16, True, "auto", False),
    "fast+compile": (torch.bfloat16, True, "auto", True),
}

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets), matched on the device name.
BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0)]


def bf16_peak(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in BF16_PEAK_TFLOPS if key in name), None)


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
