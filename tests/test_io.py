"""One image reader and one mask rule (dmfn_fast.io), shared by training, the CLIs and the Python API.
Every file is generated in tmp_path: 16-bit, palette, alpha, CMYK, EXIF-rotated, symlink loops."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dmfn_fast import data, io
from dmfn_fast.masks import IrregularMasks, MaskSource, stroke_mask


def png16_rgb(path, a):
    """A 16-bit RGB PNG (PIL cannot write one): IHDR bit depth 16, colour type 2."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def rotated(a, path, orientation=6):
    """Save array `a` (as stored) with an EXIF orientation tag; viewers show it rotated."""
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes())


# ---- images -------------------------------------------------------------------------

def test_16bit_grey_scaled_not_clipped(tmp_path):
    a = np.array([[0, 16384, 32768, 65535]], np.uint16).repeat(3, 0)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = io.load_image(tmp_path / "g16.png")
    assert got.shape == (3, 4, 3) and got.dtype == np.uint8
    assert np.abs(got[0, :, 0].astype(int) - np.round(a[0] / 257)).max() <= 1
    Image.fromarray(a.astype(np.int32), "I").save(tmp_path / "i32.tif")
    assert np.abs(io.load_image(tmp_path / "i32.tif")[0, :, 1].astype(int) - np.round(a[0] / 257)).max() <= 1
    png16_rgb(tmp_path / "rgb16.png", np.stack([a, a // 2, 65535 - a], -1))
    got = io.load_image(tmp_path / "rgb16.png")
    assert np.abs(got[0, :, 0].astype(int) - np.round(a[0] / 257)).max() <= 1
    assert np.abs(got[0, :, 2].astype(int) - np.round((65535 - a[0]) / 257)).max() <= 1


def test_training_reads_16bit_as_displayed(tmp_path):
    """A mid-grey 16-bit PNG must train as mid-grey (convert("RGB") alone clips it to white)."""
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(tmp_path / "imgs" / "g.png")
    ds = data.InpaintDataset(data.list_images(str(tmp_path / "imgs")), 32, MaskSource("rect"))
    x = ds[0]["image"]
    assert abs(((x + 1) * 127.5).mean().item() - 30000 / 257) < 1.5


def test_exif_orientation_applied_to_images_and_masks(tmp_path):
    a = np.zeros((20, 30, 3), np.uint8)
    a[:5] = 255  # top band as stored
    rotated(a, tmp_path / "photo.jpg")
    got = io.load_image(tmp_path / "photo.jpg")
    assert got.shape == (30, 20, 3)  # orientation 6: shown rotated 90 degrees clockwise
    assert got[:, -5:].mean() > 200 and got[:, :10].mean() < 50
    m = np.zeros((20, 30), np.uint8)
    m[:5] = 255
    rotated(m, tmp_path / "mask.png")
    hole = io.load_mask(tmp_path / "mask.png")
    assert hole.shape == (30, 20) and hole[:, -5:].all() and not hole[:, :-5].any()
    # the Python API sees the same orientation
    g_img, g_mask = Image.open(tmp_path / "photo.jpg"), Image.open(tmp_path / "mask.png")
    assert io.pil_to_rgb(g_img).size == (20, 30)
    assert io.mask_to_bool(g_mask).shape == (30, 20)


def test_image_modes_rule(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[255, 0, 128], [255, 255, 255]]
    got = io.pil_to_rgb(Image.fromarray(rgba, "RGBA"))
    a = np.asarray(got)
    assert got.mode == "RGB"
    assert tuple(a[0, 0]) == (200, 0, 0)  # opaque: as is
    assert tuple(a[0, 1]) == (255, 255, 255)  # transparent: white, as shown on a page
    assert np.abs(a[0, 2].astype(int) - [228, 127, 127]).max() <= 1  # half: blended over white
    la = Image.fromarray(np.stack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 0, np.uint8)], -1), "LA")
    assert (np.asarray(io.pil_to_rgb(la)) == 255).all()
    p = Image.new("P", (2, 2))
    p.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    p.putdata([0, 1, 1, 0])
    assert tuple(np.asarray(io.pil_to_rgb(p))[0, 1]) == (200, 100, 0)
    p.info["transparency"] = 1
    p.save(tmp_path / "pt.png")
    a = io.load_image(tmp_path / "pt.png")
    assert tuple(a[0, 1]) == (255, 255, 255) and tuple(a[0, 0]) == (10, 20, 30)
    grey = np.asarray(io.pil_to_rgb(Image.new("L", (2, 2), 77)))
    assert (grey == 77).all()
    cmyk = np.asarray(io.pil_to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))))
    assert tuple(cmyk[0, 0]) == (255, 0, 0)
    with pytest.raises(ValueError, match="float"):
        io.pil_to_rgb(Image.new("F", (2, 2)))


def test_unreadable_files_listed_not_skipped(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")  # a symlink loop
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    names = [p.name for p in io.list_images(tmp_path)]
    assert names == ["dangling.png", "good.png", "loop.png"]
    with pytest.raises(ValueError, match="loop.png"):
        io.load_image(tmp_path / "loop.png")
    with pytest.raises((ValueError, FileNotFoundError), match="dangling.png"):
        io.load_image(tmp_path / "dangling.png")
    # training lists them too, so each is reported as a bad image
    ds = data.InpaintDataset(data.list_images(str(tmp_path)), 8, MaskSource("rect"))
    bad = {os.path.basename(p) for i in range(len(ds)) for p, _ in ds[i]["bad"]}
    assert bad == {"dangling.png", "loop.png"}


def test_one_list_of_extensions():
    assert data.IMAGE_EXTS is io.IMAGE_EXTS
    assert ".pgm" in io.IMAGE_EXTS


def test_recursive_listing_is_the_io_one(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "sub" / "b.pgm")
    assert [p.name for p in io.list_images(tmp_path)] == ["a.png"]
    assert [p.name for p in io.list_images(tmp_path, recursive=True)] == ["a.png", "b.pgm"]
    assert [os.path.basename(p) for p in data.list_images(str(tmp_path))] == ["a.png", "b.pgm"]


# ---- masks ---------------------------------------------------------------------------

def test_mask_rule_half_of_full_scale():
    u8 = np.array([[0, 3, 127, 128, 255]], np.uint8)  # 3: JPEG noise, not a hole
    assert io.mask_to_bool(u8).tolist() == [[False, False, False, True, True]]
    assert io.mask_to_bool(Image.fromarray(u8)).tolist() == [[False, False, False, True, True]]
    u16 = np.array([[0, 200, 32767, 32768, 65535]], np.uint16)
    assert io.mask_to_bool(u16).tolist() == [[False, False, False, True, True]]
    assert io.mask_to_bool(Image.fromarray(u16)).tolist() == [[False, False, False, True, True]]
    f = np.array([[0, 0.2, 0.5, 0.51, 1]], np.float32)
    assert io.mask_to_bool(f).tolist() == [[False, False, False, True, True]]
    assert io.mask_to_bool(np.array([[0, 1]], np.int64)).tolist() == [[False, True]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        io.mask_to_bool(np.array([[0, 255.0]]))
    with pytest.raises(ValueError, match="uint8"):
        io.mask_to_bool(np.array([[0, 255]], np.int64))
    # colour: the brightest channel decides (dark red strokes are holes, luminance would drop them)
    c = np.zeros((1, 3, 3), np.uint8)
    c[0, 1, 0] = 200
    c[0, 2, 2] = 100
    assert io.mask_to_bool(c).tolist() == [[False, True, False]]
    # alpha used: alpha > half decides, whatever the colour
    la = np.zeros((1, 3, 2), np.uint8)
    la[0, :, 1] = [0, 100, 200]
    assert io.mask_to_bool(la).tolist() == [[False, False, True]]


def test_mask_warning_for_inverted_looking_masks():
    hole = np.zeros((10, 10), bool)
    hole[2:4, 2:4] = True
    assert io.mask_warning(hole) is None
    msg = io.mask_warning(~hole, "m.png")
    assert "m.png" in msg and "96%" in msg and "--invert-masks" in msg


@pytest.mark.parametrize("size", [256, 100, 700])
def test_irregular_resize_keeps_hole_fraction(tmp_path, size):
    """Bicubic + `> 0` grew the holes by up to 44%; the hole fraction must survive the resize."""
    rng = np.random.default_rng(0)
    for i in range(3):
        m = stroke_mask(512, 512, rng) > 0
        (tmp_path / f"d{i}").mkdir()
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / f"d{i}" / "m.png")
        got = IrregularMasks(str(tmp_path / f"d{i}"))(size, size, rng)
        assert got.shape == (size, size) and set(np.unique(got)) <= {0.0, 1.0}
        assert abs(got.mean() - m.mean()) < 0.05 * m.mean() + 0.002, (size, got.mean(), m.mean())


def test_irregular_masks_follow_the_rule_and_invert(tmp_path):
    (tmp_path / "masks").mkdir()
    a = np.full((64, 64), 40, np.uint8)  # faint grey background: not a hole (was: all hole)
    a[10:30, 10:30] = 255
    Image.fromarray(a).save(tmp_path / "masks" / "m.png")
    m = IrregularMasks(str(tmp_path / "masks"))(64, 64, np.random.default_rng(0))
    assert m.sum() == 400 and m[10:30, 10:30].all()
    with pytest.warns(UserWarning, match="90%"):  # inverted, the hole covers most of the image
        inv = MaskSource("irregular", str(tmp_path / "masks"), invert=True)
    m2, _ = inv(64, 64, np.random.default_rng(0))
    assert np.array_equal(m2, 1 - m)


def test_irregular_masks_warn_when_they_look_inverted(tmp_path):
    (tmp_path / "masks").mkdir()
    a = np.full((32, 32), 255, np.uint8)
    a[4:8, 4:8] = 0
    Image.fromarray(a).save(tmp_path / "masks" / "m.png")
    with pytest.warns(UserWarning, match="invert"):
        IrregularMasks(str(tmp_path / "masks"))


def test_generator_inpaint_uses_the_mask_rule():
    from dmfn_fast import Generator

    torch.manual_seed(0)
    g = Generator(nf=8, n_blocks=1, impl="reference").eval()
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    mask[10:12, 10:12] = 5  # JPEG-noise level: not a hole
    out = g.inpaint(img, mask)
    assert np.array_equal(out[10:12, 10:12], img[10:12, 10:12])
    assert (out[4:8, 4:8] != img[4:8, 4:8]).any()
    with pytest.warns(UserWarning, match="invert"):
        g.inpaint(img, 255 - mask)


def test_models_does_not_import_pil_handling():
    import subprocess
    import sys

    code = "import sys, dmfn_fast.models; print('dmfn_fast.io' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    import dmfn_fast.models as models
    assert not hasattr(models, "_inpaint_picture")
