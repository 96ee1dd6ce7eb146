"""Pieces of train.py that are not the loop: checkpoints, RNG state, the local
discriminator's crop, validation, sample grids and the loss curve."""
import glob
import json
import os
import random
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from . import metrics
from .losses import rals_d_loss

FORMAT = "dmfn-fast-train-v1"
CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")


# ---- RNG state (weights_only-loadable: tensors, lists, ints) -------------------------

def rng_state():
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], torch.tensor(py_state[1], dtype=torch.int64), py_state[2]],
    }


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))


# ---- checkpoints ------------------------------------------------------------------

def nonfinite_params(*modules):
    """Names of parameters or buffers holding NaN/Inf."""
    return [f"{i}:{k}" for i, m in enumerate(modules) for k, v in m.state_dict().items()
            if v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(out_dir, step, ckpt, keep=3):
    """Write out_dir/ckpt_<step>.pt atomically (temp file + os.replace), then delete all but
    the newest `keep`. Returns the path."""
    path = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def list_checkpoints(out_dir):
    """Checkpoints in out_dir, oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if CKPT_RE.search(p)]
    return sorted(paths, key=lambda p: int(CKPT_RE.search(p).group(1)))


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dmfn-fast training checkpoint (format {FORMAT!r}); "
                         "a bare generator state dict (latest_G.pth) is for inference, not --resume")
    return ckpt


# ---- the discriminator's inputs ---------------------------------------------------

def crop_boxes(x, boxes):
    """The local discriminator's input: per image, its box (top, left, h, w), resized to
    128 when the training size is not 256 (at 256 the box is 128 and copied as is)."""
    crops = []
    for img, (t, l, h, w) in zip(x, boxes.tolist()):
        c = img[:, t:t + h, l:l + w].unsqueeze(0)
        if (h, w) != (128, 128):
            c = F.interpolate(c, size=(128, 128), mode="bilinear", align_corners=False)
        crops.append(c)
    return torch.cat(crops)


def global_view(x):
    """The global discriminator's input: the image, resized to 256 if needed."""
    if x.shape[-2:] != (256, 256):
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    return x


def cpu_has_bf16():
    """Native bf16 on this CPU (AVX512-BF16/AMX); without it bf16 autocast is several times slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---- one training step --------------------------------------------------------------

class RealFake(torch.nn.Module):
    """D on real and fake in one forward, so DDP sees a single pass per step."""

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, real_local, real_global, fake_local, fake_global):
        return self.D(real_local, real_global)[0], self.D(fake_local, fake_global)[0]


def train_step(G, D, D_pair, criterion, opt_G, opt_D, scaler, image, mask, box, autocast, finite):
    """The paper's recipe: one G update with D frozen, then one D update on the detached composite.

    G may be DDP-wrapped or compiled; D is the bare discriminator (no gradient sync in the G step);
    D_pair is RealFake(D), possibly DDP-wrapped. `autocast()` gives the autocast context and
    `finite(loss)` says whether a loss is finite (on every rank). Returns (terms, ok): ok is False
    when a loss was non-finite and its update skipped (a G update whose D loss is bad stays)."""
    D.requires_grad_(False)
    with autocast():
        with record_function("G forward"):
            raw = G(torch.cat([image * (1 - mask), mask], 1))
            out = mask * raw + (1 - mask) * image  # losses see the composite, as the authors
        with record_function("D forward (G step)"):
            pred_fake, feats_fake = D(crop_boxes(out, box), global_view(out))
            pred_real, feats_real = D(crop_boxes(image, box), global_view(image))
        with record_function("losses"):
            loss_g, terms = criterion(out, image, pred_real, pred_fake, feats_fake, feats_real)
    terms = {k: v.detach().float() for k, v in terms.items()}
    terms["G"] = loss_g.detach().float()
    ok = finite(loss_g)
    if ok:
        opt_G.zero_grad(set_to_none=True)
        with record_function("G backward"):
            scaler.scale(loss_g).backward()
        with record_function("optimizer"):
            scaler.step(opt_G)
        D.requires_grad_(True)
        fake = out.detach()
        with record_function("D step"):
            with autocast():
                pred_real, pred_fake = D_pair(crop_boxes(image, box), global_view(image),
                                              crop_boxes(fake, box), global_view(fake))
                loss_d = rals_d_loss(pred_real.float(), pred_fake.float())
            terms["D"] = loss_d.detach()
            ok = finite(loss_d)
            if ok:
                opt_D.zero_grad(set_to_none=True)
                scaler.scale(loss_d).backward()
        if ok:
            with record_function("optimizer"):
                scaler.step(opt_D)
        scaler.update()
    D.requires_grad_(True)
    return terms, ok


# ---- validation, samples, curves --------------------------------------------------

@torch.no_grad()
def inpaint_batch(G, image, mask, autocast):
    """The composite: generated pixels in the hole, known pixels elsewhere."""
    with autocast:
        out = G(torch.cat([image * (1 - mask), mask], 1))
    return mask * out.float() + (1 - mask) * image


@torch.no_grad()
def validate(G, batches, autocast):
    """Mean PSNR/SSIM over the whole image and inside the hole, images mapped to [0, 1]."""
    was_training = G.training
    G.eval()
    sums, n = {}, 0
    for image, mask in batches:
        out = (inpaint_batch(G, image, mask, autocast) + 1) / 2
        tgt = (image + 1) / 2
        vals = {"psnr": metrics.psnr(out, tgt), "ssim": metrics.ssim(out, tgt),
                "psnr_hole": metrics.psnr(out, tgt, mask), "ssim_hole": metrics.ssim(out, tgt, mask)}
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v.clamp(max=100).sum().item()  # identical images: cap inf at 100 dB
        n += image.shape[0]
    G.train(was_training)
    return {k: v / n for k, v in sums.items()}


def save_grid(path, image, mask, out, max_rows=8):
    """Rows of input (holes white) | output | target, from tensors in [-1, 1]."""
    from PIL import Image

    image, mask, out = image[:max_rows].float().cpu(), mask[:max_rows].float().cpu(), out[:max_rows].float().cpu()
    inp = image * (1 - mask) + mask
    rows = [torch.cat([a, b, c], 2) for a, b, c in zip(inp, out, image)]
    grid = torch.cat(rows, 1).clamp(-1, 1)
    a = ((grid.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(a).save(path)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(log_path, png_path):
    """Loss curve PNG (one panel per generator term, D, and validation PSNR) from the JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    keys = [k for k in train[-1] if k not in ("kind", "step", "lr", "it_s")] if train else []
    keys.sort(key=lambda k: (k not in ("G", "D"), k != "G"))  # G and D first, then the terms
    panels = keys + (["psnr_hole"] if val else [])
    if not panels:
        return
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, panels):
        src = val if k == "psnr_hole" else train
        xs = [r["step"] for r in src if k in r]
        ax.plot(xs, [r[k] for r in src if k in r], marker="." if len(xs) < 30 else None)
        ax.set_title(("val " if src is val else "") + k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
