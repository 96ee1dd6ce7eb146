"""The reference Generator and Discriminator: the authors' key names and sizes, and input checks."""
import pytest
import torch

from dmfn_fast import DMFB, Discriminator, Generator

# Key names from the authors' released code (issue: "Reference DMFN in PyTorch").
_BLOCK_KEYS = ["c1", "d1", "d2", "d3", "d4", "c2"]
G_KEYS = (
    [f"encoder.{i}.conv.{p}" for i in range(4) for p in ("weight", "bias")]
    + [f"blocks.{b}.{c}.{p}" for b in range(8) for c in _BLOCK_KEYS for p in ("weight", "bias")]
    + [
        "decoder.0.conv.weight", "decoder.0.conv.bias",
        "decoder.1.deconv.weight", "decoder.1.deconv.bias",
        "decoder.1.conv.conv.weight", "decoder.1.conv.conv.bias",
        "decoder.2.deconv.weight", "decoder.2.deconv.bias",
        "decoder.2.conv.conv.weight", "decoder.2.conv.conv.bias",
        "decoder.3.conv.weight", "decoder.3.conv.bias",
    ]
)
_D_BLOCK = ["conv.weight", "conv.bias", "norm.weight", "norm.bias", "norm.running_mean",
            "norm.running_var", "norm.num_batches_tracked"]
D_KEYS = (
    [f"global_model.{i}.{k}" for i in range(6) for k in _D_BLOCK]
    + [f"local_fea{i}.{k}" for i in range(1, 6) for k in _D_BLOCK]
    + ["global_classifier.weight", "global_classifier.bias", "local_classifier.weight",
       "local_classifier.bias", "classifier.1.weight", "classifier.1.bias"]
)


def _input(n=2, h=32, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 3, h, w, generator=g) * 2 - 1
    mask = (torch.rand(n, 1, h, w, generator=g) > 0.6).float()
    return img, mask


def test_generator_keys_and_parameter_count():
    g = Generator()
    assert len(G_KEYS) == 116
    assert list(g.state_dict()) == G_KEYS
    assert sum(p.numel() for p in g.parameters()) == 9_037_443


def test_discriminator_keys_and_parameter_count():
    d = Discriminator()
    assert len(D_KEYS) == 83
    assert list(d.state_dict()) == D_KEYS
    assert sum(p.numel() for p in d.parameters()) == 36_673_025


def test_dmfb_dilations_and_shapes():
    b = DMFB(32, 16)
    for i, d in enumerate((1, 2, 4, 8), 1):
        conv = getattr(b, f"d{i}")
        assert conv.dilation == (d, d) and conv.padding == (d, d)
    x = torch.randn(2, 32, 13, 11)
    assert b(x).shape == x.shape


def test_dmfb_reference_matches_spec_by_hand():
    """forward_reference against the spec's equations written out with functional ops."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    b = DMFB(32, 16).double()
    x = torch.randn(2, 32, 9, 7, dtype=torch.float64)
    h = F.relu(F.instance_norm(F.conv2d(x, b.c1.weight, b.c1.bias, padding=1)))
    ks, acc = [], 0
    for i, d in enumerate((1, 2, 4, 8), 1):
        conv = getattr(b, f"d{i}")
        acc = acc + F.conv2d(h, conv.weight, conv.bias, padding=d, dilation=d)
        ks.append(acc)
    t = F.relu(F.instance_norm(torch.cat(ks, 1)))
    want = x + F.instance_norm(F.conv2d(t, b.c2.weight, b.c2.bias, padding=1))
    torch.testing.assert_close(b(x), want, rtol=1e-12, atol=1e-12)


def test_dmfb_block_reference_is_the_module_path():
    """dmfb_block_reference (dmfn_fast/ops/dmfb.py), which forward_reference and forward (impl="reference")
    call, gives exactly what the block's own modules computed before it moved there."""
    import torch.nn.functional as F

    from dmfn_fast.ops.dmfb import dmfb_block_reference

    torch.manual_seed(2)
    b = DMFB(32, 16, impl="reference")
    x = torch.randn(2, 32, 11, 9)
    h = torch.relu(F.instance_norm(b.c1(x)))
    k1 = b.d1(h)
    k2 = k1 + b.d2(h)
    k3 = k2 + b.d3(h)
    k4 = k3 + b.d4(h)
    t = torch.relu(F.instance_norm(torch.cat([k1, k2, k3, k4], 1)))
    want = x + F.instance_norm(b.c2(t))
    with torch.no_grad():
        assert torch.equal(dmfb_block_reference(x, b.params()), want.detach())
        assert torch.equal(b.forward_reference(x), want.detach())
        assert torch.equal(b(x), want.detach())


def test_state_dict_round_trip_gives_identical_outputs():
    g1, g2 = Generator(nf=16, n_blocks=2), Generator(nf=16, n_blocks=2)
    img, mask = _input()
    x = torch.cat([img * (1 - mask), mask], 1)
    assert not torch.equal(g1(x), g2(x))
    g2.load_state_dict(g1.state_dict())
    assert torch.equal(g1(x), g2(x))


def test_authors_module_prefix_is_accepted():
    g1, g2 = Generator(nf=16, n_blocks=1), Generator(nf=16, n_blocks=1)
    g2.load_state_dict({"module." + k: v for k, v in g1.state_dict().items()})
    for a, b in zip(g1.parameters(), g2.parameters()):
        assert torch.equal(a, b)


def test_other_models_checkpoint_is_rejected_clearly():
    g = Generator()
    with pytest.raises(ValueError, match="not a DMFN Generator"):
        g.load_state_dict(Discriminator().state_dict())
    with pytest.raises(ValueError, match="differ in shape"):
        g.load_state_dict(Generator(nf=32).state_dict())
    with pytest.raises(ValueError, match="not a DMFN Discriminator"):
        Discriminator().load_state_dict(g.state_dict())


def test_init_statistics():
    g, d = Generator(), Discriminator()
    w = torch.cat([b.c2.weight.flatten() for b in g.blocks])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert all(torch.all(m.bias == 0) for m in g.modules() if isinstance(m, torch.nn.Conv2d))
    bn = d.global_model[1].norm.weight
    assert abs(bn.mean().item() - 1) < 0.01 and 0 < bn.std().item() < 0.05


def test_generator_output_range_and_shape():
    g = Generator(nf=16, n_blocks=2)
    img, mask = _input(n=1, h=20, w=36)
    out = g(torch.cat([img * (1 - mask), mask], 1))
    assert out.shape == (1, 3, 20, 36)
    assert out.abs().max() <= 1


@pytest.mark.parametrize("h,w", [(301, 257), (32, 28), (5, 3)])
def test_inpaint_keeps_known_pixels_bit_exact(h, w):
    g = Generator(nf=16, n_blocks=1)
    img, mask = _input(n=2, h=h, w=w)
    out = g.inpaint(img, mask)
    assert out.shape == img.shape
    known = (mask == 0).expand_as(img)
    assert torch.equal(out[known], img[known])
    # The hole comes from the network, not the input.
    assert not torch.equal(out[~known], img[~known])


def test_inpaint_accepts_bool_mask_and_broadcasts_one_mask():
    g = Generator(nf=16, n_blocks=1)
    img, mask = _input(n=3, h=16, w=12)
    a = g.inpaint(img, mask[:1].bool())
    b = g.inpaint(img, mask[:1].expand(3, -1, -1, -1))
    assert torch.equal(a, b)


def test_forward_rejects_bad_input():
    g = Generator(nf=16, n_blocks=1)
    with pytest.raises(ValueError, match=r"\[N, 4, H, W\]"):
        g(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.randn(1, 4, 18, 16))


def test_inpaint_rejects_bad_masks_and_images():
    g = Generator(nf=16, n_blocks=1)
    img, mask = _input(n=1, h=16, w=16)
    with pytest.raises(ValueError, match="1 channel"):
        g.inpaint(img, mask.expand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="does not match image size"):
        g.inpaint(img, mask[..., :12])
    with pytest.raises(ValueError, match="0 \\(known\\) or 1 \\(missing\\)"):
        g.inpaint(img, mask * 0.5)
    with pytest.raises(ValueError, match=r"image must be \[N, 3, H, W\]"):
        g.inpaint(img[:, :2], mask)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        g.inpaint(img * 255, mask)
    with pytest.raises(ValueError, match="NaN"):
        g.inpaint(img.clone().fill_(float("nan")), mask)


def test_discriminator_outputs_and_input_checks():
    d = Discriminator()
    torch.manual_seed(0)
    logits, feats = d(torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256))
    assert logits.shape == (2, 1)
    assert [f.shape[1:] for f in feats] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]
    with pytest.raises(ValueError, match="x_local"):
        d(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 256, 256))


def test_discriminator_impl_validates_and_keeps_its_hooks(monkeypatch):
    """Discriminator(impl=...) is validated; where the thin-input kernel may run (use_fast patched to say yes,
    the kernel stubbed), a path whose input block or whole global model carries a hook keeps its plain layers,
    so the hook runs."""
    import torch.nn.functional as F

    from dmfn_fast.ops import thin_conv

    with pytest.raises(ValueError, match="impl must be one of"):
        Discriminator(impl="quick")
    d = Discriminator(nf=4, impl="fast")
    calls = []
    monkeypatch.setattr(thin_conv, "use_fast", lambda x, impl="auto": impl != "reference")
    monkeypatch.setattr(thin_conv, "thin_conv", lambda x, w, b, s, p, act: calls.append(1) or F.conv2d(x, w, b, s, p))
    xl, xg = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ref = Discriminator(nf=4, impl="reference", init=False)
        ref.load_state_dict(d.state_dict())
        want = ref(xl, xg)[0]
        assert torch.allclose(d(xl, xg)[0], want) and len(calls) == 2
        fired = []
        h1 = d.local_fea1.register_forward_hook(lambda m, i, o: fired.append("local"))
        h2 = d.global_model.register_forward_pre_hook(lambda m, i: fired.append("global"))
        calls.clear()
        assert torch.allclose(d(xl, xg)[0], want)
        assert calls == [] and sorted(fired) == ["global", "local"]
        h1.remove(), h2.remove()


def test_impl_switch_propagates_and_validates():
    g = Generator(nf=16, n_blocks=2, impl="reference")
    assert all(b.impl == "reference" for b in g.blocks)
    g.impl = "auto"
    assert all(b.impl == "auto" for b in g.blocks)
    with pytest.raises(ValueError, match="impl must be one of"):
        Generator(impl="quick")


@pytest.mark.parametrize("batch", [1, 2])
def test_lean_training_forward_same_values_and_gradients_less_saved(batch, saved_bytes):
    """impl auto/fast in training: the encoder's and decoder's [IN, ReLU, conv] runs are selectively
    checkpointed. Same output and gradients as impl reference (which runs them as plain modules; on the CPU
    both take the DMFB reference), less saved for backward; no grad: the plain path."""
    torch.manual_seed(0)
    G = Generator(nf=8, n_blocks=2, impl="reference")
    x0 = torch.randn(batch, 4, 20, 28)
    runs = {}
    for impl in ("reference", "auto"):
        G.impl = impl
        G.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y, saved = saved_bytes(G, x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        runs[impl] = (y.detach(), x.grad, {n: p.grad for n, p in G.named_parameters()}, saved)
    (y0, gx0, gp0, s0), (y1, gx1, gp1, s1) = runs["reference"], runs["auto"]
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-7)
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-5, atol=1e-7, msg=n)
    assert s1 < 0.8 * s0, (s1, s0)
    with torch.no_grad():
        torch.testing.assert_close(G(x0), y0, rtol=0, atol=0)


@pytest.mark.parametrize("env", [("DMFN_RECOMPUTE", "0"), ("DMFN_IMPL", "reference")])
def test_recompute_switches_off(monkeypatch, env, saved_bytes):
    """DMFN_RECOMPUTE=0 (or DMFN_IMPL=reference) keeps the plain path: as much saved as impl reference."""
    from dmfn_fast.ops._impl import recompute

    torch.manual_seed(0)
    G = Generator(nf=8, n_blocks=1, impl="auto")
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    lean = saved_bytes(G, x)[1]
    monkeypatch.setenv(*env)
    assert not recompute("auto") and not recompute("fast")
    plain = saved_bytes(G, x)[1]
    G.impl = "reference"
    assert plain == saved_bytes(G, x)[1] > lean


def test_lean_path_keeps_container_hooks():
    """A forward hook on a container the lean path would skip (an UpBlock, a conv_block): the plain path."""
    G = Generator(nf=8, n_blocks=1, impl="auto")
    seen = []
    G.decoder[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    G(torch.randn(1, 4, 16, 16, requires_grad=True)).sum().backward()
    assert seen == [torch.Size([1, 16, 8, 8])]
