"""Image and mask files for training, inference, evaluation and the Python API: one reader
(clear errors for corrupt files), one mask rule, matching masks to images by name, safe PNG writing.

Images are read as they are displayed: EXIF orientation applied; 16-bit (I;16, I, 16-bit RGB)
scaled to 8 bits (v / 257); palette, grey and CMYK made RGB; transparency composited over white.

Mask rule (every tool): a pixel is a hole where its value is above half of full scale:
> 127 for 8-bit, > 32767 for 16-bit, > 0.5 for float masks (which must lie in [0, 1]), True for
bool. Colour masks: the brightest channel decides. A mask whose alpha channel is used (not all
opaque) is read from the alpha alone, with the same rule, whatever the colour."""
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LAMA_MASK_TAG = "_mask"  # LaMa's convention: NAME.png with NAME_mask000.png, NAME_mask001.png, ...
_16BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Above this hole fraction a mask most likely marks the known region instead.
INVERTED_FRACTION = 0.5


def open_image(path):
    """Open and fully decode an image file, so truncated files fail here and not later."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (or a dangling symlink)") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (symlink loops too), SyntaxError, ...
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _upright(im):
    """The image as viewers show it: EXIF orientation applied (a no-op without the tag)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: use the pixels as stored
        return im


def _scale16(im):
    """A 16-bit (or 32-bit integer holding 16-bit values) image as uint8 L, v / 257 rounded."""
    a = np.asarray(im).astype(np.int64)
    if im.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError("32-bit integer image with values outside 0..65535 is not supported; "
                         "save it as 8- or 16-bit")
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")


def pil_to_rgb(im: Image.Image, name="image") -> Image.Image:
    """A PIL image of any mode as 8-bit RGB, as displayed (see the module docstring for the rule)."""
    im = _upright(im)
    if im.mode in _16BIT:
        im = _scale16(im)
    elif im.mode == "F":
        raise ValueError(f"{name}: 32-bit float images are not supported; save it as 8- or 16-bit")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path) -> np.ndarray:
    """uint8 RGB array [H, W, 3], as displayed (see the module docstring)."""
    im = open_image(path)
    try:
        return np.array(pil_to_rgb(im, str(path)))
    except ValueError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def load_mask(path, invert=False) -> np.ndarray:
    """bool array [H, W], True = hole (the mask rule; `invert` flips it)."""
    hole = mask_to_bool(open_image(path), str(path))
    return ~hole if invert else hole


def _full_scale_threshold(a, name):
    """Bool array: above half of full scale for a's dtype."""
    if a.dtype == bool:
        return a
    if a.dtype == np.uint8:
        return a > 127
    if a.dtype == np.uint16:
        return a > 32767
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ValueError(f"{name}: float masks must be finite and in [0, 1] (> 0.5 = hole); "
                             "for 0..255 values use a uint8 array")
        return a > 0.5
    if np.issubdtype(a.dtype, np.integer):
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name}: {a.dtype} masks must hold only 0 and 1; use uint8 (0..255, > 127 = hole), "
                             "uint16 or bool")
        return a == 1
    raise TypeError(f"{name}: mask must be numeric or bool, got {a.dtype}")


def mask_to_bool(mask, name="mask") -> np.ndarray:
    """A PIL image or an array ([H, W], [H, W, 1|2|3|4]) to a bool [H, W] hole mask (the mask rule)."""
    if isinstance(mask, Image.Image):
        mask = _upright(mask)
        if mask.mode == "P":
            mask = mask.convert("RGBA" if "transparency" in mask.info else "RGB")
        elif mask.mode == "1":
            mask = mask.convert("L")
        elif mask.mode == "I":  # 16-bit PNGs open as I in some Pillow versions
            mask = _scale16(mask)
        elif mask.mode in ("CMYK", "YCbCr", "LAB", "HSV", "PA"):
            mask = mask.convert("RGBA" if mask.mode == "PA" else "RGB")
        elif mask.mode == "F":
            return _full_scale_threshold(np.asarray(mask), name)
        mask = np.asarray(mask)
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] in (2, 4):  # LA / RGBA
        alpha = m[..., -1]
        full = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535, np.dtype(bool): True}.get(alpha.dtype, 1)
        if (alpha != full).any():
            return _full_scale_threshold(alpha, name)
        m = m[..., :-1]
    if m.ndim == 3 and m.shape[2] in (1, 3):
        m = m.max(axis=2)
    if m.ndim != 2:
        raise ValueError(f"{name}: mask must be [H, W] or [H, W, 1|2|3|4], got shape {m.shape}")
    return _full_scale_threshold(m, name)


def mask_warning(hole, name="mask"):
    """A warning line when a mask's hole covers most of the image (a mask drawn the other way
    round, white = keep), else None."""
    frac = float(np.mean(hole)) if np.size(hole) else 0.0
    if frac <= INVERTED_FRACTION:
        return None
    return (f"{name}: the hole covers {frac:.0%} of the image; if white marks the part to keep in "
            "your masks, pass --invert-masks (invert=True in Python) to swap hole and known pixels")


def warn_if_inverted(hole, name="mask", stacklevel=3):
    msg = mask_warning(hole, name)
    if msg:
        warnings.warn(msg, UserWarning, stacklevel=stacklevel)
    return msg


def is_image_name(p) -> bool:
    return os.path.splitext(str(p))[1].lower() in IMAGE_EXTS


def list_images(folder, recursive=False) -> list:
    """Sorted paths of the image files in `folder` (by extension; subfolders too if `recursive`).
    Entries that cannot be stat-ed (dangling symlinks, symlink loops) are listed, not dropped, so the
    reader reports them by name; symlinked folders are not followed."""
    folder = Path(folder)
    if recursive:
        found = [Path(d) / f for d, _, fs in os.walk(folder) for f in fs]
    else:
        found = [p for p in folder.iterdir() if not _is_dir(p)]
    return sorted(p for p in found if is_image_name(p))


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def real_path(p) -> Path:
    """Path.resolve() that does not raise on symlink loops (the reader reports those)."""
    return Path(os.path.realpath(p))


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
        if exact is not None and real_path(exact) != real_path(p):
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


def inpaint_picture(model, image, mask, invert=False):
    """Generator.inpaint for a PIL image or numpy array: same type (and dtype) out, known pixels as given."""
    import torch

    if not isinstance(image, (Image.Image, np.ndarray)):
        raise TypeError(f"image must be a tensor, PIL image or numpy array, got {type(image).__name__}")
    is_pil = isinstance(image, Image.Image)
    arr = np.asarray(pil_to_rgb(image)) if is_pil else image
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must be [H, W, 3] (RGB), got shape {arr.shape}")
    hole = mask_to_bool(mask)
    if invert:
        hole = ~hole
    if hole.shape != arr.shape[:2]:
        raise ValueError(f"mask size {hole.shape} does not match image size {arr.shape[:2]}")
    warn_if_inverted(hole, "mask", stacklevel=4)
    if arr.dtype == np.uint8:
        x = torch.tensor(arr).permute(2, 0, 1).float() / 127.5 - 1
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError("float image arrays must be finite and in [0, 1]")
        x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) * 2 - 1
    else:
        raise TypeError(f"image array must be uint8 or float in [0, 1], got {arr.dtype}")
    m = torch.from_numpy(hole)[None, None].float()
    y = model.inpaint(x[None].clamp(-1, 1), m)[0].permute(1, 2, 0).float().numpy()
    y = (y + 1) / 2
    y = np.clip(np.round(y * 255), 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else y.astype(arr.dtype)
    out = np.where(hole[..., None], y, arr)
    return Image.fromarray(out) if is_pil else out


# ---- checks the CLIs run on their flags before any work ------------------------------------

def device_problem(name):
    """Why `name` is not a usable torch device here, or None."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return f"{name!r} is not a device ({e}); use cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name}: CUDA is not available here; use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{name}: only {torch.cuda.device_count()} CUDA device(s) here"
    elif dev.type != "cpu" and not hasattr(torch, dev.type):
        return f"{name}: unsupported device type; use cpu or cuda"
    return None


def _writable_dir(d: Path):
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def output_file_problem(path):
    """Why a file cannot be written at `path` (checked before computing), or None."""
    p = Path(path)
    if p.is_dir():
        return f"{p} is a folder; give a file name"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        return f"folder {parent} does not exist; create it first"
    if not _writable_dir(parent) or (p.exists() and not os.access(p, os.W_OK)):
        return f"cannot write {p} (permission denied)"
    return None


def output_dir_problem(path):
    """Why `path` cannot be (created and) written as an output folder, or None."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            return f"{p} exists and is not a folder"
        return None if _writable_dir(p) else f"cannot write in {p} (permission denied)"
    q = p.parent
    while not q.exists() and q != q.parent:  # the nearest existing ancestor must be a writable folder
        q = q.parent
    if not q.is_dir():
        return f"cannot create {p}: {q} is not a folder"
    return None if _writable_dir(q) else f"cannot create {p} (permission denied in {q})"
