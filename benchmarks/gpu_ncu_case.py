"""The workloads gpu_check.sh profiles with ncu, each run twice to warm up (autotuning, the extension's plan
caches), then once inside the NVTX range "profile" that ncu filters on:
- by default, one bf16 branch op with IN+ReLU, forward and backward, at the training shape (N=16, 64x64, C=64),
  its kernels called directly;
- --centroid, the centroid op's forward+backward at [16, 512, 32, 32] channels-last: in fp32, then bf16, its
  default and whole-pixel plans and the Triton kernels (both passes, the forward in runs of pixels, interleaved
  or not, or whole planes), each dtype after six Triton reads of the same two maps' bytes (the stream of one
  buffer, in order and as 512 runs read at once; the two maps streamed at the same offsets and half a map apart;
  the pair kernel's column order; pixel by pixel). Every
  variant of the op's pair kernel read at about 2.0 TB/s on the H100 (s18) and 2.8 on the H200 (s15), two
  thirds of the copy rate, where the stream reached the copy rate: ncu's DRAM bytes, occupancy and stall
  reasons say whether it moves more bytes than counted, or waits on what.
--dry: tiny sizes on CPU under TRITON_INTERPRET=1 (the centroid op's CPU kernel)."""
import os
import sys

DRY = "--dry" in sys.argv
CENTROID = "--centroid" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
# The plan switches this case sets are set blank now, before any thread starts: setting them later replaces
# a value in place rather than growing the environment (tests/test_centroid_align.py's refusal test).
PLANS = {"default": {}, "whole pixels": {"DMFN_CENTROID_PIXELS": "1"}, "Triton": {"DMFN_CENTROID_TRITON": "2"},
         "Triton planes": {"DMFN_CENTROID_TRITON": "3"},
         "Triton planes, maps apart": {"DMFN_CENTROID_TRITON": "3", "DMFN_CENTROID_APART": "1"},
         "Triton, interleaved runs": {"DMFN_CENTROID_TRITON": "1", "DMFN_CENTROID_INTERLEAVE": "1"},
         "Triton, one map a program": {"DMFN_CENTROID_TRITON": "1", "DMFN_CENTROID_ONE_MAP": "1"}}
for _name in {k for p in PLANS.values() for k in p}:
    os.environ.setdefault(_name, "")

import torch  # noqa: E402

dev = "cpu" if DRY else "cuda"
sync = torch.cuda.synchronize if not DRY else (lambda: None)


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def profiled(once):
    """once() twice, then once inside the NVTX range "profile"."""
    once()
    once()
    sync()
    if not DRY:
        torch.cuda.nvtx.range_push("profile")
    once()
    if not DRY:
        torch.cuda.nvtx.range_pop()
    sync()


torch.manual_seed(0)
if CENTROID:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from stream_kernels import (column_read, flat, pixel_read, stream_read, stream_read_pair,  # noqa: E402
                                stream_read_strided)

    from dmfn_fast.ops import centroid_align as ca  # noqa: E402

    shape = (2, 8, 5, 6) if DRY else (16, 512, 32, 32)
    for dt in (torch.float32, torch.bfloat16):
        if DRY and dt == torch.bfloat16:
            continue  # the interpreter has no bf16 math
        both = torch.rand(2, *shape, device=dev).to(dt)
        a, t = cl(both[0]).requires_grad_(), cl(both[1])

        def reads():
            stream_read(both, 4096, 4)
            stream_read_strided(both, 8192, 8, 1 if DRY else 512)  # as the Triton pair sums' 512 runs
            fa, ft = flat(a), flat(t)
            for shift in (0, fa.numel() // 8192 // 2):  # the two maps at the same offsets, half a map apart
                stream_read_pair(fa, ft, 8192, 8, shift)
            if not DRY:  # the dry maps' 8 channels make no whole column
                column_read(a.detach(), t)
            pixel_read(a.detach(), t, 16)
        profiled(reads)
        for name, env in PLANS.items():
            def op():
                os.environ.update(env)
                torch.autograd.grad(ca.centroid_align_loss(a, t, impl="fast"), a)
                os.environ.update({k: "" for k in env})
            profiled(op)
            print(f"ncu case: centroid {dt} {name} done", flush=True)
else:
    from dmfn_fast.ops import dmfb as ops  # noqa: E402

    N, C, H, W = (1, 4, 6, 5) if DRY else (16, 64, 64, 64)
    D = [1, 2, 4, 8]
    dt = torch.float32 if DRY else torch.bfloat16  # the interpreter has no bf16 math
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
    profiled(once)
print("ncu case done")
