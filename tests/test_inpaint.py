"""dmfn-inpaint and Generator.from_pretrained / Generator.inpaint on real photographs
(scikit-image's data) with generated masks. A small generator (nf=16, 2 blocks) keeps CPU time low."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from dmfn_fast import Generator
from dmfn_fast.inpaint import main
from dmfn_fast.io import load_mask, mask_to_bool, pair_images_and_masks

try:
    from dmfn_fast.masks import rect_mask, stroke_mask
except ImportError:  # the training helper's module is not there yet: same shapes, made here
    def rect_mask(h, w, rng):
        m = np.zeros((h, w), np.float32)
        hh, ww = max(1, h // 2), max(1, w // 2)
        y, x = rng.integers(0, h - hh + 1), rng.integers(0, w - ww + 1)
        m[y:y + hh, x:x + ww] = 1
        return m

    def stroke_mask(h, w, rng):
        from PIL import ImageDraw
        im = Image.new("L", (w, h))
        d = ImageDraw.Draw(im)
        for _ in range(4):
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(4)]
            d.line(pts, fill=255, width=max(1, min(h, w) // 12))
        return (np.asarray(im) > 0).astype(np.float32)


def photo(name, h, w):
    """A real photograph resized to h x w (uint8 RGB)."""
    im = getattr(data, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    return np.array(Image.fromarray(im).resize((w, h), Image.BICUBIC))


def mask_png(hole, kind="grey"):
    """Save-ready PIL mask of a bool hole array in one of the conventions users hand in."""
    h, w = hole.shape
    if kind == "grey":
        return Image.fromarray(hole.astype(np.uint8) * 255)
    if kind == "colour":  # red strokes on black
        a = np.zeros((h, w, 3), np.uint8)
        a[hole, 0] = 200
        return Image.fromarray(a)
    if kind == "alpha":  # opaque black strokes on a transparent white background
        a = np.full((h, w, 4), 255, np.uint8)
        a[hole, :3] = 0
        a[..., 3] = np.where(hole, 255, 0)
        return Image.fromarray(a, "RGBA")
    if kind == "binary":
        return Image.fromarray(hole).convert("1")
    raise ValueError(kind)


@pytest.fixture(scope="module")
def small_g():
    torch.manual_seed(0)
    return Generator(nf=16, n_blocks=2, impl="reference").eval()


@pytest.fixture(scope="module")
def authors_ckpt(tmp_path_factory, small_g):
    """Saved as the authors do: torch.save(net.state_dict()) of a DataParallel net ("module." keys)."""
    p = tmp_path_factory.mktemp("ckpt") / "latest_G.pth"
    torch.save({"module." + k: v for k, v in small_g.state_dict().items()}, p)
    return p


@pytest.fixture(scope="module")
def our_ckpt(tmp_path_factory, small_g):
    p = tmp_path_factory.mktemp("ckpt") / "train.pt"
    torch.save({"format": "dmfn-fast-train-v1", "G": small_g.state_dict(), "D": {}, "opt_G": {}, "opt_D": {},
                "sched_G": {}, "sched_D": {}, "scaler": None, "step": 7, "rng": {},
                "config": {"nf": 16, "n_blocks": 2}, "val": None}, p)
    return p


def write_pair(folder_img, folder_mask, name, image, hole, kind="grey"):
    folder_img.mkdir(exist_ok=True)
    folder_mask.mkdir(exist_ok=True)
    Image.fromarray(image).save(folder_img / f"{name}.png")
    mask_png(hole, kind).save(folder_mask / f"{name}.png")


def read(p):
    return np.asarray(Image.open(p).convert("RGB"))


def assert_known_exact(out, image, hole):
    assert out.shape == image.shape
    assert np.array_equal(out[~hole], image[~hole]), "known pixels changed"


def test_from_pretrained_reads_both_formats_and_infers_size(authors_ckpt, our_ckpt, small_g):
    for p in (authors_ckpt, our_ckpt):
        g = Generator.from_pretrained(p)
        assert not g.training
        assert g.encoder[0].conv.out_channels == 16 and len(g.blocks) == 2
        for k, v in small_g.state_dict().items():
            assert torch.equal(g.state_dict()[k], v), k


def test_from_pretrained_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Generator.from_pretrained(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot load"):
        Generator.from_pretrained(tmp_path / "junk.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DMFN generator"):
        Generator.from_pretrained(tmp_path / "other.pth")
    torch.save({"format": "something-else"}, tmp_path / "fmt.pth")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        Generator.from_pretrained(tmp_path / "fmt.pth")


def test_python_api_pil_numpy_tensor(small_g):
    rng = np.random.default_rng(1)
    img = photo("chelsea", 61, 83)
    hole = stroke_mask(61, 83, rng) > 0
    out = small_g.inpaint(Image.fromarray(img), mask_png(hole, "colour"))
    assert isinstance(out, Image.Image) and out.size == (83, 61)
    assert_known_exact(np.asarray(out), img, hole)
    assert (np.asarray(out)[hole] != img[hole]).any()

    out_u8 = small_g.inpaint(img, hole)
    assert out_u8.dtype == np.uint8
    assert np.array_equal(out_u8, np.asarray(out))

    f = img.astype(np.float64) / 255
    out_f = small_g.inpaint(f, hole.astype(np.float32))
    assert out_f.dtype == np.float64 and np.array_equal(out_f[~hole], f[~hole])
    assert np.abs(out_f - out_u8 / 255.0).max() <= 0.5 / 255 + 1e-6

    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    m = torch.from_numpy(hole)[None, None].float()
    y = small_g.inpaint(x, m)
    assert torch.equal(y[m.expand_as(y) == 0], x[m.expand_as(x) == 0])
    with pytest.raises(ValueError, match="does not match"):
        small_g.inpaint(img, hole[:-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        small_g.inpaint(f * 2, hole)


def test_mask_conventions():
    rng = np.random.default_rng(2)
    hole = stroke_mask(40, 50, rng) > 0
    for kind in ("grey", "colour", "alpha", "binary"):
        assert np.array_equal(mask_to_bool(mask_png(hole, kind)), hole), kind
    opaque = np.zeros((4, 4, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[1, 2, :3] = 255
    assert mask_to_bool(opaque).sum() == 1  # alpha all opaque: the colour decides


@pytest.mark.parametrize("kind", ["grey", "colour", "alpha"])
def test_cli_odd_size_known_pixels_exact(tmp_path, authors_ckpt, kind):
    rng = np.random.default_rng(3)
    img = photo("astronaut", 257, 301)
    hole = (rect_mask(257, 301, rng=rng) > 0) | (stroke_mask(257, 301, rng) > 0)
    write_pair(tmp_path / "img", tmp_path / "mask", "astro", img, hole, kind)
    rc = main(["--checkpoint", str(authors_ckpt), "--images", str(tmp_path / "img"),
               "--masks", str(tmp_path / "mask"), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    out = read(tmp_path / "out" / "astro.png")
    assert_known_exact(out, img, hole)
    assert (out[hole] != img[hole]).mean() > 0.5


def test_cli_tiny_and_single_files(tmp_path, our_ckpt):
    img = photo("coffee", 8, 8)
    hole = np.zeros((8, 8), bool)
    hole[2:5, 3:7] = True
    Image.fromarray(img).save(tmp_path / "tiny.png")
    mask_png(hole).save(tmp_path / "hole.png")
    rc = main(["--checkpoint", str(our_ckpt), "--images", str(tmp_path / "tiny.png"),
               "--masks", str(tmp_path / "hole.png"), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    assert_known_exact(read(tmp_path / "out" / "tiny.png"), img, hole)


def test_cli_large_with_resize(tmp_path, authors_ckpt, small_g, monkeypatch):
    rng = np.random.default_rng(4)
    img = photo("astronaut", 768, 1024)
    hole = np.zeros((768, 1024), bool)
    hole[300:420, 500:700] = True
    hole |= stroke_mask(768, 1024, rng) > 0
    write_pair(tmp_path / "img", tmp_path / "mask", "big", img, hole)
    seen = []
    real_inpaint = Generator.inpaint

    def spy(self, x, m):
        seen.append(tuple(x.shape[-2:]))
        return real_inpaint(self, x, m)

    monkeypatch.setattr(Generator, "inpaint", spy)
    rc = main(["--checkpoint", str(authors_ckpt), "--images", str(tmp_path / "img"),
               "--masks", str(tmp_path / "mask"), "--out", str(tmp_path / "out"), "--resize", "--quiet"])
    assert rc == 0
    assert seen and max(max(s) for s in seen) <= 256, seen
    out = read(tmp_path / "out" / "big.png")
    assert_known_exact(out, img, hole)
    assert (out[hole] != img[hole]).mean() > 0.5


def test_cli_errors_reported_run_goes_on(tmp_path, authors_ckpt, capsys):
    rng = np.random.default_rng(5)
    good = photo("chelsea", 40, 52)
    write_pair(tmp_path / "img", tmp_path / "mask", "good", good, rect_mask(40, 52, rng=rng) > 0)
    write_pair(tmp_path / "img", tmp_path / "mask", "mismatch", good, np.ones((20, 20), bool))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    mask_png(np.ones((8, 8), bool)).save(tmp_path / "mask" / "corrupt.png")
    Image.fromarray(good).save(tmp_path / "img" / "truncated.jpg")
    raw = (tmp_path / "img" / "truncated.jpg").read_bytes()
    (tmp_path / "img" / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    mask_png(np.ones((40, 52), bool)).save(tmp_path / "mask" / "truncated.png")
    Image.fromarray(good).save(tmp_path / "img" / "nomask.png")
    rc = main(["--checkpoint", str(authors_ckpt), "--images", str(tmp_path / "img"),
               "--masks", str(tmp_path / "mask"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert (tmp_path / "out" / "good.png").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]
    assert "4 failed" in err
    assert "mismatch.png" in err and "20x20" in err and "52x40" in err
    assert "corrupt.png" in err and "cannot read image" in err
    assert "truncated.jpg" in err
    assert "no mask found for nomask.png" in err


def test_cli_lama_layout_and_batches(tmp_path, authors_ckpt):
    """LaMa keeps NAME.png and NAME_mask000.png, ... in one folder; one output per mask.
    Batched and one-by-one runs agree (instance norm is per image)."""
    rng = np.random.default_rng(6)
    folder = tmp_path / "lama"
    folder.mkdir()
    img = photo("coffee", 64, 96)
    holes = [stroke_mask(64, 96, rng) > 0 for _ in range(3)]
    Image.fromarray(img).save(folder / "cup.png")
    for i, h in enumerate(holes):
        mask_png(h).save(folder / f"cup_mask{i:03d}.png")
    pairs = pair_images_and_masks(folder, folder)
    assert [p[2] for p in pairs] == ["cup_mask000", "cup_mask001", "cup_mask002"]
    outs = {}
    for bs in ("1", "3"):
        rc = main(["--checkpoint", str(authors_ckpt), "--images", str(folder), "--masks", str(folder),
                   "--out", str(tmp_path / f"out{bs}"), "--batch-size", bs, "--quiet"])
        assert rc == 0
        outs[bs] = [read(tmp_path / f"out{bs}" / f"cup_mask{i:03d}.png") for i in range(3)]
    for i, h in enumerate(holes):
        assert_known_exact(outs["3"][i], img, h)
        assert np.abs(outs["3"][i].astype(int) - outs["1"][i]).max() <= 1


def test_cli_bf16_and_module_entry(tmp_path, authors_ckpt):
    rng = np.random.default_rng(7)
    img = photo("astronaut", 33, 45)
    hole = rect_mask(33, 45, rng=rng) > 0
    write_pair(tmp_path / "img", tmp_path / "mask", "a", img, hole)
    r = subprocess.run([sys.executable, "-m", "dmfn_fast.inpaint", "--checkpoint", str(authors_ckpt),
                        "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
                        "--out", str(tmp_path / "out"), "--dtype", "bf16", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_known_exact(read(tmp_path / "out" / "a.png"), img, hole)


def test_cli_never_overwrites_inputs(tmp_path, authors_ckpt, capsys):
    img = photo("chelsea", 16, 16)
    hole = np.zeros((16, 16), bool)
    hole[4:9, 4:9] = True
    write_pair(tmp_path / "img", tmp_path / "mask", "cat", img, hole)
    before = (tmp_path / "img" / "cat.png").read_bytes()
    for out in ("img", "mask"):
        rc = main(["--checkpoint", str(authors_ckpt), "--images", str(tmp_path / "img"),
                   "--masks", str(tmp_path / "mask"), "--out", str(tmp_path / out), "--quiet"])
        assert rc == 2
        assert "input folder" in capsys.readouterr().err
    assert (tmp_path / "img" / "cat.png").read_bytes() == before


def test_cli_bad_checkpoint_exit_2(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"nope")
    img = photo("chelsea", 16, 16)
    write_pair(tmp_path / "img", tmp_path / "mask", "cat", img, np.ones((16, 16), bool))
    rc = main(["--checkpoint", str(tmp_path / "bad.pth"), "--images", str(tmp_path / "img"),
               "--masks", str(tmp_path / "mask"), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and "cannot load checkpoint" in capsys.readouterr().err
    assert load_mask(tmp_path / "mask" / "cat.png").all()
