"""What a run reports: validation, sample grids, the JSONL log (and TensorBoard) and the loss curve."""
import json
import os
import warnings

import numpy as np
import torch

from .. import metrics
from .step import generate


@torch.no_grad()
def inpaint_batch(G, image, mask, autocast):
    """The composite: generated pixels in the hole, known pixels elsewhere."""
    with autocast:
        return generate(G, image, mask)


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


def train_line(row):
    return (f"step {row['step']:6d}  G {row['G']:.4f}  rec {row['rec']:.4f}  guided {row['guided']:.4f}  "
            f"fm_vgg {row['fm_vgg']:.4f}  align {row['align']:.4f}  adv {row['adv']:.4f}  "
            f"fm_dis {row['fm_dis']:.4f}  D {row['D']:.4f}  ({row['it_s']:.2f} it/s)")


def val_line(val):
    return ("val  step {step}: PSNR {psnr:.2f} dB (hole {psnr_hole:.2f}), SSIM {ssim:.4f} (hole {ssim_hole:.4f})"
            .format(**val))


# ---- the log ------------------------------------------------------------------------

class Log:
    """Rows appended to OUT/log.jsonl, and to TensorBoard (OUT/tb) when it is installed. Rank 0 only."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            pass

    def write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_log(path):
    """The rows of a JSONL log. A line that does not parse (the last one, cut off by a crash) is dropped
    with a warning instead of stopping the run."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}: line {n} is not valid JSON (cut off by a crash?); dropped: {line[:80]!r}")
    return rows


def rewrite_log(path, rows):
    """Replace the log by `rows`: a temp file renamed over it, so a crash meanwhile leaves the old log whole."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_losses(log_path, png_path):
    """Loss curve PNG (one panel per generator term, D, and validation PSNR) from the JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(log_path):
        return
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
