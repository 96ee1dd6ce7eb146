"""The workload gpu_check.sh profiles with ncu: one bf16 branch op with IN+ReLU, forward and backward, at the
training shape (N=16, 64x64, C=64), its kernels called directly. Two warm-up passes (autotuning), then one
inside the NVTX range "profile" that ncu filters on. --dry: tiny sizes on CPU under TRITON_INTERPRET=1."""
import os
import sys

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from dmfn_fast.ops import dmfb as ops  # noqa: E402

dev = "cpu" if DRY else "cuda"
N, C, H, W = (1, 4, 6, 5) if DRY else (16, 64, 64, 64)
D = [1, 2, 4, 8]
dt = torch.float32 if DRY else torch.bfloat16  # the interpreter has no bf16 math


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


torch.manual_seed(0)
h = cl(torch.randn(N, C, H, W, device=dev).to(dt))
ws = [cl((torch.randn(C, C, 3, 3, device=dev) / 24).to(dt)) for _ in D]
bs = [(0.1 * torch.randn(C, device=dev)).to(dt) for _ in D]
w, b = ops.pack_branches(ws, bs, dt)


def once():
    t, mean, rstd = ops._branches_in_relu_fn(h, w, b, D)
    dt_ = cl(torch.randn_like(t))
    sa, sb = ops._in_backward_sums(dt_, t, mean, rstd, relu=True, from_y=True)
    G = ops._branches_forward(h, w, b, D, grad=(dt_, mean, rstd, sa, sb))
    ops._branches_dgrad(w, G, D, h)
    ops._branches_wgrad(h, G, D)


sync = torch.cuda.synchronize if not DRY else (lambda: None)
once()
once()
sync()
if not DRY:
    torch.cuda.nvtx.range_push("profile")
once()
if not DRY:
    torch.cuda.nvtx.range_pop()
sync()
print("ncu case done")
