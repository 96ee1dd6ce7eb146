"""Centroid alignment loss: the C++/CUDA extension vs the PyTorch reference, forward and forward+backward,
at relu4_1 sizes [16,512,32,32] (a 256x256 batch of 16) and [16,512,64,64]. Each case is one
`benchmark.group` with variants "reference" and "extension" (benchmarks/summarize.py prints the speedup).
On CUDA, pct_copy_bound = the time to move the same bytes at the card's measured copy bandwidth
(forward: read both maps; forward+backward: also write the gradient) / the extension's median."""
import pytest
import torch

from conftest import QUICK, cuda_or_skip, sync
from dmfn_fast.ops import centroid_align as ca

SHAPES = [(2, 64, 16, 16)] if QUICK else [(16, 512, 32, 32), (16, 512, 64, 64)]
ROUNDS = 3 if QUICK else 15
VARIANTS = {
    "reference": ca.centroid_align_loss_reference,
    "extension": lambda a, b: ca.centroid_align_loss(a, b, impl="fused"),
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
    return a


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_centroid_cpu(benchmark, shape, variant, backward):
    run(benchmark, shape, variant, backward, "cpu")


def copy_bandwidth(nbytes):
    """Bytes per second of a device-to-device copy (read + write), median of 20."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / sorted(times[5:])[10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_centroid_cuda(benchmark, shape, variant, backward, dtype):
    cuda_or_skip()
    a = run(benchmark, shape, variant, backward, "cuda", dtype)
    moved = a.numel() * a.element_size() * (3 if backward else 2)
    bound = moved / copy_bandwidth(256 << 20)
    pct = 100 * bound / benchmark.stats.stats.median
    benchmark.extra_info["pct_copy_bound"] = pct
    print(f"\n{benchmark.group} {variant}: {benchmark.stats.stats.median * 1e6:.1f} us, "
          f"{pct:.0f}% of the copy-bandwidth bound ({bound * 1e6:.1f} us)")
