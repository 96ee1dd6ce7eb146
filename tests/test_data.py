import numpy as np
import pytest
import torch
from PIL import Image

from dmfn_fast.data import InpaintDataset, collate, demo_images, list_images
from dmfn_fast.masks import MaskSource


def _images(folder, n=4, size=(80, 60)):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_folder_list_and_sample(tmp_path):
    folder = _images(tmp_path / "imgs")
    (folder / "sub").mkdir()
    Image.new("RGB", (90, 90)).save(folder / "sub" / "deep.jpg")
    paths = list_images(str(folder))
    assert len(paths) == 5  # searched recursively
    (tmp_path / "list.txt").write_text("imgs/img0.png\n\n# comment\nimgs/img1.png\n")
    assert [p.split("/")[-1] for p in list_images(str(tmp_path / "list.txt"))] == ["img0.png", "img1.png"]
    ds = InpaintDataset(paths, 32, MaskSource("rect"), seed=3)
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert -1 <= s["image"].min() and s["image"].max() <= 1
    assert s["mask"].shape == (1, 32, 32) and s["box"].tolist()[2:] == [16, 16]
    again = ds[0]  # a sample is a pure function of (seed, epoch, index)
    assert torch.equal(s["image"], again["image"]) and torch.equal(s["mask"], again["mask"])
    ds.epoch = 1
    assert not torch.equal(s["mask"], ds[0]["mask"]) or not torch.equal(s["image"], ds[0]["image"])
    other_rank = InpaintDataset(paths, 32, MaskSource("rect"), seed=3, rank=1)
    assert not torch.equal(other_rank[0]["mask"], s["mask"])  # same seed, different masks per rank


def test_empty_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(str(tmp_path / "empty"))


def test_corrupt_images_are_skipped_and_reported(tmp_path):
    folder = _images(tmp_path / "imgs", n=3)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = open(folder / "img0.png", "rb").read()
    (folder / "trunc.png").write_bytes(good[: len(good) // 2])
    paths = list_images(str(folder))
    ds = InpaintDataset(paths, 32, MaskSource("rect"))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (5, 3, 32, 32) and torch.isfinite(batch["image"]).all()
    bad = {p.split("/")[-1] for p, _ in batch["bad"]}
    assert bad == {"bad.png", "trunc.png"}
    all_bad = InpaintDataset([str(folder / "bad.png")] * 3, 32, MaskSource("rect"))
    with pytest.raises(RuntimeError, match="unreadable"):
        all_bad[0]


def test_small_image_upscaled_with_warning(tmp_path):
    folder = _images(tmp_path / "imgs", n=1, size=(20, 24))
    ds = InpaintDataset(list_images(str(folder)), 32, MaskSource("rect"))
    with pytest.warns(UserWarning, match="smaller than the training size"):
        s = ds[0]
    assert s["image"].shape == (3, 32, 32)


def test_demo_images_load_offline():
    photos = demo_images()
    names = [n for n, _ in photos]
    assert len(photos) >= 8 and "astronaut" in names
    for _, a in photos:
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
