"""DMFN generator and discriminator, module for module as in the authors' code,
so that their released `latest_G.pth` loads with strict=True."""
import functools
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .ops._impl import check_impl, has_hooks, recompute
from .ops import bias_act as _bias_act
from .ops import dmfb as _dmfb
from .ops import thin_conv as _thin
from .ops.dmfb import DMFBParams, dmfb_block, dmfb_block_reference
from .recipes import check_recipe


# Our training checkpoints (dmfn_fast.training.checkpoint writes them); from_pretrained reads their "G".
TRAIN_FORMAT = "dmfn-fast-train-v1"

def conv_block(in_ch, out_ch, k, stride=1, padding=0, dilation=1, norm="none", act="relu"):
    """Conv2d (submodule `conv`), then optional norm (`norm`), then activation."""
    layers = [("conv", nn.Conv2d(in_ch, out_ch, k, stride, padding, dilation))]
    if norm == "in":
        layers.append(("norm", nn.InstanceNorm2d(out_ch, affine=False)))
    elif norm == "bn":
        layers.append(("norm", nn.BatchNorm2d(out_ch, affine=True)))
    elif norm != "none":
        raise ValueError(f"unknown norm {norm!r}")
    acts = {"relu": nn.ReLU(True), "lrelu": nn.LeakyReLU(0.2, True), "tanh": nn.Tanh(), "none": None}
    if acts[act] is not None:
        layers.append(("act", acts[act]))
    return nn.Sequential(OrderedDict(layers))


class UpBlock(nn.Module):
    """ConvTranspose2d x2 upsampling, IN, ReLU, then a 3x3 conv_block."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1)
        self.norm = nn.InstanceNorm2d(out_ch, affine=False)
        self.conv = conv_block(out_ch, out_ch, 3, 1, 1, norm="in", act="relu")

    def forward(self, x):
        return self.conv(F.relu(self.norm(self.deconv(x))))


class DMFB(nn.Module):
    """Dense multi-scale fusion block: four dilated 3x3 branches, summed cumulatively.
    The computation lives in dmfn_fast/ops/dmfb.py (reference and fused path, chosen by `impl`)."""

    dilations = (1, 2, 4, 8)

    def __init__(self, channels=256, inner=64, impl="auto"):
        super().__init__()
        self.impl = impl
        self.c1 = nn.Conv2d(channels, inner, 3, 1, 1)
        for i, d in enumerate(self.dilations, 1):
            setattr(self, f"d{i}", nn.Conv2d(inner, inner, 3, 1, d, d))
        self.c2 = nn.Conv2d(4 * inner, channels, 3, 1, 1)

    @property
    def impl(self):
        return self._impl

    @impl.setter
    def impl(self, value):
        self._impl = check_impl(value)

    def params(self) -> DMFBParams:
        ds = (self.d1, self.d2, self.d3, self.d4)
        return DMFBParams(self.c1.weight, self.c1.bias, tuple(d.weight for d in ds), tuple(d.bias for d in ds),
                          self.c2.weight, self.c2.bias, self.dilations)

    def forward(self, x):
        return dmfb_block(x, self.params(), self.impl)

    def forward_reference(self, x):
        return dmfb_block_reference(x, self.params())


def init_weights(module: nn.Module, std: float = 0.02, recipe: str = "paper") -> None:
    """The authors' training init, under both recipes (the paper does not give one): Conv2d
    weights N(0, std) with zero bias, BatchNorm2d weights N(1, std) with zero bias. Their init
    matches class names containing "Conv2d" or "BatchNorm2d", so ConvTranspose2d (the generator's
    upsampling) and Linear (the discriminator's classifiers) keep PyTorch's default init, non-zero
    biases included; so do they here."""
    check_recipe(recipe)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):  # ConvTranspose2d is not a Conv2d subclass
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def _describe_mismatch(name, missing, unexpected):
    def few(keys):
        keys = sorted(keys)
        return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")

    msg = f"this state dict is not a DMFN {name}"
    if missing:
        msg += f"; {len(missing)} keys missing (e.g. {few(missing)})"
    if unexpected:
        msg += f"; {len(unexpected)} unexpected keys (e.g. {few(unexpected)})"
    return msg


def _strict_load(model, state_dict, name):
    """load_state_dict(strict=True) with an error that says which model was expected."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(f"expected a state dict for a DMFN {name}, got {type(state_dict).__name__}")
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    if missing or unexpected:
        raise ValueError(_describe_mismatch(name, missing, unexpected))
    bad = [k for k in own if own[k].shape != state_dict[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(
            f"this state dict does not fit this DMFN {name}: {len(bad)} tensors differ in shape, "
            f"e.g. {k}: {tuple(state_dict[k].shape)} in the file vs {tuple(own[k].shape)} here "
            "(were nf / n_blocks / channels different?)"
        )
    return nn.Module.load_state_dict(model, state_dict, strict=True)


def _generator_state(obj, path="checkpoint"):
    """The generator state dict in a loaded file: ours ("format": "dmfn-fast-train-v1", key "G")
    or the authors' bare `latest_G.pth` state dict."""
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != TRAIN_FORMAT or not isinstance(obj.get("G"), dict):
            raise ValueError(f"{path}: unknown checkpoint format {obj['format']!r} (expected {TRAIN_FORMAT})")
        obj = obj["G"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{path}: not a DMFN checkpoint (a {type(obj).__name__}, not a state dict)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _generator_arch(sd, path="checkpoint"):
    """Generator(...) keyword arguments read off the state dict's shapes."""
    try:
        w = sd["encoder.0.conv.weight"]
        out_channels = sd["decoder.3.conv.weight"].shape[0]
    except KeyError:
        raise ValueError(f"{path}: not a DMFN generator state dict (no encoder.0.conv.weight)") from None
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.")}
    return dict(in_channels=w.shape[1], out_channels=out_channels, nf=w.shape[0], n_blocks=len(blocks))


def nonfinite_keys(sd):
    """Keys of the floating-point tensors in a state dict that hold NaN or Inf."""
    return [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def _check_finite(sd, path="checkpoint"):
    """Refuse weights holding NaN or Inf (a diverged run or a damaged file): they would give NaN images."""
    keys = nonfinite_keys(sd)
    if keys:
        v = sd[keys[0]]
        bad = int((~torch.isfinite(v)).sum())
        raise ValueError(f"{path}: tensor {keys[0]!r} holds NaN or Inf ({bad} of {v.numel()} values); the "
                         "checkpoint is damaged or training diverged: use an earlier checkpoint")


# ---- the one way to feed the generator: masked input, padding, crop, composite ----------
# Written once, used by Generator.inpaint, the exported model (export.py, scripted), training and
# validation. Plain tensor code, so TorchScript and torch.export take it as it is.

def generator_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, 4, Hp, Wp]: `image` with the holes zeroed, then `mask` (0/1, 1 = missing), padded at the
    bottom and right by edge replication to multiples of 4 (the two stride-2 stages), at least 8 (so
    instance norm at the bottleneck sees more than one pixel). Always pads (maybe by 0) so that
    exported graphs have no shape-dependent branch."""
    H, W = image.shape[-2], image.shape[-1]
    Hp, Wp = max(8, H + (4 - H % 4) % 4), max(8, W + (4 - W % 4) % 4)
    mask = mask.to(image.dtype)
    x = torch.cat([image * (1 - mask), mask], 1)
    return F.pad(x, [0, Wp - W, 0, Hp - H], mode="replicate")


def generator_output(y: torch.Tensor, image: torch.Tensor, mask: torch.Tensor):
    """(raw, composite) from the generator's output `y` on `generator_input(image, mask)`: raw is `y`
    cropped to the image (for the losses), composite has the generated pixels in the hole and the
    known pixels of `image`, bit-exact, elsewhere (differentiable in raw)."""
    raw = y[:, :, : image.shape[-2], : image.shape[-1]]
    return raw, torch.where(mask > 0.5, raw, image)


def feed_generator(G, image, mask):
    """(raw, composite) = G on the masked, padded `image`, cropped, composited; any H and W.

    G: a Generator, or the same wrapped by DDP or torch.compile (called as G(x), so DDP syncs).
    image [N, 3, H, W] in [-1, 1], mask [N, 1, H, W] 0/1 (1 = missing), on G's device. Works with
    gradients and under autocast (raw in autocast's dtype; composite promoted to image's dtype)."""
    return generator_output(G(generator_input(image, mask)), image, mask)


def _hooked(seq):
    """Whether a container in seq has hooks: the lean path would skip them (it runs the leaves)."""
    return any(has_hooks(m) for m in seq.modules() if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d,
               nn.InstanceNorm2d, nn.ReLU, nn.Tanh)))


def _flat(seq):
    """The layers of the encoder or decoder in the order they run (UpBlock's functional ReLU as a module)."""
    out = []
    for m in seq:
        if isinstance(m, UpBlock):
            out += [m.deconv, m.norm, nn.ReLU(), *m.conv]
        else:
            out += list(m)
    return out


def _keep_conv_output(weight_shape):
    """Selective checkpointing: a region saves its last convolution's output (found by weight shape) and
    recomputes the rest (the norm and activation; in the first region, the 4-channel input convolution)."""
    def policy(ctx, func, *args, **kwargs):
        if func is torch.ops.aten.convolution.default and tuple(args[1].shape) == weight_shape:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return functools.partial(create_selective_checkpoint_contexts, policy)


def _conv_relu(layers, i):
    """layers[i] is a convolution the thin-input kernel computes and a plain ReLU comes next."""
    return (_thin.fits(layers[i]) and i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU
            and not has_hooks(layers[i + 1]))


def _run_layers(layers, x, lean, fused_norm, fused_act=False, thin=False):
    """layers on x, as nn.Sequential would, with two changes that keep values and gradients:
    - lean: each [norm, activation, conv] run (and the first [conv, ReLU, conv]) is one selectively
      checkpointed region: backward recomputes the activation from the saved norm input instead of holding
      both from the forward. At 256 px, batch 16 that is 629 MiB less peak memory in a training step
      (benchmarks/roofline.py) for a rerun of the instance norms, ReLUs and the 4 -> 64 input convolution
      (13 of the generator's 4561 GFLOP).
    - fused_norm: each [instance norm, ReLU] runs in the Triton kernels (dmfb.instance_norm_act; with the
      conv after it, dmfb.norm_relu_conv, which also keeps only the norm input), where nn.InstanceNorm2d
      converts channels-last to contiguous and back; to rounding (the statistics in fp32, as the
      reference's). There, a convolution followed by a norm skips its bias, which the norm cancels
      (dmfb.conv_before_norm). Not where a layer has forward hooks (they would be skipped).
    - fused_act: a convolution followed by a ReLU and no norm (the first) adds its bias under the ReLU in one
      kernel (ops.bias_act), outside the checkpointed regions (inference, or recompute off).
    - thin: the first convolution (4 input channels) and its ReLU in one kernel (ops.thin_conv), inside its
      checkpointed region too (it computes the ReLU's output again there, instead of cuDNN, a bias add and
      the ReLU)."""
    convs = (nn.Conv2d, nn.ConvTranspose2d)

    def before_norm(j):  # the layer after layers[j] is an instance norm of this sample's statistics, no hooks
        norm = layers[j + 1] if j + 1 < len(layers) else None
        return isinstance(norm, nn.InstanceNorm2d) and not norm.affine and not norm.track_running_stats \
            and not has_hooks(norm)

    i = 0
    while i < len(layers):
        region = layers[i:i + 3]
        if (fused_norm and len(region) >= 2 and isinstance(region[0], nn.InstanceNorm2d)
                and isinstance(region[1], nn.ReLU) and not any(has_hooks(m) for m in region)):
            if len(region) == 3 and isinstance(region[2], convs):
                x = _dmfb.norm_relu_conv(x, region[2], before_norm(i + 2))
                i += 3
            else:
                x = _dmfb.instance_norm_act(x, relu=True)
                i += 2
            continue
        starts = isinstance(region[0], nn.InstanceNorm2d) or (i == 0 and isinstance(region[0], convs))
        if lean and len(region) == 3 and starts and isinstance(region[2], convs):
            conv = region[2]
            if fused_norm and before_norm(i + 2) and not has_hooks(conv):
                conv = functools.partial(_dmfb.conv_before_norm, conv)
            if thin and i == 0 and _conv_relu(layers, 0):
                run = lambda t, a=region[0], c=conv: c(_thin.conv_act(a, t, "relu"))  # noqa: E731
            else:
                run = lambda t, a=region[0], b=region[1], c=conv: c(b(a(t)))  # noqa: E731
            # no randomness in [norm, ReLU, conv]: no RNG state to save and restore (nor to read in a CUDA
            # graph capture, train.py --cuda-graphs)
            x = checkpoint(run, x, use_reentrant=False, preserve_rng_state=False,
                           context_fn=_keep_conv_output(tuple(region[2].weight.shape)))
            i += 3
        elif fused_norm and isinstance(layers[i], convs) and before_norm(i) and not has_hooks(layers[i]):
            x = _dmfb.conv_before_norm(layers[i], x)
            i += 1
        elif thin and _conv_relu(layers, i):
            x = _thin.conv_act(layers[i], x, "relu")
            i += 2
        elif (fused_act and _bias_act.fusable(layers[i]) and i + 1 < len(layers)
              and type(layers[i + 1]) is nn.ReLU and not has_hooks(layers[i + 1])):
            x = _bias_act.conv_bias_act(layers[i], x, "relu")  # bias and ReLU in one pass
            i += 2
        else:
            x = layers[i](x)
            i += 1
    return x


class Generator(nn.Module):
    """DMFN generator. Input [N, 4, H, W]: the image in [-1, 1] with holes zeroed,
    then the mask (1 = missing). Output [N, 3, H, W] in [-1, 1]. H, W divisible by 4."""

    def __init__(self, in_channels=4, out_channels=3, nf=64, n_blocks=8, impl="auto", init=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder = nn.Sequential(
            conv_block(in_channels, nf, 5, 1, 2, norm="none"),
            conv_block(nf, 2 * nf, 3, 2, 1, norm="in"),
            conv_block(2 * nf, 2 * nf, 3, 1, 1, norm="in"),
            conv_block(2 * nf, 4 * nf, 3, 2, 1, norm="in"),
        )
        self.blocks = nn.Sequential(*[DMFB(4 * nf, nf, impl) for _ in range(n_blocks)])
        self.decoder = nn.Sequential(
            conv_block(4 * nf, 4 * nf, 3, 1, 1, norm="in"),
            UpBlock(4 * nf, 2 * nf),
            UpBlock(2 * nf, nf),
            conv_block(nf, out_channels, 3, 1, 1, norm="none", act="tanh"),
        )
        self.impl = impl
        if init:
            init_weights(self)

    @property
    def impl(self):
        return self._impl

    @impl.setter
    def impl(self, value):
        self._impl = check_impl(value)
        for b in self.blocks:
            b.impl = self._impl

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Generator expects [N, {self.in_channels}, H, W] (masked image + mask), got {tuple(x.shape)}"
            )
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(
                f"Generator.forward needs H and W divisible by 4, got {x.shape[2]}x{x.shape[3]}; "
                "use Generator.inpaint for any size"
            )
        return self.forward_unchecked(x)

    def forward_unchecked(self, x, reference: bool = False):
        """forward without the Python-side shape checks (which a trace would bake in): for export.
        reference=True runs every DMFB's PyTorch reference and the plain norms whatever `impl` says (no
        Triton in a graph)."""
        # compiled: Inductor picks its own recomputes; the norms stay ours (dmfb.COMPILED_NORMS)
        compiling = torch.compiler.is_compiling()
        unhooked = not reference and not _hooked(self.encoder) and not _hooked(self.decoder)
        lean = unhooked and not compiling and torch.is_grad_enabled() and recompute(self.impl)
        fused_norm = unhooked and (not compiling or _dmfb.COMPILED_NORMS) and _dmfb.use_fused(x, self.impl)
        # compiled, Inductor fuses the bias and ReLU itself (use_fast says no while tracing)
        fused_act = fused_norm and _bias_act.use_fast(x, self.impl)
        thin = fused_norm and _thin.use_fast(x, self.impl, per_call_wins=True)  # the input conv and ReLU: one kernel
        run = lean or fused_norm
        h = _run_layers(_flat(self.encoder), x, lean, fused_norm, fused_act, thin) if run else self.encoder(x)
        for b in self.blocks:
            h = b.forward_reference(h) if reference else b(h)
        return _run_layers(_flat(self.decoder), h, lean, fused_norm, fused_act) if run else self.decoder(h)

    def fill(self, image, mask):
        """(raw, composite): feed_generator(self, image, mask), for one image batch on this model's device."""
        return feed_generator(self, image, mask)

    @classmethod
    def from_pretrained(cls, path, impl="auto", map_location="cpu"):
        """A generator in eval mode from our training checkpoint or the authors' `latest_G.pth`
        (recognised automatically; nf and n_blocks are read off the weights' shapes)."""
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {path}") from None
        except Exception as e:
            raise ValueError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
        sd = _generator_state(obj, path)
        _check_finite(sd, path)
        model = cls(**_generator_arch(sd, path), impl=impl, init=False)
        model.load_state_dict(sd)
        return model.eval()

    def inpaint(self, image, mask, invert=False):
        """Fill the holes of `image` where `mask` is a hole. Any H, W; known pixels come back bit-exact.

        Tensors: image [N, C, H, W] (or [C, H, W]) float in [-1, 1], mask [N, 1, H, W] 0/1 (1 = missing);
        returns a tensor like `image`, with gradients. PIL image / numpy array (uint8 [H, W, 3], or float
        in [0, 1]): read as displayed, mask a PIL image or array under the mask rule of dmfn_fast.io
        (hole = above half of full scale); returns the same type (and dtype) as `image`, without
        gradients, and warns when the hole covers most of the image. invert=True swaps hole and known."""
        if not torch.is_tensor(image):
            from .io import inpaint_picture  # PIL handling lives in io, imported only when used

            with torch.no_grad():
                return inpaint_picture(self, image, mask, invert)
        image, mask = check_image_and_mask(image, mask, self.in_channels - 1)
        mask = mask.to(image.dtype)
        if invert:
            mask = 1 - mask
        p = next(self.parameters())
        y = self(generator_input(image.to(p.device, p.dtype), mask.to(p.device, p.dtype)))
        # composite in the input's dtype and device, so known pixels stay bit-exact
        return generator_output(y.to(image.device, image.dtype), image, mask)[1]

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        return _strict_load(self, state_dict, "Generator")


class Discriminator(nn.Module):
    """Global + local discriminator. forward(x_local [N,3,128,128], x_global [N,3,256,256])
    -> (logits [N, 1], the 5 local feature maps). impl ("auto", "reference", "fast"): whether the two input
    convolutions may run by the thin-input kernel (ops.thin_conv, under its own auto rule)."""

    def __init__(self, in_channels=3, nf=64, init=True, impl="auto"):
        super().__init__()
        self.impl = check_impl(impl)

        def block(i, o):
            return conv_block(i, o, 5, 2, 2, norm="bn", act="lrelu")

        g = [in_channels, nf, 2 * nf, 4 * nf, 8 * nf, 8 * nf, 8 * nf]
        self.global_model = nn.Sequential(*[block(g[i], g[i + 1]) for i in range(6)])
        for i in range(5):
            setattr(self, f"local_fea{i + 1}", block(g[i], g[i + 1]))
        self.global_classifier = nn.Linear(8 * nf * 16, 512)
        self.local_classifier = nn.Linear(8 * nf * 16, 512)
        self.classifier = nn.Sequential(nn.LeakyReLU(0.2), nn.Linear(1024, 1))
        if init:
            init_weights(self)

    def forward(self, x_local, x_global):
        for name, x, size in (("x_local", x_local, 128), ("x_global", x_global, 256)):
            if x.dim() != 4 or tuple(x.shape[1:]) != (self.local_fea1.conv.in_channels, size, size):
                raise ValueError(f"Discriminator {name} must be [N, 3, {size}, {size}], got {tuple(x.shape)}")
        feats = []
        h = x_local
        for i in range(5):
            block = getattr(self, f"local_fea{i + 1}")
            y = self._thin_block(block, h) if i == 0 else None
            h = block(h) if y is None else y
            feats.append(h)
        loc = self.local_classifier(h.flatten(1))
        g = None if has_hooks(self.global_model) else self._thin_block(self.global_model[0], x_global)
        if g is None:
            g = self.global_model(x_global)
        else:
            for block in self.global_model[1:]:
                g = block(g)
        glob = self.global_classifier(g.flatten(1))
        return self.classifier(torch.cat([loc, glob], 1)), feats

    def _thin_block(self, block, x):
        """block(x) with its 3-channel 5x5 stride-2 convolution by the thin-input kernel (ops.thin_conv: cuDNN ran
        these two layers in a generic kernel, 0.76 ms of the training step's GPU time on the H200 of s10), then
        its norm and activation; None where block is not a plain [conv, norm, act] the kernel runs on x."""
        if not (type(block) is nn.Sequential and list(dict(block.named_children())) == ["conv", "norm", "act"]
                and not has_hooks(block) and _thin.fits(block.conv) and _thin.use_fast(x, self.impl)):
            return None
        conv = block.conv
        y = _thin.thin_conv(x, conv.weight, conv.bias, conv.stride[0], conv.padding[0], "none")
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()  # the kernel writes channels-last: keep an NCHW model NCHW
        return block.act(block.norm(y))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not strict:
            return super().load_state_dict(state_dict, strict=False, assign=assign)
        return _strict_load(self, state_dict, "Discriminator")


def check_image_and_mask(image, mask, channels=3):
    """Validate an image/mask pair; returns them with a [N, 1, H, W] mask."""
    if not torch.is_tensor(image) or not torch.is_tensor(mask):
        raise TypeError("image and mask must be tensors")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if image.dim() != 4 or image.shape[1] != channels:
        raise ValueError(f"image must be [N, {channels}, H, W], got {tuple(image.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have 1 channel ([N, 1, H, W]), got {tuple(mask.shape)}")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask size {tuple(mask.shape[-2:])} does not match image size {tuple(image.shape[-2:])}")
    if mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask batch {mask.shape[0]} does not match image batch {image.shape[0]}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor in [-1, 1], got {image.dtype}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or Inf")
    if image.numel() and (image.min() < -1 - 1e-3 or image.max() > 1 + 1e-3):
        raise ValueError(
            f"image values must lie in [-1, 1], got [{image.min().item():.3g}, {image.max().item():.3g}]; "
            "map uint8 images with x / 127.5 - 1"
        )
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(
            "mask values must be 0 (known) or 1 (missing), as bool or a number type; "
            "binarize soft masks first, e.g. (mask > 0.5).float()"
        )
    return image, mask.expand(image.shape[0], -1, -1, -1)

