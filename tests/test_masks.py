import numpy as np
import pytest
from PIL import Image

from dmfn_fast.masks import MaskSource, rect_box, rect_mask, stroke_mask


def test_rect_mask_shape_values_and_jitter():
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(300):
        box = rect_box(256, 256, rng=rng)
        m = rect_mask(256, 256, rng=rng, box=box)
        assert m.shape == (256, 256) and m.dtype == np.float32
        assert set(np.unique(m)) == {0.0, 1.0}
        ys, xs = np.nonzero(m)
        t, l, h, w = box
        assert (h, w) == (128, 128)
        # the hole lies inside its box, each side shrunk by 0..16 px, the same on both ends
        assert t <= ys.min() and ys.max() < t + h and l <= xs.min() and xs.max() < l + w
        dh, dw = ys.min() - t, xs.min() - l
        assert 0 <= dh <= 16 and 0 <= dw <= 16
        assert ys.max() == t + h - 1 - dh and xs.max() == l + w - 1 - dw
        sides.append((dh, dw))
    sides = np.array(sides)
    assert sides.min() == 0 and sides.max() == 16  # the whole jitter range is used
    assert abs(sides.mean() - 8) < 1.0


def test_rect_mask_center_and_scaling():
    m = rect_mask(256, 256, center=True, jitter=0)
    assert m[64:192, 64:192].all() and m.sum() == 128 * 128
    m = rect_mask(64, 64, center=True, rng=np.random.default_rng(1))  # hole 32, jitter 4 at 64 px
    assert 24 * 24 <= m.sum() <= 32 * 32
    with pytest.raises(ValueError, match="does not fit"):
        rect_box(64, 64, hole=100)


def test_stroke_mask_statistics():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(100):
        m = stroke_mask(128, 96, rng)
        assert m.shape == (128, 96) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
        areas.append(m.mean())
    areas = np.array(areas)
    assert areas.min() > 0.005 and areas.max() < 0.9
    assert 0.05 < areas.mean() < 0.5, areas.mean()
    assert areas.std() > 0.02  # free-form: the hole area varies
    # a pure function of the seed
    assert np.array_equal(stroke_mask(64, 64, np.random.default_rng(5)), stroke_mask(64, 64, np.random.default_rng(5)))


def _write_masks(folder, n=3):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        a = np.zeros((50, 70), np.uint8)
        a[10:20 + 5 * i, 5:40] = 255
        Image.fromarray(a).save(folder / f"m{i}.png")
    return folder


def test_irregular_and_mixed(tmp_path):
    src = MaskSource("irregular", str(_write_masks(tmp_path / "masks")))
    rng = np.random.default_rng(0)
    for _ in range(10):
        m, box = src(64, 64, rng)
        assert m.shape == (64, 64) and set(np.unique(m)) == {0.0, 1.0}
        assert 0.05 < m.mean() < 0.4
        t, l, h, w = box
        assert (h, w) == (32, 32) and 0 <= t <= 32 and 0 <= l <= 32
    mixed = MaskSource("mixed", str(tmp_path / "masks"), probs={"rect": 1, "stroke": 1, "irregular": 0})
    kinds = set()
    for _ in range(40):
        m, _ = mixed(64, 64, rng)
        # a rect hole fills its bounding box; a stroke mask (almost never) does
        ys, xs = np.nonzero(m)
        kinds.add(bool(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()))
    assert kinds == {True, False}


def test_mask_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        MaskSource("irregular", str(tmp_path / "nope"))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="no .png masks.*\\.txt"):
        MaskSource("irregular", str(tmp_path / "txt"))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "a.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a readable PNG"):
        MaskSource("irregular", str(tmp_path / "fake"))
    with pytest.raises(ValueError, match="needs a mask folder"):
        MaskSource("irregular")
    with pytest.raises(ValueError, match="kind"):
        MaskSource("circles")
