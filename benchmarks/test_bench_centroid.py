"""Centroid alignment loss: the C++/CUDA extension vs the PyTorch reference, forward and forward+backward,
at relu4_1 sizes [16,512,32,32] (a 256x256 batch of 16) and [16,512,64,64]. Each case is one
`benchmark.group` with variants "reference" and "extension" (benchmarks/summarize.py prints the speedup).
On CPU the time is pytest-benchmark's wall clock. On CUDA each case also records, in extra_info, the
CUDA-timed median (triton.testing.do_bench after warm-up; CUDA events where triton is missing), as
benchmarks/test_bench_dmfb.py does, and pct_copy_bound = the time to move the same bytes at the card's
measured copy bandwidth (forward: read both maps; forward+backward: also write the gradient) / that median."""
import pytest
import torch

from conftest import QUICK, cuda_or_skip, sync
from dmfn_fast.ops import centroid_align as ca

SHAPES = [(2, 64, 16, 16)] if QUICK else [(16, 512, 32, 32), (16, 512, 64, 64)]
ROUNDS = 3 if QUICK else 15
VARIANTS = {
    "reference": ca.centroid_align_loss_reference,
    "extension": lambda a, b: ca.centroid_align_loss(a, b, impl="fast"),
}


def step(fn, a, b, backward):
    if not backward:
        return lambda: fn(a, b)
    a = a.detach().requires_grad_()  # the target is detached in training, as here
    return lambda: torch.autograd.grad(fn(a, b), a)


def run(benchmark, shape, variant, backward, device, dtype=torch.float32):
    if variant == "extension" and not ca.has_kernel(device):
        pytest.skip(f"dmfn_fast extension has no {device} kernel: {ca._ext_state['why'] or 'built without it'}")
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(shape, generator=g, device=device, dtype=dtype)
    b = torch.rand(shape, generator=g, device=device, dtype=dtype)
    fn = step(VARIANTS[variant], a, b, backward)

    def timed():
        out = fn()
        sync(device)
        return out

    benchmark.group = f"centroid {device} {'fwd+bwd' if backward else 'fwd'} {list(shape)} {str(dtype)[6:]}"
    benchmark.extra_info["variant"] = variant
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    return a, b


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_centroid_cpu(benchmark, shape, variant, backward):
    run(benchmark, shape, variant, backward, "cpu")


def cuda_median_ms(fn):
    """Median GPU time of fn in ms, after warm-up (CUDA events, as triton.testing.do_bench times)."""
    try:
        import triton.testing
    except ImportError:
        triton = None
    if triton is not None:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(5):
        fn()
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(nbytes):
    """Bytes per second of a device-to-device copy (read + write), from its CUDA-timed median."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (cuda_median_ms(lambda: dst.copy_(src)) * 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_centroid_cuda(benchmark, shape, variant, backward, dtype):
    cuda_or_skip()
    a, b = run(benchmark, shape, variant, backward, "cuda", dtype)
    ms = cuda_median_ms(step(VARIANTS[variant], a, b, backward))
    moved = a.numel() * a.element_size() * (3 if backward else 2)
    bound_ms = moved / copy_bandwidth(256 << 20) * 1e3
    pct = 100 * bound_ms / ms
    benchmark.extra_info.update(cuda_median_ms=ms, pct_copy_bound=pct)
    print(f"\n{benchmark.group} {variant}: {ms * 1e3:.1f} us (CUDA median), "
          f"{pct:.0f}% of the copy-bandwidth bound ({bound_ms * 1e3:.1f} us)")
