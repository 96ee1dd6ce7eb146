"""Frozen VGG19 feature extractor for the perceptual losses.

Defined here (not imported from torchvision, which does not run beside the CPU
torch wheel) with torchvision's layer indices, so its `vgg19` state dict loads."""
import functools
import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .ops._impl import has_hooks
from .ops import max_pool
from .ops.bias_act import conv_bias_act
from .recipes import check_recipe

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
# torchvision vgg19 config; "M" is a 2x2 max-pool.
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512]
# Indices in `features` of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
LAYERS = (1, 6, 11, 20, 29)
CHANNELS = (64, 128, 256, 512, 512)
HOW_TO = (
    "VGG19 weights are needed for the perceptual losses. Download torchvision's file "
    f"{VGG19_URL} and pass its path (VGG19Features(weights=PATH), train.py --vgg-weights PATH, "
    "or the DMFN_VGG19_WEIGHTS environment variable), or put it in the torch hub cache "
    "(<torch.hub.get_dir()>/checkpoints/). For smoke tests only, weights='random'."
)


def _build_features():
    layers, c = [], 3
    for v in _CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers[: LAYERS[-1] + 1])


def _load_weights(weights):
    """A state dict from a path, the hub cache, or a download; None for 'random'."""
    if weights == "random":
        return None
    if weights == "auto":
        weights = os.environ.get("DMFN_VGG19_WEIGHTS") or None
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"VGG19 weights file not found: {weights}. {HOW_TO}")
        return torch.load(weights, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(VGG19_URL, map_location="cpu", progress=False, weights_only=True)
    except Exception as e:  # no network, no cache
        raise RuntimeError(f"Could not get VGG19 weights ({type(e).__name__}: {e}). {HOW_TO}") from None


def _run_fused(stage, x, convs=True, pools=False):
    """stage (a slice of `features`) on x; convs: each Conv2d + ReLU pair as one conv_bias_act; pools: each 2x2
    max pool by ops.max_pool (no indices)."""
    layers, i = list(stage), 0
    while i < len(layers):
        if convs and isinstance(layers[i], nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU):
            x = conv_bias_act(layers[i], x, "relu")
            i += 2
        elif pools and max_pool.fits(layers[i]):
            x = max_pool.max_pool2x2(x)
            i += 1
        else:
            x = layers[i](x)
            i += 1
    return x


class VGG19Features(nn.Module):
    """relu1_1 .. relu5_1 of an image x in [-1, 1]. Frozen, eval mode.

    The input is normalised as the authors' feature network does, (x - (mean - 1)) / (2 * std)
    with the ImageNet mean and std, under both recipes (the paper does not say; their code is
    the specification). It is not the ImageNet-correct ((x + 1) / 2 - mean) / std: it sits about
    one std per channel higher, and the perceptual losses' scale was tuned with it.

    weights: "auto" (DMFN_VGG19_WEIGHTS, then the hub cache or a download), a file path
    in torchvision's vgg19 format, or "random" (tests and smoke runs only)."""

    def __init__(self, weights="auto", recipe="paper"):
        super().__init__()
        self.recipe = check_recipe(recipe)
        self.features = _build_features()
        sd = _load_weights(weights)
        self.pretrained = sd is not None
        if sd is not None:
            sd = {k: v for k, v in sd.items() if k.startswith("features.")}
            own = self.state_dict()
            missing = [k for k in own if k not in sd]
            if missing:
                raise ValueError(f"not a torchvision vgg19 state dict: missing {missing[:3]}. {HOW_TO}")
            self.load_state_dict({k: sd[k] for k in own})
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        self.register_buffer("shift", (mean - 1).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", (2 * std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # always frozen

    def forward(self, x, recompute=False, fused=False, pool=False):
        """The five feature maps. recompute=True (training with the fast path): each stage after the first
        keeps only its input for backward and reruns its layers there, so the layers between the returned
        maps (relu1_2, the pools and their int64 indices, relu3_2 ...) are not held from the forward to the
        backward: at 256 px, batch 16, 664 MiB less peak memory for the cost of rerunning relu1_1 -> relu5_1
        once in the backward (benchmarks/roofline.py). The values and gradients are the same.
        fused=True: each convolution's bias and ReLU in one pass (ops.bias_act.conv_bias_act; the caller
        decides where it runs, as DMFNLoss does with use_fast; not where a layer has hooks, which
        it would skip): on a channels-last input, the plain layers' values and gradients to the bit (the
        kernel's output is channels-last, so an NCHW input costs one conversion).
        pool=True: the four 2x2 max pools by ops.max_pool, which keeps no indices (ATen's values and gradients to
        the bit; the caller decides where it runs, as DMFNLoss does with max_pool.use_fast)."""
        x = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out, start = [], 0
        recompute = recompute and torch.is_grad_enabled() and x.requires_grad
        hooked = any(has_hooks(m) for m in self.features.modules())
        fused, pool = fused and not hooked, pool and not hooked
        for end in LAYERS:
            stage = self.features[start:end + 1]
            if fused or pool:
                stage = functools.partial(_run_fused, stage, convs=fused, pools=pool)
            if recompute and start > 0:
                x = checkpoint(stage, x, use_reentrant=False, preserve_rng_state=False)
            else:
                x = stage(x)
            out.append(x)
            start = end + 1
        return out
