"""GPU parity of the fused Triton DMFB against the cuDNN reference at full size (skipped without CUDA).

Same checks as tests/test_dmfb_triton.py (which runs them on CPU under the interpreter), at the
model's real sizes and in bf16 too. References run in float64 from the same rounded inputs: on an H200,
cuDNN's own fp32 weight gradient at N=16, 64x64 was 3.6e-5 off float64, the fused one 9e-7, so an fp32
reference would fail a correct kernel. Tolerances: fp32 1e-5 (IEEE dots), fp16 1e-2, bf16 3e-2 (max-norm,
relative to the largest reference value).
"""
import pytest
import torch

from dmfn_fast.ops import dmfb

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(dmfb.triton_unavailable_reason() is not None, reason="triton is not importable"),
]

@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: cuDNN's default TF32 convolutions (c1, c2 and the reference) would differ by ~1e-3."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _err(a, b, scale=None):
    a, b = a.detach().float(), b.detach().float()
    scale = b.abs().max().item() if scale is None else scale
    return (a - b).abs().max().item() / scale


def _rel_l2(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def _strays_no_further(fast, ref, exact, floor):
    """Each fast tensor at most twice as far (relative L2) from the higher-precision run `exact` as the same
    tensor of the reference path in the fast path's precision, plus floor."""
    for i, (f, r, e) in enumerate(zip(fast, ref, exact)):
        err, err_ref = _rel_l2(f, e), _rel_l2(r, e)
        assert err <= 2 * err_ref + floor, (i, err, err_ref)


def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 64, 64, 64), (1, 64, 128, 128), (3, 64, 13, 11), (2, 48, 37, 29),
                                   (2, 8, 16, 16)])  # C=8: the tiny models of the CPU-sized tests
def test_branches_parity(dtype, shape):
    N, C, H, W = shape
    torch.manual_seed(0)
    dev = "cuda"
    h = torch.randn(N, C, H, W, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(C, C, 3, 3, device=dev) / (3 * C ** 0.5)).to(dtype) for _ in range(4)]
    bs = [(0.1 * torch.randn(C, device=dev)).to(dtype) for _ in range(4)]
    ref_in = [_leaf(h.double())] + [_leaf(w.double()) for w in ws] + [_leaf(b.double()) for b in bs]
    ref = dmfb.dmfb_branches_reference(ref_in[0], ref_in[1:5], ref_in[5:])
    g = torch.randn_like(ref).to(dtype)
    ref.backward(g.double())
    fast_in = [_leaf(h)] + [_leaf(w) for w in ws] + [_leaf(b) for b in bs]
    out = dmfb.dmfb_branches(fast_in[0], fast_in[1:5], fast_in[5:])
    out.backward(g)
    tol = TOL[dtype]
    assert _err(out, ref) <= tol
    for f, r in zip(fast_in, ref_in):
        assert _err(f.grad, r.grad) <= tol


@pytest.mark.parametrize("shape", [(16, 64, 64, 64), (2, 48, 37, 29)])
def test_branches_tf32(shape):
    """fp32 with cuDNN's TF32 allowed (PyTorch's default): the kernels take TF32 dots, 10-bit mantissas,
    so forward and gradients are held to 5e-3 of float64 (max-norm), as TF32 convolutions would be."""
    N, C, H, W = shape
    torch.manual_seed(0)
    h = torch.randn(N, C, H, W, device="cuda").contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(C, C, 3, 3, device="cuda") / (3 * C ** 0.5) for _ in range(4)]
    bs = [0.1 * torch.randn(C, device="cuda") for _ in range(4)]
    ref_in = [_leaf(t.double()) for t in [h] + ws + bs]
    ref = dmfb.dmfb_branches_reference(ref_in[0], ref_in[1:5], ref_in[5:])
    g = torch.randn_like(ref).float()
    ref.backward(g.double())
    fast_in = [_leaf(t) for t in [h] + ws + bs]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        out = dmfb.dmfb_branches(fast_in[0], fast_in[1:5], fast_in[5:])
        out.backward(g)
    assert _err(out, ref) <= 5e-3
    for f, r in zip(fast_in, ref_in):
        assert _err(f.grad, r.grad) <= 5e-3


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="branches_wgrad9 is for sm_90 and newer")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 64, 64, 64), (1, 48, 37, 29), (1, 64, 37, 29)])
def test_wgrad9_matches_float64(dtype, shape):
    """The other weight gradients, with one program per branch over its 9 taps (opt-in DMFN_WGRAD9=1) and
    over runs of TMA tiles (DMFN_WGRAD_TMA, the sm_90 default), at full size and with edge tiles, against
    float64 (dW_j[tap, ci, co] and db_j), held to what the per-tap kernel reaches."""
    N, C, H, W = shape
    h = torch.randn(N, C, H, W, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    G = torch.randn(N, 4 * C, H, W, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    exact = []
    for j, d in enumerate((1, 2, 4, 8)):
        g = G[:, j * C:(j + 1) * C].double()
        w = torch.nn.grad.conv2d_weight(h.double(), (C, C, 3, 3), g, padding=d, dilation=d)
        exact.append((w.permute(2, 3, 1, 0).reshape(9, C, C), g.sum((0, 2, 3))))
    # the per-tap rows, the 9 taps per program, and the TMA tiles (C a multiple of 64 only, as dmfb._tma)
    for kind in ("rows", "taps9", "tma")[:3 if C % 64 == 0 else 2]:
        dw, db = dmfb._branches_wgrad(h, G, [1, 2, 4, 8], taps9=kind == "taps9", tma=kind == "tma")
        for j, (w, b) in enumerate(exact):
            assert _err(dw[j], w) <= 1e-4, (kind, j, _err(dw[j], w))  # fp32 sums of exact products
            assert _err(db[j], b) <= 1e-4, (kind, j, _err(db[j], b))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="the TMA branch kernels are for sm_90 and newer")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 64, 64, 64), (1, 64, 37, 29), (2, 128, 24, 40)])
def test_tma_kernels_match_row_kernels(dtype, shape):
    """The TMA forward, grad and dgrad kernels (sm_90's default, DMFN_TMA: 2-D pixel tiles, h or G by tensor
    descriptor, the padding zero-filled by the copy engine) at full size and at odd sizes (edge tiles past
    the image), against the row kernels and the forward against float64; the TMA wgrad too."""
    N, C, H, W = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    cl = lambda t: t.to(dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
    h = cl(torch.randn(N, C, H, W, device="cuda", generator=g))
    ws = [torch.randn(C, C, 3, 3, device="cuda", generator=g) / (3 * C ** 0.5) for _ in range(4)]
    bs = [torch.randn(C, device="cuda", generator=g) * 0.1 for _ in range(4)]
    w, b = dmfb.pack_branches([x.to(dtype) for x in ws], [x.to(dtype) for x in bs], dtype)
    rows = dmfb._branches_forward(h, w, b, [1, 2, 4, 8], tma=False)
    tma = dmfb._branches_forward(h, w, b, [1, 2, 4, 8], tma=True)
    f64 = dmfb.dmfb_branches_reference(h.double(), [x.to(dtype).double() for x in ws],
                                       [x.to(dtype).double() for x in bs])
    assert _err(tma, f64) <= TOL[dtype] and _err(tma, rows) <= TOL[dtype], (_err(tma, f64), _err(tma, rows))
    t, mean, rstd = dmfb._in_act_fn(rows, None, True)
    dt = cl(torch.randn(t.shape, device="cuda", generator=g))
    sa, sb = dmfb._in_backward_sums(dt, t, mean, rstd, relu=True, from_y=True)
    G_rows = dmfb._branches_forward(h, w, b, [1, 2, 4, 8], grad=(dt, mean, rstd, sa, sb), tma=False)
    G_tma = dmfb._branches_forward(h, w, b, [1, 2, 4, 8], grad=(dt, mean, rstd, sa, sb), tma=True)
    assert _err(G_tma, G_rows) <= TOL[dtype], _err(G_tma, G_rows)
    dh_rows = dmfb._branches_dgrad(w, G_rows, [1, 2, 4, 8], h, tma=False)
    dh_tma = dmfb._branches_dgrad(w, G_rows, [1, 2, 4, 8], h, tma=True)
    assert _err(dh_tma, dh_rows) <= TOL[dtype], _err(dh_tma, dh_rows)
    # the TMA weight gradient (DMFN_WGRAD_TMA), fp32 sums, against the row kernel's
    dw_rows, db_rows = dmfb._branches_wgrad(h, G_rows, [1, 2, 4, 8], taps9=False, tma=False)
    dw_tma, db_tma = dmfb._branches_wgrad(h, G_rows, [1, 2, 4, 8], tma=True)
    assert _err(dw_tma, dw_rows) <= 1e-4, _err(dw_tma, dw_rows)
    # The bias gradient sums G over pixels, and G comes through the instance norm's backward, whose sum over
    # an image's pixels is zero: in fp16 the terms' magnitudes are about 6e5 times their sum (H200, s10), so
    # two fp32 summation orders differ by about 2e-4 of the result. Both kernels are checked against the
    # float64 sum, in units of the summed magnitudes (fp32 rounding, whatever the order).
    Gp = G_rows.double().permute(0, 2, 3, 1).reshape(-1, 4, C)
    db64, mag = Gp.sum(0), Gp.abs().sum(0)
    for db in (db_rows, db_tma):
        assert (db.double() - db64).norm() <= 1e-6 * mag.norm(), ((db.double() - db64).norm() / mag.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nchw_input_accepted(dtype):
    torch.manual_seed(0)
    h = torch.randn(2, 32, 19, 23, device="cuda").to(dtype)
    ws = [(torch.randn(32, 32, 3, 3, device="cuda") / 17).to(dtype) for _ in range(4)]
    bs = [torch.zeros(32, device="cuda", dtype=dtype) for _ in range(4)]
    out = dmfb.dmfb_branches(h, ws, bs)
    ref = dmfb.dmfb_branches_reference(h.float(), [w.float() for w in ws], [b.float() for b in bs])
    assert _err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("res", [False, True])
def test_instance_norm_parity(dtype, res):
    """Against float64. With ReLU the reference takes the fused output's ReLU decisions, and those may
    differ from float64's only within rounding of the kink (|normalized value| <= 1e-4): one such flip
    moves a whole channel's gradient (on an H200, fp32 torch itself flipped 2 of 16.8M pixels)."""
    torch.manual_seed(0)
    x = (2 * torch.randn(16, 256, 64, 64, device="cuda") + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x) if res else None
    g = torch.randn(x.shape, device="cuda").to(dtype)
    xf, rf = _leaf(x), (_leaf(r) if res else None)
    out = dmfb.instance_norm_act(xf, rf, relu=not res)
    out.backward(g)
    xr, rr = _leaf(x.double()), (_leaf(r.double()) if res else None)
    if res:
        ref = dmfb.instance_norm_act_reference(xr, rr, relu=False)
    else:
        z = dmfb.instance_norm_act_reference(xr)
        keep = out.detach() > 0
        flips = keep != (z.detach() > 0)
        assert not flips.any() or z.detach()[flips].abs().max().item() <= 1e-4
        ref = torch.where(keep, z, torch.zeros_like(z))
    ref.backward(g.double())
    assert _err(out, ref) <= TOL[dtype]
    assert _err(xf.grad, xr.grad) <= TOL[dtype]
    if res:
        assert _err(rf.grad, rr.grad) <= TOL[dtype]


def test_opcheck_every_op_on_cuda():
    """torch.library.opcheck of every DMFB op (triton_op on CUDA), as test_dmfb_triton does under the
    interpreter."""
    from test_dmfb_triton import check_opcheck

    checked = {name.split()[1] for name, _ in check_opcheck(2, 7, 5, 16, device="cuda")}
    assert checked == set(dmfb.DEFINED), set(dmfb.DEFINED) ^ checked


def _block_pair(dtype):
    from dmfn_fast.models import DMFB

    torch.manual_seed(0)
    block = DMFB(256, 64, impl="fast").cuda()
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, 0.0, 0.05 if name.endswith("weight") else 0.5)
    return block.to(dtype)


def _block_grads(block, fn, x, g):
    """[output, grad x, grad of every weight] of fn(x) with output gradient g, all float64."""
    block.zero_grad()
    xl = _leaf(x)
    y = fn(xl)
    y.backward(g.to(y.dtype))
    return [y.double(), xl.grad.double()] + [p.grad.double() for n, p in block.named_parameters()
                                          if n.endswith("weight")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 64, 64), (1, 128, 128), (2, 13, 11)])
def test_block_parity(dtype, shape):
    """The fused block and the reference block in the same dtype are both compared with a float64
    reference (relative L2: the three IN+ReLU kinks flip pixels whose pre-activation lies within rounding
    of 0, in either path), and the fused error must stay within twice the reference's own plus a floor
    (fp16/bf16: 1e-2). fp32: the output to 1e-5 (max-norm), the gradients to 3e-3 (relative L2). A flip
    moves a gradient by O(1) at a few elements and, through the instance norms, a little everywhere; with
    a fraction p of pre-activations flipped the gradients' relative L2 is about sqrt(p) at any size, and
    p grows with the forward's rounding error (fused fp32 1.7e-6 max-norm, the reference's about 1e-7).
    On H200s at N=1, 128x128 the fused dx was 2.8e-4 and 1.02e-3 off float64 in two runs (the reference
    4.6e-7 both times). The fp32 pieces, which have no kink, are held to 1e-5 in test_branches_parity and
    test_instance_norm_parity."""
    N, H, W = shape
    block = _block_pair(dtype)
    exact_block = _block_pair(torch.float32).double()
    exact_block.load_state_dict({k: v.double() for k, v in block.state_dict().items()})
    x = torch.randn(N, 256, H, W, device="cuda").to(dtype)
    g = torch.randn(N, 256, H, W, device="cuda")
    exact = _block_grads(exact_block, exact_block.forward_reference, x.double(), g)
    fused = _block_grads(block, block, x, g)
    ref = _block_grads(block, block.forward_reference, x, g)
    if dtype == torch.float32:
        assert _err(fused[0], exact[0]) <= TOL[dtype]
    floor = 3e-3 if dtype == torch.float32 else 1e-2
    _strays_no_further(fused, ref, exact, floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_block_matches_eager(dtype):
    """torch.compile of the fused block computes what eager computes, output and every gradient (relative
    L2; the atomics' summation order differs run to run), with the ops traced as triton_ops (the default).
    On an H200 (torch 2.11) the compiled bf16 gradients were once 5-8x their own size off while the output
    agreed: Inductor miscompiled instance-norm sums that were views of one base (see dmfb._sums32)."""
    torch._dynamo.reset()
    block = _block_pair(dtype)
    x = torch.randn(2, 256, 16, 16, device="cuda").to(dtype)
    g = torch.randn(2, 256, 16, 16, device="cuda")
    eager = _block_grads(block, block, x, g)
    compiled = _block_grads(block, torch.compile(block), x, g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (c, e) in enumerate(zip(compiled, eager)):
        err = ((c - e).norm() / e.norm()).item()
        assert err <= tol, (i, err)


def test_block_saves_less_memory():
    """The fused block keeps h, the pre-norm conv outputs and t (which c2 keeps anyway) for backward;
    not d1..d4 and the cat: at least half a cat's bytes less than the reference."""
    block = _block_pair(torch.bfloat16)
    x = torch.randn(8, 256, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def saved_bytes(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = fn(x)
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
        del y
        return used

    fused = saved_bytes(block)
    ref = saved_bytes(block.forward_reference)
    cat_bytes = x.numel() * x.element_size()  # the cat has 4 * 64 = 256 channels, like x
    assert fused <= ref - cat_bytes // 2, (fused, ref)


def test_generator_training_autocast_matches_reference():
    """The generator's forward and backward in bf16 autocast, fused (the DMFBs, and the encoder's and
    decoder's [norm, ReLU, conv] runs as one node each) and reference, both held to an fp32 run (TF32 off):
    the fused run strays at most twice as far as the reference plus 1e-2 (relative L2), output and every
    weight gradient."""
    from dmfn_fast.models import Generator

    torch.manual_seed(0)
    G = Generator(nf=32, n_blocks=2, impl="fast").cuda().to(memory_format=torch.channels_last)
    x = torch.cat([torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1,
                   (torch.rand(2, 1, 64, 64, device="cuda") > 0.5).float()], 1)
    g = torch.randn(2, 3, 64, 64, device="cuda")

    def run(impl, autocast):
        G.impl = impl
        G.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = G(x)
        y.float().backward(g)
        return [y.float()] + [p.grad.float().clone() for n, p in G.named_parameters() if n.endswith("weight")]

    exact = run("reference", False)
    fast, ref = run("fast", True), run("reference", True)
    _strays_no_further(fast, ref, exact, 1e-2)


def test_generator_autocast_and_compile():
    from dmfn_fast.models import Generator

    torch.manual_seed(0)
    G = Generator(impl="fast").cuda()
    G_ref = Generator(impl="reference", init=False).cuda()
    G_ref.load_state_dict(G.state_dict())
    x = torch.cat([torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1,
                   (torch.rand(2, 1, 64, 64, device="cuda") > 0.5).float()], 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, y_ref = G(x), G_ref(x)
    assert y.dtype == y_ref.dtype
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() <= 5e-2
    compiled = torch.compile(G)
    y_c = compiled(x)
    y_c.float().sum().backward()
    assert all(p.grad is not None for p in G.parameters())
    with torch.no_grad():
        assert _err(y_c, G_ref(x)) <= 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "lrelu"])
def test_bias_act_parity(dtype, act):
    """The convolutions' bias + activation kernel at the generator's first layer size (64 channels, 256 px),
    forward and both gradients, against the reference in float64 from the same rounded inputs; ReLU's forward
    equal to the dtype's reference to the bit (one rounding of the same fp32 sum)."""
    from dmfn_fast.ops import bias_act as ba

    torch.manual_seed(0)
    x = torch.randn(2, 64, 256, 256, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(64, device="cuda").to(dtype)
    g = torch.randn_like(x)
    xs, bs = _leaf(x), _leaf(b)
    y = ba.bias_act(xs, bs, act, 0.2)
    dx, db = torch.autograd.grad(y, (xs, bs), g)
    x64, b64 = _leaf(x.double()), _leaf(b.double())
    y64 = ba.bias_act_reference(x64, b64, act, 0.2)
    dx64, db64 = torch.autograd.grad(y64, (x64, b64), g.double())
    if act == "relu":
        assert torch.equal(y, ba.bias_act_reference(x, b, act))
    for a, r in ((y, y64), (dx, dx64), (db, db64)):
        assert _err(a, r) <= TOL[dtype]


@pytest.mark.parametrize("kernels", [dict(fused=True), dict(pool=True), dict(fused=True, pool=True)])
def test_vgg_fused_matches_plain_layers(kernels):
    """The VGG's sixteen convolutions with their bias and ReLU in the kernel, its four pools by the index-free
    max-pool kernels, and both, as training runs them (bf16 autocast, channels-last, stages recomputed): the
    features and the input gradient equal to the plain layers' to the bit (the same convolutions, the same
    single rounding of each sum, the same maxima and the same element of each window taking its gradient)."""
    from dmfn_fast.vgg import VGG19Features

    torch.manual_seed(0)
    vgg = VGG19Features("random").cuda().to(memory_format=torch.channels_last)
    x = (torch.rand(2, 3, 128, 128, device="cuda") * 2 - 1).contiguous(memory_format=torch.channels_last)
    from dmfn_fast.ops import max_pool as mp

    outs, pools = [], []
    real_pool = mp.max_pool2x2
    for kw in (kernels, {}):
        xs = _leaf(x)
        # deterministic cuDNN: the same algorithms both times, so any difference is the kernel's
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False), \
                pytest.MonkeyPatch.context() as patch:
            patch.setattr(mp, "max_pool2x2", lambda t: pools.append(1) or real_pool(t))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = vgg(xs, recompute=True, **kw)
            outs.append((feats, torch.autograd.grad([f.float().sum() for f in feats], xs)[0]))
    # the four pools forward and again in backward (the recomputed stages), with pool=True only
    assert len(pools) == (8 if kernels.get("pool") else 0), len(pools)
    (fa, da), (fb, db) = outs
    assert all(torch.equal(a, b) for a, b in zip(fa, fb))
    assert torch.equal(da, db)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 64, 256, 256), (16, 512, 32, 32), (3, 40, 37, 29)])  # the VGG's first
def test_max_pool_matches_aten(dtype, shape):
    """The index-free 2x2 max pool against ATen's max_pool2d on CUDA: values and input gradient equal to the
    bit, with ties (small integers), NaNs and -inf in the windows, an odd last row and column (3x40x37x29)."""
    from dmfn_fast.ops import max_pool as mp

    torch.manual_seed(0)
    x = torch.randint(-4, 4, shape, device="cuda").to(dtype)
    x.view(-1)[::97] = float("nan")
    x.view(-1)[5::89] = float("-inf")
    x = x.contiguous(memory_format=torch.channels_last)
    xs, xr = _leaf(x), _leaf(x)
    y, y_ref = mp.max_pool2x2(xs), mp.max_pool2x2_reference(xr)
    g = torch.randn_like(y_ref)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.nan_to_num(7.0), y_ref.nan_to_num(7.0))
    assert torch.equal(torch.autograd.grad(y, xs, g)[0], torch.autograd.grad(y_ref, xr, g)[0])


# the guided term on relu1_1 at the training shape in three dtypes; in bf16 a feature-matching term (relu4_1),
# NCHW at odd sizes and a partial channel tile (each dtype and layout compiles the kernels again; the
# interpreter covers fp32 and fp16 at small shapes)
L1_CASES = [(dt, (16, 64, 256, 256), torch.channels_last, True) for dt in DTYPES] + [
    (torch.bfloat16, (16, 512, 32, 32), torch.channels_last, False),
    (torch.bfloat16, (3, 40, 37, 29), torch.contiguous_format, True),
    (torch.bfloat16, (2, 80, 13, 11), torch.channels_last, True)]


@pytest.mark.parametrize("dtype, shape, layout, guided", L1_CASES)
def test_l1_loss_matches_the_formula(dtype, shape, layout, guided):
    """The losses' L1 kernels against _L1Mean (ATen's passes) on CUDA: the gradient equal to the bit (every
    product, difference and sign rounded as ATen rounds them: a contracted FMA would leave a gradient where
    a == b), exactly 0 where a == b (the known region), the loss to the float64 sum."""
    from dmfn_fast import losses
    from dmfn_fast.ops import l1_loss as l1

    torch.manual_seed(0)
    N, C, H, W = shape
    a = torch.relu(torch.randn(shape, device="cuda")).to(dtype)
    b = a.clone()
    b[:, :, H // 4:H // 2, W // 4:W // 2] = torch.relu(torch.randn(N, C, H // 2 - H // 4, W // 2 - W // 4,
                                                                   device="cuda")).to(dtype)
    a, b = a.contiguous(memory_format=layout), b.contiguous(memory_format=layout)
    g = (1 + torch.rand(N, 1, H, W, device="cuda")).to(dtype) if guided else None
    ak, ar = _leaf(a), _leaf(a)
    lk, lr = l1.l1_mean(ak, b, g), losses._L1Mean.apply(ar, b, g)
    gl = torch.tensor(0.75, device="cuda").to(dtype)
    (gk,), (gr,) = torch.autograd.grad(lk, ak, gl), torch.autograd.grad(lr, ar, gl)
    assert torch.equal(gk, gr)
    assert (gk[(a == b).expand_as(gk)] == 0).all()
    want = l1.l1_mean_reference(a.double(), b.double(), None if g is None else g.double())
    rel = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps  # fp32: summation order; else 2 roundings
    assert lk.dtype == dtype and abs(lk.double() - want).item() <= rel * want.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_l1_loss_under_autocast(dtype):
    """As training runs the loss (autocast, 16-bit features): both paths give an fp32 loss, as ATen's autocast
    vector_norm gave _L1Mean (the kernels had given bf16: the s15 graphed step logged bf16-rounded terms),
    within the sum order of each other, and the same gradient to the bit."""
    from dmfn_fast import losses
    from dmfn_fast.ops import l1_loss as l1

    torch.manual_seed(1)
    cl = torch.channels_last
    a = torch.relu(torch.randn(16, 64, 256, 256, device="cuda")).to(dtype).contiguous(memory_format=cl)
    b = torch.relu(torch.randn(16, 64, 256, 256, device="cuda")).to(dtype).contiguous(memory_format=cl)
    g = (1 + torch.rand(16, 1, 256, 256, device="cuda")).to(dtype)
    ak, ar = _leaf(a), _leaf(a)
    with torch.autocast("cuda", dtype=dtype):
        lk, lr = l1.l1_mean(ak, b, g), losses._L1Mean.apply(ar, b, g)
    assert lk.dtype == lr.dtype == torch.float32
    assert abs(lk.item() - lr.item()) <= 1e-5 * lr.item()
    seed = torch.tensor(25.0, device="cuda")
    (gk,), (gr,) = torch.autograd.grad(lk, ak, seed), torch.autograd.grad(lr, ar, seed)
    assert gk.dtype == dtype and torch.equal(gk, gr)


# the generator's input convolution in three dtypes; other shapes in bf16 (each new shape and dtype compiles
# and autotunes the kernels again, and the interpreter covers fp32 and fp16 at these shapes)
THIN_CASES = [(dt, (16, 4, 256, 256, 5, 1, 2)) for dt in DTYPES] + [
    (torch.bfloat16, shape) for shape in ((3, 4, 37, 29, 5, 1, 2), (2, 8, 33, 31, 3, 2, 1), (1, 1, 17, 13, 3, 1, 1),
                                          (16, 3, 256, 256, 5, 2, 2))]  # the last: the discriminator's global input


@pytest.mark.parametrize("dtype, shape", THIN_CASES)
def test_thin_conv_parity(dtype, shape):
    """The thin-input convolution (ops/thin_conv.py) with bias and ReLU, forward and the weight, bias and input
    gradients, against the reference in float64 from the same rounded inputs. The reference's gradients pass
    through the kernel's own ReLU mask (y > 0): at 67 M outputs some lie within rounding of 0, and one flipped
    mask bit moved the input gradient by 1.4e-2 of its largest value (the H200, s15, fp32 and fp16)."""
    from dmfn_fast.ops import thin_conv as tc

    N, C, H, W, K, stride, pad = shape
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, C, K, K, device="cuda") / (K * C ** 0.5)).to(dtype)
    b = torch.randn(64, device="cuda").to(dtype)
    fast = [_leaf(t) for t in (x, w, b)]
    ref = [_leaf(t.double()) for t in (x, w, b)]
    y = tc.thin_conv(*fast, stride, pad, "relu")
    z64 = tc.thin_conv_reference(*ref, stride, pad, "none")
    g = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, fast, g))
    want = (torch.relu(z64), *torch.autograd.grad(z64, ref, g.double() * (y > 0)))
    for name, a, r in zip(("y", "dx", "dw", "db"), got, want):
        assert _err(a, r) <= TOL[dtype], (name, _err(a, r))


def test_discriminator_thin_conv_in_training():
    """The discriminator's two 3-channel input convolutions by the thin-input kernel as training runs them (bf16
    autocast, channels-last, batch-statistics norms): logits, local features and the input and weight
    gradients held to an fp32 run of the plain layers (TF32 off), as the generator's test holds its own: at
    most twice as far as the bf16 run of the plain layers, plus 1e-2 (relative L2). The two bf16 runs differ
    by their roundings alone; compared directly, an input gradient stood 3.01e-2 apart (the H200, s15)."""
    from dmfn_fast.models import Discriminator
    from dmfn_fast.ops import thin_conv as tc

    torch.manual_seed(0)
    D = Discriminator(nf=32, impl="fast").cuda().to(memory_format=torch.channels_last)
    D_ref = Discriminator(nf=32, impl="reference", init=False).cuda().to(memory_format=torch.channels_last)
    D_ref.load_state_dict(D.state_dict())
    cl = torch.channels_last
    xl = (torch.rand(4, 3, 128, 128, device="cuda") * 2 - 1).contiguous(memory_format=cl)
    xg = (torch.rand(4, 3, 256, 256, device="cuda") * 2 - 1).contiguous(memory_format=cl)
    calls = []
    real = tc._ThinConvEager.apply
    tc._ThinConvEager.apply = lambda *a: calls.append(1) or real(*a)
    out = {}
    D32 = Discriminator(nf=32, impl="reference", init=False).cuda().to(memory_format=torch.channels_last)
    D32.load_state_dict(D.state_dict())
    try:
        for name, model in (("fast", D), ("ref", D_ref), ("fp32", D32)):
            ins = [_leaf(xl), _leaf(xg)]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "fp32"):
                logits, feats = model(*ins)
            loss = logits.float().square().sum() + sum(f.float().square().mean() for f in feats)
            grads = torch.autograd.grad(loss, ins + [model.local_fea1.conv.weight, model.global_model[0].conv.weight])
            out[name] = [logits, *feats, *grads]
    finally:
        tc._ThinConvEager.apply = real
    assert len(calls) == 2
    _strays_no_further(out["fast"], out["ref"], out["fp32"], 1e-2)


def test_generator_thin_conv_in_training():
    """The generator's input convolution by the thin-input kernel as training runs it (bf16 autocast,
    channels-last, inside its selectively checkpointed region, recomputed in backward), and at inference: held
    to an fp32 run (TF32 off) as test_generator_training_autocast_matches_reference holds the fused path, it
    strays at most twice as far as the same run with the plain layers plus 1e-2 (relative L2), output and
    every weight gradient."""
    from dmfn_fast.models import Generator
    from dmfn_fast.ops import thin_conv as tc

    torch.manual_seed(0)
    G = Generator(nf=32, n_blocks=2, impl="fast").cuda().to(memory_format=torch.channels_last)
    x = torch.cat([torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1,
                   (torch.rand(2, 1, 64, 64, device="cuda") > 0.5).float()], 1)
    g = torch.randn(2, 3, 64, 64, device="cuda")
    calls = []
    real_forward, real_function = tc._forward, tc._ThinConvEager.apply

    def run(thin, autocast):
        G.zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DMFN_RECOMPUTE", "1")  # the checkpointed region (read per call)
            mp.setattr(tc, "_forward", lambda *a: calls.append("kernel") or real_forward(*a))
            mp.setattr(tc._ThinConvEager, "apply", lambda *a: calls.append("function") or real_function(*a))
            if not thin:
                mp.setattr(tc, "use_fast", lambda *a, **k: False)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                y = G(x)
                with torch.no_grad():
                    y_inf = G(x)
            y.float().backward(g)
        return [y.float(), y_inf.float()] + [p.grad.float().clone() for n, p in G.named_parameters()
                                             if n.endswith("weight")]

    exact = run(False, False)
    thin, plain = run(True, True), run(False, True)
    # the training forward and its recompute in backward through the eager Function (not the traced op), and
    # the inference forward
    assert sorted(calls) == ["function"] * 2 + ["kernel"] * 3, calls
    _strays_no_further(thin, plain, exact, 1e-2)
