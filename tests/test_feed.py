"""One way to feed the generator (models.feed_generator), NaN checkpoints, flags checked before work."""
import numpy as np
import pytest
import torch
from PIL import Image

from dmfn_fast import Generator, evaluate, export, inpaint
from dmfn_fast.models import feed_generator, generator_input, generator_output


@pytest.fixture(scope="module")
def g():
    torch.manual_seed(0)
    return Generator(nf=8, n_blocks=1, impl="reference").eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, g):
    p = tmp_path_factory.mktemp("ckpt") / "latest_G.pth"
    torch.save(g.state_dict(), p)
    return p


def batch(n, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=gen) * 2 - 1, (torch.rand(n, 1, h, w, generator=gen) > 0.6).float()


@pytest.mark.parametrize("hw,padded", [((5, 6), (8, 8)), ((13, 10), (16, 12)), ((16, 16), (16, 16))])
def test_generator_input_pads_by_the_rule(hw, padded):
    x, m = batch(2, *hw)
    inp = generator_input(x, m)
    assert inp.shape == (2, 4, *padded)
    H, W = hw
    assert torch.equal(inp[:, :3, :H, :W], x * (1 - m)) and torch.equal(inp[:, 3:, :H, :W], m)
    assert torch.equal(inp[:, :, -1, :W], inp[:, :, H - 1, :W])  # replicate, not zeros


def test_feed_generator_gives_raw_and_composite_with_gradients(g):
    x, m = batch(2, 13, 10)
    G = Generator(nf=8, n_blocks=1, impl="reference")
    G.load_state_dict(g.state_dict())
    raw, out = feed_generator(G, x, m)
    assert raw.shape == out.shape == x.shape
    known = m.expand_as(x) == 0
    assert torch.equal(out[known], x[known]) and torch.equal(out[~known], raw[~known])
    (out.square().mean() + raw.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters())
    with torch.no_grad():
        assert torch.equal(G.eval().inpaint(x, m), feed_generator(G, x, m)[1])
        assert torch.equal(G.fill(x, m)[1], feed_generator(G, x, m)[1])


def test_feed_generator_under_autocast(g):
    x, m = batch(2, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw, out = feed_generator(g, x, m)
    assert raw.dtype == torch.bfloat16 and out.dtype == torch.float32
    known = m.expand_as(x) == 0
    assert torch.equal(out[known], x[known])


def test_generator_output_crops():
    y = torch.randn(1, 3, 8, 12)
    x, m = batch(1, 5, 9)
    raw, out = generator_output(y, x, m)
    assert torch.equal(raw, y[:, :, :5, :9])


def test_export_wraps_the_generator_itself(g):
    assert not hasattr(export, "_Core")
    mod = export.InpaintModule(g)
    x, m = batch(2, 13, 10)
    with torch.no_grad():
        assert torch.equal(mod(x, m), g.inpaint(x, m))
        assert torch.equal(mod(x, m * 0.9), g.inpaint(x, m))  # > 0.5 = hole, the float mask rule


# ---- NaN / Inf weights ------------------------------------------------------------------

def test_nonfinite_checkpoint_refused(tmp_path, g, capsys):
    sd = {k: v.clone() for k, v in g.state_dict().items()}
    sd["blocks.0.d2.weight"][0, 0, 0, 0] = float("nan")
    p = tmp_path / "nan.pth"
    torch.save(sd, p)
    with pytest.raises(ValueError, match=r"nan\.pth.*blocks\.0\.d2\.weight.*NaN or Inf"):
        Generator.from_pretrained(p)
    assert export.main(["--checkpoint", str(p), "--out", str(tmp_path / "g.pt")]) == 2
    assert "blocks.0.d2.weight" in capsys.readouterr().err
    assert not (tmp_path / "g.pt").exists()


def test_export_verify_fails_on_nonfinite_output(tmp_path, ckpt, monkeypatch, capsys):
    def runner(fmt, path):
        return lambda x, m: torch.where(m > 0.5, torch.full_like(x, float("nan")), x)

    monkeypatch.setattr(export, "load_runner", runner)
    assert export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "g.pt")]) == 1
    cap = capsys.readouterr()
    assert "not finite" in cap.err and "verified (" not in cap.out


# ---- flags checked before any work --------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(Generator, "from_pretrained", classmethod(boom))


def pair(tmp_path, hole_value=255):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "mask").mkdir(exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "img" / "a.png")
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = hole_value
    Image.fromarray(m).save(tmp_path / "mask" / "a.png")


def exit_code(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


def test_inpaint_flags_checked_first(tmp_path, ckpt, no_model, capsys):
    pair(tmp_path)
    base = ["--checkpoint", str(ckpt), "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask")]
    assert exit_code(inpaint.main, base + ["--out", str(tmp_path / "o"), "--device", "gpu0"]) == 2
    assert "--device" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert exit_code(inpaint.main, base + ["--out", str(tmp_path / "file" / "o")]) == 2
    assert "--out" in capsys.readouterr().err
    assert exit_code(inpaint.main, base + ["--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "no.pth")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert exit_code(inpaint.main, base + ["--out", str(tmp_path / "o"), "--batch-size", "0"]) == 2


def test_eval_flags_checked_first(tmp_path, monkeypatch, capsys):
    pair(tmp_path)

    def boom(args):
        raise AssertionError("scored before the flags were checked")

    monkeypatch.setattr(evaluate, "evaluate", boom)
    base = ["--results", str(tmp_path / "img"), "--gt", str(tmp_path / "img")]
    assert exit_code(evaluate.main, base + ["--json", str(tmp_path / "nodir" / "m.json")]) == 2
    assert "--json" in capsys.readouterr().err
    assert exit_code(evaluate.main, base + ["--json", str(tmp_path)]) == 2
    assert exit_code(evaluate.main, base + ["--json", str(tmp_path / "m.json"), "--device", "tpu9"]) == 2
    assert exit_code(evaluate.main, base + ["--json", str(tmp_path / "m.json"),
                                            "--lpips-vgg16", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert exit_code(evaluate.main, base + ["--results", str(tmp_path / "nope")]) == 2


def test_export_flags_checked_first(tmp_path, ckpt, no_model, capsys):
    assert exit_code(export.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "no" / "g.pt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert exit_code(export.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 2
    assert exit_code(export.main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "g.onnx"),
                                   "--format", "onnx", "--opset", "3"]) == 2
    assert exit_code(export.main, ["--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "g.pt")]) == 2


# ---- --invert-masks and the inverted-mask warning ---------------------------------------------

def test_inpaint_invert_masks_and_warning(tmp_path, ckpt, capsys):
    pair(tmp_path)
    m = np.asarray(Image.open(tmp_path / "mask" / "a.png"))
    Image.fromarray(255 - m).save(tmp_path / "mask" / "a.png")  # drawn white = keep
    argv = ["--checkpoint", str(ckpt), "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
            "--out", str(tmp_path / "o"), "--quiet"]
    assert inpaint.main(argv) == 0
    err = capsys.readouterr().err
    assert "a.png" in err and "94%" in err and "--invert-masks" in err
    img = np.asarray(Image.open(tmp_path / "img" / "a.png"))
    assert inpaint.main(argv[:-3] + ["--out", str(tmp_path / "o2"), "--invert-masks", "--quiet"]) == 0
    assert "--invert-masks" not in capsys.readouterr().err
    out = np.asarray(Image.open(tmp_path / "o2" / "a.png"))
    keep = m == 0
    assert np.array_equal(out[keep], img[keep]) and (out[4:8, 4:8] != img[4:8, 4:8]).any()


def test_eval_invert_masks(tmp_path):
    pair(tmp_path)
    (tmp_path / "res").mkdir()
    res = np.full((16, 16, 3), 90, np.uint8)
    res[4:8, 4:8] = 100  # wrong only in the hole
    Image.fromarray(res).save(tmp_path / "res" / "a.png")
    m = np.asarray(Image.open(tmp_path / "mask" / "a.png"))
    Image.fromarray(255 - m).save(tmp_path / "mask" / "inv.png")
    import json
    argv = ["--results", str(tmp_path / "res"), "--gt", str(tmp_path / "img"), "--json", str(tmp_path / "m.json")]
    assert evaluate.main(argv + ["--masks", str(tmp_path / "mask" / "inv.png"), "--invert-masks"]) == 0
    r = json.loads((tmp_path / "m.json").read_text())
    assert r["metrics"]["l1_hole"] == pytest.approx(10 / 255)


def test_symlink_loops_reported_by_name_in_both_tools(tmp_path, ckpt, capsys):
    import os

    pair(tmp_path)
    os.symlink(tmp_path / "img" / "loop.png", tmp_path / "img" / "loop.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mask" / "loop.png")
    rc = inpaint.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "img"), "--masks",
                       str(tmp_path / "mask"), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "1 failed" in err and "loop.png" in err and "wrote 1 of 2" in err
    rc = evaluate.main(["--results", str(tmp_path / "img"), "--gt", str(tmp_path / "img"),
                        "--json", str(tmp_path / "m.json")])
    assert rc == 1 and "loop.png" in capsys.readouterr().err
