"""dmfn-fast: DMFN image inpainting (Hui et al., arXiv 2002.02609) with fused kernels."""
from .ops import _impl

_impl.check_environment()  # a bad DMFN_* switch stops here, before any work
from . import losses  # noqa: E402
from .models import DMFB, Discriminator, Generator, init_weights  # noqa: E402
from .vgg import VGG19Features  # noqa: E402

__all__ = ["Generator", "Discriminator", "DMFB", "VGG19Features", "init_weights", "losses"]
__version__ = "0.1.0"
