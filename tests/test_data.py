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
    assert torch.equal(ds[(0, 0)]["mask"], s["mask"])  # a bare index is epoch 0's
    assert not torch.equal(s["mask"], ds[(1, 0)]["mask"]) or not torch.equal(s["image"], ds[(1, 0)]["image"])
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


def _epoch_by_epoch(n, batch, seed, world, rank, epochs):
    """The batches' keys as train.py took them before s18: a fresh DistributedSampler (and loader) per epoch."""
    out = []
    for epoch in range(epochs):
        s = torch.utils.data.DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
        s.set_epoch(epoch)
        idx = list(s)
        idx = idx[: len(idx) // batch * batch]
        out += [[(epoch, i) for i in idx[b:b + batch]] for b in range(0, len(idx), batch)]
    return out


@pytest.mark.parametrize("n,batch,world,rank", [(16, 16, 1, 0), (23, 4, 1, 0), (23, 3, 2, 1)])
def test_epoch_batches_run_on_across_epochs_and_resume(n, batch, world, rank):
    """One endless sampler gives each epoch's shuffle, cut to whole batches, as a loader per epoch did; started
    at global batch k (a resume at step k) it gives the same batches from the k-th on."""
    from dmfn_fast.training.build import EpochBatches

    want = _epoch_by_epoch(n, batch, 5, world, rank, 4)
    per_epoch = n // (batch * world)
    assert len(want) == 4 * per_epoch
    for start in (0, 1, per_epoch, 2 * per_epoch + per_epoch // 2):
        it = iter(EpochBatches(range(n), batch, 5, world, rank, start))
        got = [next(it) for _ in range(len(want) - start)]
        assert got == want[start:], start


class _PidSamples(InpaintDataset):
    def __getitem__(self, index):
        import os
        return dict(super().__getitem__(index), pid=os.getpid())


def test_train_batches_keep_one_set_of_workers(tmp_path):
    """train.py's loader: the samples of an epoch key as the dataset's epoch does, and two workers serve five
    epochs of one batch each (a loader per epoch started new workers every epoch: with the demo set, every
    step)."""
    from dmfn_fast.training.build import train_batches

    paths = list_images(str(_images(tmp_path / "imgs", n=5)))
    ds = _PidSamples(paths, 16, MaskSource("rect"), seed=3)
    it = train_batches(ds, 4, 3, 1, 0, 0, 2, False)
    got = [next(it) for _ in range(5)]
    assert len({p for b in got for p in b["pid"].tolist()}) <= 2
    keys = _epoch_by_epoch(5, 4, 3, 1, 0, 5)
    for b, k in zip(got, keys):
        for j, (epoch, i) in enumerate(k):
            want = ds[(epoch, i)]
            assert torch.equal(b["image"][j], want["image"]) and torch.equal(b["mask"][j], want["mask"])
    del it  # ends its workers
