"""dmfn-eval: score a folder of inpainted results against the ground truths (and the masks).

PSNR, SSIM and L1 (MAE) on [0, 1] images, over the whole image and, with masks, inside the hole
(dmfn_fast.metrics; SSIM follows scikit-image's convention). FID and LPIPS only with backbone
weights you supply (nothing is downloaded):
  --fid-inception FILE  a TorchScript Inception feature extractor, e.g. StyleGAN2-ADA's
                        inception-2015-12-05.pt (called with uint8 [N, 3, H, W], return_features=True);
                        FID itself is torchmetrics' FrechetInceptionDistance (pip install torchmetrics).
  --lpips-vgg16 FILE    torchvision's vgg16-397923af.pth; LPIPS-VGG's linear heads come from the
                        torchmetrics package (or --lpips-lin FILE, the lpips package's weights/v0.1/vgg.pth).
Masks: hole where the value is above half of full scale (dmfn_fast.io); --invert-masks swaps hole and known.
Exit status: 0 all images scored, 1 some pairs failed (reported, the others still scored), 2 nothing to score
or bad arguments (every flag, --json's folder included, is checked before scoring)."""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics
from .io import device_problem, lama_base, list_images, load_image, load_mask, mask_warning, output_file_problem

# torchvision vgg16 `features` config; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_HOW_TO = ("LPIPS needs torchvision's VGG16 weights: download "
                "https://download.pytorch.org/models/vgg16-397923af.pth and pass --lpips-vgg16 PATH")
FID_HOW_TO = ("FID needs an Inception feature extractor: download StyleGAN2-ADA's TorchScript "
              "inception-2015-12-05.pt and pass --fid-inception PATH (and pip install torchmetrics)")


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018, v0.1) on images in [-1, 1]; per-image distances."""

    def __init__(self, vgg16_path, lin_path=None):
        super().__init__()
        layers, c = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        sd = torch.load(vgg16_path, map_location="cpu", weights_only=True)
        sd = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        self.features.load_state_dict(sd)
        if lin_path is None:
            import torchmetrics  # ships the LPIPS linear heads

            lin_path = Path(torchmetrics.__file__).parent / "functional/image/lpips_models/vgg.pth"
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        self.lins = nn.ParameterList([lin[f"lin{i}.model.1.weight"] for i in range(5)])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.requires_grad_(False).eval()

    def forward(self, x, y):
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total, tap = 0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _LPIPS_TAPS[tap]:
                f = h / torch.sqrt(1e-8 + (h**2).sum(1, keepdim=True))
                fx, fy = f.chunk(2)
                total = total + F.conv2d((fx - fy) ** 2, self.lins[tap]).mean((1, 2, 3))
                tap += 1
                if tap == len(_LPIPS_TAPS):
                    break
        return total


class _Features(nn.Module):
    """Wraps a TorchScript feature extractor for torchmetrics' FID (uint8 [N, 3, H, W] -> [N, D])."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        try:
            return self.net(x, return_features=True).flatten(1)
        except RuntimeError:  # not StyleGAN's detector: plain features
            return self.net(x).flatten(1)


def make_fid(path, device):
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = torch.jit.load(str(path), map_location=device).eval()
    return FrechetInceptionDistance(feature=_Features(net), normalize=False).to(device)


def _find(index, stem):
    """The file in `index` (stem -> path) for a result stem, also via LaMa's NAME_mask* rule."""
    if stem in index:
        return index[stem]
    base = lama_base(stem)
    return index.get(base) if base is not None else None


def _to_tensor(a, device):
    return torch.from_numpy(a).permute(2, 0, 1)[None].to(device, torch.float64) / 255


def _optional(args, device):
    """(fid, lpips, skipped reasons) from the backbones the user supplied."""
    fid = lp = None
    skipped = {}
    if args.fid_inception:
        try:
            fid = make_fid(args.fid_inception, device)
        except ImportError:
            skipped["fid"] = "torchmetrics is not installed (pip install torchmetrics)"
        except Exception as e:
            skipped["fid"] = f"cannot load {args.fid_inception}: {type(e).__name__}: {e}"
    else:
        skipped["fid"] = FID_HOW_TO
    if args.lpips_vgg16:
        try:
            lp = LPIPS(args.lpips_vgg16, args.lpips_lin).to(device)
        except ImportError:
            skipped["lpips"] = "the LPIPS heads come from torchmetrics: pip install torchmetrics, or pass --lpips-lin"
        except Exception as e:
            skipped["lpips"] = f"cannot load LPIPS weights: {type(e).__name__}: {e}"
    else:
        skipped["lpips"] = LPIPS_HOW_TO
    return fid, lp, skipped


def _json_value(v):
    return v if not (isinstance(v, float) and math.isinf(v)) else ("inf" if v > 0 else "-inf")


def evaluate(args):
    device = torch.device(args.device)
    results, gt = Path(args.results), Path(args.gt)
    for p, flag in ((results, "--results"), (gt, "--gt")):
        if not p.is_dir():
            raise FileNotFoundError(f"{flag} {p}: not a folder")
    gt_index = {p.stem: p for p in list_images(gt)}
    mask_index = {}
    if args.masks:
        masks = Path(args.masks)
        if not masks.exists():
            raise FileNotFoundError(f"--masks {masks}: no such file or folder")
        mask_index = None if masks.is_file() else {p.stem: p for p in list_images(masks)}
    fid, lp, skipped = _optional(args, device)
    rows, errors, warnings = [], [], []
    for r in list_images(results):
        try:
            g = _find(gt_index, r.stem)
            if g is None:
                raise ValueError(f"no ground truth for {r.name} in {gt}")
            x, y = load_image(r), load_image(g)
            if x.shape != y.shape:
                raise ValueError(f"size {x.shape[1]}x{x.shape[0]} differs from ground truth {g.name} "
                                 f"{y.shape[1]}x{y.shape[0]}")
            hole = None
            if args.masks:
                mp = Path(args.masks) if mask_index is None else (mask_index.get(r.stem) or mask_index.get(g.stem))
                if mp is None:
                    raise ValueError(f"no mask for {r.name} in {args.masks}")
                hole = load_mask(mp, invert=getattr(args, "invert_masks", False))
                warning = mask_warning(hole, mp.name)
                if warning:
                    warnings.append({"image": r.name, "warning": warning})
                    print(f"dmfn-eval: warning: {warning}", file=sys.stderr)
                if hole.shape != x.shape[:2]:
                    raise ValueError(f"mask {mp.name} is {hole.shape[1]}x{hole.shape[0]}, image {x.shape[1]}x{x.shape[0]}")
        except Exception as e:
            errors.append({"image": r.name, "error": str(e)})
            continue
        tx, ty = _to_tensor(x, device), _to_tensor(y, device)
        row = {"image": r.name, "gt": g.name,
               "psnr": metrics.psnr(tx, ty).item(), "ssim": metrics.ssim(tx, ty).item(), "l1": metrics.l1(tx, ty).item()}
        if hole is not None:
            m = torch.from_numpy(hole)[None, None].to(device)
            row["hole_fraction"] = float(hole.mean())
            if hole.any():
                row.update(psnr_hole=metrics.psnr(tx, ty, m).item(), ssim_hole=metrics.ssim(tx, ty, m).item(),
                           l1_hole=metrics.l1(tx, ty, m).item())
        if lp is not None:
            with torch.no_grad():
                row["lpips"] = lp(tx * 2 - 1, ty * 2 - 1).item()
        if fid is not None:
            fid.update(torch.from_numpy(y).permute(2, 0, 1)[None].to(device), real=True)
            fid.update(torch.from_numpy(x).permute(2, 0, 1)[None].to(device), real=False)
        rows.append(row)
    keys = [k for k in ("psnr", "ssim", "l1", "psnr_hole", "ssim_hole", "l1_hole", "lpips") if any(k in r for r in rows)]
    summary = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    if fid is not None:
        if len(rows) >= 2:
            summary["fid"] = float(fid.compute())
        else:
            skipped["fid"] = "FID needs at least 2 images"
    report = {"results": str(results), "gt": str(gt), "masks": args.masks, "n_images": len(rows),
              "n_failed": len(errors), "metrics": summary, "skipped": skipped, "errors": errors,
              "warnings": warnings,
              "notes": "images in [0, 1]; PSNR/SSIM/L1 are means of per-image values; *_hole: inside the mask only"}
    if args.per_image:
        report["per_image"] = rows
    return report


def print_table(report, per_image=False, file=None):
    file = file or sys.stdout
    m = report["metrics"]
    print(f"{report['n_images']} images scored, {report['n_failed']} failed", file=file)
    print(f"{'metric':<12}{'value':>12}", file=file)
    for k, v in m.items():
        print(f"{k:<12}{v:>12.4f}", file=file)
    for k, why in report["skipped"].items():
        print(f"{k}: skipped ({why})", file=file)
    if per_image and report.get("per_image"):
        cols = [k for k in report["per_image"][0] if k not in ("image", "gt")]
        print("\n" + f"{'image':<28}" + "".join(f"{c:>14}" for c in cols), file=file)
        for r in report["per_image"]:
            print(f"{r['image'][:27]:<28}" + "".join(f"{r.get(c, float('nan')):>14.4f}" for c in cols), file=file)
    for e in report["errors"]:
        print(f"  failed: {e['image']}: {e['error']}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dmfn-eval", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--results", required=True, help="folder of inpainted images")
    ap.add_argument("--gt", required=True, help="folder of ground truths (same names, or NAME for NAME_mask*)")
    ap.add_argument("--masks", help="mask folder (same names as results or ground truths) or one mask file")
    ap.add_argument("--json", default="metrics.json", help="where to write the report (default metrics.json)")
    ap.add_argument("--per-image", action="store_true", help="per-image rows in the table and the JSON")
    ap.add_argument("--fid-inception", help="TorchScript Inception feature extractor file (see above)")
    ap.add_argument("--lpips-vgg16", help="torchvision vgg16 weights file (see above)")
    ap.add_argument("--lpips-lin", help="LPIPS linear heads file (default: the copy in torchmetrics)")
    ap.add_argument("--invert-masks", action="store_true",
                    help="swap hole and known: for masks drawn white (or opaque) where the image is kept")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    # every flag checked before any scoring (argparse error, exit 2)
    for flag, p in (("--results", args.results), ("--gt", args.gt)):
        if not Path(p).is_dir():
            ap.error(f"{flag} {p}: not a folder")
    if args.masks and not Path(args.masks).exists():
        ap.error(f"--masks {args.masks}: no such file or folder")
    for flag, p in (("--fid-inception", args.fid_inception), ("--lpips-vgg16", args.lpips_vgg16),
                    ("--lpips-lin", args.lpips_lin)):
        if p and not Path(p).is_file():
            ap.error(f"{flag} {p}: no such file")
    for flag, problem in (("--json", output_file_problem(args.json)), ("--device", device_problem(args.device))):
        if problem:
            ap.error(f"{flag}: {problem}")
    try:
        report = evaluate(args)
    except (OSError, ValueError) as e:
        print(f"dmfn-eval: error: {e}", file=sys.stderr)
        return 2
    if not report["n_images"] and not report["n_failed"]:
        print(f"dmfn-eval: error: no images in {args.results}", file=sys.stderr)
        return 2
    print_table(report, args.per_image)
    out = json.loads(json.dumps(report, default=str), parse_constant=lambda c: _json_value(float(c)))
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 1 if report["n_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
