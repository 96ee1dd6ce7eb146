"""dmfn-export: the reference-path generator as TorchScript or ONNX, with dynamic N, H and W.

The exported model takes image [N, 3, H, W] float32 in [-1, 1] and mask [N, 1, H, W] float32
(> 0.5 = hole), any H and W, and returns [N, 3, H, W] in [-1, 1] with the known pixels of `image`
unchanged: the same as Generator.inpaint on tensors. After exporting, the file is loaded back and
run on a real image at two sizes and compared with the eager model; the max error is printed.
Exit status: 0 exported and verified, 1 the check failed, 2 could not export."""
import argparse
import copy
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn

from .io import output_file_problem
from .models import Generator, generator_input, generator_output

MIN_OPSET = 18  # torch.onnx.export(dynamo=True) writes opset 18 and later
TOLERANCE = {"torchscript": 1e-4, "onnx": 1e-3}  # max abs error on the [-1, 1] scale, fp32


class _Unchecked(nn.Module):
    """The generator's forward on its reference path, without its Python-side shape checks (a trace would
    bake them in); the generator itself is left as it is."""

    def __init__(self, g: Generator):
        super().__init__()
        self.g = g

    def forward(self, x):
        return self.g.forward_unchecked(x, reference=True)


class InpaintModule(nn.Module):
    """Generator.inpaint on tensors as exportable code: the float mask rule (> 0.5 = hole), then the
    generator fed the one way (models.generator_input / generator_output). `net`: a Generator (on its
    reference path) or a trace of one's check-free forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if isinstance(net, Generator):
            net = _Unchecked(net)
        self.net = net

    def forward(self, image, mask):
        m = (mask > 0.5).to(image.dtype)
        return generator_output(self.net(generator_input(image, m)), image, m)[1]


def _example(h, w, n=1):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1, (torch.rand(n, 1, h, w, generator=g) > 0.7).float()


def _float_cpu_eval(g: Generator) -> Generator:
    """An fp32 CPU copy in eval mode: exporting must not move, cast or switch the caller's model."""
    return copy.deepcopy(g).float().cpu().eval()


def export_torchscript(g: Generator, path):
    """Trace the shape-agnostic core, script the padding around it so H and W stay dynamic."""
    g = _float_cpu_eval(g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=Warning)
        core = torch.jit.trace(_Unchecked(g), torch.rand(1, 4, 64, 64) * 2 - 1, check_trace=False)  # verify() checks
        module = torch.jit.script(InpaintModule(core))
    module.save(str(path))
    return path


def export_onnx(g: Generator, path, opset=18):
    """torch.onnx.export (torch.export based) with dynamic N, H, W; needs the onnx and onnxscript packages."""
    for pkg in ("onnx", "onnxscript"):
        try:
            __import__(pkg)
        except ImportError:
            raise RuntimeError(f"ONNX export needs the '{pkg}' package: pip install onnx onnxscript") from None
    g = _float_cpu_eval(g)
    N, H, W = torch.export.Dim("N"), torch.export.Dim("H"), torch.export.Dim("W")
    dims = {0: N, 2: H, 3: W}
    torch.onnx.export(InpaintModule(g).eval(), _example(64, 64), str(path), input_names=["image", "mask"],
                      output_names=["output"], opset_version=opset, dynamo=True, verbose=False,
                      dynamic_shapes={"image": dims, "mask": dims})
    return path


def load_runner(fmt, path):
    """A function (image, mask) -> output tensor running the exported file; None if no runtime is installed."""
    if fmt == "torchscript":
        m = torch.jit.load(str(path), map_location="cpu")
        return lambda x, mk: m(x, mk)
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x, mk: torch.from_numpy(sess.run(None, {"image": x.numpy(), "mask": mk.numpy()})[0])


def verification_images():
    """Real photographs at two sizes (one odd, one not a multiple of 4) with a hole in each."""
    try:
        from skimage import data
        img = data.astronaut()
        name = "skimage.data.astronaut"
    except ImportError:  # scikit-image missing: a smooth synthetic image still exercises every path
        yy, xx = np.mgrid[0:512, 0:512]
        img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
        name = "a synthetic gradient (scikit-image not installed)"
    out = []
    for h, w in ((256, 256), (301, 257)):
        x = torch.from_numpy(np.array(img[:h, :w])).permute(2, 0, 1)[None].float() / 127.5 - 1
        m = torch.zeros(1, 1, h, w)
        m[..., h // 4: h // 2 + 20, w // 3: 2 * w // 3] = 1
        m[..., h - 40: h - 30, 10: w - 10] = 1
        out.append((f"{name} {h}x{w}", x, m))
    return out


def verify(g: Generator, fmt, path):
    """Max abs error of the exported model vs eager Generator.inpaint per test image, or None if it cannot run."""
    run = load_runner(fmt, path)
    if run is None:
        return None
    g = _float_cpu_eval(g)
    errors = {}
    with torch.no_grad():
        for name, x, m in verification_images():
            want = g.inpaint(x, m)
            got = run(x, m)
            for what, t in (("exported model", got), ("eager model", want)):
                if not torch.isfinite(t).all():
                    raise RuntimeError(f"the {what} returned values that are not finite (NaN or Inf) on {name}")
            if got.shape != want.shape:
                raise RuntimeError(f"exported model returned {tuple(got.shape)} for {name}, expected {tuple(want.shape)}")
            if not torch.equal(got[m.expand_as(got) == 0], x[m.expand_as(x) == 0]):
                raise RuntimeError(f"exported model changed known pixels on {name}")
            errors[name] = (got - want).abs().max().item()
    return errors


def _max_opset():
    try:
        import onnx
        return onnx.defs.onnx_opset_version()
    except ImportError:
        return 25


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dmfn-export", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="our training checkpoint or the authors' latest_G.pth")
    ap.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    ap.add_argument("--out", required=True, help="output file (e.g. dmfn.pt or dmfn.onnx)")
    ap.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    ap.add_argument("--no-verify", action="store_true", help="skip running the exported model")
    args = ap.parse_args(argv)
    # every flag checked before the model is loaded
    if not os.path.isfile(args.checkpoint):
        ap.error(f"--checkpoint {args.checkpoint}: no such file")
    problem = output_file_problem(args.out)
    if problem:
        ap.error(f"--out: {problem}")
    if args.format == "onnx" and not MIN_OPSET <= args.opset <= _max_opset():
        ap.error(f"--opset must be between {MIN_OPSET} and {_max_opset()}, got {args.opset}")
    try:
        g = Generator.from_pretrained(args.checkpoint, impl="reference")
        if args.format == "torchscript":
            export_torchscript(g, args.out)
        else:
            export_onnx(g, args.out, args.opset)
    except Exception as e:
        print(f"dmfn-export: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"dmfn-export: wrote {args.format} model to {args.out}")
    if args.no_verify:
        return 0
    try:
        errors = verify(g, args.format, args.out)
    except Exception as e:
        print(f"dmfn-export: verification failed: {e}", file=sys.stderr)
        return 1
    if errors is None:
        print("dmfn-export: not verified: onnxruntime is not installed (pip install onnxruntime)")
        return 0
    tol = TOLERANCE[args.format]
    for name, err in errors.items():
        print(f"  {name}: max abs error vs eager {err:.3g} (on [-1, 1]; tolerance {tol:g})")
    if max(errors.values()) > tol:
        print("dmfn-export: verification failed: error above tolerance", file=sys.stderr)
        return 1
    print("dmfn-export: verified (known pixels unchanged, dynamic H and W)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
