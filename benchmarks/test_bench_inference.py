"""Inference throughput of the full-size generator (nf=64, 8 DMFBs): images/s at 256x256 and 512x512,
batch 1 and 16, fp32 and bf16, on the CPU and (when present) CUDA. Generator.inpaint under
torch.inference_mode, model weights cast to the dtype, median after a warm-up round.
On the CPU (and with DMFN_BENCH_QUICK=1) one tiny case with a small model, so the file never rots."""
import pytest
import torch

from conftest import QUICK, sync
from dmfn_fast import Generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TINY = [(64, 1, "fp32")]
FULL = [(s, n, d) for s in (256, 512) for n in (1, 16) for d in DTYPES]
CASES = [("cpu", *c) for c in TINY] + [("cuda", *c) for c in (TINY if QUICK else FULL)]


@pytest.mark.parametrize("device,size,batch,dtype", CASES, ids=[f"{d}-{s}px-b{n}-{t}" for d, s, n, t in CASES])
def test_inpaint_throughput(benchmark, device, size, batch, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    torch.manual_seed(0)
    tiny = (size, batch, dtype) in TINY
    g = Generator(nf=16, n_blocks=2) if tiny else Generator()
    g = g.eval().to(device, DTYPES[dtype])
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    m = torch.zeros(batch, 1, size, size, device=device)
    m[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1

    def step():
        with torch.inference_mode():
            g.inpaint(x, m)
        sync(device)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(images_per_s=batch / median, device=torch.device(device).type, dtype=dtype,
                                size=size, batch=batch, impl=g.impl)
    print(f"\n{device} {size}x{size} batch {batch} {dtype}: {batch / median:.3f} images/s")
