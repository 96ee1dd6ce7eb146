"""dmfn-inpaint: fill the holes of a file or folder of images with a DMFN generator.

Exit status: 0 when every pair was written, 1 when some pairs failed (each is reported and the
others still run; a summary closes the run), 2 when nothing could run (bad arguments, checked before
any work; a bad checkpoint; an output folder that is refused or cannot be written; no images).

Masks: a pixel is a hole where its value is above half of full scale (dmfn_fast.io); --invert-masks
swaps hole and known. A mask whose hole covers most of its image is warned about."""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import (device_problem, load_image, load_mask, mask_warning, output_dir_problem, pair_images_and_masks,
                 real_path, save_png)
from .models import Generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Job:
    name: str
    out_path: Path
    image: np.ndarray  # uint8 [H, W, 3], the original
    hole: np.ndarray  # bool [H, W]
    box: tuple = None  # (y0, y1, x0, x1) of the region the model sees, in original pixels
    x: torch.Tensor = None  # [3, h, w] in [-1, 1]: the region, maybe downscaled
    m: torch.Tensor = None  # [1, h, w] 0/1


def _span(lo, hi, side, limit):
    """[a, b) of length min(side, limit) centred on [lo, hi), shifted to fit in [0, limit)."""
    side = min(max(side, hi - lo), limit)
    a = min(max((lo + hi - side) // 2, 0), limit - side)
    return a, a + side


def prepare(job: Job, resize=None) -> Job:
    """Choose the region the model works on. Without `resize`: the whole image at full size.
    With it: a square around the holes with as much context again as the holes' extent (the
    training ratio: 128 holes in 256 images), downscaled so its longer side is at most `resize`."""
    H, W = job.hole.shape
    box = (0, H, 0, W)
    if resize:
        ys, xs = np.nonzero(job.hole)
        side = max(2 * max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()), resize)
        box = _span(ys.min(), ys.max() + 1, side, H) + _span(xs.min(), xs.max() + 1, side, W)
    y0, y1, x0, x1 = box
    x = torch.from_numpy(job.image[y0:y1, x0:x1]).permute(2, 0, 1).float() / 127.5 - 1
    m = torch.from_numpy(job.hole[y0:y1, x0:x1])[None].float()
    scale = resize / max(y1 - y0, x1 - x0) if resize else 1.0
    if scale < 1:
        size = (max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale)))
        x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        # A small pixel that touches any hole pixel is a hole.
        m = (F.interpolate(m[None], size=size, mode="area")[0] > 0).float()
    job.box, job.x, job.m = box, x.clamp(-1, 1), m
    return job


def finish(job: Job, pred: torch.Tensor) -> np.ndarray:
    """Paste the prediction [3, h, w] into the original, at hole pixels only."""
    y0, y1, x0, x1 = job.box
    if pred.shape[-2:] != (y1 - y0, x1 - x0):
        pred = F.interpolate(pred[None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
    pred = ((pred.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = job.image.copy()
    region, hole = out[y0:y1, x0:x1], job.hole[y0:y1, x0:x1]
    region[hole] = pred[hole]
    return out


def run_batch(model, jobs, device):
    x = torch.stack([j.x for j in jobs]).to(device)
    m = torch.stack([j.m for j in jobs]).to(device)
    with torch.inference_mode():
        return model.inpaint(x, m).cpu()


def check_output(out: Path, pairs):
    """Refuse an --out that is, or holds, one of the inputs."""
    out = real_path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    inputs = {real_path(p) for pair in pairs for p in pair[:2] if p is not None}
    folders = {p.parent for p in inputs}
    if out in folders:
        raise ValueError(f"--out {out} is an input folder; choose another so no input can be overwritten")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="dmfn-inpaint", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="our training checkpoint or the authors' latest_G.pth")
    ap.add_argument("--images", required=True, help="an image file or a folder of images")
    ap.add_argument("--masks", required=True,
                    help="a mask file (used for every image) or a folder: NAME.* or LaMa's NAME_mask*.png")
    ap.add_argument("--out", required=True, help="output folder (created; must not be an input folder)")
    ap.add_argument("--resize", type=int, nargs="?", const=256, default=None, metavar="SIZE",
                    help="work on the region around the holes downscaled to at most SIZE (default 256) "
                         "and paste the filled holes back at full resolution")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--impl", choices=("auto", "reference", "fast", "fused"), default="auto",
                    help="DMFB kernels: auto (fast where measured faster), reference, fast ('fused': old name)")
    ap.add_argument("--invert-masks", action="store_true",
                    help="swap hole and known: for masks drawn white (or opaque) where the image is kept")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    # every flag checked before any work (argparse error, exit 2)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.resize is not None and args.resize < 8:
        ap.error("--resize SIZE must be >= 8")
    if not Path(args.checkpoint).is_file():
        ap.error(f"--checkpoint {args.checkpoint}: no such file")
    for flag, p in (("--images", args.images), ("--masks", args.masks)):
        if not Path(p).exists():
            ap.error(f"{flag} {p}: no such file or folder")
    for flag, problem in (("--device", device_problem(args.device)), ("--out", output_dir_problem(args.out))):
        if problem:
            ap.error(f"{flag}: {problem}")
    return args


def _progress(total, quiet):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", disable=quiet, file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        pairs = pair_images_and_masks(args.images, args.masks)
        check_output(out, pairs)
        model = Generator.from_pretrained(args.checkpoint, impl=args.impl)
        model = model.to(args.device, DTYPES[args.dtype])
    except (OSError, ValueError, RuntimeError) as e:
        print(f"dmfn-inpaint: error: {e}", file=sys.stderr)
        return 2
    if not pairs:
        print(f"dmfn-inpaint: error: no images found in {args.images}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    errors, written, taken, warnings = [], 0, set(), []
    bar = _progress(len(pairs), args.quiet)
    buckets = {}  # work size -> pending jobs, so a batch has one size

    def flush(key):
        nonlocal written
        jobs = buckets.pop(key)
        try:
            preds = run_batch(model, jobs, args.device)
            for j, p in zip(jobs, preds):
                save_png(finish(j, p), j.out_path)
                written += 1
        except Exception as e:
            errors.extend((j.name, f"inference failed: {type(e).__name__}: {e}") for j in jobs)
        if bar is not None:
            bar.update(len(jobs))

    for img_path, mask_path, stem in pairs:
        name = f"{img_path.name} + {mask_path.name}" if mask_path else img_path.name
        try:
            if mask_path is None:
                raise ValueError(f"no mask found for {img_path.name} (looked for {stem}.* and {stem}_mask*.*)")
            out_path = out / f"{stem}.png"
            if out_path in taken:
                raise ValueError(f"output {out_path.name} was already written for another input of the same name")
            image, hole = load_image(img_path), load_mask(mask_path, invert=args.invert_masks)
            if hole.shape != image.shape[:2]:
                raise ValueError(f"mask is {hole.shape[1]}x{hole.shape[0]} but image is "
                                 f"{image.shape[1]}x{image.shape[0]} (W x H)")
            taken.add(out_path)
            warning = mask_warning(hole, mask_path.name)
            if warning:
                warnings.append(warning)
                print(f"dmfn-inpaint: warning: {warning}", file=sys.stderr)
        except Exception as e:
            errors.append((name, str(e)))
            if bar is not None:
                bar.update(1)
            continue
        job = Job(name, out_path, image, hole)
        if not hole.any():  # nothing to fill: the image as it is
            save_png(image, out_path)
            written += 1
            if bar is not None:
                bar.update(1)
            continue
        prepare(job, args.resize)
        key = tuple(job.x.shape[-2:])
        buckets.setdefault(key, []).append(job)
        if len(buckets[key]) >= args.batch_size:
            flush(key)
    for key in list(buckets):
        flush(key)
    if bar is not None:
        bar.close()
    print(f"dmfn-inpaint: wrote {written} of {len(pairs)} images to {out}", file=sys.stderr)
    if warnings:
        print(f"dmfn-inpaint: {len(warnings)} masks cover most of their image (see the warnings above; "
              "--invert-masks swaps hole and known)", file=sys.stderr)
    if errors:
        print(f"dmfn-inpaint: {len(errors)} failed:", file=sys.stderr)
        for name, msg in errors:
            print(f"  {name}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
