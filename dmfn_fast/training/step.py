"""One training step (G update with D frozen, then D update) and the discriminator's inputs."""
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..losses import rals_d_loss
from ..models import feed_generator


def generate(G, image, mask):
    """The composite G(masked image, mask) in the hole, the known pixels elsewhere (the losses see it, as
    the authors), in image's dtype. Training, validation and the sample grids all feed G through here,
    and through it the same feed_generator as Generator.inpaint and the exported models."""
    return feed_generator(G, image, mask)[1]


def _to_128(c):
    if c.shape[-2:] != (128, 128):
        c = F.interpolate(c, size=(128, 128), mode="bilinear", align_corners=False)
    return c


class Crops:
    """The local discriminator's input for one batch's boxes (top, left, h, w), as crops(x): per image its
    box, resized to 128 when the training size is not 256 (at 256 the box is 128 and copied as is).

    Boxes of one size (every box of a training run: masks.py makes them all half the image) are one gather
    of [N, h, w] pixels, whose backward is one scatter; its index is built once per batch on `like`'s device,
    from the boxes copied there without a wait (the loader pins them). A crop per image (the fallback for
    boxes of several sizes) costs three ops per image forward and, in backward, a zero fill and an add of
    the whole batch per image (indexing the batch dimension)."""

    def __init__(self, boxes, like):
        N, C, H, W = like.shape
        self.boxes = check_boxes(boxes, H, W)
        self.pix = None
        if len({(bh, bw) for _, _, bh, bw in self.boxes}) == 1:
            self.pix = crop_pixels(boxes.to(like.device, non_blocking=True), *self.boxes[0][2:], H, W)

    def __call__(self, x):
        if self.pix is None:
            return torch.cat([_to_128(img[:, t:t + bh, l:l + bw].unsqueeze(0))
                              for img, (t, l, bh, bw) in zip(x, self.boxes)])
        return gather_crops(x, self.pix)


def check_boxes(boxes, H, W):
    """The boxes (top, left, h, w) as a list (the loader's are on the CPU: no wait), or a ValueError if one
    reaches outside the H x W image."""
    boxes = boxes.tolist()
    if any(t < 0 or l < 0 or t + bh > H or l + bw > W for t, l, bh, bw in boxes):
        raise ValueError(f"a box (top, left, h, w) reaches outside the {H}x{W} image: {boxes}")
    return boxes


def crop_pixels(boxes, h, w, H, W):
    """[N, h, w] flat pixel indices (n * H + row) * W + col of N boxes (top, left, ...) of size h x w, on the
    boxes' device: device ops only, so a CUDA graph recomputes them from whatever boxes its buffer holds."""
    dev = boxes.device
    rows = boxes[:, 0, None] + torch.arange(h, device=dev)  # [N, h]
    cols = boxes[:, 1, None] + torch.arange(w, device=dev)  # [N, w]
    return (torch.arange(boxes.shape[0], device=dev)[:, None, None] * H + rows[:, :, None]) * W + cols[:, None, :]


def gather_crops(x, pix):
    """x's pixels at crop_pixels' indices, as [N, C, h, w] (channels-last strides), resized to 128 if needed."""
    N, C, H, W = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(N * H * W, C)  # a view of a channels-last x
    return _to_128(flat[pix].permute(0, 3, 1, 2))


def crop_boxes(x, boxes):
    """x's crops of `boxes` (see Crops)."""
    return Crops(boxes, x)(x)


def global_view(x):
    """The global discriminator's input: the image, resized to 256 if needed."""
    if x.shape[-2:] != (256, 256):
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    return x


class RealFake(torch.nn.Module):
    """D on real and fake in one forward, so DDP sees a single pass per step."""

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, real_local, real_global, fake_local, fake_global):
        return self.D(real_local, real_global)[0], self.D(fake_local, fake_global)[0]


def _copied(terms):
    """{name: fp32 scalar}, one fresh tensor's views: the loss's own outputs may live in memory that its CUDA
    graphs reuse (torch.compile mode="reduce-overhead"), which a later replay overwrites while a caller may
    still hold the terms (the H200's e2e stage did, s10). One stack, taken before anything else replays."""
    try:
        values = torch.stack([v.detach().float() for v in terms.values()])
    except (RuntimeError, AttributeError) as e:
        shapes = {k: (tuple(v.shape), str(v.device)) if torch.is_tensor(v) else type(v).__name__
                  for k, v in terms.items()}
        raise ValueError(f"train_step: the criterion's loss terms must be scalar tensors on one device, "
                         f"got {shapes}") from e
    return dict(zip(terms, values.unbind()))


def train_step(G, D, D_pair, criterion, opt_G, opt_D, scaler, image, mask, box, autocast, finite):
    """The paper's recipe: one G update with D frozen, then one D update on the detached composite.

    G may be DDP-wrapped or compiled; D is the bare discriminator (no gradient sync in the G step);
    D_pair is RealFake(D), possibly DDP-wrapped. `autocast()` gives the autocast context and
    `finite(loss)` says whether a loss is finite (on every rank). Returns (terms, ok): ok is False
    when a loss was non-finite and its update skipped (a G update whose D loss is bad stays; a bad G loss
    skips both updates). The terms are fresh fp32 scalars: they outlive the next step."""
    D.requires_grad_(False)
    with autocast():
        with record_function("G forward"):
            out = generate(G, image, mask)
        with record_function("D forward (G step)"):
            crops = Crops(box, image)
            pred_fake, feats_fake = D(crops(out), global_view(out))
            pred_real, feats_real = D(crops(image), global_view(image))
        with record_function("losses"):
            loss_g, terms = criterion(out, image, pred_real, pred_fake, feats_fake, feats_real)
    terms = _copied(dict(terms, G=loss_g))
    opt_G.zero_grad(set_to_none=True)
    with record_function("G backward"):
        scaler.scale(loss_g).backward()
    # The D step needs neither G's update nor its loss's value (the composite is detached, and the G step
    # leaves D's weights alone), so it is queued before either loss is read: the host waits for the GPU once
    # per step, with all of the step's work queued, not once after each backward (the fused path is
    # host-bound). A non-finite G loss then costs a wasted D pass whose gradients are dropped: the same
    # updates as checking first.
    D.requires_grad_(True)
    fake = out.detach()
    with record_function("D step"):
        with autocast():
            pred_real, pred_fake = D_pair(crops(image), global_view(image), crops(fake), global_view(fake))
            loss_d = rals_d_loss(pred_real.float(), pred_fake.float())
        opt_D.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
    terms["D"] = loss_d.detach().float()
    ok_g = finite(loss_g)
    ok = ok_g and finite(loss_d)
    if ok_g:
        with record_function("optimizer"):
            scaler.step(opt_G)
            if ok:
                scaler.step(opt_D)
        scaler.update()
    else:
        opt_G.zero_grad(set_to_none=True)
    if not ok:
        opt_D.zero_grad(set_to_none=True)
    return terms, ok
