"""Image and mask files for inference and evaluation: reading (with clear errors for
corrupt files), mask conventions, matching masks to images by name, and safe PNG writing.

Mask convention: white or any non-zero value = hole. RGB masks: a pixel is a hole if any
channel is non-zero. Masks with an alpha channel that is actually used (not all opaque):
the alpha alone decides, opaque (alpha > 0) = hole, whatever the colour."""
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LAMA_MASK_TAG = "_mask"  # LaMa's convention: NAME.png with NAME_mask000.png, NAME_mask001.png, ...


def _open(path):
    """Open and fully decode an image file, so truncated files fail here and not later."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_image(path) -> np.ndarray:
    """uint8 RGB array [H, W, 3]. Grey is replicated, alpha dropped."""
    im = _open(path)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise ValueError(f"{path}: {im.mode} (16/32-bit) images are not supported; save it as 8-bit RGB")
    return np.array(im.convert("RGB"))


def load_mask(path) -> np.ndarray:
    """bool array [H, W], True = hole."""
    return mask_to_bool(_open(path))


def mask_to_bool(mask) -> np.ndarray:
    """A PIL image or an array ([H, W], [H, W, 1|3|4]) to a bool [H, W] hole mask."""
    if isinstance(mask, Image.Image):
        if mask.mode == "P":
            mask = mask.convert("RGBA")
        elif mask.mode == "1":
            mask = mask.convert("L")
        mask = np.asarray(mask)
    m = np.asarray(mask)
    if m.dtype == bool:
        pass
    elif not (np.issubdtype(m.dtype, np.number)):
        raise TypeError(f"mask must be numeric or bool, got {m.dtype}")
    if m.ndim == 3 and m.shape[2] in (2, 4):  # LA / RGBA
        alpha = m[..., -1]
        if (alpha != alpha.flat[0]).any() or alpha.flat[0] == 0:
            return alpha > 0
        m = m[..., :-1]
    if m.ndim == 3 and m.shape[2] in (1, 3):
        return (m != 0).any(axis=2)
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W] or [H, W, 1|2|3|4], got shape {m.shape}")
    return m != 0


def is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def list_images(folder) -> list:
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


def lama_base(stem: str):
    """'NAME_mask001' -> 'NAME' (LaMa's rule: split at the last '_mask'); None if no tag."""
    if LAMA_MASK_TAG not in stem:
        return None
    return stem.rsplit(LAMA_MASK_TAG, 1)[0]


def pair_images_and_masks(images, masks):
    """Pairs (image_path, mask_path or None, out_stem) for a file or folder of each.

    - mask is a file: that mask for every image.
    - mask folder: NAME.* with the image's stem (output NAME.png), else every LaMa mask
      NAME_mask*.png (one output per mask, named after the mask, as LaMa does).
    Images and masks may share one folder: files that are LaMa masks of an image there are
    not taken as images. An image without a mask gets mask None (reported by the caller)."""
    images, masks = Path(images), Path(masks)
    if not images.exists():
        raise FileNotFoundError(f"--images {images}: no such file or folder")
    if not masks.exists():
        raise FileNotFoundError(f"--masks {masks}: no such file or folder")
    image_files = [images] if images.is_file() else list_images(images)
    if masks.is_file():
        return [(p, masks, p.stem) for p in image_files]
    by_stem, lama = {}, {}
    for p in list_images(masks):
        by_stem.setdefault(p.stem, p)
        base = lama_base(p.stem)
        if base is not None:
            lama.setdefault(base, []).append(p)
    stems = {p.stem for p in image_files}
    pairs = []
    for p in image_files:
        base = lama_base(p.stem)
        if base is not None and base in stems and p in lama.get(base, ()):
            continue  # a LaMa mask lying beside its image
        exact = by_stem.get(p.stem)
        if exact is not None and exact.resolve() != p.resolve():
            pairs.append((p, exact, p.stem))
        elif p.stem in lama:
            pairs += [(p, m, m.stem) for m in lama[p.stem]]
        else:
            pairs.append((p, None, p.stem))
    return pairs


def save_png(array: np.ndarray, path) -> None:
    """Write an RGB uint8 array as PNG atomically (temp file + os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
