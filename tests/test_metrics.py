"""Hand-written metrics against known values and against scikit-image on real photographs."""
import math

import numpy as np
import pytest
import torch
from skimage import data, metrics as skm

from dmfn_fast.metrics import l1, psnr, ssim, ssim_map


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].double()


@pytest.fixture(scope="module")
def pair():
    a = data.astronaut()[100:197, 150:271].astype(np.float64) / 255  # odd size 97x121
    rng = np.random.default_rng(0)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    return a, b


def test_identical_images():
    x = torch.rand(2, 3, 31, 37)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert (l1(x, x) == 0).all()


def test_psnr_known_noise_level():
    """A constant error e gives MSE e^2, so PSNR = -20 log10(e); +-e at random keeps it exact."""
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 0.8 + 0.1
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    for e in (0.1, 0.01, 1 / 255):
        assert psnr(x + e * sign, x).item() == pytest.approx(-20 * math.log10(e), abs=1e-9)
        assert l1(x + e * sign, x).item() == pytest.approx(e, abs=1e-12)
    assert psnr(x + 0.1, x, data_range=255.0).item() == pytest.approx(20 * math.log10(2550), abs=1e-9)


def test_psnr_matches_skimage(pair):
    a, b = pair
    assert psnr(t(a), t(b)).item() == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=1), abs=1e-9)


def test_ssim_matches_skimage(pair):
    """Same value as skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1): same window and the same border convention
    (map cropped by 5 pixels before averaging; full map padded by mirroring like scipy)."""
    a, b = pair
    ref, full = skm.structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1, full=True)
    assert 0.3 < ref < 0.95
    assert ssim(t(a), t(b)).item() == pytest.approx(ref, abs=1e-10)
    assert np.abs(ssim_map(t(a), t(b))[0].permute(1, 2, 0).numpy() - full).max() < 1e-10
    # Averaging the whole map instead (border included) would differ by this much:
    assert abs(full.mean() - ref) > 1e-4


def test_masked_metrics(pair):
    a, b = pair
    mask = np.zeros(a.shape[:2], bool)
    mask[20:60, 30:90] = True
    m = torch.from_numpy(mask)[None, None]
    d = (a - b)[mask]
    assert psnr(t(a), t(b), m).item() == pytest.approx(-10 * math.log10((d**2).mean()), abs=1e-9)
    assert l1(t(a), t(b), m).item() == pytest.approx(np.abs(d).mean(), abs=1e-12)
    _, full = skm.structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1, full=True)
    assert ssim(t(a), t(b), m).item() == pytest.approx(full[mask].mean(), abs=1e-10)
    # Pixels outside the mask do not count.
    b2 = b.copy()
    b2[~mask] = 0
    assert psnr(t(a), t(b2), m).item() == pytest.approx(psnr(t(a), t(b), m).item(), abs=1e-9)


def test_per_image_and_tiny():
    x = torch.rand(3, 3, 6, 5)
    y = x.clone()
    y[1] += 0.05
    p = psnr(x, y)
    assert p.shape == (3,) and torch.isinf(p[0]) and p[1] == pytest.approx(26.0206, abs=1e-3)
    s = ssim(x, y)  # smaller than the window: whole map, mirrored padding
    assert s.shape == (3,) and s[0] == pytest.approx(1.0) and s[1] < 1
