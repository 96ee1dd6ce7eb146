"""Training masks, float32 [H, W] with 1 = missing, 0 = known.

Every generator takes a numpy Generator `rng`, so a mask is a pure function of
its seed (what makes resumed and multi-process training reproducible).
`MaskSource` also returns the box the local discriminator looks at."""
import os
import warnings

import numpy as np
from PIL import Image, ImageDraw

from .io import INVERTED_FRACTION, load_mask
from .recipes import check_recipe

KINDS = ("rect", "irregular", "stroke", "mixed")


def _rng(rng):
    return rng if rng is not None else np.random.default_rng()


def rect_box(h, w, hole=None, center=False, rng=None):
    """(top, left, height, width) of the hole's box: `hole` square (default half the
    smaller side, 128 at 256), at a random or the centre position."""
    rng = _rng(rng)
    hole = min(h, w) // 2 if hole is None else int(hole)
    if not 0 < hole <= min(h, w):
        raise ValueError(f"hole size {hole} does not fit a {h}x{w} image")
    if center:
        return (h - hole) // 2, (w - hole) // 2, hole, hole
    return int(rng.integers(0, h - hole + 1)), int(rng.integers(0, w - hole + 1)), hole, hole


def rect_mask(h, w, hole=None, jitter=None, center=False, rng=None, box=None, recipe="paper"):
    """A rectangle hole in `box` (default: `rect_box(h, w, hole, center, rng)`), top/bottom and
    left/right each shrunk by a random number of px. jitter defaults to 16 at 256, scaled with
    the size. recipe "paper" draws 0..jitter, as the authors' comment says; "authors" draws
    0..jitter+1, as their code does."""
    rng = _rng(rng)
    jitter = round(16 * min(h, w) / 256) if jitter is None else int(jitter)
    most = jitter + (check_recipe(recipe) == "authors")
    t, l, bh, bw = box if box is not None else rect_box(h, w, hole, center, rng)
    if 2 * most >= min(bh, bw):
        raise ValueError(f"jitter {jitter} would shrink a {bh}x{bw} hole to nothing")
    dh, dw = (int(rng.integers(0, most + 1)) for _ in range(2))
    m = np.zeros((h, w), np.float32)
    m[t + dh:t + bh - dh, l + dw:l + bw - dw] = 1.0
    return m


def stroke_mask(h, w, rng=None, max_strokes=4, min_vertex=4, max_vertex=12, min_width=12, max_width=40):
    """Free-form brush strokes, DeepFill v2 style (Yu et al. 2019): a few random walks of
    thick line segments with round joints. Widths are for 256 px and scale with the size."""
    rng = _rng(rng)
    scale = min(h, w) / 256
    mean_angle, angle_range = 2 * np.pi / 5, 2 * np.pi / 15
    avg_radius = np.hypot(h, w) / 8
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        n = int(rng.integers(min_vertex, max_vertex + 1))
        lo, hi = mean_angle - rng.uniform(0, angle_range), mean_angle + rng.uniform(0, angle_range)
        angles = [2 * np.pi - rng.uniform(lo, hi) if i % 2 == 0 else rng.uniform(lo, hi) for i in range(n)]
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h)))]
        for a in angles:
            r = float(np.clip(rng.normal(avg_radius, avg_radius / 2), 0, 2 * avg_radius))
            x, y = pts[-1]
            pts.append((float(np.clip(x + r * np.cos(a), 0, w - 1)), float(np.clip(y + r * np.sin(a), 0, h - 1))))
        width = max(1, int(rng.uniform(min_width, max_width) * scale))
        draw.line(pts, fill=255, width=width)
        for x, y in pts:
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    m = (np.asarray(img) > 0).astype(np.float32)
    if rng.random() < 0.5:
        m = m[:, ::-1]
    if rng.random() < 0.5:
        m = m[::-1, :]
    return np.ascontiguousarray(m)


class IrregularMasks:
    """A folder of mask PNGs (searched recursively), resized to the training size.

    Read with the mask rule of dmfn_fast.io (hole = above half of full scale, e.g. > 127 for 8-bit;
    `invert=True` swaps hole and known). The resize keeps the hole fraction: the 0/1 mask is
    resampled bilinearly (area-averaging when shrinking) and thresholded at one half."""

    CHECK_FIRST = 8  # masks read at start to warn about inverted-looking ones

    def __init__(self, folder, invert=False):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"mask folder not found: {folder}")
        self.invert = bool(invert)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
        self.paths = [p for p in files if p.lower().endswith(".png")]
        if not self.paths:
            seen = sorted({os.path.splitext(p)[1].lower() or "(no extension)" for p in files})
            raise ValueError(
                f"mask folder {folder} has no .png masks (found {len(files)} files"
                + (f" of types {', '.join(seen[:6])}" if files else "")
                + "); irregular masks must be PNG images where values above half of full scale "
                "(> 127 for 8-bit) mark the hole"
            )
        for p in self.paths:  # a header read each: cheap, and fails now rather than mid-run
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:
                raise ValueError(f"{p} is not a readable PNG mask ({type(e).__name__}: {e})") from None
        fracs = [self._read(p).mean() for p in self.paths[: self.CHECK_FIRST]]
        if fracs and np.mean(fracs) > INVERTED_FRACTION:
            warnings.warn(
                f"masks in {folder}: the holes cover {np.mean(fracs):.0%} of the image on average (first "
                f"{len(fracs)} files); if white marks the part to keep, pass invert=True (train.py: "
                "--invert-masks) to swap hole and known pixels", UserWarning, stacklevel=2)

    def __len__(self):
        return len(self.paths)

    def _read(self, path):
        return load_mask(path, invert=self.invert)

    def __call__(self, h, w, rng=None):
        rng = _rng(rng)
        hole = self._read(self.paths[int(rng.integers(len(self.paths)))])
        if hole.shape != (h, w):
            # Bilinear on the 0/1 mask (Pillow widens the filter when shrinking, so it averages the
            # area), then half: the hole fraction survives, unlike bicubic followed by > 0.
            f = Image.fromarray(hole.astype(np.float32), "F").resize((w, h), Image.BILINEAR)
            hole = np.asarray(f) > 0.5
        return hole.astype(np.float32)


class MaskSource:
    """Masks of one kind, or a mix. `source(h, w, rng) -> (mask [H, W] float32, box)`,
    where box = (top, left, height, width) is what the local discriminator sees:
    the unjittered hole box for rect masks, a random half-size box otherwise (as the authors).

    kind: rect | irregular (needs `folder`) | stroke | mixed (`probs`: {kind: p}, default
    equal over the available kinds). invert=True swaps hole and known in the mask files (irregular
    masks drawn white = keep); it does not touch the generated rect and stroke masks. recipe: see
    `rect_mask`."""

    def __init__(self, kind="rect", folder=None, probs=None, hole=None, jitter=None, center=False, invert=False,
                 recipe="paper"):
        self.recipe = check_recipe(recipe)
        if kind not in KINDS:
            raise ValueError(f"mask kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.hole, self.jitter, self.center = kind, hole, jitter, center
        self.irregular = IrregularMasks(folder, invert) if folder and kind in ("irregular", "mixed") else None
        if kind == "irregular" and self.irregular is None:
            raise ValueError("mask kind 'irregular' needs a mask folder (--mask-dir)")
        if kind == "mixed":
            probs = dict(probs) if probs else {k: 1.0 for k in ("rect", "stroke", "irregular")
                                              if k != "irregular" or self.irregular}
            bad = set(probs) - {"rect", "stroke", "irregular"}
            if bad or any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
                raise ValueError(f"mixed mask probabilities must be >= 0 over rect/stroke/irregular, got {probs}")
            if probs.get("irregular", 0) > 0 and self.irregular is None:
                raise ValueError("mixed masks with irregular > 0 need a mask folder (--mask-dir)")
            total = sum(probs.values())
            self.kinds = list(probs)
            self.probs = np.array([probs[k] / total for k in self.kinds])

    def __call__(self, h, w, rng=None):
        rng = _rng(rng)
        kind = self.kind
        if kind == "mixed":
            kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probs))]
        box = rect_box(h, w, self.hole, self.center and kind == "rect", rng)
        if kind == "rect":
            return rect_mask(h, w, jitter=self.jitter, rng=rng, box=box, recipe=self.recipe), box
        if kind == "stroke":
            return stroke_mask(h, w, rng), box
        return self.irregular(h, w, rng), box
