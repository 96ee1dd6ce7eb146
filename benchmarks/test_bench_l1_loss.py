"""The loss's L1 terms, forward and backward: the guided term on relu1_1 (the largest, [16, 64, 256, 256] at
the training shape, weighted by a [16, 1, 256, 256] map) by the loss's eager formula (_L1Mean, ATen's
passes), by torch.compile of the plain formula, and by the two kernels of dmfn_fast/ops/l1_loss.py. On CUDA
each case also records the CUDA-timed median (triton.testing.do_bench) in extra_info and prints it; without
CUDA the kernel and compiled cases skip and the formula runs in fp32 at a tiny size."""
import pytest
import torch

from conftest import QUICK, skip_unless_runs, time_case
from dmfn_fast import losses
from dmfn_fast.ops import l1_loss

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHAPE = (1, 64, 16, 16) if QUICK else (16, 64, 256, 256)


@pytest.mark.parametrize("impl", ["reference", "compile", "fast"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bench_l1_loss(benchmark, dtype, impl):
    if impl == "compile" and not CUDA:
        pytest.skip("torch.compile is timed on CUDA only: Inductor's CPU code is not the comparison")
    skip_unless_runs("fast" if impl == "fast" else "reference", dtype)
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    a = torch.relu(torch.randn(SHAPE, device=DEVICE)).to(dt).contiguous(memory_format=torch.channels_last)
    b = (a + 0.1 * torch.relu(torch.randn_like(a))).contiguous(memory_format=torch.channels_last)
    g = (1 + torch.rand(SHAPE[0], 1, *SHAPE[2:], device=DEVICE)).to(dt)
    a.requires_grad_()
    if impl == "compile":
        fn = torch.compile(l1_loss.l1_mean_reference)
    else:
        fn = lambda a, b, g: losses.l1_mean(a, b, g, impl=impl)  # noqa: E731
    time_case(benchmark, lambda: torch.autograd.grad(fn(a, b, g), a), f"guided L1 fwd+bwd {list(SHAPE)} {dtype}",
              "l1_loss", impl=impl, dtype=dtype)
