"""The generator's input convolution (4 -> 64 channels, 5x5) and its ReLU: cuDNN, its bias add and the ReLU
against the thin-input kernels (dmfn_fast/ops/thin_conv.py), forward at inference's batch 64 and forward plus
the weight and bias gradient at training's batch 16, 256 px. On CUDA each case also records the CUDA-timed
median (triton.testing.do_bench) in extra_info and prints it; without CUDA the kernel cases skip and the plain
ones run in fp32 at tiny sizes."""
import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, skip_unless_runs, time_case
from dmfn_fast.ops import thin_conv as tc

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SIDE = 16 if QUICK else 256
BATCH = {"fwd": 2 if QUICK else 64, "fwd+bwd": 1 if QUICK else 16}


def _case(what, impl, dtype):
    torch.manual_seed(0)
    x = torch.rand(BATCH[what], 4, SIDE, SIDE, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 4, 5, 5, device=DEVICE) / 10).to(dtype).requires_grad_()
    b = torch.randn(64, device=DEVICE, dtype=dtype).requires_grad_()
    if impl == "fast":
        def conv():
            return tc.thin_conv(x, w, b, 1, 2, "relu")
    else:
        def conv():
            return F.relu(F.conv2d(x, w, b, 1, 2))
    if what == "fwd":
        def run():
            with torch.no_grad():
                return conv()
        return run
    g = torch.randn(BATCH[what], 64, SIDE, SIDE, device=DEVICE, dtype=dtype)
    return lambda: torch.autograd.grad(conv(), (w, b), g)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("what", ["fwd", "fwd+bwd"])
def test_bench_thin_conv(benchmark, what, dtype, impl):
    skip_unless_runs(impl, dtype)
    torch.backends.cudnn.benchmark = True
    time_case(benchmark, _case(what, impl, DTYPES[dtype]), f"G input conv {what} [{BATCH[what]}, 4, {SIDE}, {SIDE}] "
              f"{dtype}", "thin_conv", what=what, impl=impl, dtype=dtype)
