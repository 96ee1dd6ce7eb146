"""VGG19Features: torchvision-format weights, normalization, frozen, and a clear error without weights."""
import pytest
import torch
import torch.nn.functional as F

from dmfn_fast import VGG19Features
from dmfn_fast.vgg import _CFG


def _torchvision_style_state_dict(seed=0):
    """A full torchvision vgg19 state dict (features + classifier) with random values."""
    g = torch.Generator().manual_seed(seed)
    sd, c, i = {}, 3, 0
    for v in _CFG + ["M", 512, 512, 512, "M"][1:]:
        if v == "M":
            i += 1
            continue
        sd[f"features.{i}.weight"] = torch.randn(v, c, 3, 3, generator=g) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(v, generator=g) * 0.05
        c, i = v, i + 2
    sd["classifier.0.weight"] = torch.randn(10, 10)
    return sd


def test_loads_torchvision_file_and_matches_functional_vgg(tmp_path):
    sd = _torchvision_style_state_dict()
    path = tmp_path / "vgg19.pth"
    torch.save(sd, path)
    vgg = VGG19Features(weights=str(path))
    assert vgg.pretrained and not vgg.training
    assert all(not p.requires_grad for p in vgg.parameters())
    x = torch.rand(1, 3, 20, 18) * 2 - 1
    feats = vgg(x)
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]
    # relu1_1 by hand, from the [-1, 1] input normalized as the authors' feature network does.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    y = (x - (mean - 1)) / (2 * std)
    r11 = F.relu(F.conv2d(y, sd["features.0.weight"], sd["features.0.bias"], padding=1))
    torch.testing.assert_close(feats[0], r11, rtol=1e-5, atol=1e-5)
    h = F.relu(F.conv2d(r11, sd["features.2.weight"], sd["features.2.bias"], padding=1))
    r21 = F.relu(F.conv2d(F.max_pool2d(h, 2), sd["features.5.weight"], sd["features.5.bias"], padding=1))
    torch.testing.assert_close(feats[1], r21, rtol=1e-5, atol=1e-5)


def test_stays_frozen_under_train():
    vgg = VGG19Features(weights="random")
    vgg.train()
    assert not vgg.training


def test_missing_weights_error_says_how_to_supply(monkeypatch, tmp_path):
    monkeypatch.delenv("DMFN_VGG19_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="vgg19-dcbb9e9d.pth.*weights='random'"):
        VGG19Features()
    with pytest.raises(FileNotFoundError, match="not found"):
        VGG19Features(weights=str(tmp_path / "nope.pth"))


def test_rejects_a_file_that_is_not_vgg19(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="not a torchvision vgg19"):
        VGG19Features(weights=str(path))


def test_recompute_same_values_and_gradients_less_saved(saved_bytes):
    """recompute=True (the fast path's training): the same maps and input gradient, and the layers between
    the returned maps are not saved for backward."""
    torch.manual_seed(0)
    vgg = VGG19Features("random")
    x0 = torch.randn(2, 3, 40, 36)
    w = [torch.randn(1) for _ in range(5)]
    results = {}
    for recompute in (False, True):
        x = x0.clone().requires_grad_()
        feats, saved = saved_bytes(vgg, x, recompute=recompute)
        sum(wi * f.square().mean() for wi, f in zip(w, feats)).backward()
        results[recompute] = ([f.detach() for f in feats], x.grad, saved)
    (f0, g0, s0), (f1, g1, s1) = results[False], results[True]
    for a, b in zip(f0, f1):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-9)
    assert s1 < 0.6 * s0, (s1, s0)
    with torch.no_grad():  # nothing to recompute without autograd
        assert all(torch.equal(a, b) for a, b in zip(vgg(x0, recompute=True), f0))
