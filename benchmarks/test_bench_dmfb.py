"""Fused Triton DMFB vs the strongest PyTorch reference (cuDNN, channels-last, same dtype, cudnn.benchmark).

Cases: the branch op alone, one whole DMFB, the generator; forward and forward+backward; at the
bottleneck sizes N=16 64x64 (256x256 training) and N=1 128x128 (512x512 inference); bf16, fp16, fp32.
On CUDA each case also records, in extra_info, the CUDA-timed median (triton.testing.do_bench, after
warm-up, so autotuning is excluded) and the peak memory of one call, and prints a summary line; the
branch forward also prints its time as a percentage of the copy-bandwidth bound (read h + write the
cat once at the measured device-to-device copy bandwidth).
Without CUDA the fused cases skip and the reference cases run in fp32 on CPU at tiny sizes (also on CUDA
with DMFN_BENCH_QUICK=1).
"""
import pytest
import torch

from conftest import QUICK, cuda_or_skip, sync
from dmfn_fast.models import DMFB, Generator
from dmfn_fast.ops import dmfb as ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Bottleneck (DMFB) sizes; the generator's input is 4x larger per side.
SIZES = [(1, 8, 8)] if QUICK else [(16, 64, 64), (1, 128, 128)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NF = 16 if QUICK and not CUDA else 64  # nf: DMFB channels 4*nf, inner nf


def _copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write), measured once."""
    import triton.testing

    if not hasattr(_copy_bandwidth, "value"):
        x = torch.empty(256 * 2 ** 20, device="cuda", dtype=torch.uint8)
        y = torch.empty_like(x)
        ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
        _copy_bandwidth.value = 2 * x.numel() / (ms * 1e-3)
    return _copy_bandwidth.value


def _make_case(what, impl, dtype, N, H, W):
    """(fn(x) -> output, input x, params) for one case, inputs channels-last on DEVICE."""
    torch.manual_seed(0)
    C = NF
    if what == "branches":
        h = torch.randn(N, C, H, W, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
        ws = [(torch.randn(C, C, 3, 3, device=DEVICE) * 0.05).to(dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_() for _ in range(4)]
        bs = [torch.zeros(C, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(4)]
        fn = ops.dmfb_branches if impl == "fast" else ops.dmfb_branches_reference
        return (lambda x: fn(x, ws, bs)), h, ws + bs
    if what == "dmfb":
        model = DMFB(4 * C, C, impl=impl)
        x = torch.randn(N, 4 * C, H, W, device=DEVICE, dtype=dtype)
    else:
        model = Generator(nf=C, n_blocks=8, impl=impl)
        H, W = 4 * H, 4 * W
        x = torch.cat([torch.rand(N, 3, H, W, device=DEVICE) * 2 - 1,
                       (torch.rand(N, 1, H, W, device=DEVICE) > 0.5).float()], 1).to(dtype)
    model = model.to(DEVICE, dtype).to(memory_format=torch.channels_last)
    return model, x.contiguous(memory_format=torch.channels_last), list(model.parameters())


def _step(fn, x, params, mode):
    x = x.detach().requires_grad_(mode == "fwd+bwd")
    if mode == "fwd":
        with torch.no_grad():
            return fn(x)
    y = fn(x)
    y.backward(torch.ones_like(y))
    for p in params:
        p.grad = None
    return y


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"N{s[0]}-{s[1]}x{s[2]}")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("what", ["branches", "dmfb", "generator"])
def test_bench_dmfb(benchmark, what, mode, size, dtype, impl):
    if impl == "fast":
        cuda_or_skip()
        if ops.triton_unavailable_reason():
            pytest.skip(ops.triton_unavailable_reason())
    if not CUDA and dtype != "fp32":
        pytest.skip("half precision is timed only on CUDA (CPU convolutions in fp16/bf16 are not a real baseline)")
    N, H, W = size
    dt = DTYPES[dtype]
    torch.backends.cudnn.benchmark = True
    fn, x, params = _make_case(what, impl, dt, N, H, W)

    def run():
        out = _step(fn, x, params, mode)
        sync(DEVICE)
        return out

    run()  # warm-up: autotuning, cuDNN algorithm search
    benchmark.group = f"{what} {mode} N={N} {H}x{W} {dtype}"
    benchmark.extra_info.update(what=what, mode=mode, impl=impl, dtype=dtype, N=N, H=H, W=W)
    if CUDA:
        import triton.testing

        ms = triton.testing.do_bench(lambda: _step(fn, x, params, mode), warmup=25, rep=100,
                                     return_mode="median")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = run()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        del out
        benchmark.extra_info.update(cuda_median_ms=ms, peak_mem_mib=peak)
        line = f"[dmfb bench] {benchmark.group} {impl}: {ms:.3f} ms (CUDA median), peak +{peak:.0f} MiB"
        if what == "branches" and mode == "fwd" and impl == "fast":
            nbytes = x.numel() * x.element_size() * 5  # read h (C channels), write the cat (4C)
            bound_ms = nbytes / _copy_bandwidth() * 1e3
            benchmark.extra_info.update(copy_bound_ms=bound_ms, pct_of_copy_bound=100 * bound_ms / ms)
            line += f"; copy-bandwidth bound {bound_ms:.3f} ms = {100 * bound_ms / ms:.0f}% of this time"
        print(line)
    benchmark(run)
