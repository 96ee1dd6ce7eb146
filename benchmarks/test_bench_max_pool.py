"""2x2 max pooling, forward and backward: ATen's max_pool2d (which writes and reads int64 indices) against the
index-free kernels (dmfn_fast/ops/max_pool.py), on the VGG's first pool input at 256 px, batch 16 (64
channels). On CUDA each case also records the CUDA-timed median (triton.testing.do_bench) in extra_info and
prints it; without CUDA the kernel cases skip and ATen's run in fp32 at a tiny size."""
import pytest
import torch

from conftest import QUICK, skip_unless_runs, time_case
from dmfn_fast.ops import max_pool as mp

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHAPE = (1, 64, 16, 16) if QUICK else (16, 64, 256, 256)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bench_max_pool(benchmark, dtype, impl):
    skip_unless_runs(impl, dtype)
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device=DEVICE, dtype=DTYPES[dtype]).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    pool = mp.max_pool2x2 if impl == "fast" else mp.max_pool2x2_reference
    g = torch.randn_like(mp.max_pool2x2_reference(x.detach()))
    time_case(benchmark, lambda: torch.autograd.grad(pool(x), x, g), f"max pool 2x2 fwd+bwd {list(SHAPE)} {dtype}",
              "max_pool", impl=impl, dtype=dtype)
