"""Image quality metrics on [N, C, H, W] tensors in [0, 1]: PSNR, SSIM and L1,
over the whole image or inside a mask. Used by validation and `dmfn-eval`."""
import torch
import torch.nn.functional as F


def _masked_mean(x, mask):
    """Per-image mean of x [N, C, H, W] over pixels where mask [N, 1, H, W] is 1 (all if None)."""
    if mask is None:
        return x.flatten(1).mean(1)
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def psnr(x, y, mask=None, data_range=1.0):
    """Per-image PSNR in dB; inf for identical images."""
    mse = _masked_mean((x.double() - y.double()) ** 2, mask)
    return 10 * torch.log10(data_range**2 / mse)


def l1(x, y, mask=None):
    return _masked_mean((x.double() - y.double()).abs(), mask)


def _gaussian(size=11, sigma=1.5, dtype=torch.float64, device=None):
    g = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    return g / g.sum()


def _symmetric_pad(t, p):
    """Pad the last two dims by p with edge-including mirroring (scipy.ndimage mode 'reflect'), as skimage does."""
    for dim in (-1, -2):
        n = t.shape[dim]
        while n < p:  # tiny images: mirror repeatedly
            t = torch.cat([t.flip(dim), t, t.flip(dim)], dim)
            n = t.shape[dim]
        t = torch.cat([t.narrow(dim, 0, p).flip(dim), t, t.narrow(dim, n - p, p).flip(dim)], dim)
    return t


def ssim_map(x, y, data_range=1.0, win=11, sigma=1.5):
    """SSIM at every pixel, [N, C, H, W]: scikit-image's structural_similarity(full=True) with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False (borders mirrored like scipy)."""
    x, y = x.double(), y.double()
    C = x.shape[1]
    g = _gaussian(win, sigma, device=x.device)
    k = (g[:, None] * g[None, :]).expand(C, 1, win, win).contiguous()
    pad = win // 2

    def blur(t):
        return F.conv2d(_symmetric_pad(t, pad), k, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx**2
    syy = blur(y * y) - my**2
    sxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))


def ssim(x, y, mask=None, data_range=1.0, win=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03).

    Without a mask: the mean of the map without its win // 2 border, like scikit-image's
    structural_similarity (the border depends on padding; images smaller than the window use
    the whole map). With a mask: the mean over the map's pixels inside the mask, border included."""
    s = ssim_map(x, y, data_range, win, sigma)
    if mask is None:
        p = win // 2
        if min(s.shape[-2:]) > 2 * p:
            s = s[..., p:-p, p:-p]
    return _masked_mean(s, mask)
