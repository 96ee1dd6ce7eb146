"""One small fused DMFB forward+backward (bf16 and fp32, odd sizes), on sm_90 the TMA kernels (the TMA
wgrad among them) and the opt-in 9-tap wgrad kernel, the centroid op in each of its kernel paths on CUDA,
the convolutions' bias + activation kernel, the thin-input convolution, the index-free max pool, the losses'
L1 kernels, and a tiny training step captured as a CUDA graph and replayed: the workload gpu_check.sh runs
under compute-sanitizer memcheck. Exits non-zero if a result is not finite.

    python benchmarks/gpu_sanitize_case.py          # CUDA (gpu_check.sh runs it under compute-sanitizer)
    python benchmarks/gpu_sanitize_case.py --dry    # CPU, kernels interpreted, fp32, smaller maps: the centroid
                                                    # plans and the small kernels' cases, so the script cannot rot
"""
import os
import sys

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from dmfn_fast.models import DMFB  # noqa: E402
from dmfn_fast.ops import bias_act as ba  # noqa: E402
from dmfn_fast.ops import _impl  # noqa: E402
from dmfn_fast.ops import centroid_align as ca  # noqa: E402
from dmfn_fast.ops import thin_conv as tc  # noqa: E402

DEV = "cpu" if DRY else "cuda"
# the interpreter has no bf16 math: fp32 alone there
DTYPES = (torch.float32,) if DRY else (torch.bfloat16, torch.float32)
torch.manual_seed(0)
# (not in --dry: the fused DMFB under the interpreter takes minutes; its interpreter tests cover it)
for dt in () if DRY else (torch.bfloat16, torch.float32):
    m = DMFB(64, 16, impl="fast").cuda().to(dt).to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 13, 11, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = m(x)
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
# the sm_90 kernel alternatives (DMFN_TMA, DMFN_WGRAD9, DMFN_WGRAD_TMA) at an odd size: TMA forward, grad and
# dgrad (the grad's autotuner runs its three epilogues), 9-tap and TMA wgrad
if not DRY and torch.cuda.get_device_capability()[0] >= 9:
    from dmfn_fast.ops import dmfb as ops

    C, dt = 64, torch.bfloat16
    h = torch.randn(2, C, 13, 11, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
    w, b = ops.pack_branches([torch.randn(C, C, 3, 3, device="cuda", dtype=dt) / 24 for _ in range(4)],
                             [torch.zeros(C, device="cuda", dtype=dt) for _ in range(4)], dt)
    k = ops._branches_forward(h, w, b, ops.DILATIONS, tma=True)
    t, mean, rstd = ops._in_act_fn(k, None, True)
    sa, sb = ops._in_backward_sums(t, t, mean, rstd, relu=True, from_y=True)
    G = ops._branches_forward(h, w, b, ops.DILATIONS, grad=(t, mean, rstd, sa, sb), tma=True)
    dw, db = ops._branches_wgrad(h, G, ops.DILATIONS, taps9=True, tma=False)
    dw_tma, db_tma = ops._branches_wgrad(h, G, ops.DILATIONS, tma=True)
    dh = ops._branches_dgrad(w, G, ops.DILATIONS, h, tma=True)
    assert all(torch.isfinite(v).all() for v in (k, G, dw, dh, dw_tma, db_tma))
# every centroid kernel: planes (NCHW), both maps in one launch with 16-byte channels-last loads (C a multiple
# of 8 in bf16, 4 in fp32; 40x42: 14 runs of 128 pixels, the last partial, rows wider than a thread's 32-pixel
# step), 16-byte channels-last one map at a time (the target NCHW), and scalar channels-last (C = 6 in bf16);
# then the two-map cases again with the gradient in blocks of one image row (DMFN_CENTROID_GRAD_ROWS, read per
# call) in two waves
cases = ((torch.float32, 8, 5, torch.contiguous_format, None),
         (torch.bfloat16, 24, 5, torch.channels_last, None),
         (torch.float32, 12, 5, torch.channels_last, None),
         (torch.bfloat16, 16, 40, torch.channels_last, None),
         (torch.bfloat16, 16, 5, torch.channels_last, torch.contiguous_format),
         (torch.bfloat16, 6, 5, torch.channels_last, None))
# each plan: the switches it sets, over the package's defaults (every switch set: no measured plan applies)
DEFAULTS = {n[len("DMFN_CENTROID_"):]: _impl.SWITCHES[n][0] for n in ca.PLAN_SWITCHES}
plans = [({}, c) for c in cases]
plans += [(dict(GRAD_ROWS="1", WAVES="2"), c) for c in cases[1:4]]
# each block finishing its own planes (DMFN_CENTROID_BLOCK_FINISH): 5x7 pixels are one run per column; the
# 40x42 case keeps finish_pairs; and in whole-pixel blocks of 32 vectors (fp32, 104 channels: 26 vectors)
plans += [(dict(BLOCK_FINISH="1"), c) for c in cases[1:4]]
plans += [(dict(BLOCK_FINISH="1", PIXELS="1"), (torch.float32, 104, 5, torch.channels_last, None))]
# blocks of whole pixels (DMFN_CENTROID_PIXELS): 264 channels (64 vectors a block in bf16, 128 in fp32), 520 in
# fp32 and 1032 in bf16 (256), over 40x42 pixels (runs, the last partial), and 264 in fp32 over 5x7 (one run)
pixels = [(dt, C, 40, torch.channels_last, None)
          for dt, C in ((torch.bfloat16, 264), (torch.float32, 264), (torch.float32, 520), (torch.bfloat16, 1032))]
plans += [(dict(PIXELS="1"), c) for c in pixels + [(torch.float32, 264, 5, torch.channels_last, None)]]
# the Triton kernels (DMFN_CENTROID_TRITON; 1 runs 2's forward kernels): both passes in four waves (2), and
# with the forward in whole planes (3); the same maps, 5x7 (one short run an image), a partial channel group
# (1032 in fp32)
plans += [(dict(TRITON=t, WAVES=w), c) for t, w in (("2", "4"), ("3", "1")) for c in pixels + list(cases[1:4:2])]
# and both forwards with map b's pixels half a run ahead of map a's (DMFN_CENTROID_APART; runs cut short)
plans += [(dict(TRITON=t, WAVES="4", APART="1"), c) for t in ("1", "3") for c in pixels]
# and the runs' steps interleaved over an image's programs (DMFN_CENTROID_INTERLEAVE), alone in one wave, and
# with map b half an image ahead in two
plans += [(dict(TRITON="1", WAVES=w, INTERLEAVE="1", APART=ap), c) for w, ap in (("1", "0"), ("2", "1"))
          for c in pixels]
# and a program a map (DMFN_CENTROID_ONE_MAP), in order in one wave and interleaved in two, on the maps with a
# partial channel group (fewer plans: each compiles under the tool)
plans += [(dict(TRITON="1", WAVES=w, ONE_MAP="1", INTERLEAVE=i), c) for w, i in (("1", "0"), ("2", "1"))
          for c in pixels[2:]]
for switches, (dt, C, HW, mf, mf_tgt) in plans:
    if DRY:  # fp32, and 7x9 for 40x42: the interpreter runs a Triton program at a time
        dt, HW = torch.float32, min(HW, 7)
    os.environ.update({f"DMFN_CENTROID_{k}": v for k, v in dict(DEFAULTS, **switches).items()})
    a = torch.rand(2, C, HW, HW + 2, device=DEV, dtype=dt).contiguous(memory_format=mf).requires_grad_()
    b = torch.rand_like(a).contiguous(memory_format=mf_tgt or mf)
    loss = ca.centroid_align_loss(a, b, impl="fast")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
for k in DEFAULTS:
    os.environ.pop(f"DMFN_CENTROID_{k}")
# the convolutions' bias + activation kernel: a partial channel tile (40) and a partial pixel tile, both forms
bdt = DTYPES[0]
xb = torch.randn(2, 40, 9, 13, device=DEV, dtype=bdt).contiguous(memory_format=torch.channels_last)
for bias, act in ((torch.randn(40, device=DEV, dtype=bdt), "lrelu"), (None, "relu")):
    yb = ba.bias_act(xb.requires_grad_(), bias, act)
    yb.float().sum().backward()
    assert torch.isfinite(yb).all() and torch.isfinite(xb.grad).all()
    xb = xb.detach()
# the thin-input convolution (the generator's input convolution; the discriminator's, 3 channels padded to 4):
# a partial pixel tile, stride 2, 8 channels, 24 outputs, forward and the weight, bias and input gradients in
# bf16 and fp32
for dt in DTYPES:
    for C, K, stride, pad in ((4, 5, 1, 2), (3, 5, 2, 2), (8, 3, 2, 1)):
        xt = torch.randn(2, C, 13, 11, device=DEV, dtype=dt).contiguous(memory_format=torch.channels_last)
        wt = torch.randn(24, C, K, K, device=DEV, dtype=dt).requires_grad_()
        bt = torch.randn(24, device=DEV, dtype=dt).requires_grad_()
        yt = tc.thin_conv(xt.requires_grad_(), wt, bt, stride, pad, "relu")
        grads = torch.autograd.grad(yt.float().square().sum(), (xt, wt, bt))
        assert torch.isfinite(yt).all() and all(torch.isfinite(g).all() for g in grads)
# the index-free max pool: odd height and width (a row and column in no window), two channel tiles, a partial
# pixel tile, forward and backward in bf16 and fp32
from dmfn_fast.ops import max_pool as mp  # noqa: E402

for dt in DTYPES:
    xp = torch.randn(2, 80, 13, 11, device=DEV, dtype=dt).contiguous(memory_format=torch.channels_last)
    yp = mp.max_pool2x2(xp.requires_grad_())
    (dxp,) = torch.autograd.grad(yp.float().sum(), xp)
    assert torch.isfinite(yp).all() and torch.isfinite(dxp).all()
# the losses' L1 kernels: each g layout (none, channels-last's per pixel, NCHW's per plane), a partial tile,
# forward and backward in bf16 and fp32
from dmfn_fast.ops import l1_loss as l1k  # noqa: E402

for dt in DTYPES:
    for fmt, guided in ((torch.channels_last, True), (torch.contiguous_format, True), (torch.channels_last, False)):
        la = torch.randn(2, 80, 13, 11, device=DEV, dtype=dt).contiguous(memory_format=fmt).requires_grad_()
        lb = torch.randn_like(la)
        lg = (1 + torch.rand(2, 1, 13, 11, device=DEV)).to(dt) if guided else None
        loss = l1k.l1_mean(la, lb, lg)
        (dla,) = torch.autograd.grad(loss, la)
        assert torch.isfinite(loss) and torch.isfinite(dla).all()
if DRY:  # CUDA graphs need CUDA
    print("sanitize case ok (dry: the centroid plans and the small kernels, interpreted)")
    sys.exit(0)
# the training step as a CUDA graph (train.py --cuda-graphs): a tiny model at 64 px, 1 eager step, the capture,
# then replays with moving crop boxes, bf16. The generator's reference path: the fused kernels were checked
# above, and their autotuning at new shapes would take minutes under memcheck; the loss's extension runs
from dmfn_fast.training import build  # noqa: E402
from dmfn_fast.training.graphed import GraphedStep  # noqa: E402
from dmfn_fast.training.step import RealFake  # noqa: E402

mf = torch.channels_last
Gs, Ds = build.models(16, 2, 8, "reference", "cuda", mf, 0)
parts = build.optimizers(Gs, Ds, device_type="cuda", amp_dtype=torch.bfloat16)
crit = build.criterion(build.vgg(random=True, quiet=True).to("cuda", memory_format=mf), "auto")
step = GraphedStep(Gs, Ds, RealFake(Ds), crit, parts.opt_G, parts.opt_D, parts.scaler, torch.bfloat16, warmup=1)
image = (torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1).contiguous(memory_format=mf)
mask = torch.zeros(2, 1, 64, 64, device="cuda")
mask[..., 16:48, 16:48] = 1
for i in range(3):
    terms, ok = step(image, mask, torch.tensor([[i, 2 * i, 32, 32], [32 - i, 3, 32, 32]]))
    assert ok and all(torch.isfinite(v) for v in terms.values())
torch.cuda.synchronize()
print("sanitize case ok")
