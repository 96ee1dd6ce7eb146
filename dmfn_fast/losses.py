"""DMFN's losses, with the authors' weights as defaults.

`out` is the composite (generated pixels in the hole, known pixels elsewhere),
`tgt` the ground truth; both in [-1, 1].
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from .ops._impl import recompute
from .ops import bias_act, l1_loss, max_pool
from .ops.centroid_align import centroid_align_loss
from .recipes import check_recipe
from .vgg import CHANNELS, VGG19Features

# w_l = 1e3 / C_l^2 for relu1_1 .. relu5_1, and for the discriminator's 5 local features.
LAYER_WEIGHTS = tuple(1e3 / c**2 for c in CHANNELS)


class _L1Mean(torch.autograd.Function):
    """mean |a*g - b*g| (g None: mean |a - b|), b and g without gradient: the same values and gradients as
    (a*g - b*g).abs().mean(), with less memory. It keeps sign(a*g - b*g) as int8 for backward instead of the
    difference, and builds the gradient in one buffer. At 256 px these run at the training step's memory
    peak (the loss's forward, then the start of its backward)."""

    @staticmethod
    def forward(ctx, a, b, g):
        d = a * g if g is not None else a.clone()
        d.sub_(b * g if g is not None else b)
        # mean |d| without an |d| buffer, summed and divided in fp32 at least (a 16-bit d's own sum overflowed:
        # inf in fp16 once it passed 65504), then rounded once to l1_loss.loss_dtype
        acc = torch.promote_types(d.dtype, torch.float32)
        loss = (torch.linalg.vector_norm(d, 1, dtype=acc) / d.numel()).to(l1_loss.loss_dtype(d))
        ctx.save_for_backward(d.sign_().to(torch.int8), g)
        ctx.dtype = d.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        sign, g = ctx.saved_tensors
        ga = sign.to(ctx.dtype).mul_(grad / sign.numel())  # = mean's and abs's backward, in their order
        return (ga.mul_(g) if g is not None else ga), None, None


def l1_mean(a, b, g=None, impl="auto"):
    """mean |a*g - b*g| (or mean |a - b|) for a with gradient and b, g without: one Triton kernel each way where
    ops.l1_loss.use_fast says so, else _L1Mean."""
    if b.requires_grad or (g is not None and g.requires_grad):
        return l1_loss.l1_mean_reference(a, b, g)
    if l1_loss.use_fast(a, b, g, impl):
        return l1_loss.l1_mean(a, b, g)
    return _L1Mean.apply(a, b, g)


def reconstruction_loss(out, tgt):
    return (out - tgt).abs().mean()


def guidance_map(out, tgt):
    """Per-image normalized error map En = E / max(E), E = channel-mean squared error (detached)."""
    dt = torch.promote_types(out.dtype, torch.float32)  # fp16 squares underflow
    e = (out.detach().to(dt) - tgt.detach().to(dt)).pow(2).mean(1, keepdim=True)
    m = e.amax(dim=(2, 3), keepdim=True)
    return e / torch.where(m > 0, m, torch.ones_like(m))  # a perfect image gives 0, not NaN


def self_guided_loss(feats_out, feats_tgt, out, tgt, layer_weights=LAYER_WEIGHTS, impl="auto"):
    """Guided L1 on relu1_1 (G1 = 1 + En) and relu2_1 (G2 = 1 + avgpool2(En)); impl: l1_mean's."""
    en = guidance_map(out, tgt)
    guides = (1 + en, 1 + F.avg_pool2d(en, 2))
    loss = 0.0
    for fo, ft, g, w in zip(feats_out[:2], feats_tgt[:2], guides, layer_weights[:2]):
        loss = loss + w * l1_mean(fo, ft, g.to(fo.dtype), impl)
    return loss


def feature_matching_loss(feats_out, feats_tgt, layer_weights=LAYER_WEIGHTS, impl="auto"):
    """L1 on relu3_1, relu4_1, relu5_1; impl: l1_mean's."""
    return sum(w * l1_mean(fo, ft, impl=impl) for fo, ft, w in zip(feats_out[2:], feats_tgt[2:], layer_weights[2:]))


def _bce(logits, target: float):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def rals_d_loss(real_logits, fake_logits):
    """Relativistic average GAN loss for the discriminator."""
    r, f = real_logits, fake_logits
    return (_bce(r - f.mean(), 1.0) + _bce(f - r.mean(), 0.0)) / 2


def rals_g_loss(real_logits, fake_logits):
    """Relativistic average GAN loss for the generator; the real logits carry no gradient."""
    r, f = real_logits.detach(), fake_logits
    return (_bce(r - f.mean(), 0.0) + _bce(f - r.mean(), 1.0)) / 2


def disc_feature_matching_loss(feats_fake, feats_real, layer_weights=LAYER_WEIGHTS, impl="auto"):
    """L1 between the discriminator's local features of the output and of the (detached) target; impl:
    l1_mean's."""
    return sum(w * l1_mean(a, b.detach(), impl=impl) for a, b, w in zip(feats_fake, feats_real, layer_weights))


class DMFNLoss(nn.Module):
    """The generator's total loss. Returns (total, {term: value}) so training can log every term.

    Terms whose inputs are not given (no discriminator outputs) are left out.
    `impl` ("auto", "reference", "fast") picks the alignment loss's implementation, and whether the VGG's and the
    L1 terms' Triton kernels may run (each where it can, under its own auto rule: docs/impl.md).
    `recipe` "paper" measures the alignment loss's centroids on the paper's grid (v along the
    height), "authors" on their code's (v along the width; see dmfn_fast.recipes)."""

    def __init__(self, vgg, w_rec=1.0, w_vgg=25.0, w_align=1.0, w_adv=0.003, w_dfm=5.0,
                 layer_weights=LAYER_WEIGHTS, impl="auto", recipe="paper"):
        super().__init__()
        self.recipe = check_recipe(recipe)
        self.vgg = vgg
        self.w_rec, self.w_vgg, self.w_align, self.w_adv, self.w_dfm = w_rec, w_vgg, w_align, w_adv, w_dfm
        self.layer_weights = tuple(layer_weights)
        self.impl = impl

    def forward(self, out, tgt, real_logits=None, fake_logits=None, feats_fake=None, feats_real=None):
        if out.shape != tgt.shape:
            raise ValueError(f"out and tgt differ in shape: {tuple(out.shape)} vs {tuple(tgt.shape)}")
        # the label times the VGG in eager profiles; a compiled graph has none (Dynamo would warn)
        with contextlib.nullcontext() if torch.compiler.is_compiling() else record_function("VGG"):
            # impl auto/fast: the VGG's inner activations are recomputed in backward (VGG19Features.forward);
            # compiled, Inductor picks its own recomputes (as in the generator)
            lean = recompute(self.impl) and isinstance(self.vgg, VGG19Features) and not torch.compiler.is_compiling()
            # each convolution's bias and ReLU in one kernel where it runs (ops.bias_act.use_fast), and the pools
            # without indices (ops.max_pool.use_fast)
            ours = isinstance(self.vgg, VGG19Features)
            kw = {k: True for k, on in (("fused", ours and bias_act.use_fast(out, self.impl)),
                                        ("pool", ours and max_pool.use_fast(out, self.impl))) if on}
            fo = self.vgg(out, recompute=True, **kw) if lean else self.vgg(out, **kw)
            with torch.no_grad():
                ft = self.vgg(tgt, **kw)
        terms = {
            "rec": self.w_rec * reconstruction_loss(out, tgt),
            "guided": self.w_vgg * self_guided_loss(fo, ft, out, tgt, self.layer_weights, self.impl),
            "fm_vgg": self.w_vgg * feature_matching_loss(fo, ft, self.layer_weights, self.impl),
            "align": self.w_align * centroid_align_loss(fo[3], ft[3], impl=self.impl, grid=self.recipe),
        }
        if real_logits is not None and fake_logits is not None:
            terms["adv"] = self.w_adv * rals_g_loss(real_logits, fake_logits)
        if feats_fake is not None and feats_real is not None:
            terms["fm_dis"] = self.w_dfm * disc_feature_matching_loss(feats_fake, feats_real, self.layer_weights,
                                                                      self.impl)
        total = sum(t.float() for t in terms.values())
        return total, terms
