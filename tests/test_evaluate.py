"""dmfn-eval on real photographs with results of known error."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from skimage import data, metrics as skm

from dmfn_fast.evaluate import LPIPS, main


def crop(name, h=48, w=64):
    im = getattr(data, name)()
    return np.array(im[:h, :w])


@pytest.fixture
def folders(tmp_path):
    """gt/, masks/, results/: 'astro' identical; 'coffee' +-k levels in the hole only; LaMa-named 'cat_mask000'."""
    for d in ("gt", "masks", "results"):
        (tmp_path / d).mkdir()
    hole = np.zeros((48, 64), bool)
    hole[10:30, 20:50] = True
    rng = np.random.default_rng(0)
    for name, stem, k in (("astronaut", "astro", 0), ("coffee", "coffee", 6), ("chelsea", "cat", 3)):
        gt = np.clip(crop(name), 10, 245)  # room for +-k without clipping
        res = gt.astype(int)
        res[hole] += (rng.integers(0, 2, res[hole].shape) * 2 - 1) * k
        Image.fromarray(gt).save(tmp_path / "gt" / f"{stem}.png")
        out_stem = stem if stem != "cat" else "cat_mask000"
        Image.fromarray(res.astype(np.uint8)).save(tmp_path / "results" / f"{out_stem}.png")
        Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{out_stem}.png")
    return tmp_path, hole


def run(tmp_path, *extra):
    return main(["--results", str(tmp_path / "results"), "--gt", str(tmp_path / "gt"),
                 "--masks", str(tmp_path / "masks"), "--json", str(tmp_path / "m.json"), "--per-image", *extra])


def test_known_values_and_json(folders, capsys):
    tmp_path, hole = folders
    assert run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "psnr_hole" in out and "fid: skipped" in out and "--fid-inception" in out and "--lpips-vgg16" in out
    rep = json.loads((tmp_path / "m.json").read_text())
    rows = {r["image"]: r for r in rep["per_image"]}
    assert rep["n_images"] == 3 and rep["n_failed"] == 0
    assert rows["astro.png"]["psnr"] == "inf" and rows["astro.png"]["ssim"] == pytest.approx(1.0)
    assert rows["cat_mask000.png"]["gt"] == "cat.png"
    for name, k in (("coffee.png", 6), ("cat_mask000.png", 3)):
        r = rows[name]
        assert r["psnr_hole"] == pytest.approx(20 * math.log10(255 / k), abs=1e-9)
        assert r["l1_hole"] == pytest.approx(k / 255, abs=1e-12)
        assert r["l1"] == pytest.approx(k / 255 * hole.mean(), abs=1e-12)
        assert r["psnr"] == pytest.approx(20 * math.log10(255 / k) - 10 * math.log10(hole.mean()), abs=1e-9)
    gt = np.asarray(Image.open(tmp_path / "gt" / "coffee.png"))
    res = np.asarray(Image.open(tmp_path / "results" / "coffee.png"))
    ref = skm.structural_similarity(gt / 255.0, res / 255.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1)
    assert rows["coffee.png"]["ssim"] == pytest.approx(ref, abs=1e-10)
    assert rep["metrics"]["psnr"] == "inf"
    assert rep["metrics"]["psnr_hole"] == "inf"  # the mean of per-image values, one of them inf
    assert rep["metrics"]["l1_hole"] == pytest.approx((6 + 3) / 255 / 3, abs=1e-12)


def test_failures_reported_not_fatal(folders, capsys):
    tmp_path, _ = folders
    Image.fromarray(crop("coffee", 40, 40)).save(tmp_path / "results" / "small.png")
    Image.fromarray(crop("coffee", 48, 64)).save(tmp_path / "gt" / "small.png")
    (tmp_path / "results" / "broken.png").write_bytes(b"not png")
    Image.fromarray(crop("coffee")).save(tmp_path / "results" / "orphan.png")
    assert run(tmp_path) == 1
    err = capsys.readouterr().err
    assert "small.png" in err and "40x40" in err
    assert "broken.png" in err and "orphan.png" in err
    rep = json.loads((tmp_path / "m.json").read_text())
    assert rep["n_images"] == 3 and rep["n_failed"] == 3


def test_lpips_with_supplied_weights(folders, tmp_path_factory):
    if importlib.util.find_spec("torchmetrics") is None:
        pytest.skip("LPIPS heads are read from torchmetrics (pip install torchmetrics)")
    tmp_path, _ = folders
    torch.manual_seed(0)  # stand-in for torchvision's vgg16 file: same key names, random values
    feats = nn.Sequential(*[m for m in _vgg16_like()])
    path = tmp_path_factory.mktemp("w") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()} | {"classifier.0.weight": torch.zeros(1)}, path)
    lp = LPIPS(path)
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    d0 = lp(x, x)
    d1 = lp(x, (x + 0.3 * torch.randn_like(x)).clamp(-1, 1))
    assert d0.shape == (2,) and torch.allclose(d0, torch.zeros(2)) and (d1 > 1e-4).all()
    assert run(tmp_path, "--lpips-vgg16", str(path)) == 0
    rep = json.loads((tmp_path / "m.json").read_text())
    rows = {r["image"]: r for r in rep["per_image"]}
    assert rows["astro.png"]["lpips"] == pytest.approx(0, abs=1e-6) and rows["coffee.png"]["lpips"] > 0
    assert "lpips" not in rep["skipped"] and "lpips" in rep["metrics"]


def _vgg16_like():
    c = 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if v == "M":
            yield nn.MaxPool2d(2)
        else:
            yield nn.Conv2d(c, v, 3, padding=1)
            yield nn.ReLU()
            c = v


class _TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x.float() / 255).mean((2, 3))


def test_fid_with_supplied_extractor(folders, capsys):
    if importlib.util.find_spec("torchmetrics") is None:
        pytest.skip("FID uses torchmetrics (pip install torchmetrics)")
    tmp_path, _ = folders
    torch.manual_seed(0)
    torch.jit.script(_TinyFeatures()).save(str(tmp_path / "feat.pt"))
    assert run(tmp_path, "--fid-inception", str(tmp_path / "feat.pt")) == 0
    rep = json.loads((tmp_path / "m.json").read_text())
    assert "fid" not in rep["skipped"] and rep["metrics"]["fid"] > 0
    # Results equal to the ground truths: FID 0.
    for p in (tmp_path / "results").iterdir():
        gt = tmp_path / "gt" / (p.name.split("_mask")[0].removesuffix(".png") + ".png")
        p.write_bytes(gt.read_bytes())
    assert run(tmp_path, "--fid-inception", str(tmp_path / "feat.pt")) == 0
    rep = json.loads((tmp_path / "m.json").read_text())
    assert rep["metrics"]["fid"] == pytest.approx(0, abs=1e-4)
