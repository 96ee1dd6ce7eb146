"""Geometric alignment (centroid) loss of DMFN, on VGG relu4_1 features.

Per (n, c): p = (f + 1e-7) / sum(f + 1e-7); cx = sum p*u, cy = sum p*v with
u = 2*w/W - 1 along the width and v = 2*h/H - 1 along the height. The loss is
the mean over (n, c, {x, y}) of the squared centroid difference.

The authors' public code builds its vertical grid along the width axis, so both
of its components measure horizontal position; we follow the paper (v along H).
"""
import torch

from ._impl import use_fast

EPS = 1e-7


def centroids_reference(f: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2] centroids (x, y), computed in fp32 or wider."""
    if f.dim() != 4:
        raise ValueError(f"feature map must be [N, C, H, W], got shape {tuple(f.shape)}")
    f = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
    H, W = f.shape[-2:]
    u = torch.arange(W, device=f.device, dtype=f.dtype) * (2.0 / W) - 1.0
    v = torch.arange(H, device=f.device, dtype=f.dtype) * (2.0 / H) - 1.0
    f = f + EPS
    s0 = f.sum(dim=(2, 3))
    cx = (f * u.view(1, 1, 1, W)).sum(dim=(2, 3)) / s0
    cy = (f * v.view(1, 1, H, 1)).sum(dim=(2, 3)) / s0
    return torch.stack([cx, cy], dim=-1)


def centroid_align_loss_reference(f_out: torch.Tensor, f_tgt: torch.Tensor) -> torch.Tensor:
    if f_out.shape != f_tgt.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(f_out.shape)} vs {tuple(f_tgt.shape)}")
    return (centroids_reference(f_out) - centroids_reference(f_tgt)).pow(2).mean()


def centroid_align_loss(f_out: torch.Tensor, f_tgt: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """The alignment loss; the C++/CUDA extension where it is built, else the reference."""
    if use_fast(impl, False, "the dmfn_fast C++ extension is not built"):
        raise AssertionError("unreachable")
    return centroid_align_loss_reference(f_out, f_tgt)
