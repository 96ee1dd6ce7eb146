"""A convolution's bias and ReLU: ATen's two passes (a broadcast add, then a ReLU) against the one-pass kernel
(dmfn_fast/ops/bias_act.py), on the generator's first convolution output and in the frozen VGG as the training
step runs it (forward+backward, stages recomputed). On CUDA each case also records the CUDA-timed median
(triton.testing.do_bench) in extra_info and prints it; without CUDA the kernel cases skip and the plain ones
run in fp32 at tiny sizes."""
import pytest
import torch

from conftest import QUICK, skip_unless_runs, time_case
from dmfn_fast.ops import bias_act as ba
from dmfn_fast.vgg import VGG19Features

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# the generator's first convolution output at 256 px, batch 16; the VGG on 256 px images, batch 16
ACT_SHAPE = (1, 64, 16, 16) if QUICK else (16, 64, 256, 256)
VGG_SHAPE = (1, 3, 32, 32) if QUICK else (16, 3, 256, 256)


def _case(what, impl, dtype):
    torch.manual_seed(0)
    if what == "bias+relu":
        x = torch.randn(ACT_SHAPE, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
        b = torch.randn(ACT_SHAPE[1], device=DEVICE, dtype=dtype)
        fn = ba.bias_act if impl == "fast" else ba.bias_act_reference
        return lambda: fn(x, b, "relu")
    vgg = VGG19Features("random").to(DEVICE, dtype, memory_format=torch.channels_last)
    x = (torch.rand(VGG_SHAPE, device=DEVICE, dtype=dtype) * 2 - 1).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = [torch.ones_like(f) for f in vgg(x.detach())]
    return lambda: torch.autograd.grad(vgg(x, recompute=True, fused=impl == "fast"), x, g)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("what", ["bias+relu", "vgg fwd+bwd"])
def test_bench_bias_act(benchmark, what, dtype, impl):
    skip_unless_runs(impl, dtype)
    torch.backends.cudnn.benchmark = True
    shape = ACT_SHAPE if what == "bias+relu" else VGG_SHAPE
    time_case(benchmark, _case(what, impl, DTYPES[dtype]), f"{what} {list(shape)} {dtype}", "bias_act", what=what,
              impl=impl, dtype=dtype)
