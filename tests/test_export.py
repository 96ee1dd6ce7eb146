"""dmfn-export: TorchScript always, ONNX when onnx/onnxscript/onnxruntime are installed.
Exported models are run on real photographs at sizes other than the one traced."""
import importlib.util

import numpy as np
import pytest
import torch
from skimage import data

from dmfn_fast import Generator
from dmfn_fast.export import export_onnx, export_torchscript, load_runner, main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    g = Generator(nf=16, n_blocks=2, impl="reference").eval()
    p = tmp_path_factory.mktemp("ckpt") / "latest_G.pth"
    torch.save(g.state_dict(), p)
    return p


def cases():
    img = data.coffee()
    for h, w, n in ((37, 53, 2), (8, 8, 1), (130, 97, 1)):
        x = torch.from_numpy(np.array(img[:h, :w])).permute(2, 0, 1)[None].float().repeat(n, 1, 1, 1) / 127.5 - 1
        m = (torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(h)) > 0.6).float()
        yield x, m


def check_round_trip(g, fmt, path, tol):
    run = load_runner(fmt, path)
    with torch.no_grad():
        for x, m in cases():
            want, got = g.inpaint(x, m), run(x, m)
            assert got.shape == want.shape
            assert torch.equal(got[m.expand_as(got) == 0], x[m.expand_as(x) == 0])
            assert (got - want).abs().max().item() <= tol


def test_torchscript_round_trip(tmp_path, ckpt, capsys):
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "g.pt")]) == 0
    out = capsys.readouterr().out
    assert "max abs error vs eager" in out and "verified" in out
    check_round_trip(Generator.from_pretrained(ckpt), "torchscript", tmp_path / "g.pt", 1e-5)


def test_export_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "x.pth").write_bytes(b"junk")
    assert main(["--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path / "g.pt")]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err


def test_onnx_round_trip(tmp_path, ckpt):
    missing = [p for p in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"ONNX export/run needs {', '.join(missing)} (pip install onnx onnxscript onnxruntime)")
    g = Generator.from_pretrained(ckpt)
    export_onnx(g, tmp_path / "g.onnx")
    check_round_trip(g, "onnx", tmp_path / "g.onnx", 1e-4)


def test_export_leaves_the_callers_model_alone(tmp_path):
    """Export works on an fp32 CPU copy in eval mode: the caller's model keeps its dtype and training mode."""
    g = Generator(nf=8, n_blocks=1, impl="reference").to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    export_torchscript(g, tmp_path / "g.pt")
    assert g.training and all(p.dtype == torch.bfloat16 for p in g.parameters())
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items())
