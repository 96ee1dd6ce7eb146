"""The DMFB's fused fast path (Triton). Placeholder until the kernels land:
`can_fuse` reports False, so every block runs its PyTorch reference."""
import torch


def can_fuse(x: torch.Tensor):
    """(ok, reason): whether the fused DMFB can run on this input."""
    return False, "the fused Triton DMFB is not implemented yet"


def dmfb_fused(block, x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError
