"""Each loss against a float64 computation written out by hand from the paper's definitions."""
import math

import numpy as np
import pytest
import torch

from dmfn_fast import Generator, VGG19Features, losses
from dmfn_fast.losses import l1_mean
from dmfn_fast.ops.centroid_align import centroid_align_loss, centroid_align_loss_reference, centroids_reference

W_L = [1e3 / c**2 for c in (64, 128, 256, 512, 512)]


def rnd(*shape, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(*shape, generator=g, dtype=torch.float64)
    return t if positive else t * 2 - 1


def test_layer_weights():
    assert losses.LAYER_WEIGHTS == pytest.approx(W_L)


def test_reconstruction_loss():
    a, b = rnd(2, 3, 5, 4, seed=1), rnd(2, 3, 5, 4, seed=2)
    want = np.mean(np.abs(a.numpy() - b.numpy()))
    assert losses.reconstruction_loss(a, b).item() == pytest.approx(want, rel=1e-12)


def _centroids_by_hand(f):
    N, C, H, W = f.shape
    out = np.zeros((N, C, 2))
    for n in range(N):
        for c in range(C):
            s = sx = sy = 0.0
            for h in range(H):
                for w in range(W):
                    p = f[n, c, h, w] + 1e-7
                    s += p
                    sx += p * (2 * w / W - 1)
                    sy += p * (2 * h / H - 1)
            out[n, c] = sx / s, sy / s
    return out


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 6, 3), (2, 2, 1, 1)])
def test_centroid_loss_by_hand_non_square(shape):
    fo, ft = rnd(*shape, seed=3, positive=True), rnd(*shape, seed=4, positive=True)
    want = np.mean((_centroids_by_hand(fo.numpy()) - _centroids_by_hand(ft.numpy())) ** 2)
    assert centroid_align_loss_reference(fo, ft).item() == pytest.approx(want, rel=1e-10, abs=1e-15)
    assert centroid_align_loss(fo, ft, impl="reference").item() == pytest.approx(want, rel=1e-10, abs=1e-15)


def test_centroid_follows_paper_axes():
    """Mass in the bottom-left corner: x near -1 (left), y near 2*3/4 - 1 (bottom row)."""
    f = torch.zeros(1, 1, 4, 6, dtype=torch.float64)
    f[0, 0, 3, 0] = 1.0
    cx, cy = centroids_reference(f)[0, 0].tolist()
    assert cx == pytest.approx(-1, abs=1e-5) and cy == pytest.approx(0.5, abs=1e-5)


def test_centroid_loss_is_finite_for_zero_channel():
    fo = torch.zeros(1, 2, 3, 3)
    ft = rnd(1, 2, 3, 3, positive=True).float()
    assert torch.isfinite(centroid_align_loss_reference(fo, ft))


def test_guidance_map_and_self_guided_loss_by_hand():
    N, H, W = 2, 6, 4
    out, tgt = rnd(N, 3, H, W, seed=5), rnd(N, 3, H, W, seed=6)
    f1o, f1t = rnd(N, 2, H, W, seed=7), rnd(N, 2, H, W, seed=8)
    f2o, f2t = rnd(N, 3, H // 2, W // 2, seed=9), rnd(N, 3, H // 2, W // 2, seed=10)
    o, t = out.numpy(), tgt.numpy()
    E = ((o - t) ** 2).mean(1)  # [N, H, W]
    En = E / E.reshape(N, -1).max(1)[:, None, None]
    En2 = En.reshape(N, H // 2, 2, W // 2, 2).mean((2, 4))
    G1, G2 = 1 + En[:, None], 1 + En2[:, None]
    want = W_L[0] * np.mean(np.abs(f1o.numpy() * G1 - f1t.numpy() * G1)) + W_L[1] * np.mean(
        np.abs(f2o.numpy() * G2 - f2t.numpy() * G2)
    )
    got = losses.self_guided_loss([f1o, f2o], [f1t, f2t], out, tgt)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_guidance_map_of_perfect_image_is_zero_not_nan():
    x = rnd(2, 3, 4, 4)
    en = losses.guidance_map(x, x.clone())
    assert torch.isfinite(en).all() and torch.all(en == 0)


def test_feature_matching_loss_by_hand():
    fo = [rnd(2, 3, 4, 4, seed=i) for i in range(5)]
    ft = [rnd(2, 3, 4, 4, seed=10 + i) for i in range(5)]
    want = sum(W_L[l] * np.mean(np.abs(fo[l].numpy() - ft[l].numpy())) for l in (2, 3, 4))
    assert losses.feature_matching_loss(fo, ft).item() == pytest.approx(want, rel=1e-12)


def _bce(x, y):
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


def test_relativistic_average_losses_by_hand():
    r, f = rnd(5, 1, seed=11) * 3, rnd(5, 1, seed=12) * 3
    rl, fl = r.flatten().tolist(), f.flatten().tolist()
    mr, mf = np.mean(rl), np.mean(fl)
    d = (np.mean([_bce(x - mf, 1) for x in rl]) + np.mean([_bce(x - mr, 0) for x in fl])) / 2
    g = (np.mean([_bce(x - mf, 0) for x in rl]) + np.mean([_bce(x - mr, 1) for x in fl])) / 2
    assert losses.rals_d_loss(r, f).item() == pytest.approx(d, rel=1e-10)
    assert losses.rals_g_loss(r, f).item() == pytest.approx(g, rel=1e-10)


def test_generator_adversarial_loss_does_not_backprop_into_real_logits():
    r = rnd(4, 1, seed=13).requires_grad_()
    f = rnd(4, 1, seed=14).requires_grad_()
    losses.rals_g_loss(r, f).backward()
    assert r.grad is None and f.grad is not None and f.grad.abs().sum() > 0


def test_disc_feature_matching_by_hand_and_target_detached():
    shapes = [(2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2), (2, 4, 2, 2), (2, 4, 1, 1)]
    a = [rnd(*s, seed=20 + i).requires_grad_() for i, s in enumerate(shapes)]
    b = [rnd(*s, seed=30 + i).requires_grad_() for i, s in enumerate(shapes)]
    want = sum(W_L[k] * np.mean(np.abs(a[k].detach().numpy() - b[k].detach().numpy())) for k in range(5))
    got = losses.disc_feature_matching_loss(a, b)
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert all(t.grad is None for t in b) and all(t.grad is not None for t in a)


def test_combined_loss_terms_weights_and_gradient_flow():
    torch.manual_seed(0)
    vgg = VGG19Features(weights="random")
    g = Generator(nf=16, n_blocks=1)
    tgt = torch.rand(2, 3, 24, 20) * 2 - 1
    mask = torch.zeros(2, 1, 24, 20)
    mask[..., 6:18, 4:14] = 1
    raw = g(torch.cat([tgt * (1 - mask), mask], 1))
    out = mask * raw + (1 - mask) * tgt
    r, f = torch.randn(2, 1), torch.randn(2, 1, requires_grad=True)
    ff = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(5)]
    fr = [torch.randn(2, 4, 3, 3) for _ in range(5)]
    crit = losses.DMFNLoss(vgg)
    total, terms = crit(out, tgt, r, f, ff, fr)
    assert set(terms) == {"rec", "guided", "fm_vgg", "align", "adv", "fm_dis"}
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    assert terms["rec"].item() == pytest.approx(losses.reconstruction_loss(out, tgt).item())
    assert terms["adv"].item() == pytest.approx(0.003 * losses.rals_g_loss(r, f).item())
    fo, ft = vgg(out), vgg(tgt)
    assert terms["fm_vgg"].item() == pytest.approx(25 * losses.feature_matching_loss(fo, ft).item(), rel=1e-5)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g.parameters())
    assert g.encoder[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in vgg.parameters())
    # Weights are arguments.
    _, terms0 = losses.DMFNLoss(vgg, w_rec=0.0, w_align=2.0)(out.detach(), tgt)
    assert terms0["rec"].item() == 0 and set(terms0) == {"rec", "guided", "fm_vgg", "align"}


def test_impl_fast_runs_where_the_vgg_kernel_cannot(monkeypatch):
    """DMFNLoss(impl="fast") asks the fast path of the centroid op (which runs on CPUs) and of the VGG's
    bias + ReLU and max-pool kernels and the L1 kernels (which need CUDA and Triton): on a CPU the VGG and the
    L1 terms keep their plain layers and formula, without an error, and the terms are the reference's."""
    from dmfn_fast.ops import bias_act, centroid_align, l1_loss, max_pool

    if not centroid_align.extension_available():
        pytest.skip("the centroid extension is not built: impl='fast' has nothing to run here")
    torch.manual_seed(0)
    vgg = VGG19Features(weights="random")
    out, tgt = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    calls = []
    monkeypatch.setattr(bias_act, "bias_act", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(max_pool, "max_pool2x2", lambda *a, **k: calls.append(2))
    monkeypatch.setattr(l1_loss, "l1_mean", lambda *a, **k: calls.append(3))
    _, fast = losses.DMFNLoss(vgg, impl="fast")(out, tgt)
    _, ref = losses.DMFNLoss(vgg, impl="reference")(out, tgt)
    assert not calls
    for k in ref:
        assert fast[k].item() == pytest.approx(ref[k].item(), rel=1e-4, abs=1e-9), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_l1_mean_same_gradients_as_the_formula(dtype, guided):
    """l1_mean keeps int8 signs for backward: the gradient equals autograd's of (a*g - b*g).abs().mean()
    bit for bit, zero differences included; the value to rounding (a different summation order)."""
    torch.manual_seed(0)
    a0 = torch.randn(2, 5, 9, 7).to(dtype)
    b = a0.clone()
    b[0, :2] = torch.randn(2, 9, 7).to(dtype)  # the rest differ by exactly 0: sign 0, gradient 0
    g = (1 + torch.rand(2, 1, 9, 7)).to(dtype) if guided else None
    out = {}
    for name, fn in (("formula", lambda a: (a * g - b * g).abs().mean() if guided else (a - b).abs().mean()),
                     ("l1_mean", lambda a: l1_mean(a, b, g))):
        a = a0.clone().requires_grad_()
        v = fn(a)
        v.backward(torch.tensor(3.0, dtype=v.dtype))
        out[name] = (v.detach(), a.grad)
    assert out["l1_mean"][0].dtype == out["formula"][0].dtype
    torch.testing.assert_close(out["l1_mean"][0], out["formula"][0], rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=0)
    assert torch.equal(out["l1_mean"][1], out["formula"][1])
    assert (out["l1_mean"][1][1] == 0).all()


def test_every_l1_term_asks_the_kernels_with_the_loss_impl(monkeypatch):
    """DMFNLoss's guided (2), VGG feature-matching (3) and discriminator feature-matching (one per feature) terms
    each ask ops.l1_loss.use_fast with the loss's impl, with b and g that need no gradient; where it says no,
    _L1Mean runs."""
    from dmfn_fast.ops import l1_loss

    torch.manual_seed(0)
    asked = []

    def ask(a, b, g=None, impl="auto"):
        asked.append((impl, g is not None, b.requires_grad))
        return False
    monkeypatch.setattr(l1_loss, "use_fast", ask)
    vgg = VGG19Features(weights="random")
    out = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    tgt = torch.rand(2, 3, 32, 32) * 2 - 1
    ff = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(5)]
    fr = [torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(5)]  # detached by the term
    for impl in ("reference", "fast"):
        asked.clear()
        losses.DMFNLoss(vgg, impl=impl)(out, tgt, torch.randn(2, 1), torch.randn(2, 1), ff, fr)
        assert asked == [(impl, True, False)] * 2 + [(impl, False, False)] * 3 + [(impl, False, False)] * 5


def test_l1_mean_keeps_int8_signs_for_backward():
    a = torch.randn(2, 3, 8, 8, requires_grad=True)
    b, g = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        l1_mean(a, b, g)
    assert saved == [(torch.int8, (2, 3, 8, 8)), (torch.float32, (2, 1, 8, 8))]
    b.requires_grad_()  # a gradient for b too: the plain formula
    l1_mean(a, b).backward()
    assert b.grad is not None
