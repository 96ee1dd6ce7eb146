"""dmfn-fast: DMFN image inpainting (Hui et al., arXiv 2002.02609) with fused kernels."""
from . import losses
from .models import DMFB, Discriminator, Generator, init_weights
from .vgg import VGG19Features

__all__ = ["Generator", "Discriminator", "DMFB", "VGG19Features", "init_weights", "losses"]
__version__ = "0.1.0"
