"""Numerics of the Triton DMFB kernels against the PyTorch reference, on CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the checks run in two child processes
(this file run as a script with case names; two because CI has two cores), and one test per case
asserts on what they report. Forward and every gradient are compared on fresh random inputs.
Errors are max |fast - ref| / max |ref| (for parameter groups, over the group's largest gradient,
since the biases before an instance norm have zero true gradient). Tolerances: fp32 1e-5, fp16 1e-2.
"""
import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# name -> (check, kwargs). Channel counts are small (the interpreter costs per op, per program).
CASES = {}
for _dt in ("fp32", "fp16"):
    for _n, _h, _w in ((1, 13, 11), (3, 13, 11), (1, 32, 32), (3, 32, 32), (1, 48, 40)):
        CASES[f"branches-{_dt}-{_n}x{_h}x{_w}"] = ("branches", dict(dtype=_dt, N=_n, H=_h, W=_w, C=16,
                                                                   channels_last=_n == 3))
CASES["branches-fp32-1x13x11-C80"] = ("branches", dict(dtype="fp32", N=1, H=13, W=11, C=80, channels_last=True))
CASES["branches-fp16-1x9x7-C24"] = ("branches", dict(dtype="fp16", N=1, H=9, W=7, C=24, channels_last=False))
for _dt in ("fp32", "fp16"):
    for _relu, _res in ((True, False), (False, True)):
        _kind = "relu" if _relu else "residual"
        CASES[f"in-{_kind}-{_dt}-3x13x11-C32"] = ("instance_norm", dict(dtype=_dt, N=3, H=13, W=11, C=32,
                                                                          relu=_relu, res=_res))
    CASES[f"in-relu-{_dt}-1x32x32-C80"] = ("instance_norm", dict(dtype=_dt, N=1, H=32, W=32, C=80,
                                                                    relu=True, res=False))
    CASES[f"branches-in-relu-{_dt}-3x13x11"] = ("branches_in_relu", dict(dtype=_dt, N=3, H=13, W=11, C=16))
# Channel means from the input, not the biases, about 20x the spread (an offset on h, centre taps only so
# zero padding adds no spread): the statistics must stay exact in fp32.
CASES["branches-in-relu-fp32-offset-2x13x11"] = ("branches_in_relu", dict(dtype="fp32", N=2, H=13, W=11, C=16,
                                                                          offset=20.0))
# The norms' reductions as the GPU runs them at the training shape: each program sums a run of pixel tiles
# (143 pixels = 3 tiles of 64; 1 program per (image, channel tile): one run of 3, the last tile partial; 8: two
# runs, the second one partial tile), two channel tiles (C = 80).
CASES["in-splits-residual-fp32-2x13x11-C80"] = ("instance_norm", dict(dtype="fp32", N=2, H=13, W=11, C=80,
                                                                      relu=False, res=True, programs=1))
CASES["in-splits-relu-fp16-2x13x11-C80"] = ("instance_norm", dict(dtype="fp16", N=2, H=13, W=11, C=80,
                                                                  relu=True, res=False, programs=8))
# the elementwise kernels with 128-pixel programs (what gpu_breakdown.py times against 64): 143 pixels, the
# second tile partial
CASES["in-apply-128-pixels-fp16-2x13x11-C80"] = ("instance_norm", dict(dtype="fp16", N=2, H=13, W=11, C=80,
                                                                       relu=True, res=True, apply_pixels=128))
CASES["branches-in-relu-splits-fp32-2x13x11"] = ("branches_in_relu", dict(dtype="fp32", N=2, H=13, W=11, C=16,
                                                                          programs=1))
CASES["dmfb-block-fp32-2x13x11"] = ("block", dict(N=2, H=13, W=11))
CASES["dmfb-block-autocast-bf16"] = ("block_autocast", dict(N=2, H=12, W=10))
# The kernels' K loop in several steps (C over BLOCK_K, as on a GPU for C > 64): the interpreter's own tiles
# cover C in one step.
CASES["branches-in-relu-k-steps-C48"] = ("k_steps", dict(N=2, H=9, W=7, C=48, block=16))
# The opt-in TMA kernels (2-D tiles, h by tensor descriptor) with tiles smaller than the image and than C:
# edge tiles past the image, the K loop in steps, two channel tiles.
CASES["tma-kernels-tiles-k-steps-C32"] = ("tma", dict(N=2, H=9, W=13, C=32, TH=4, TW=8, block=16))
CASES["generator-fp32-2x20x16"] = ("generator", dict(N=2, H=20, W=16))
CASES["generator-fused-norms-save-less"] = ("fused_norms", dict(N=2, H=16, W=12))
CASES["generator-bias-before-norm-skipped"] = ("bias_before_norm", dict(N=2, H=16, W=12))
CASES["generator-compiled-fused-norms"] = ("generator_compiled", dict(N=2, H=16, W=12))
CASES["torch-compile-aot-eager"] = ("compiled", dict(N=2, H=13, W=11))
CASES["eager-path-equals-op-path"] = ("eager_path", dict(N=2, H=9, W=7))
CASES["eager-path-equals-op-path-autocast"] = ("eager_path", dict(N=2, H=9, W=7, autocast=True))
CASES["opcheck-every-op"] = ("opcheck", dict(N=2, H=7, W=5, C=16))
# The weight-gradient kernel as the GPU launches it (several pixel splits and channel tiles, the bias
# programs), which the ops' interpreter path (one split, one tile) does not reach.
CASES["wgrad-splits-tiles-C80"] = ("wgrad_splits", dict(N=2, C=80, H=9, W=7, BP=32, BC=64, split=64))
CASES["wgrad-splits-tiles-C16"] = ("wgrad_splits", dict(N=1, C=16, H=5, W=13, BP=16, BC=16, split=16))
# The same for branches_wgrad9 (all 9 taps of a branch in one program).
CASES["wgrad9-splits-tiles-C80"] = ("wgrad_splits", dict(N=2, C=80, H=9, W=7, BP=32, BC=64, split=64, taps9=True))
CASES["wgrad9-splits-tiles-C16"] = ("wgrad_splits", dict(N=1, C=16, H=5, W=13, BP=16, BC=16, split=16,
                                                         taps9=True))
CASES["autotuned-launch-cache"] = ("tuned_launch", {})
CASES["eager-sums-one-zeros-per-pass"] = ("arena", dict(N=2, H=9, W=7))
# The convolutions' bias + activation kernel (ops/bias_act.py): two channel tiles, the second partial, and a
# partial pixel tile; N 1 and 3; then where it runs: the frozen VGG and the generator's first convolution.
for _dt in ("fp32", "fp16"):
    for _n in (1, 3):
        CASES[f"bias-act-{_dt}-{_n}x13x11-C80"] = ("bias_act", dict(dtype=_dt, N=_n, H=13, W=11, C=80))
CASES["bias-act-vgg-fused-32px"] = ("vgg_fused", dict(N=2, H=32, W=32))
CASES["bias-act-generator-inference"] = ("generator_inference", dict(N=2, H=16, W=12))
# The thin-input convolution (ops/thin_conv.py): forward and gradients for its shapes, then in the generator.
for _dt in ("fp32", "fp16"):
    for _n in (1, 3):
        CASES[f"thin-conv-{_dt}-N{_n}"] = ("thin_conv", dict(dtype=_dt, N=_n))
CASES["thin-conv-generator"] = ("generator_thin", dict(N=2, H=16, W=12))
CASES["thin-conv-discriminator"] = ("discriminator_thin", dict(N=2, nf=4))
# The index-free max pool (ops/max_pool.py); in the VGG: the bias-act case above (bias-act-vgg-fused-32px).
for _dt in ("fp32", "fp16"):
    for _n in (1, 3):
        CASES[f"max-pool-{_dt}-N{_n}"] = ("max_pool", dict(dtype=_dt, N=_n))
CASES["max-pool-bf16-N1"] = ("max_pool", dict(dtype="bf16", N=1))  # exact: compares, no arithmetic
# The losses' L1 kernels (ops/l1_loss.py): every layout and g, against the loss's formula; then in DMFNLoss.
for _dt in ("fp32", "fp16"):
    for _n in (1, 3):
        CASES[f"l1-loss-{_dt}-N{_n}"] = ("l1_loss", dict(dtype=_dt, N=_n))
CASES["l1-loss-bf16-N3"] = ("l1_loss", dict(dtype="bf16", N=3))  # the interpreter truncates bf16: not exact
CASES["l1-loss-in-dmfn-loss"] = ("l1_in_loss", dict(N=2, H=32, W=32))
# The centroid loss's Triton kernels (DMFN_CENTROID_TRITON 1 to 4): runs of whole pixels, a last run cut short,
# whole planes, a partial channel group (1032 channels: 3 groups of 512 in fp32, 2 of 1024 in 16 bits), the
# authors' grid
for _dt, _n, _c, _h, _w, _grid in (("fp32", 1, 8, 17, 19, "paper"), ("fp32", 3, 40, 9, 8, "paper"),
                                   ("fp32", 2, 1032, 3, 4, "paper"), ("fp16", 3, 40, 9, 8, "paper"),
                                   ("fp16", 2, 1032, 3, 4, "paper"), ("bf16", 2, 24, 7, 6, "paper"),
                                   ("fp32", 2, 16, 6, 6, "authors")):
    CASES[f"centroid-triton-{_dt}-{_n}x{_c}x{_h}x{_w}-{_grid}"] = (
        "centroid_triton", dict(dtype=_dt, N=_n, C=_c, H=_h, W=_w, grid=_grid))
# Its finish alone, over more runs than a program loads at once (the cases above fit in one round)
CASES["centroid-finish-rounds"] = ("centroid_finish", dict(NC=150, R=5))
# A measured plan (MEASURED_PLANS) as the default, through the loss
CASES["centroid-measured-plan"] = ("centroid_measured_plan", dict(N=2, C=24, H=7, W=6))


# ----------------------------------------------------------------------------- checks (child process)


def _err(a, b, scale=None, l2=False):
    a, b = a.detach().float(), b.detach().float()
    if l2:
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    scale = b.abs().max().item() if scale is None else scale
    return (a - b).abs().max().item() / max(scale, 1e-30)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def check_branches(dtype, N, H, W, C, channels_last):
    from dmfn_fast.ops.dmfb import dmfb_branches, dmfb_branches_reference

    dt = DTYPES[dtype]
    h = torch.randn(N, C, H, W).to(dt)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(C, C, 3, 3) / (3 * C ** 0.5)).to(dt) for _ in range(4)]
    bs = [(0.1 * torch.randn(C)).to(dt) for _ in range(4)]
    ref_in = [_leaf(h.float())] + [_leaf(w.float()) for w in ws] + [_leaf(b.float()) for b in bs]
    ref = dmfb_branches_reference(ref_in[0], ref_in[1:5], ref_in[5:])
    g = torch.randn_like(ref).to(dt)
    ref.backward(g.float())
    fast_in = [_leaf(h)] + [_leaf(w) for w in ws] + [_leaf(b) for b in bs]
    out = dmfb_branches(fast_in[0], fast_in[1:5], fast_in[5:])
    out.backward(g)
    assert out.dtype == dt and out.shape == ref.shape
    names = ["h"] + [f"w{i}" for i in range(1, 5)] + [f"b{i}" for i in range(1, 5)]
    errs = [("out", _err(out, ref))]
    errs += [(f"grad {n}", _err(f.grad, r.grad)) for n, f, r in zip(names, fast_in, ref_in)]
    return errs


@contextlib.contextmanager
def _norm_programs(programs):
    """The reductions' target program count (None: as shipped). Small: each program sums a run of pixel
    tiles, the last run and tile partial."""
    from dmfn_fast.ops import dmfb

    real = dmfb._kn.TARGET_PROGRAMS
    dmfb._kn.TARGET_PROGRAMS = programs or real
    try:
        yield
    finally:
        dmfb._kn.TARGET_PROGRAMS = real


def check_instance_norm(dtype, N, H, W, C, relu, res, programs=None, apply_pixels=None):
    """apply_pixels: the elementwise kernels' pixels per program on fp16/bf16 (None: as shipped)."""
    from dmfn_fast.ops import dmfb

    real = dmfb._kn.APPLY_PIXELS_2BYTE
    dmfb._kn.APPLY_PIXELS_2BYTE = apply_pixels or real
    try:
        with _norm_programs(programs):
            return _check_instance_norm(dtype, N, H, W, C, relu, res)
    finally:
        dmfb._kn.APPLY_PIXELS_2BYTE = real


def _check_instance_norm(dtype, N, H, W, C, relu, res):
    from dmfn_fast.ops.dmfb import instance_norm_act, instance_norm_act_reference

    dt = DTYPES[dtype]
    x = (1.5 * torch.randn(N, C, H, W) + 10 * torch.randn(1, C, 1, 1)).to(dt)  # |mean| >> std
    r = torch.randn(N, C, H, W).to(dt) if res else None
    xr, rr = _leaf(x.float()), (_leaf(r.float()) if res else None)
    ref = instance_norm_act_reference(xr, rr, relu)
    g = torch.randn_like(ref).to(dt)
    ref.backward(g.float())
    xf, rf = _leaf(x), (_leaf(r) if res else None)
    out = instance_norm_act(xf, rf, relu)
    out.backward(g)
    assert out.is_contiguous(memory_format=torch.channels_last)
    errs = [("out", _err(out, ref)), ("grad x", _err(xf.grad, xr.grad))]
    if res:
        errs.append(("grad res", _err(rf.grad, rr.grad)))
    return errs


def check_branches_in_relu(dtype, N, H, W, C, offset=0.0, programs=None):
    with _norm_programs(programs):
        return _check_branches_in_relu(dtype, N, H, W, C, offset)


def _check_branches_in_relu(dtype, N, H, W, C, offset):
    import torch.nn.functional as F

    from dmfn_fast.ops.dmfb import branches_in_relu, dmfb_branches_reference

    dt = DTYPES[dtype]
    h = (torch.relu(torch.randn(N, C, H, W)) + offset).to(dt)
    ws = [(torch.randn(C, C, 3, 3) / (3 * C ** 0.5)).to(dt) for _ in range(4)]
    if offset:
        ws = [w * F.pad(torch.ones(1, 1), (1, 1, 1, 1)).to(dt) for w in ws]
    bs = [(3 * torch.randn(C)).to(dt) for _ in range(4)]  # channel means well above the spread
    ref_in = [_leaf(h.float())] + [_leaf(w.float()) for w in ws] + [_leaf(b.float()) for b in bs]
    # The cat rounded to the storage dtype, as the kernel stores it: otherwise ReLU's kink flips a few
    # pixels with |xhat| below the rounding error, and each flip is an O(1) gradient difference.
    k = dmfb_branches_reference(ref_in[0], ref_in[1:5], ref_in[5:])
    ref = F.relu(F.instance_norm(k.to(dt).float()))
    g = torch.randn_like(ref).to(dt)
    ref.backward(g.float())
    fast_in = [_leaf(h)] + [_leaf(w) for w in ws] + [_leaf(b) for b in bs]
    out = branches_in_relu(fast_in[0], fast_in[1:5], fast_in[5:])
    out.backward(g)
    errs = [("out", _err(out, ref)), ("grad h", _err(fast_in[0].grad, ref_in[0].grad))]
    scale = max(r.grad.abs().max().item() for r in ref_in[1:])
    names = [f"w{i}" for i in range(1, 5)] + [f"b{i}" for i in range(1, 5)]
    errs += [(f"grad {n}", _err(f.grad, r.grad, scale)) for n, f, r in zip(names, fast_in[1:], ref_in[1:])]
    return errs


def _compare_module(model, fast_fn, ref_fn, x, l2=False):
    """Run both paths (fresh grads each), return errors of output, input grad and every param grad.
    l2: relative L2 errors of the gradients (bf16: ReLU's kink flips pixels whose pre-activation is
    within rounding of 0, a few O(1) differences that a max-norm would report at full size)."""
    xr, xf = _leaf(x), _leaf(x)
    ref = ref_fn(xr)
    g = torch.randn_like(ref)
    ref.backward(g)
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = fast_fn(xf)
    out.backward(g.to(out.dtype))
    errs = [("out", _err(out, ref)), ("grad x", _err(xf.grad, xr.grad, l2=l2))]
    if l2:
        errs += [(f"grad {n}", _err(p.grad, ref_grads[n], l2=True)) for n, p in model.named_parameters()
                 if not n.endswith("bias")]  # zero true gradient (bias before an instance norm)
    else:
        scale = max(gr.abs().max().item() for gr in ref_grads.values())
        errs += [(f"grad {n}", _err(p.grad, ref_grads[n], scale)) for n, p in model.named_parameters()]
    return errs


def _assert_fused_runs(x):
    from dmfn_fast.ops import dmfb

    why = dmfb.triton_unavailable_reason() or dmfb.fused_why_not(x)
    assert not why, f"the fused path would not run: {why}"


def _random_block(C, inner):
    from dmfn_fast.models import DMFB

    block = DMFB(C, inner, impl="fast")
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, 0.0, 0.1 if name.endswith("weight") else 0.5)
    return block


def check_block(N, H, W):
    block = _random_block(32, 16)
    x = torch.randn(N, 32, H, W)
    _assert_fused_runs(x)
    return _compare_module(block, block, block.forward_reference, x)


def check_block_autocast(N, H, W):
    """bf16 under CPU autocast: the kernels run in the dtype of c1's output (bf16; the interpreter
    computes its dots in fp32). Both the fused block and the reference under autocast are compared
    with the fp32 reference; the fused error must stay within twice the reference's own plus 1e-2."""
    block = _random_block(32, 16)
    x = torch.randn(N, 32, H, W)

    def run(fn, autocast):
        block.zero_grad()
        xl = _leaf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(xl)
        y.float().backward(g)
        return [y, xl.grad] + [p.grad.clone() for n, p in block.named_parameters() if n.endswith("weight")]

    torch.manual_seed(1)
    g = torch.randn(N, 32, H, W)
    exact = run(block.forward_reference, False)
    ref = run(block.forward_reference, True)
    fused = run(block, True)
    assert fused[0].dtype == ref[0].dtype
    labels = ["out", "grad x"] + [f"grad {n}" for n, _ in block.named_parameters() if n.endswith("weight")]
    out = []
    for label, f, r, e in zip(labels, fused, ref, exact):
        out.append((label, _err(f, e, l2=True), 2 * _err(r, e, l2=True) + 1e-2))
    return out


def check_generator(N, H, W):
    from dmfn_fast.models import Generator

    torch.manual_seed(1)
    G = Generator(nf=16, n_blocks=2, impl="fast")
    x = torch.cat([torch.rand(N, 3, H, W) * 2 - 1, (torch.rand(N, 1, H, W) > 0.5).float()], 1)
    _assert_fused_runs(x)
    G_ref = Generator(nf=16, n_blocks=2, impl="reference", init=False)
    G_ref.load_state_dict(G.state_dict())

    def ref_fn(inp):  # same parameters, so the gradients land on G too
        G.impl = "reference"
        try:
            return G(inp)
        finally:
            G.impl = "fast"

    errs = _compare_module(G, G, ref_fn, x)
    errs.append(("reference-model out", _err(G(x), G_ref(x))))
    return errs


def _generator_random_biases(N, H, W, seed):
    """A small fast generator with every bias N(0, 0.5) (so that a skipped or kept bias shows), and an input."""
    from dmfn_fast.models import Generator

    torch.manual_seed(seed)
    G = Generator(nf=8, n_blocks=1, impl="fast")
    for n, p in G.named_parameters():
        if n.endswith("bias"):
            torch.nn.init.normal_(p, 0.0, 0.5)
    x = torch.cat([torch.rand(N, 3, H, W) * 2 - 1, (torch.rand(N, 1, H, W) > 0.5).float()], 1)
    _assert_fused_runs(x)
    return G, x


def check_bias_before_norm(N, H, W):
    """A convolution followed by an instance norm runs without its bias (dmfb.conv_before_norm): the norm
    cancels it. With every bias random, the fast generator matches the reference (output and every other
    gradient, fp32); those biases get exactly zero gradients, on the eager path and through the ops (never
    None: DDP wants one per parameter), where the reference's are rounding noise; without gradients, changing
    them changes nothing, bit for bit. The biases no norm follows (first and last convolution, branches)
    keep theirs."""
    G, x = _generator_random_biases(N, H, W, seed=2)
    skipped = {"encoder.1.conv.bias", "encoder.2.conv.bias", "encoder.3.conv.bias", "blocks.0.c1.bias",
               "blocks.0.c2.bias", "decoder.0.conv.bias", "decoder.1.deconv.bias", "decoder.1.conv.conv.bias",
               "decoder.2.deconv.bias", "decoder.2.conv.conv.bias"}
    g = torch.randn(N, 3, H, W)

    def grads(impl, ops=False):
        G.impl = impl
        G.zero_grad(set_to_none=True)
        y = _via_ops(None, x, G) if ops else G(x)
        y.backward(g)
        return y.detach(), {n: p.grad for n, p in G.named_parameters()}

    _, ref = grads("reference")
    y_fast, fast = grads("fast")
    _, via_ops = grads("fast", ops=True)
    # float64 ground truth: with biases this large the fp32 reference's norms lose more than the fast path's
    G64 = copy.deepcopy(G).double()
    G64.impl = "reference"
    y64 = G64(x.double())
    y64.backward(g.double())
    exact = {n: p.grad for n, p in G64.named_parameters()}
    G.impl = "fast"
    scale = max(v.abs().max().item() for v in exact.values())
    errs = [("out", _err(y_fast, y64))]
    for n in ref:
        if n in skipped:
            assert fast[n] is not None and via_ops[n] is not None, n
            errs += [(f"eager grad {n} (zero)", fast[n].abs().max().item(), 0.0),
                     (f"ops grad {n} (zero)", via_ops[n].abs().max().item(), 0.0),
                     (f"reference grad {n} (rounding)", ref[n].abs().max().item() / scale, 1e-5)]
        else:
            errs.append((f"grad {n}", _err(fast[n], exact[n], scale)))
    with torch.no_grad():
        before = G(x)
        for n, p in G.named_parameters():
            if n in skipped:
                p.add_(torch.randn_like(p))
        errs.append(("no grad: output after changing the skipped biases", _err(G(x), before), 0.0))
    return errs


def check_generator_compiled(N, H, W):
    """torch.compile(fullgraph=True) of the fast generator: the encoder's and decoder's norms are the fused
    ops there too (dmfb.COMPILED_NORMS): 8 instance_norm_act calls besides the block's 2, no aten instance
    norm; DMFN_COMPILED_NORMS=0 leaves them to the compiler. The input convolution is the thin_conv op. Under
    aot_eager the output and every gradient match eager's (the same kernels through the ops)."""
    from dmfn_fast.ops import dmfb

    G, x = _generator_random_biases(N, H, W, seed=4)
    graphs = []

    def record(gm, example_inputs):  # the graph Dynamo hands the compiler
        graphs.append([str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function"])
        return gm.forward

    def norms(compiled_norms):
        real = dmfb.COMPILED_NORMS
        dmfb.COMPILED_NORMS = compiled_norms
        try:
            torch._dynamo.reset()
            graphs.clear()
            torch.compile(G, backend=record, fullgraph=True)(x)
        finally:
            dmfb.COMPILED_NORMS = real
        targets = [t for g in graphs for t in g]
        # the input convolution (ops.thin_conv), where the generator runs its layers itself (with our norms)
        assert sum("thin_conv" in t for t in targets) == int(compiled_norms), targets
        return (sum("instance_norm_act" in t for t in targets), sum("instance_norm" in t and "act" not in t
                                                                  for t in targets))

    ours, others = norms(True)
    assert (ours, others) == (10, 0), (ours, others)
    ours, others = norms(False)
    assert ours == 2 and others == 8, (ours, others)
    torch._dynamo.reset()
    errs = _compare_module(G, torch.compile(G, backend="aot_eager", fullgraph=True), G, x)
    torch._dynamo.reset()
    return errs


def check_k_steps(N, H, W, C, block):
    """check_branches_in_relu with every branch kernel's channel tiles cut to `block` (< C)."""
    from dmfn_fast.ops import dmfb

    real = dmfb._conv_kernel

    def small_tiles(name, dtype, pixels, C_):
        kern, kw = real(name, dtype, pixels, C_)
        tiles = ("BLOCK_CI", "BLOCK_CO") if name.startswith("wgrad") else ("BLOCK_N", "BLOCK_K")
        return kern, dict(kw, **{t: block for t in tiles})

    dmfb._conv_kernel = small_tiles
    try:
        return check_branches_in_relu("fp32", N, H, W, C)
    finally:
        dmfb._conv_kernel = real


def check_tma(N, H, W, C, TH, TW, block):
    """branches_fwd_tma (MODE 0), branches_grad_tma and branches_dgrad_tma launched directly with small tiles,
    against the row kernels (the ops' path); the forward and dgrad against float64."""
    import triton

    from dmfn_fast.kernels import dmfb_branches as kb
    from dmfn_fast.ops import dmfb as ops

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    h = cl(torch.randn(N, C, H, W))
    ws = [torch.randn(C, C, 3, 3) / (3 * C ** 0.5) for _ in range(4)]
    bs = [torch.randn(C) * 0.1 for _ in range(4)]
    w, b = ops.pack_branches(ws, bs, torch.float32)
    grid = (N * -(-H // TH) * -(-W // TW), -(-C // block))
    tiles = dict(D1=1, D2=2, D3=4, D4=8, TH=TH, TW=TW, BLOCK_N=block, BLOCK_K=block)
    unused = torch.empty(1)
    rows = ops._branches_forward(h, w, b, ops.DILATIONS, tma=False)
    out = torch.empty_like(rows)  # channels-last, as the kernel writes it
    kb.branches_fwd_tma[grid](h, w, b, out, h, unused, unused, unused, unused, N, H, W, C, MODE=0, EPI=0, **tiles)
    f64 = ops.dmfb_branches_reference(h.double(), [x.double() for x in ws], [x.double() for x in bs])
    t, mean, rstd = ops._in_act_fn(rows, None, True)
    dt = cl(torch.randn_like(t))
    sa, sb = ops._in_backward_sums(dt, t, mean, rstd, relu=True, from_y=True)
    G_rows = ops._branches_forward(h, w, b, ops.DILATIONS, grad=(dt, mean, rstd, sa, sb), tma=False)  # EPI 2
    # the grad kernels' three epilogues (dt loaded after / before the loop; suffix sums in memory / registers)
    # compute the same sums in the same order: equal to the bit
    G_epi, rows_epi = [], []
    for epi in (0, 1, 2):
        G_epi.append(torch.empty_like(out))
        kb.branches_grad_tma[grid](h, w, b, G_epi[-1], dt, mean, rstd, sa, sb, N, H, W, C, EPI=epi, **tiles)
        rows_epi.append(torch.empty_like(out))
        kb.branches_grad[(N * -(-(H * W) // 32), -(-C // block))](
            h, w, b, rows_epi[-1], dt, mean, rstd, sa, sb, N, H, W, C, D1=1, D2=2, D3=4, D4=8, UPCAST=False,
            PREC="ieee", BLOCK_P=32, BLOCK_N=block, BLOCK_K=block, EPI=epi)
    G = G_epi[0]
    # dgrad from suffix sums G of an upstream gradient dk, against autograd through the reference in float64
    dk = torch.randn(N, 4 * C, H, W, dtype=torch.float64)
    G64 = dk.view(N, 4, C, H, W).flip(1).cumsum(1).flip(1).reshape(N, 4 * C, H, W)
    h64 = h.double().requires_grad_()
    ref = torch.autograd.grad(ops.dmfb_branches_reference(h64, [x.double() for x in ws], [x.double() for x in bs]),
                              h64, dk)[0]
    Gk = cl(G64.float())
    dh = torch.empty_like(h)
    kb.branches_dgrad_tma[grid](Gk, w, dh, N, H, W, C, FLAT=0, **tiles)
    dh_flat = torch.empty_like(h)
    kb.branches_dgrad_tma[grid](Gk, w, dh_flat, N, H, W, C, FLAT=1, **tiles)
    dh_rows = ops._branches_dgrad(w, Gk, ops.DILATIONS, h, tma=False)
    dh_op = ops._branches_dgrad(w, Gk, ops.DILATIONS, h, tma=True)  # the ops' launch of it (one 16x16 tile here)
    # wgrad by TMA: tiles past the image's edge, runs of tiles across images (3 runs of 8 tiles), channel tiles
    w64 = [x.double().requires_grad_() for x in ws]
    b64 = [x.double().requires_grad_() for x in bs]
    ref_w = torch.autograd.grad(ops.dmfb_branches_reference(h.double(), w64, b64), w64 + b64, dk)
    wgs = []
    # 1 tap per program in 3 runs; 3 taps in more runs than tiles (the last programs' runs empty)
    for taps, splits in ((1, 3), (3, 40)):
        dw, db = torch.zeros(4, 9, C, C), torch.zeros(4, C)
        kb.branches_wgrad_tma[(splits, 4 * 9 // taps + 4, (C // block) ** 2)](
            h, Gk, dw, db, N, H, W, C, D1=1, D2=2, D3=4, D4=8, TH=TH, TW=TW, BLOCK_CI=block, BLOCK_CO=block,
            SPLITS=splits, TAPS=taps)
        wgs.append(ops._unpack_grads(dw, db, [torch.float32] * 8))
    wg_op = ops._unpack_grads(*ops._branches_wgrad(h, Gk, ops.DILATIONS, tma=True), [torch.float32] * 8)
    wg_rows = ops._unpack_grads(*ops._branches_wgrad(h, Gk, ops.DILATIONS, tma=False), [torch.float32] * 8)
    return [("fwd vs row kernel", _err(out, rows)), ("fwd vs float64", _err(out.double(), f64)),
            ("grad vs row kernel", _err(G, G_rows)), ("dgrad vs row kernel", _err(dh, dh_rows)),
            *[(f"grad EPI {e} vs EPI 0", _err(G_epi[e], G), 0.0) for e in (1, 2)],
            ("row grad, small tiles, vs the ops' launch", _err(rows_epi[0], G_rows)),
            *[(f"row grad EPI {e} vs EPI 0", _err(rows_epi[e], rows_epi[0]), 0.0) for e in (1, 2)],
            ("dgrad vs float64", _err(dh.double(), ref)), ("dgrad, one loop, vs float64", _err(dh_flat.double(), ref)),
            ("dgrad launched by the ops", _err(dh_op, ref)),
            *[(f"wgrad TMA, {taps} tap(s) per program, {'dw' if i < 4 else 'db'}{i % 4} vs float64",
               _err(wg[i].double(), ref_w[i])) for taps, wg in zip((1, 3), wgs) for i in range(8)],
            *[(f"wgrad TMA launched by the ops {'dw' if i < 4 else 'db'}{i % 4} vs float64",
               _err(wg_op[i].double(), ref_w[i])) for i in range(8)],
            ("wgrad TMA vs row kernel", max(_err(a, r) for a, r in zip(wgs[0], wg_rows)))]


def check_fused_norms(N, H, W):
    """The generator's encoder and decoder norms on the fused path: every [norm, ReLU, conv] run is one
    _NormReluConvEager node and the last norm+ReLU of the encoder an instance_norm_act; with gradients
    they keep fewer bytes for backward than the reference's selectively checkpointed regions; without,
    the same layers run as instance_norm_act and then the module. Output against the reference."""
    from dmfn_fast.models import Generator
    from dmfn_fast.ops import dmfb

    calls = {"node": 0, "norm": 0}
    real_apply, real_norm = dmfb._NormReluConvEager.apply, dmfb.instance_norm_act

    def node(*a):
        calls["node"] += 1
        return real_apply(*a)

    def norm(*a, **k):
        calls["norm"] += 1
        return real_norm(*a, **k)

    torch.manual_seed(3)
    G = Generator(nf=8, n_blocks=1, impl="fast")
    x = torch.cat([torch.rand(N, 3, H, W) * 2 - 1, (torch.rand(N, 1, H, W) > 0.5).float()], 1)

    def saved_bytes(impl):
        G.impl = impl
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = G(x)
        return y, sum(storages.values())

    dmfb._NormReluConvEager.apply, dmfb.instance_norm_act = node, norm
    try:
        y, fused = saved_bytes("fast")
        with_grad = dict(calls)
        calls.update(node=0, norm=0)
        with torch.no_grad():
            G(x)
        no_grad = dict(calls)
    finally:
        dmfb._NormReluConvEager.apply, dmfb.instance_norm_act = real_apply, real_norm
    y_ref, lean = saved_bytes("reference")
    # 2 encoder and 5 decoder [norm, ReLU, conv] runs, the encoder's last norm+ReLU; no grad: all 8 norms,
    # plus the fused block's own two
    assert with_grad == {"node": 7, "norm": 1} and no_grad == {"node": 0, "norm": 10}, (with_grad, no_grad)
    assert fused < lean, (fused, lean)
    return [("out", _err(y, y_ref)), ("saved bytes, fused / lean reference", fused / lean, 1.0)]


def check_compiled(N, H, W):
    """torch.compile(fullgraph=True, aot_eager) of the fused block: no graph breaks, autograd through
    the ops. Under the interpreter the ops are opaque custom ops (wrap_triton cannot trace
    interpreted kernels); the inductor path through triton_op is tested on CUDA."""
    block = _random_block(32, 16)
    x = torch.randn(N, 32, H, W)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    return _compare_module(block, compiled, block.forward_reference, x)


def check_bias_act(dtype, N, H, W, C):
    """bias_act against bias_act_reference, forward and the gradients of x and b, for each activation and
    without a bias; ReLU's forward equal to the bit (one rounding of the same fp32 sum)."""
    from dmfn_fast.ops import bias_act as ba

    dt = DTYPES[dtype]
    out = []
    for act in ba.ACTS:
        for with_bias in (True, False):
            x = torch.randn(N, C, H, W).to(dt).contiguous(memory_format=torch.channels_last)
            b = torch.randn(C).to(dt) if with_bias else None
            g = torch.randn(N, C, H, W).to(dt)
            xs, bs = _leaf(x), None if b is None else _leaf(b)
            xr, br = _leaf(x), None if b is None else _leaf(b)
            y = ba.bias_act(xs, bs, act, 0.2)
            y_ref = ba.bias_act_reference(xr, br, act, 0.2)
            assert y.is_contiguous(memory_format=torch.channels_last)
            tag = f"{act}{'' if with_bias else ' no bias'}"
            if act == "relu":
                assert torch.equal(y, y_ref), f"{tag}: ReLU forward not bit-identical"
            out.append((f"{tag} out", _err(y, y_ref)))
            grads = torch.autograd.grad(y, [t for t in (xs, bs) if t is not None], g)
            grads_ref = torch.autograd.grad(y_ref, [t for t in (xr, br) if t is not None], g)
            for name, a, r in zip(("dx", "db"), grads, grads_ref):
                out.append((f"{tag} {name}", _err(a, r)))
    return out


def check_max_pool(dtype, N):
    """max_pool2x2 against F.max_pool2d: values and input gradient equal to the bit (NaN where ATen has NaN),
    with ties (small integers), NaNs and -inf in the windows (ATen's pick: the first greater, a later NaN),
    a window of four -inf, odd heights and widths (the last row or column in no window: gradient 0), two
    channel tiles (C=80), a partial pixel tile, in fp32, fp16 and bf16 (compared in fp32 by the kernel); an
    input under 2 rows refused as ATen refuses it."""
    from dmfn_fast.ops import max_pool as mp

    dt = DTYPES[dtype]
    out = []
    for C, H, W in ((80, 13, 11), (16, 8, 6), (3, 7, 2)):
        x = torch.randint(-3, 3, (N, C, H, W)).to(dt)
        x.view(-1)[::17] = float("nan")
        x.view(-1)[5::23] = float("-inf")
        x = x.contiguous(memory_format=torch.channels_last)
        xs, xr = _leaf(x), _leaf(x)
        y, y_ref = mp.max_pool2x2(xs), mp.max_pool2x2_reference(xr)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.nan_to_num(7.0), y_ref.nan_to_num(7.0))
        g = torch.randn_like(y_ref)
        dx, dx_ref = torch.autograd.grad(y, xs, g)[0], torch.autograd.grad(y_ref, xr, g)[0]
        assert torch.equal(dx, dx_ref), f"{C}x{H}x{W}: the input gradient differs"
        out.append((f"{C}x{H}x{W} dx", _err(dx, dx_ref)))
    # a window of four -inf (not the image's first): its gradient to its first input, as ATen's CPU kernel
    x = torch.randn(N, 8, 6, 6).to(dt)
    x[:, :, 2:4, 2:4] = float("-inf")
    xs, xr = _leaf(x), _leaf(x)
    g = torch.randn(N, 8, 3, 3).to(dt)
    dx, dx_ref = (torch.autograd.grad(f(t), t, g)[0] for f, t in ((mp.max_pool2x2, xs),
                                                                   (mp.max_pool2x2_reference, xr)))
    assert torch.equal(dx, dx_ref) and torch.equal(dx[:, :, 2, 2], g[:, :, 1, 1]), "an all -inf window"
    try:
        mp.max_pool2x2(torch.randn(N, 4, 1, 5))
        raise AssertionError("a one-row input was accepted")
    except ValueError:
        pass
    return out


def check_l1_loss(dtype, N):
    """l1_mean's kernels against the loss's formula (_L1Mean, ATen's passes) on features equal to the target's
    outside a patch (as in the known region): channels-last and NCHW, with the guide g or none, 200 channels
    (two channel tiles, the second partial), 13x11 (partial tiles), one channel at 7x9 (the NCHW guide's own
    layout), several programs each over several tiles. fp32 and fp16: the gradient equal to the bit, the loss to the
    float64 sum (1e-6) and to the formula's (2 ulp); bf16 (the interpreter truncates where a GPU rounds): both
    to bf16's rounding. Every dtype: exactly 0 gradient where a == b; a NaN gives a NaN loss and the formula's
    gradient; b or g with gradients take the formula (the kernels would drop theirs); a gradient of the
    gradient (create_graph) is the formula's."""
    from dmfn_fast import losses
    from dmfn_fast.ops import l1_loss as l1

    dt = DTYPES[dtype]
    exact = dtype != "bf16"
    calls = []
    real = l1._op
    l1._op = lambda *args: calls.append(1) or real(*args)
    out = []
    try:
        for C, H, W in ((200, 13, 11), (1, 7, 9)):
            for fmt in (torch.channels_last, torch.contiguous_format):
                for guided in (True, False):
                    tag = f"C{C} {'cl' if fmt == torch.channels_last else 'nchw'} {'g' if guided else 'no g'}"
                    a = torch.relu(torch.randn(N, C, H, W)).to(dt)
                    b = a.clone()
                    # differences well above the rounding inside the patch: no near-ties, whose sign the
                    # interpreter's truncating bf16 may flip
                    step = torch.rand(N, C, H // 2 - 1, W // 2 - 2) + 0.25
                    b[:, :, 1:H // 2, 2:W // 2] += (step * torch.randn_like(step).sign()).to(dt)
                    a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
                    g = (1 + torch.rand(N, 1, H, W)).to(dt) if guided else None
                    ak, ar = _leaf(a), _leaf(a)
                    n0 = len(calls)
                    lk = losses.l1_mean(ak, b, g, impl="fast")
                    assert len(calls) == n0 + 1, f"{tag}: the kernels did not run"
                    lr = losses._L1Mean.apply(ar, b, g)
                    assert lk.dtype == lr.dtype and lk.shape == lr.shape == ()
                    gl = torch.tensor(0.75).to(dt)
                    (gk,), (gr,) = torch.autograd.grad(lk, ak, gl), torch.autograd.grad(lr, ar, gl)
                    assert gk.stride() == gr.stride(), tag
                    known = (a == b).expand_as(gk)
                    assert (gk[known] == 0).all(), f"{tag}: a gradient where a == b"
                    if exact:
                        assert torch.equal(gk, gr), f"{tag}: the gradient differs"
                    # fp32: against the float64 sum (ATen's CPU vector_norm is 1e-4 off it at 16k elements)
                    ulps = 2 * torch.finfo(dt).eps if dt != torch.float32 else 1e-6
                    want = lr if dt != torch.float32 else l1.l1_mean_reference(a.double(), b.double(),
                                                                              None if g is None else g.double())
                    out.append((f"{tag} loss", _err(lk, want), ulps if exact else 2e-2))
                    out.append((f"{tag} grad", _err(gk, gr), 0.0 if exact else 2e-2))
        a = torch.randn(N, 16, 5, 5).to(dt)
        a[0, 3, 2, 2] = float("nan")
        ak, ar, zero = _leaf(a), _leaf(a), torch.zeros_like(a)
        lk = l1.l1_mean(ak, zero)
        assert torch.isnan(lk), "a NaN"
        gk, gr = torch.autograd.grad(lk, ak)[0], torch.autograd.grad(losses._L1Mean.apply(ar, zero, None), ar)[0]
        assert torch.equal(gk, gr) or not exact, "a NaN's gradient"
        n0 = len(calls)
        for b, g in ((_leaf(a), None), (a, _leaf((1 + torch.rand(N, 1, 5, 5)).to(dt)))):
            losses.l1_mean(_leaf(a), b, g, impl="fast").backward()
            assert len(calls) == n0 and (b if g is None else g).grad is not None, "a gradient of b or g dropped"
        # a gradient of the gradient: linear in the loss's gradient, as the formula's
        a = torch.randn(N, 16, 5, 5).to(dt)
        g = (1 + torch.rand(N, 1, 5, 5)).to(dt)
        b = torch.randn_like(a)
        w = [torch.tensor(1.5, dtype=dt, requires_grad=True) for _ in range(2)]
        second = []
        for fn, wi in ((l1.l1_mean, w[0]), (losses._L1Mean.apply, w[1])):
            at = _leaf(a)
            (ga,) = torch.autograd.grad(wi * fn(at, b, g), at, create_graph=True)
            second.append(torch.autograd.grad((ga.float() * torch.linspace(-1, 1, ga.numel()).view_as(ga)).sum(),
                                              wi)[0])
        # bf16: the formula's second derivative rounds each product and its sum in bf16, the kernels' in fp32
        out.append(("gradient of the gradient", _err(second[0], second[1]), 1e-5 if exact else 5e-2))
        # under autocast (training's), both paths give an fp32 loss, as ATen's autocast vector_norm gave
        # _L1Mean (the kernels had given a's dtype: the H200's s15 graphed step logged bf16-rounded terms), and
        # the same gradient in a's dtype
        if dt != torch.float32:
            a = torch.relu(torch.randn(N, 16, 5, 7)).to(dt)
            b, g = torch.relu(torch.randn_like(a.float())).to(dt), (1 + torch.rand(N, 1, 5, 7)).to(dt)
            ak, ar = _leaf(a), _leaf(a)
            with torch.autocast("cpu", dtype=dt):
                lk, lr = l1.l1_mean(ak, b, g), losses._L1Mean.apply(ar, b, g)
            assert lk.dtype == lr.dtype == torch.float32, (lk.dtype, lr.dtype)
            (gk,), (gr,) = (torch.autograd.grad(x, y, torch.tensor(0.75)) for x, y in ((lk, ak), (lr, ar)))
            assert gk.dtype == gr.dtype == dt and (torch.equal(gk, gr) or not exact), "autocast: the gradient differs"
            out.append(("autocast: fp32 loss", _err(lk, lr), 1e-6 if exact else 2e-2))  # bf16: truncated here
        # a sum past fp16's largest value (65504; the H200's [16, 64, 256, 256] fp16 loss was inf): the mean is 1
        a = torch.ones(1, 8, 100, 100).to(dt)
        for name, fn in (("kernels", l1.l1_mean), ("_L1Mean", losses._L1Mean.apply)):
            out.append((f"{name}: mean of a sum past 65504", _err(fn(_leaf(a), torch.zeros_like(a), None),
                                                                 torch.tensor(1.0)), 0.0))
    finally:
        l1._op = real
    return out


def check_centroid_triton(dtype, N, C, H, W, grid):
    """The centroid loss's Triton forward (ops/centroid_align.py, kernels/centroid_sums.py), every tensor its
    launcher allocates filled with garbage first (a ticket of 7, NaN elsewhere: the kernels must write what they
    read): its stats against the C++ op's (CPU kernel) per component, its loss against float64, the same bits
    on a rerun, in runs of pixels (DMFN_CENTROID_TRITON=1) and whole planes (3), each also with map b's pixels
    half a run ahead of map a's (DMFN_CENTROID_APART=1), the runs also with their steps interleaved over the
    image's programs (DMFN_CENTROID_INTERLEAVE=1), with and without APART, and with a program a map
    (DMFN_CENTROID_ONE_MAP=1), in order and interleaved. Then through
    centroid_align_loss with the switch at 1 (the Triton forward, the C++ backward), 2 (both in Triton, both
    maps' gradients, channels-last), 3 (2 in whole planes) and 4 (whole planes, the C++ backward, both maps'
    gradients): the loss and gradients against
    float64 on `grid`; an NCHW map, the authors' grid (its NCHW means) or the switch at 0 take the C++ op. The
    maps are exact in their dtype, so the sums' error is fp32's; fp16/bf16 gradients are rounded once by the
    backward."""
    from dmfn_fast.ops import centroid_align as ca

    assert ca.extension_available(), ca._ext_state["why"]
    dt = DTYPES[dtype]
    cl = torch.channels_last
    a = torch.rand(N, C, H, W).to(dt).contiguous(memory_format=cl)
    b = torch.rand(N, C, H, W).to(dt).contiguous(memory_format=cl)
    plan = ca.triton_forward_plan(a.shape, a.element_size(), 3)
    real_empty = torch.empty

    def dirty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(7 if t.dtype == torch.int32 else float("nan"))
    loss_c, st_c = torch.ops.dmfn_fast.centroid_align_fwd(a, b)
    errs = []
    # runs of whole pixels (1) or whole planes (3) a program; APART: map b's pixels half a run ahead of map a's;
    # INTERLEAVE: the runs' steps interleaved over an image's programs (APART: map b half an image ahead); ONE_MAP:
    # a program a map (APART moot: set here to show it is ignored)
    for mode, apart, inter, one in (("1", "0", "0", "0"), ("1", "1", "0", "0"), ("1", "0", "1", "0"),
                                    ("1", "1", "1", "0"), ("3", "0", "0", "0"), ("3", "1", "0", "0"),
                                    ("1", "1", "0", "1"), ("1", "0", "1", "1")):
        os.environ.update(DMFN_CENTROID_TRITON=mode, DMFN_CENTROID_APART=apart, DMFN_CENTROID_INTERLEAVE=inter,
                          DMFN_CENTROID_ONE_MAP=one)
        torch.empty = dirty
        try:
            loss, st = ca._fwd_triton_fn(a, b)
            loss2, st2 = ca._fwd_triton_fn(a, b)
        finally:
            torch.empty = real_empty
            for k in ("TRITON", "APART", "INTERLEAVE", "ONE_MAP"):
                os.environ.pop(f"DMFN_CENTROID_{k}")
        assert torch.equal(loss, loss2) and torch.equal(st, st2), f"mode {mode}: not the same bits on a rerun"
        mode += " interleaved" * (inter == "1") + " apart" * (apart == "1") + " one map" * (one == "1")
        errs += [(f"mode {mode} stats {k} vs C++ op", _err(st[..., i], st_c[..., i]), 1e-5)
                 for i, k in enumerate(("S0", "cx", "cy"))]
        errs.append((f"mode {mode} loss vs float64",
                     _err(loss, ca.centroid_align_loss_reference(a.double(), b.double())), 1e-5))
    calls = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = ca._fwd_triton, ca._bwd_triton

    def counted(name, real):
        def run(*args):
            calls[name] += 1
            return real(*args)
        return run
    ca._fwd_triton, ca._bwd_triton = counted("fwd", real_fwd), counted("bwd", real_bwd)
    want = 1 if grid == "paper" else 0  # the authors' grid: the op on NCHW means over H, the C++ forward
    try:
        # 1: the Triton forward, the C++ backward; 2: both passes in Triton, both maps' gradients; 3: 2 with the
        # forward in whole planes; 4: that forward, the C++ backward of both maps
        for mode, both in (("1", False), ("2", True), ("3", True), ("4", True)):
            os.environ["DMFN_CENTROID_TRITON"] = mode
            x, y = _leaf(a), (_leaf(b) if both else b)
            xr, yr = _leaf(a.double()), (_leaf(b.double()) if both else b.double())
            grads = torch.autograd.grad(ca.centroid_align_loss(x, y, impl="fast", grid=grid), (x, y)[:1 + both])
            lr = ca.centroid_align_loss_reference(xr, yr, grid)
            errs.append((f"{grid} loss, mode {mode}", _err(ca.centroid_align_loss(a, b, impl="fast", grid=grid),
                                                          lr), 1e-5))
            for name, gk, gref in zip(("out", "tgt"), grads, torch.autograd.grad(lr, (xr, yr)[:1 + both])):
                errs.append((f"{grid} grad {name}, mode {mode}", _err(gk, gref), TOL[dtype]))
                if mode != "1" and want:
                    assert gk.is_contiguous(memory_format=cl), f"{name} gradient not channels-last"
        assert calls == {"fwd": 8 * want, "bwd": 4 * want}, calls  # modes 2 and 3: a gradient a map
        ca.centroid_align_loss(a.contiguous(), b.contiguous(), impl="fast", grid=grid)  # NCHW: the C++ forward
        os.environ["DMFN_CENTROID_TRITON"] = "0"
        ca.centroid_align_loss(a, b, impl="fast", grid=grid)
        assert calls == {"fwd": 8 * want, "bwd": 4 * want}, calls
    finally:
        ca._fwd_triton, ca._bwd_triton = real_fwd, real_bwd
        os.environ.pop("DMFN_CENTROID_TRITON")
    run, runs = plan[-2:]
    covered = 0 <= H * W - (runs - 1) * run <= run
    errs.append((f"plan {plan}: its runs cover the {H * W} pixels once", float(not covered), 0.0))
    return errs


def check_centroid_measured_plan(N, C, H, W):
    """MEASURED_PLANS (ops/centroid_align.py) through centroid_align_loss with no switch set: its plan for the
    maps' GPU and dtype runs (here the Triton forward a map a program, and the Triton backward: every switch it
    sets is read), the loss and both gradients against float64; fp16 maps, which it has no plan for, and any
    switch set (even to its default) take the C++ op."""
    from dmfn_fast.ops import centroid_align as ca

    for n in ca.PLAN_SWITCHES:
        os.environ.pop(n, None)
    cl = torch.channels_last
    a, b = (torch.rand(N, C, H, W).contiguous(memory_format=cl) for _ in range(2))
    x, y, xr, yr = _leaf(a), _leaf(b), _leaf(a.double()), _leaf(b.double())
    calls = []
    real = ca._fwd_triton, ca._bwd_triton, ca.triton_forward_plan, ca._capability_major, ca.MEASURED_PLANS
    ca._fwd_triton = lambda *args: calls.append("fwd") or real[0](*args)
    ca._bwd_triton = lambda *args: calls.append("bwd") or real[1](*args)

    def plan(*args):  # the forward's one_map argument; the backward's plan takes none
        calls.append(("one map", args[5]) if len(args) > 5 else "plan")
        return real[2](*args)
    ca.triton_forward_plan = plan
    ca._capability_major = lambda f: 9  # a CPU tensor's is None: an H100's here
    ca.MEASURED_PLANS = {(9, torch.float32): {"DMFN_CENTROID_TRITON": "2", "DMFN_CENTROID_ONE_MAP": "1"}}
    try:
        loss = ca.centroid_align_loss(x, y, impl="fast")
        grads = torch.autograd.grad(loss, (x, y))
        assert calls == ["fwd", ("one map", True), "bwd", "plan", "bwd", "plan"], calls
        ref = ca.centroid_align_loss_reference(xr, yr)
        errs = [("loss vs float64", _err(loss, ref), 1e-5)]
        errs += [(f"grad {k} vs float64", _err(g, gr), 1e-5)
                 for k, g, gr in zip(("out", "tgt"), grads, torch.autograd.grad(ref, (xr, yr)))]
        calls.clear()
        ca.centroid_align_loss(a.half(), b.half(), impl="fast")  # no plan for fp16: the C++ op
        os.environ["DMFN_CENTROID_WAVES"] = "1"
        torch.autograd.grad(ca.centroid_align_loss(x, y, impl="fast"), (x, y))
        assert calls == [], calls
    finally:
        ca._fwd_triton, ca._bwd_triton, ca.triton_forward_plan, ca._capability_major, ca.MEASURED_PLANS = real
        os.environ.pop("DMFN_CENTROID_WAVES", None)
    return errs


def check_centroid_finish(NC, R):
    """centroid_finish (kernels/centroid_sums.py) on R runs of random partial sums of NC planes (not a multiple of
    a program's planes: the last program's are partly masked), loaded 2 runs a round (3 rounds, the last
    partial) and all at once: its stats and loss against float64 sums of the same partial sums, every output
    filled with NaN first, and the ticket's last taker the only program to write the loss."""
    from dmfn_fast.kernels import centroid_sums as kc

    g = torch.Generator().manual_seed(6)
    part = torch.rand(R * 6 * NC, generator=g) + 0.5  # S0 terms stay positive; the others any sign below
    part.view(R, 6, NC)[:, [1, 2, 4, 5]] -= 1.0
    e0, ex, ey = 3e-4, 2e-5, -1e-5
    sums = part.double().view(R, 6, NC).sum(0)
    want = []
    for m in range(2):
        s0 = sums[3 * m] + e0
        want.append(torch.stack([s0, (sums[3 * m + 1] + ex) / s0, (sums[3 * m + 2] + ey) / s0], -1))
    want_stats = torch.stack(want)
    want_loss = (want_stats[0, :, 1:] - want_stats[1, :, 1:]).pow(2).mean()
    errs = []
    programs = -(-NC // kc.FINISH_PLANES)
    for runs in (2, 8):
        stats = torch.full((2, NC, 3), float("nan"))
        loss_parts = torch.full((programs,), float("nan"), dtype=torch.float64)
        ticket, loss = torch.zeros(1, dtype=torch.int32), torch.full((), float("nan"))
        kc.centroid_finish[(programs,)](part, stats, loss_parts, ticket, loss, NC, R, e0, ex, ey,
                                        PLANES=kc.FINISH_PLANES, RUNS=runs, PARTS=kc.PARTS, num_warps=kc.FINISH_WARPS)
        errs.append((f"{runs} runs a round: stats vs float64", _err(stats, want_stats), 1e-6))
        errs.append((f"{runs} runs a round: loss vs float64", _err(loss, want_loss), 1e-6))
        errs.append((f"{runs} runs a round: every program took the ticket", float(ticket.item() != programs), 0.0))
    return errs


def check_l1_in_loss(N, H, W):
    """DMFNLoss with impl="fast" (the L1 kernels for its guided, VGG and discriminator feature-matching terms,
    8 calls) against impl="reference" (the VGG's kernels off in both, so the features are the same): each term
    and the gradients into the output and into the discriminator's features, fp32."""
    from dmfn_fast import losses
    from dmfn_fast.ops import bias_act, max_pool
    from dmfn_fast.ops import l1_loss as l1
    from dmfn_fast.vgg import VGG19Features

    torch.manual_seed(4)
    vgg = VGG19Features("random")
    tgt = (torch.rand(N, 3, H, W) * 2 - 1).contiguous(memory_format=torch.channels_last)
    out0 = (tgt + 0.2 * torch.randn_like(tgt)).clamp(-1, 1).contiguous(memory_format=torch.channels_last)
    feats = [torch.relu(torch.randn(N, c, H >> k, W >> k)).contiguous(memory_format=torch.channels_last)
             for k, c in enumerate((8, 16, 32))]
    real_logits, fake_logits = torch.randn(N, 1), torch.randn(N, 1)
    calls = []
    real_op, real_fused, real_pool = l1._op, bias_act.use_fast, max_pool.use_fast
    l1._op = lambda *args: calls.append(1) or real_op(*args)
    bias_act.use_fast = max_pool.use_fast = lambda *args: False
    res = {}
    try:
        for impl in ("fast", "reference"):
            crit = losses.DMFNLoss(vgg, impl=impl)
            o, ff = _leaf(out0), [_leaf(f) for f in feats]
            fr = [(f + 0.1).detach() for f in feats]
            n0 = len(calls)
            total, terms = crit(o, tgt, real_logits, fake_logits, ff, fr)
            res[impl] = (terms, torch.autograd.grad(total, [o] + ff), len(calls) - n0)
    finally:
        l1._op, bias_act.use_fast, max_pool.use_fast = real_op, real_fused, real_pool
    assert res["fast"][2] == 2 + 3 + 3 and res["reference"][2] == 0, (res["fast"][2], res["reference"][2])
    # the reference's terms sum fp32 by ATen's CPU vector_norm, about 1e-4 off the float64 sum here (the
    # kernels' 1e-7: check_l1_loss)
    errs = [(f"term {k}", _err(res["fast"][0][k], v), 5e-4) for k, v in res["reference"][0].items()]
    errs += [(f"grad {i}", _err(a, b), 1e-5) for i, (a, b) in enumerate(zip(res["fast"][1], res["reference"][1]))]
    return errs


def check_vgg_fused(N, H, W):
    """The VGG with each convolution's bias and ReLU in the kernel, with its pools by the max-pool kernels, and
    with both, against its plain layers on the same channels-last input (as training feeds it): the five
    features and the input gradient equal to the bit in fp32, with and without the stages recomputed. (Against an NCHW input the features differ by the
    convolutions' rounding, and a max-pool near-tie can then send a gradient elsewhere: not comparable.)"""
    from dmfn_fast.vgg import VGG19Features

    torch.manual_seed(2)
    vgg = VGG19Features("random")
    for m in vgg.features:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.bias, 0.0, 0.5)  # a bias that shows if it is dropped
    x = (torch.rand(N, 3, H, W) * 2 - 1).contiguous(memory_format=torch.channels_last)
    g = [torch.randn(N, c, H >> k, W >> k) for k, c in enumerate((64, 128, 256, 512, 512))]
    from dmfn_fast.ops import max_pool as mp

    out = []
    real_pool = mp.max_pool2x2
    for recompute in (False, True):
        for kernels in (dict(fused=True), dict(pool=True), dict(fused=True, pool=True)):
            tag = f"recompute={recompute} {'+'.join(kernels)}"
            xs, xr = _leaf(x), _leaf(x)
            pools = []
            mp.max_pool2x2 = lambda t: pools.append(1) or real_pool(t)
            try:
                fs = vgg(xs, recompute=recompute, **kernels)
            finally:
                mp.max_pool2x2 = real_pool
            assert len(pools) == (4 if "pool" in kernels else 0), (tag, len(pools))  # the four pools, forward
            fr = vgg(xr, recompute=recompute)
            for k, (a, r) in enumerate(zip(fs, fr)):
                assert torch.equal(a, r), f"{tag} relu{k + 1}_1 differs"
                out.append((f"{tag} relu{k + 1}_1", _err(a, r)))
            dxs = torch.autograd.grad(fs, xs, g)[0]
            dxr = torch.autograd.grad(fr, xr, g)[0]
            assert torch.equal(dxs, dxr), f"{tag}: the input gradient differs"
            out.append((f"{tag} dx", _err(dxs, dxr)))
    # a layer with hooks of any kind keeps the plain layers, so its hooks run
    fired = []
    handles = [vgg.features[0].register_full_backward_pre_hook(lambda m, go: fired.append("conv backward pre")),
               vgg.features[1].register_full_backward_hook(lambda m, gi, go: fired.append("relu backward")),
               vgg.features[1].register_forward_hook(lambda m, i, o: fired.append("relu forward"))]
    vgg(_leaf(x), fused=True, pool=True)[0].sum().backward()
    for h in handles:
        h.remove()
    assert sorted(fired) == ["conv backward pre", "relu backward", "relu forward"], fired
    return out


def check_generator_inference(N, H, W):
    """The fast generator without gradients: its first convolution's bias and ReLU in the kernel (once, and
    equal to the bit to that layer's plain output), the whole output against the reference model."""
    from dmfn_fast.models import Generator
    from dmfn_fast.ops import bias_act as ba
    from dmfn_fast.ops import thin_conv as tc

    torch.manual_seed(3)
    G = Generator(nf=16, n_blocks=2, impl="fast")
    first = G.encoder[0].conv
    torch.nn.init.normal_(first.bias, 0.0, 0.5)
    G_ref = Generator(nf=16, n_blocks=2, impl="reference", init=False)
    G_ref.load_state_dict(G.state_dict())
    x = torch.cat([torch.rand(N, 3, H, W) * 2 - 1, (torch.rand(N, 1, H, W) > 0.5).float()], 1)
    calls = []
    real, thin = ba.bias_act, tc.use_fast
    ba.bias_act = lambda *a, **k: calls.append(1) or real(*a, **k)
    tc.use_fast = lambda *a, **k: False  # the thin-input kernel would take the first convolution
    try:
        with torch.no_grad():
            y = G(x)
    finally:
        ba.bias_act, tc.use_fast = real, thin
    assert len(calls) == 1, f"the first convolution took the kernel {len(calls)} times"
    with torch.no_grad():
        xc = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(ba.conv_bias_act(first, xc, "relu"), torch.relu(first(xc)))
        # the fast generator's norms differ from the reference's by rounding: 7.5e-6 here, about as much
        # with the first convolution's plain layers (the bit-equal check above is the kernel's own)
        return [("out (relative L2)", _err(y, G_ref(x), l2=True), 3e-5)]


# (C, H, W, O, kernel, stride, padding): the generator's input convolution, a 2-channel 5x5 stride-2 one, an
# 8-channel 3x3 one with a partial output tile (O=24), one channel, stride 2 without padding
# (C, H, W, O, K, stride, padding); 3 channels (the discriminator's image input) run as 4
THIN_SHAPES = ((4, 13, 11, 64, 5, 1, 2), (2, 13, 11, 64, 5, 2, 2), (3, 13, 11, 64, 5, 2, 2), (8, 9, 7, 24, 3, 1, 1),
               (1, 6, 5, 16, 3, 2, 0))


def check_thin_conv(dtype, N):
    """thin_conv against thin_conv_reference, forward and the gradients of x, w and b, for each activation
    and shape (THIN_SHAPES with this N), the last one without a bias. The weight gradient sums over several
    programs' runs of pixel tiles (3 programs of 16-pixel tiles under the interpreter), some idle. (The input
    gradient is ATen's activation backward and convolution dgrad: it checks their wiring, in fp32 to the
    bit.) Under deterministic mode the gradients are ATen's, in fp32 to the bit. Under a dispatch mode that
    is not a selective checkpoint's, the call goes through the op, which the mode sees."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dmfn_fast.ops import thin_conv as tc

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))
    seen = []
    with Seen():
        tc.thin_conv(torch.randn(N, 4, 9, 7).to(DTYPES[dtype]), torch.randn(8, 4, 3, 3).to(DTYPES[dtype]))
    assert any("thin_conv" in f for f in seen), seen

    dt = DTYPES[dtype]
    out = []
    for C, H, W, O, K, stride, pad in THIN_SHAPES:
        for act in tc.ACTS:
            with_bias = C != 1
            x = torch.randn(N, C, H, W).to(dt).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(O, C, K, K) / (K * C ** 0.5)).to(dt)
            b = torch.randn(O).to(dt) if with_bias else None
            fast = [_leaf(t) for t in (x, w, b) if t is not None]
            ref = [_leaf(t.float()) for t in (x, w, b) if t is not None]
            y = tc.thin_conv(*fast[:2], fast[2] if with_bias else None, stride, pad, act)
            y_ref = tc.thin_conv_reference(*ref[:2], ref[2] if with_bias else None, stride, pad, act)
            assert y.dtype == dt and y.shape == y_ref.shape and y.is_contiguous(memory_format=torch.channels_last)
            g = torch.randn_like(y_ref)
            tag = f"C{C} {K}x{K}/{stride} O{O} {act}"
            out.append((f"{tag} out", _err(y, y_ref)))
            for name, a, r in zip(("dx", "dw", "db"), torch.autograd.grad(y, fast, g.to(dt)),
                                  torch.autograd.grad(y_ref, ref, g)):
                out.append((f"{tag} {name}", _err(a, r)))
    if dtype == "fp32":  # deterministic mode: the forward by the kernel, the gradients by ATen (no atomics)
        torch.use_deterministic_algorithms(True)
        try:
            fast, ref = [_leaf(x), _leaf(w)], [_leaf(x), _leaf(w)]
            grads = torch.autograd.grad(tc.thin_conv(*fast, None, stride, pad).sum(), fast)
            grads_ref = torch.autograd.grad(tc.thin_conv_reference(*ref, None, stride, pad).sum(), ref)
            assert all(torch.equal(a, r) for a, r in zip(grads, grads_ref)), "deterministic gradients"
        finally:
            torch.use_deterministic_algorithms(False)
    return out


def check_generator_thin(N, H, W):
    """The fast generator's input convolution and ReLU by the thin-input kernel: once without gradients; in
    training once forward and once again in backward (its checkpointed region recomputes it, under the
    selective checkpoint's dispatch mode, through the eager Function); output and every gradient against the
    reference generator (fp32). Biases before an instance norm have zero true gradient: each parameter's
    gradient is compared over its module's largest."""
    from dmfn_fast.models import Generator
    from dmfn_fast.ops import thin_conv as tc

    torch.manual_seed(4)
    G = Generator(nf=16, n_blocks=1, impl="fast")
    torch.nn.init.normal_(G.encoder[0].conv.bias, 0.0, 0.5)  # a bias that shows if it is dropped
    G_ref = Generator(nf=16, n_blocks=1, impl="reference", init=False)
    G_ref.load_state_dict(G.state_dict())
    x = torch.cat([torch.rand(N, 3, H, W) * 2 - 1, (torch.rand(N, 1, H, W) > 0.5).float()], 1)
    calls = []
    real_fn, real_fwd = tc._ThinConvEager.apply, tc._forward
    tc._ThinConvEager.apply = lambda *a: calls.append("function") or real_fn(*a)
    tc._forward = lambda *a: calls.append("kernel") or real_fwd(*a)
    os.environ["DMFN_RECOMPUTE"] = "1"  # the checkpointed region (read per call); a child process of its own
    try:
        with torch.no_grad():
            y = G(x)
        assert calls == ["kernel"], calls
        calls.clear()
        y_train = G(x)
        g = torch.randn_like(y_train)
        y_train.backward(g)
        assert calls == ["function", "kernel"] * 2, calls
    finally:
        tc._ThinConvEager.apply, tc._forward = real_fn, real_fwd
    y_ref = G_ref(x)
    y_ref.backward(g)
    out = [("inference out (relative L2)", _err(y, y_ref, l2=True), 3e-5),
           ("training out (relative L2)", _err(y_train, y_ref, l2=True), 3e-5)]
    refs = dict(G_ref.named_parameters())
    for name, p in G.named_parameters():
        module = name.rsplit(".", 1)[0]
        scale = max(refs[n].grad.abs().max().item() for n in refs if n.rsplit(".", 1)[0] == module)
        out.append((f"grad {name}", _err(p.grad, refs[name].grad, scale), 1e-4))
    return out


def check_discriminator_thin(N, nf):
    """The fast discriminator's two 3-channel input convolutions (5x5, stride 2) by the thin-input kernel (the
    image padded to 4 channels): logits, the local features and the gradients of both inputs and of every
    parameter against the reference discriminator (fp32, same weights, batch-statistics norms)."""
    from dmfn_fast.models import Discriminator
    from dmfn_fast.ops import thin_conv as tc

    torch.manual_seed(5)
    D = Discriminator(nf=nf, impl="fast")
    D_ref = Discriminator(nf=nf, impl="reference", init=False)
    D_ref.load_state_dict(D.state_dict())
    cl = torch.channels_last
    xl = (torch.rand(N, 3, 128, 128) * 2 - 1).contiguous(memory_format=cl)
    xg = (torch.rand(N, 3, 256, 256) * 2 - 1).contiguous(memory_format=cl)
    calls = []
    real = tc._forward
    tc._forward = lambda *a: calls.append(a[0].shape[1]) or real(*a)
    try:
        ins = [_leaf(xl), _leaf(xg)]
        logits, feats = D(*ins)
    finally:
        tc._forward = real
    assert calls == [3, 3], calls  # the local path's and the global path's input convolution
    ins_ref = [_leaf(xl), _leaf(xg)]
    logits_ref, feats_ref = D_ref(*ins_ref)
    gl = torch.randn_like(logits)
    gf = [torch.randn_like(f) for f in feats]
    grads = torch.autograd.grad([logits] + feats, ins + list(D.parameters()), [gl] + gf)
    grads_ref = torch.autograd.grad([logits_ref] + feats_ref, ins_ref + list(D_ref.parameters()), [gl] + gf)
    out = [("logits", _err(logits, logits_ref), 1e-5)]
    out += [(f"local feature {i + 1}", _err(f, r), 1e-5) for i, (f, r) in enumerate(zip(feats, feats_ref))]
    out += [(f"grad {n}", _err(a, r), 1e-5) for n, a, r in zip(("x_local", "x_global"), grads, grads_ref)]
    # a convolution's bias before a batch norm has zero true gradient: each parameter's gradient is compared
    # over its module's largest
    names = [n for n, _ in D.named_parameters()]
    grads_ref = dict(zip(names, grads_ref[2:]))
    for n, a in zip(names, grads[2:]):
        scale = max(grads_ref[m].abs().max().item() for m in names if m.rsplit(".", 1)[0] == n.rsplit(".", 1)[0])
        out.append((f"grad {n}", _err(a, grads_ref[n], scale), 1e-5))
    return out


def check_opcheck(N, H, W, C, device="cpu"):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) of every DMFB op,
    forward and backward. A failure raises; each op that passes reports 0."""
    from dmfn_fast.ops import dmfb

    ops = torch.ops.dmfn_fast
    cl = torch.channels_last
    dil = [1, 2, 4, 8]
    h = torch.relu(torch.randn(N, C, H, W, device=device)).contiguous(memory_format=cl).requires_grad_()
    w, b = dmfb.pack_branches([torch.randn(C, C, 3, 3, device=device) / 12 for _ in range(4)],
                              [torch.randn(C, device=device) for _ in range(4)], torch.float32)
    w, b = w.requires_grad_(), b.requires_grad_()
    x = torch.randn(N, 4 * C, H, W, device=device).contiguous(memory_format=cl).requires_grad_()
    res = torch.randn_like(x)
    g = torch.randn(N, 4 * C, H, W, device=device).contiguous(memory_format=cl)
    t, mean, rstd = ops.dmfb_branches_in_relu(h.detach(), w.detach(), b.detach(), dil)
    _, xm, xr = ops.instance_norm_act(x.detach(), None, True)
    xt = torch.randn(N, 4, H, W, device=device).contiguous(memory_format=cl).requires_grad_()
    wt = (torch.randn(C, 4, 5, 5, device=device) / 10).requires_grad_()
    yt = ops.thin_conv(xt.detach(), wt.detach(), None, 1, 2, 1, 0.2)
    yp = ops.max_pool2x2(x.detach())
    from dmfn_fast.ops import centroid_align as ca  # noqa: F401  (defines its Triton forward op)
    from dmfn_fast.ops import l1_loss  # noqa: F401  (defines its ops)

    assert ca.extension_available(), ca._ext_state["why"]  # the Triton forward's backward is the C++ op's
    ac = torch.rand(N, C, H, W, device=device).contiguous(memory_format=cl).requires_grad_()

    xl = x.detach().requires_grad_()
    gl = 1 + torch.rand(N, 1, H, W, device=device)
    xn = torch.randn(N, 3, H, W, device=device).requires_grad_()  # NCHW
    _, sl = ops.l1_mean_sign(xl.detach(), res, gl)
    cases = [
        ("dmfb_branches", ops.dmfb_branches.default, (h, w, b, dil)),
        ("dmfb_branches_in_relu", ops.dmfb_branches_in_relu.default, (h, w, b, dil)),
        ("instance_norm_act relu", ops.instance_norm_act.default, (x, None, True)),
        ("instance_norm_act residual", ops.instance_norm_act.default, (x, res, False)),
        ("dmfb_branches_backward", ops.dmfb_branches_backward.default, (h.detach(), w.detach(), g, dil, True)),
        ("dmfb_branches_in_relu_backward", ops.dmfb_branches_in_relu_backward.default,
         (h.detach(), w.detach(), b.detach(), t, mean, rstd, g, dil)),
        ("instance_norm_act_backward", ops.instance_norm_act_backward.default, (g, x.detach(), xm, xr, True)),
        ("bias_act relu", ops.bias_act.default, (x, torch.randn(4 * C, device=device).requires_grad_(), 1, 0.2)),
        ("bias_act lrelu no bias", ops.bias_act.default, (x, None, 2, 0.2)),
        ("thin_conv relu", ops.thin_conv.default, (xt, wt, torch.randn(C, device=device).requires_grad_(), 1, 2,
                                                   1, 0.2)),
        ("thin_conv lrelu no bias stride 2", ops.thin_conv.default, (xt, wt, None, 2, 2, 2, 0.2)),
        ("thin_conv 3 channels no act stride 2", ops.thin_conv.default,
         (xt[:, :3].contiguous(memory_format=cl).detach().requires_grad_(), wt[:, :3].detach().requires_grad_(),
          torch.randn(C, device=device).requires_grad_(), 2, 2, 0, 0.2)),
        ("thin_conv_wgrad", ops.thin_conv_wgrad.default, (xt.detach(), yt, torch.randn_like(yt), wt.detach(), 1, 2,
                                                          1, 0.2)),
        ("max_pool2x2", ops.max_pool2x2.default, (x,)),
        ("max_pool2x2_backward", ops.max_pool2x2_backward.default, (x.detach(), torch.randn_like(yp))),
        ("l1_mean_sign guided", ops.l1_mean_sign.default, (xl, res, gl)),
        ("l1_mean_sign nchw", ops.l1_mean_sign.default, (xn, torch.randn_like(xn), None)),
        ("l1_mean_sign nchw guided", ops.l1_mean_sign.default, (xn, torch.randn_like(xn), gl)),
        ("l1_mean_sign_backward", ops.l1_mean_sign_backward.default, (sl, gl, torch.tensor(0.5, device=device))),
        ("centroid_align_fwd_triton", ops.centroid_align_fwd_triton.default,
         (ac, torch.rand_like(ac).contiguous(memory_format=cl))),
        ("centroid_align_bwd_triton", ops.centroid_align_bwd_triton.default,
         (torch.tensor(0.5, device=device), ops.centroid_align_fwd(ac.detach(), ac.detach().flip(0))[1],
          ac.detach(), 1)),
    ]
    missed = set(dmfb.DEFINED) - {name.split()[0] for name, _, _ in cases}
    assert not missed, f"ops with no opcheck case: {missed}"
    out = []
    for name, op, args in cases:
        torch.library.opcheck(op, args)
        out.append((f"opcheck {name}", 0.0))
    return out


def check_eager_path(N, H, W, autocast=False):
    """Plain eager calls that need gradients run autograd.Functions (_DMFBEager for the block,
    _BranchesInReluEager for the branch op alone), not the registered ops; both run the same convolutions and
    kernels, so outputs and every gradient must agree bit for bit (tolerance 0). Under bf16 autocast one
    difference is by design: the block's op path rounds the branch weight and bias gradients to the packed
    weights' bf16 before autograd casts them back to the fp32 parameters; _DMFBEager casts the fp32 sums
    straight to fp32. Those agree to bf16's rounding (2^-8)."""
    import contextlib

    from dmfn_fast.ops import dmfb

    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        errs = _check_eager_path(dmfb, N, H, W)
    return [(label, err, 2.0 ** -8 if autocast and label.startswith("grad d") else 0.0) for label, err, _ in errs]


def _check_eager_path(dmfb, N, H, W):

    block = _random_block(32, 16)
    x = torch.randn(N, 32, H, W)
    calls = {"block": 0, "branches": 0}
    real_block, real_branches = dmfb._DMFBEager.apply, dmfb._BranchesInReluEager.apply

    def counting(name, real):
        def run(*args):
            calls[name] += 1
            return real(*args)
        return run

    dmfb._DMFBEager.apply = counting("block", real_block)
    dmfb._BranchesInReluEager.apply = counting("branches", real_branches)
    try:
        errs = _compare_module(block, block, lambda t: _via_ops(block, t), x)
        h = torch.randn(N, 16, H, W).contiguous(memory_format=torch.channels_last)
        p = block.params()
        branches = torch.nn.ModuleList([block.d1, block.d2, block.d3, block.d4])
        branches.zero_grad()
        errs += [(f"branch op {label}", err) for label, err in _compare_module(
            branches, lambda t: dmfb.branches_in_relu(t, p.branch_weights, p.branch_biases),
            lambda t: _via_ops(None, t, lambda u: dmfb.branches_in_relu(u, p.branch_weights, p.branch_biases)), h)]
    finally:
        dmfb._DMFBEager.apply, dmfb._BranchesInReluEager.apply = real_block, real_branches
    assert calls == {"block": 1, "branches": 1}, calls  # once each for the compared eager calls
    return [(label, err, 0.0) for label, err in errs]


def check_wgrad_splits(N, C, H, W, BP, BC, split, taps9=False):
    """branches_wgrad (taps9: branches_wgrad9) launched directly: dW_j[tap, ci, co] and db_j against torch's
    conv2d_weight in float64."""
    from dmfn_fast.kernels import dmfb_branches as kb

    h, G = torch.randn(N, H, W, C), torch.randn(N, H, W, 4 * C)  # channels-last [N, H, W, C] / [N, H, W, 4C]
    NP = N * H * W
    dw, db = torch.zeros(4, 9, C, C), torch.zeros(4, C)
    kern, programs = (kb.branches_wgrad9, 8) if taps9 else (kb.branches_wgrad, 40)
    grid = (-(-NP // split), programs, (-(-C // BC)) ** 2)
    kern[grid](h, G, dw, db, NP, H, W, C, split, D1=1, D2=2, D3=4, D4=8, UPCAST=False, PREC="ieee",
               BLOCK_P=BP, BLOCK_CI=BC, BLOCK_CO=BC)
    errs = []
    for j, d in enumerate((1, 2, 4, 8)):
        g = G[..., j * C:(j + 1) * C].permute(0, 3, 1, 2).double()
        ref = torch.nn.grad.conv2d_weight(h.permute(0, 3, 1, 2).double(), (C, C, 3, 3), g, padding=d, dilation=d)
        errs.append((f"dw{j + 1}", _err(dw[j].double(), ref.permute(2, 3, 1, 0).reshape(9, C, C))))
        errs.append((f"db{j + 1}", _err(db[j].double(), g.sum((0, 2, 3)))))
    return errs


def check_arena(N, H, W):
    """The eager Functions carve every kernel sum from one zeroed buffer per pass: one torch.zeros in a
    DMFB's forward (three instance norms) and one in its backward (two instance-norm backwards, the
    branches' norm sums, the weight and bias gradients), none falling past the buffer; the branch op alone
    likewise."""
    from dmfn_fast.ops import dmfb

    zeros, takes = [], []
    real_zeros, real_take = torch.zeros, dmfb._Arena.take

    def counting_zeros(*a, **k):
        zeros.append(a)
        return real_zeros(*a, **k)

    def take(self, shape):
        part = real_take(self, shape)
        takes.append(part is not None)
        return part
    torch.zeros, dmfb._Arena.take = counting_zeros, take
    try:
        block = _random_block(32, 16)
        x = torch.randn(N, 32, H, W, requires_grad=True)
        y = block(x)
        fwd_zeros, fwd_takes = len(zeros), list(takes)
        y.backward(torch.randn_like(y))
        bwd_zeros, bwd_takes = len(zeros) - fwd_zeros, takes[len(fwd_takes):]
        h = torch.randn(N, 16, H, W, requires_grad=True)
        t = dmfb.branches_in_relu(h, [block.d1.weight, block.d2.weight, block.d3.weight, block.d4.weight],
                                  [block.d1.bias, block.d2.bias, block.d3.bias, block.d4.bias])
        op_zeros = len(zeros)
        t.backward(torch.randn_like(t))
    finally:
        torch.zeros, dmfb._Arena.take = real_zeros, real_take
    assert (fwd_zeros, bwd_zeros) == (1, 1), (fwd_zeros, bwd_zeros)
    # backward: c1's and c2's zero bias gradients (skipped before their norms), then 5 kernel sums
    assert fwd_takes == [True] * 3 and bwd_takes == [True] * 7, (fwd_takes, bwd_takes)
    assert op_zeros - fwd_zeros - bwd_zeros == 1 and len(zeros) - op_zeros == 1, len(zeros)
    assert all(takes), takes
    return [("block x grad finite", 0.0 if torch.isfinite(x.grad).all() else 1.0)]


def check_tuned_launch():
    """Eager launches of an autotuned kernel (_Tuned): the Autotuner picks once per key, later launches
    with that key run its config directly, and a new key goes back to the Autotuner."""
    import triton
    import triton.language as tl

    from dmfn_fast.ops import dmfb

    @triton.jit
    def scale(x_ptr, y_ptr, n, F: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * F, mask=i < n)

    tuner = triton.autotune([triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 128})], key=["n"])(scale)
    # The interpreter cannot benchmark: each key's pick is set as a GPU run would leave it.
    tuner.cache[(100, "torch.float32", "torch.float32")] = tuner.configs[1]
    tuner.cache[(37, "torch.float32", "torch.float32")] = tuner.configs[0]
    runs = []
    real_run = tuner.run
    tuner.run = lambda *a, **k: runs.append(1) or real_run(*a, **k)
    errs = []
    for n, F, autotuner_runs in ((100, 2, 1), (100, 3, 1), (100, 2, 1), (37, 2, 2), (37, 5, 2), (100, 4, 2)):
        x = torch.randn(n)
        y = torch.full((n,), float("nan"))
        dmfb._kernel(tuner, x)[lambda META: (triton.cdiv(n, META["BLOCK"]),)](x, y, n, F=F)
        assert len(runs) == autotuner_runs, (n, F, len(runs))
        errs.append((f"n={n} F={F}", _err(y, x * F)))
    tuned = dmfb._TUNED[tuner]
    assert sorted((k[0], v["BLOCK"]) for k, v in tuned.best.items()) == [(37, 16), (100, 128)], tuned.best
    return errs


def _via_ops(block, x, fn=None):
    """The block (or fn) with every op called through torch.library (what tracing sees)."""
    from dmfn_fast.ops import dmfb

    real = dmfb._plain_eager
    dmfb._plain_eager = lambda args: False
    try:
        return (fn or block)(x)
    finally:
        dmfb._plain_eager = real


def _run_case(name):
    kind, kw = CASES[name]
    torch.manual_seed(0)
    tol = TOL["bf16" if "autocast" in name else kw.get("dtype", "fp32")]
    return [r if len(r) == 3 else (*r, tol) for r in globals()["check_" + kind](**kw)]


def _worker(names):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = {}
    for name in names:
        try:
            out[name] = {"errors": _run_case(name)}
        except Exception:
            out[name] = {"exception": traceback.format_exc()[-3000:]}
    print("RESULTS " + json.dumps(out))


# ----------------------------------------------------------------------------- tests (pytest process)

_NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _child_env(**extra):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **extra)
    env.pop("DMFN_IMPL", None)
    return env


@pytest.fixture(scope="module")
def results():
    names = list(CASES)
    halves = [names[0::2], names[1::2]]
    procs = [subprocess.Popen([sys.executable, __file__, *half], env=_child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for half in halves]
    out = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULTS ")]
        if not lines:
            pytest.fail(f"interpreter worker crashed (rc {p.returncode}):\n{stderr[-3000:]}")
        out.update(json.loads(lines[-1][len("RESULTS "):]))
    return out


@_NEEDS_TRITON
@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_reference(results, name):
    r = results[name]
    assert "exception" not in r, r.get("exception")
    bad = [f"{label}: {err:.3g} > {tol:g}" for label, err, tol in r["errors"] if not err <= tol]
    assert not bad, "; ".join(bad)


def test_cpu_uses_reference_and_fast_refuses(monkeypatch):
    from dmfn_fast.models import DMFB
    from dmfn_fast.ops import dmfb

    monkeypatch.delenv("DMFN_IMPL", raising=False)  # it would silence impl="fast"

    if dmfb.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors take the fused path")
    torch.manual_seed(0)
    block = DMFB(32, 16)
    x = torch.randn(1, 32, 9, 7)
    assert "CUDA" in dmfb.fused_why_not(x)
    with torch.no_grad():
        assert torch.equal(block(x), block.forward_reference(x))
        bb, xb = DMFB(32, 16).bfloat16(), x.bfloat16()  # a dtype auto would run fast: CPU decides
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a CPU tensor is no missing fast path: no warning
            assert torch.equal(bb(xb), bb.forward_reference(xb))
    block.impl = "fast"
    with pytest.raises(RuntimeError, match="impl='fast'.*CUDA"):
        block(x)


def test_launches_switch_to_the_inputs_gpu():
    """Triton launches on the current device: every op body runs under the input's device (a model on
    cuda:1 must not launch on cuda:0). Checked on fake CUDA tensors: no GPU needed."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from dmfn_fast.ops import dmfb

    assert isinstance(dmfb._device_of(torch.zeros(1)), contextlib.nullcontext)

    class Real(torch.Tensor):  # a tensor that reports cuda:1 without being fake
        @property
        def device(self):
            return torch.device("cuda", 1)

    ctx = dmfb._device_of(torch.zeros(1).as_subclass(Real))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    with FakeTensorMode():  # fake tensors (tracing): no device switch
        assert isinstance(dmfb._device_of(torch.empty(1, device="cuda:1")), contextlib.nullcontext)
    # The wrapper keeps the signature the op schema is inferred from.
    import inspect

    assert inspect.signature(dmfb._on_input_device(dmfb._branches_fn)) == inspect.signature(dmfb._branches_fn)


@_NEEDS_TRITON
def test_deterministic_mode_takes_the_reference(monkeypatch):
    """The fused DMFB sums with atomics; under torch.use_deterministic_algorithms(True) `auto` takes the
    reference and impl="fast" refuses, saying why."""
    from dmfn_fast.models import DMFB
    from dmfn_fast.ops import dmfb

    monkeypatch.delenv("DMFN_IMPL", raising=False)
    monkeypatch.setattr(dmfb, "INTERPRET", True)  # CPU tensors count as runnable: determinism decides
    x = torch.randn(1, 32, 9, 7).bfloat16()
    assert dmfb.fused_why_not(x) == ""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert "deterministic" in dmfb.fused_why_not(x)
        block = DMFB(32, 16).bfloat16()
        with torch.no_grad():
            assert torch.equal(block(x), block.forward_reference(x))
            block.impl = "fast"
            with pytest.raises(RuntimeError, match="deterministic"):
                block(x)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_packed_weights_cached_only_without_autograd():
    from dmfn_fast.ops import dmfb

    torch.manual_seed(0)
    ws = [torch.randn(8, 8, 3, 3, requires_grad=True) for _ in range(4)]
    bs = [torch.randn(8, requires_grad=True) for _ in range(4)]
    with torch.no_grad():
        a = dmfb.pack_branches(ws, bs, torch.float32)
        assert dmfb.pack_branches(ws, bs, torch.float32)[0] is a[0]  # cached
        ws[2].add_(1.0)  # an optimizer step bumps the version: repacked, with the new values
        c = dmfb.pack_branches(ws, bs, torch.float32)
    assert c[0] is not a[0] and torch.equal(c[0][2, 4], ws[2][:, :, 1, 1].t())
    w1, _ = dmfb.pack_branches(ws, bs, torch.float32)  # autograd on: fresh, differentiable
    w2, _ = dmfb.pack_branches(ws, bs, torch.float32)
    assert w1 is not w2 and w1.requires_grad


def test_packed_weights_follow_a_fused_adam_step():
    """Fused Adam (train.py's on CUDA) writes the weights in place without bumping their versions: a
    validation after its step must not see the packed weights of the one before (any optimizer step drops
    the cache)."""
    from dmfn_fast.ops import dmfb

    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(8, 8, 3, 3)) for _ in range(4)]
    bs = [torch.nn.Parameter(torch.randn(8)) for _ in range(4)]
    opt = torch.optim.Adam(ws + bs, lr=0.1, fused=True)
    with torch.no_grad():
        before = dmfb.pack_branches(ws, bs, torch.float32)
    for p in ws + bs:
        p.grad = torch.ones_like(p)
    versions = [p._version for p in ws]
    opt.step()
    with torch.no_grad():
        after = dmfb.pack_branches(ws, bs, torch.float32)
    assert [p._version for p in ws] == versions  # why the versions alone cannot key the cache
    assert after[0] is not before[0] and torch.equal(after[0][2, 4], ws[2][:, :, 1, 1].t())


def test_auto_rule_follows_the_benchmarks(monkeypatch):
    """impl="auto" runs the fused DMFB only in fp16/bf16 (autocast included): the fp32 kernels were
    measured 2.5x slower than cuDNN on an H200 (benchmarks/RESULTS.md). impl="fast" still forces them."""
    from dmfn_fast.models import DMFB
    from dmfn_fast.ops import dmfb

    x = torch.randn(1, 32, 9, 7)
    assert not dmfb.auto_prefers_fused(x)
    assert dmfb.auto_prefers_fused(x.bfloat16()) and dmfb.auto_prefers_fused(x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dmfb.auto_prefers_fused(x)
    # The rule, not the device, decides here: pretend the fused path could run on this input.
    calls = []
    monkeypatch.setattr(dmfb, "fused_why_not", lambda t: "")
    monkeypatch.setattr(dmfb, "_TRITON_ERROR", None)
    monkeypatch.setattr(dmfb, "dmfb_block_fused", lambda t, p: calls.append(t.dtype) or dmfb.dmfb_block_reference(t, p))
    monkeypatch.delenv("DMFN_IMPL", raising=False)
    block = DMFB(32, 16)
    with torch.no_grad():
        block(x)
        assert calls == []
        DMFB(32, 16).bfloat16()(x.bfloat16())
        assert calls == [torch.bfloat16]
        block.impl = "fast"
        block(x)
    assert calls == [torch.bfloat16, torch.float32]


# A child's torch.compile backend that keeps each AOT graph's code in `graphs` and runs nothing (Captured)
CAPTURE_SCRIPT = r"""
import torch
from torch._dynamo.backends.common import aot_autograd

graphs = []


class Captured(Exception):
    pass


def capture(gm, example_inputs):
    graphs.append(gm.code)

    def run(*args):
        raise Captured
    return run
"""

_TRACE_SCRIPT = CAPTURE_SCRIPT + r"""
import warnings

from torch._subclasses.fake_tensor import FakeTensorMode

from dmfn_fast.models import DMFB
from dmfn_fast.ops import dmfb

dmfb._check_branches = lambda *args: None  # it refuses CPU tensors; the graph is captured, never run

block = DMFB(32, 16)
fn = torch.compile(lambda x: dmfb.dmfb_block_fused(x, block.params()), fullgraph=True,
                   backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        fn(torch.randn(2, 32, 13, 11, requires_grad=True))
    except Captured:
        pass
lines = graphs[0].splitlines()
print("TRITON_OP", dmfb._USE_TRITON_OP)
print("LAUNCHES", sum("triton_kernel_wrapper" in ln and "= torch.ops" in ln for ln in lines))
print("OPS", sum("torch.ops.dmfn_fast." in ln for ln in lines))
k = dmfb._kn.in_stats
print("EAGER_RAW", dmfb._kernel(k, torch.zeros(1)) is k)
with FakeTensorMode() as mode:
    print("TRACED", type(dmfb._kernel(k, mode.from_tensor(torch.zeros(1)))).__name__)
"""


@pytest.mark.parametrize("triton_op", [False, True])
def test_compile_graph_and_launch_wrapper(triton_op):
    """torch.compile(fullgraph=True) of the fused block (traced with CPU tensors: the graph is captured,
    never run). DMFN_TRITON_OP=0: the three DMFB ops stay opaque custom ops in the AOT forward graph.
    Default (DMFN_TRITON_OP=1): they become Triton kernel nodes (in_stats + in_apply for h, branches + in_stats +
    in_apply for t, in_stats + in_apply for the output). Either way plain eager launches take the Triton
    kernel itself: wrap_triton's wrapper routes each eager launch through a higher-order op, which on an
    H200 doubled the fused DMFB's host time; only tracing takes it (in triton_op mode)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the DMFB ops are not defined")
    env = dict(os.environ, OMP_NUM_THREADS="1", DMFN_TRITON_OP="1" if triton_op else "0")
    env.pop("TRITON_INTERPRET", None)  # wrap_triton cannot trace interpreted kernels
    env.pop("DMFN_IMPL", None)
    p = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = dict(ln.split(" ", 1) for ln in p.stdout.splitlines() if " " in ln)
    if triton_op and out["TRITON_OP"] == "False":
        pytest.skip("this torch has no torch.library.triton_op / wrap_triton")
    assert out["EAGER_RAW"] == "True"
    if triton_op:
        assert (out["LAUNCHES"], out["OPS"]) == ("7", "0"), p.stdout
        assert out["TRACED"] == "TraceableTritonKernelWrapper"
    else:
        assert (out["TRITON_OP"], out["LAUNCHES"], out["OPS"]) == ("False", "0", "3"), p.stdout
        assert out["TRACED"] == "_Skip"  # the opaque op's fake impl launches nothing


_NO_TRITON_SCRIPT = r"""
import sys, warnings
sys.modules["triton"] = None  # what an install without triton looks like
import torch
from dmfn_fast.models import DMFB
from dmfn_fast.ops import dmfb
assert "triton is not installed" in dmfb.triton_unavailable_reason()
block = DMFB(32, 16)
x = torch.randn(1, 32, 9, 7)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
        y0 = block(x)  # fp32: auto takes the reference by its rule, the fast path is not missed
        block.bfloat16()
        xb = x.bfloat16()
        y1, y2 = block(xb), block(xb)
msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(msgs) == 1 and "triton is not installed" in msgs[0], msgs
assert torch.equal(y1, block.forward_reference(xb))
block.impl = "fast"
try:
    block(xb)
except RuntimeError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("impl='fast' without triton must raise")
print("OK")
"""


def test_missing_triton_warns_once_and_falls_back():
    # The interpreter env makes CPU tensors eligible, so the missing-triton branch is what decides.
    p = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], env=_child_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


def _failing_import(monkeypatch, name, error):
    """Make `import name` (or `from name import ...`) raise `error`; every other import runs as usual."""
    import builtins

    real = builtins.__import__

    def fake(mod, *args, **kwargs):
        if mod == name:
            raise error
        return real(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_kernel_import_errors_report_their_cause(monkeypatch):
    """'triton not installed' only when triton itself is absent; any other failure keeps its own message."""
    from dmfn_fast.ops import dmfb

    monkeypatch.setitem(sys.modules, "triton", None)  # what an install without triton looks like
    assert dmfb._import_kernels()[3].startswith("triton is not installed")
    monkeypatch.undo()

    _failing_import(monkeypatch, "triton", ImportError("libcuda.so.1: cannot open (simulated)", name="triton._C"))
    why = dmfb._import_kernels()[3]
    assert "not installed" not in why and "triton failed to import" in why and "libcuda.so.1" in why, why
    monkeypatch.undo()

    _failing_import(monkeypatch, "triton", AttributeError("module has no attribute 'jit' (simulated)"))
    why = dmfb._import_kernels()[3]
    assert "AttributeError" in why and "simulated" in why, why
    monkeypatch.undo()

    if importlib.util.find_spec("triton") is None:
        return
    _failing_import(monkeypatch, "dmfn_fast.kernels", SyntaxError("invalid syntax (simulated)"))
    why = dmfb._import_kernels()[3]
    assert "triton" not in why.split(":")[0] or "kernels" in why
    assert "dmfn_fast.kernels" in why and "SyntaxError: invalid syntax (simulated)" in why, why
    monkeypatch.undo()
    assert dmfb._import_kernels()[3] is None


@_NEEDS_TRITON
def test_a_broken_kernel_file_falls_back_with_one_warning(monkeypatch):
    """A kernels/ file of one of the smaller ops that fails to import leaves that op unavailable (its callers
    run their plain layers) with one warning naming the op, the error and what runs instead."""
    from dmfn_fast.ops import _impl, dmfb

    real = importlib.import_module

    def failing(name, *args, **kwargs):
        if name == "dmfn_fast.kernels.max_pool":
            raise SyntaxError("invalid syntax (simulated)")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(importlib, "import_module", failing)
    monkeypatch.setattr(_impl, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"max-pool kernel failed to import \(SyntaxError: invalid syntax "
                      r"\(simulated\)\); ATen's pooling runs"):
        assert dmfb.import_kernel_module("max_pool", "max-pool kernel", "ATen's pooling runs") is None
    assert dmfb.import_kernel_module("thin_conv", "thin-input convolution kernel", "...") is not None


def test_ops_registered_at_import():
    """Importing dmfn_fast.ops.dmfb defines every DMFB op with its fake kernel and autograd, nothing lazy."""
    code = (
        "import torch\n"
        "import dmfn_fast.ops.dmfb\n"
        "from torch._library.simple_registry import singleton\n"
        "for op in ('dmfb_branches', 'dmfb_branches_in_relu', 'instance_norm_act'):\n"
        "    q = 'dmfn_fast::' + op\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key(q, 'Autograd'), q\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key(q, 'Meta') or "
        "singleton.find(q).fake_impl.kernel is not None, q\n"
        "print('OK')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=_child_env())
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the DMFB ops are not defined")
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]



def test_eager_launch_wrapper_guards_only_when_off_device(monkeypatch):
    """The launch wrapper skips the device guard when the input is on the current GPU (host time), and
    takes it when not (a model on cuda:1 with cuda:0 current)."""
    from dmfn_fast.ops import dmfb

    class Dev(torch.Tensor):
        index = 1

        @property
        def device(self):
            return torch.device("cuda", Dev.index)

    entered = []

    class Guard:
        def __init__(self, t):
            entered.append(t.device.index)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dmfb, "_device_of", Guard)
    run = dmfb._on_input_device(lambda t: "ran")
    t = torch.zeros(1).as_subclass(Dev)
    assert run(t) == "ran" and entered == [1]
    Dev.index = 0
    assert run(t) == "ran" and entered == [1]
    assert run(torch.zeros(1)) == "ran" and entered == [1]  # CPU: no guard


if __name__ == "__main__":
    _worker(sys.argv[1:])


def test_traced_sums_are_separate_allocations():
    """Inductor miscompiles a kernel-mutated view of a shared base (it copied the base's extent out of a
    buffer sized for the view: the compiled bf16 gradients were garbage, benchmarks/RESULTS.md). Traced,
    each instance-norm sum is an allocation of its own; eager keeps one allocation (host time)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dmfn_fast.ops import dmfb

    eager = dmfb._sums32(3, 2, 5, like=torch.empty(1))
    assert len({t.untyped_storage().data_ptr() for t in eager}) == 1
    assert all(t.shape == (2, 5) and t.dtype == torch.float32 and not t.any() for t in eager)
    with FakeTensorMode() as mode:
        traced = dmfb._sums32(3, 2, 5, like=mode.from_tensor(torch.empty(1)))
        assert len({t.untyped_storage()._cdata for t in traced}) == 3
        assert all(t.shape == (2, 5) and t.storage_offset() == 0 for t in traced)


@_NEEDS_TRITON
def test_thin_conv_takes_only_what_it_computes():
    """thin_conv refuses shapes its kernel does not compute (more taps x channels than one dot holds, 3 channels
    counting as 4; 5 channels; more than 128 outputs; mismatched channels), and fits() picks the generator's
    input convolution and no other layer of the generator, the discriminator's two input convolutions, and of
    the VGG its first (which the VGG does not ask)."""
    from dmfn_fast.models import Discriminator, Generator
    from dmfn_fast.ops import thin_conv as tc
    from dmfn_fast.vgg import VGG19Features

    for c, w_shape in ((3, (64, 3, 7, 7)), (8, (64, 8, 5, 5)), (5, (64, 5, 3, 3)), (4, (256, 4, 3, 3)),
                       (4, (64, 2, 5, 5))):
        with pytest.raises(ValueError, match="thin_conv takes"):
            tc.thin_conv(torch.randn(1, c, 8, 8), torch.randn(w_shape))
    G = Generator(nf=16, n_blocks=1, init=False)
    convs = [m for m in G.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tc.fits(m) for m in convs] == [True] + [False] * (len(convs) - 1)
    D = Discriminator(init=False)  # the paper's widths (with 4, the second layers take 4 channels too)
    assert {n for n, m in D.named_modules() if isinstance(m, torch.nn.Conv2d) and tc.fits(m)} == {
        "global_model.0.conv", "local_fea1.conv"}
    vgg = [m for m in VGG19Features("random").modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tc.fits(m) for m in vgg] == [True] + [False] * (len(vgg) - 1)
    first = G.encoder[0].conv
    handle = first.register_forward_hook(lambda *a: None)
    assert not tc.fits(first)  # a hook the kernel would skip
    handle.remove()
    odd = torch.nn.Conv2d(4, 64, 5, stride=(1, 2), padding=2)
    assert not tc.fits(odd)
