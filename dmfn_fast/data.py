"""Training data: an image folder or list file, or the built-in demo set (photos that
scikit-image ships offline). A sample is a random square crop, a bicubic resize to the
training size, a random horizontal flip, and a mask.

All randomness of a sample comes from a numpy Generator seeded by (seed, epoch, index,
rank), so a sample does not depend on worker processes and resuming replays it exactly."""
import os
import warnings

import numpy as np
import torch
from PIL import Image

from .io import IMAGE_EXTS, open_image, pil_to_rgb
from .io import list_images as _list_image_files

# Natural photos in skimage.data; some need the optional `pooch` download and are skipped offline.
MAX_BAD_IN_A_ROW = 10
DEMO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
              "retina", "colorwheel", "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "page",
              "text", "cell", "motorcycle", "eagle", "lily", "skin")


def list_images(path):
    """Image paths of a folder (searched recursively) or of a list file (one path a line,
    relative paths resolved against the list's folder)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path not found: {path}")
    if os.path.isdir(path):
        paths = [str(p) for p in _list_image_files(path, recursive=True)]
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found under {path}")
        return paths
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        paths = [os.path.join(base, s) for s in (line.strip() for line in f) if s and not s.startswith("#")]
    if not paths:
        raise ValueError(f"list file {path} names no images")
    return paths


def demo_images():
    """(name, uint8 RGB array) for every demo photo that loads without a network."""
    import skimage.data

    out = []
    for name in DEMO_NAMES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        except KeyboardInterrupt:
            raise
        except BaseException:  # missing in this version (under pytest, skimage raises Skipped)
            continue
        a = np.asarray(a)
        if a.dtype != np.uint8:
            continue
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, 2)
        out.append((name, np.ascontiguousarray(a[..., :3])))
    if not out:
        raise RuntimeError("no scikit-image demo photos could be loaded; pass a data folder")
    return out


def square_resize(img: Image.Image, size, rng=None, min_scale=1.0, flip=True, name=""):
    """A random square crop (side = min side x U(min_scale, 1); centred if rng is None),
    bicubic resize to `size`, random horizontal flip. Returns float32 CHW in [-1, 1]."""
    w, h = img.size
    side = min(w, h)
    if side < size:
        warnings.warn(f"image {name} is {w}x{h}, smaller than the training size {size}: upscaled")
    if rng is None:
        x, y = (w - side) // 2, (h - side) // 2
    else:
        side = max(1, round(side * rng.uniform(min_scale, 1.0)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    img = img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    if rng is not None and flip and rng.random() < 0.5:
        a = a[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class InpaintDataset(torch.utils.data.Dataset):
    """items: image paths or (name, uint8 array) pairs. `masks(h, w, rng) -> (mask, box)`.
    train=False gives a fixed sample per index (centre crop, no flip, mask seeded by index).
    An unreadable image is skipped and listed in the sample's "bad"."""

    def __init__(self, items, size, masks, seed=0, rank=0, train=True, min_scale=1.0, flip=False):
        self.items, self.size, self.masks = list(items), size, masks
        self.seed, self.rank, self.train, self.min_scale, self.flip = seed, rank, train, min_scale, flip

    def __len__(self):
        return len(self.items)

    def _open(self, item):
        if isinstance(item, tuple):
            return Image.fromarray(item[1]), item[0]
        # the one reader: EXIF orientation, 16-bit scaling, alpha over white (dmfn_fast.io)
        with open_image(item) as im:
            return pil_to_rgb(im, str(item)), item

    def __getitem__(self, index):
        # (epoch, index) from training's sampler (build.EpochBatches); a bare index is epoch 0's
        epoch, index = index if isinstance(index, tuple) else (0, index)
        key = [self.seed, epoch, index, self.rank] if self.train else [self.seed, 1 << 30, index]
        rng = np.random.default_rng(key)
        bad = []  # an unreadable image is replaced by the next readable one, and reported
        for i in range(index, index + min(len(self.items), MAX_BAD_IN_A_ROW)):
            item = self.items[i % len(self.items)]
            try:
                img, name = self._open(item)
                break
            except Exception as e:
                bad.append((str(item), f"{type(e).__name__}: {e}"))
        else:
            raise RuntimeError(f"{len(bad)} unreadable images in a row, e.g. {bad[0][0]}: {bad[0][1]}")
        image = square_resize(img, self.size, rng if self.train else None, self.min_scale, self.flip, name=name)
        mask, box = self.masks(self.size, self.size, rng)
        return {"image": image, "mask": torch.from_numpy(mask)[None], "box": torch.tensor(box), "bad": bad}


def collate(samples):
    """default_collate, except "bad" becomes one flat list of (path, why)."""
    bad = [b for s in samples for b in s.pop("bad")]
    batch = torch.utils.data.default_collate(samples)
    batch["bad"] = bad
    return batch
