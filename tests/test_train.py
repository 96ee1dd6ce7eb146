"""train.py end to end on the demo set, tiny: 32 px, nf 8, 2 DMFBs, D nf 4, random VGG."""
import json
import os
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from dmfn_fast.training import checkpoint as C, report as R  # noqa: E402
from dmfn_fast.losses import DMFNLoss  # noqa: E402
from dmfn_fast.models import Generator  # noqa: E402
from test_train_faults import assert_same_state  # noqa: E402 (beside this file)

TINY = ["--size", "32", "--nf", "8", "--n-blocks", "2", "--d-nf", "4", "--random-vgg", "--seed", "0",
        "--n-val", "2", "--log-every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def main(*args):
    return train.main(TINY + [str(a) for a in args])


def run(tmp, *extra):
    return main("--out", tmp, *extra)


def test_demo_artefacts_and_exact_resume(tmp_path):
    # batch 5 of 16 demo photos: 3 steps an epoch, so the resumed half skips 2 batches and crosses an epoch
    a = tmp_path / "a"
    run(a, "--batch", 5, "--steps", 4, "--ckpt-every", 1, "--keep", 3, "--val-every", 2, "--sample-every", 2)
    names = sorted(os.listdir(a))
    assert [n for n in names if n.startswith("ckpt_")] == ["ckpt_0000002.pt", "ckpt_0000003.pt", "ckpt_0000004.pt"]
    assert not [n for n in names if n.endswith(".tmp")]
    assert {"log.jsonl", "loss_curve.png", "config.json", "samples"} <= set(names)
    assert sorted(os.listdir(a / "samples")) == ["step_0000002.png", "step_0000004.png"]
    grid = Image.open(a / "samples" / "step_0000004.png")
    assert grid.size == (3 * 32, 2 * 32)  # input | output | target, one row per validation image
    assert Image.open(a / "loss_curve.png").size[0] > 200
    rows = R.read_log(a / "log.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("G", "D", "rec", "guided", "fm_vgg", "align", "adv", "fm_dis"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in train_rows), key
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4]

    ckpt = torch.load(a / "ckpt_0000004.pt", weights_only=True)
    assert ckpt["format"] == "dmfn-fast-train-v1" and ckpt["step"] == 4
    assert set(ckpt) == {"format", "G", "D", "opt_G", "opt_D", "sched_G", "sched_D", "scaler", "step", "rng",
                         "config", "val"}
    assert ckpt["config"]["nf"] == 8 and json.loads(json.dumps(ckpt["config"])) == ckpt["config"]
    assert set(ckpt["val"]) >= {"psnr", "ssim", "psnr_hole", "ssim_hole"} and ckpt["val"]["step"] == 4
    assert 5 < ckpt["val"]["psnr"] < 60
    Generator(nf=8, n_blocks=2).load_state_dict(ckpt["G"])

    # 2 steps, then a resume to 4: the same weights and optimizer states as 4 straight; and the same with 2 data
    # loader processes (what a CUDA run takes by default), whose one loader crosses the epoch at step 3 and whose
    # workers are still prefetching when the run ends
    for name, extra in (("b", ()), ("c", ("--workers", 2))):
        run(tmp_path / name, "--batch", 5, "--steps", 4, "--resume", a / "ckpt_0000002.pt", "--ckpt-every", 100,
            *extra)
        assert_same_state(ckpt, torch.load(tmp_path / name / "ckpt_0000004.pt", weights_only=True))


def _bad_loss(monkeypatch, when, term="align", exc=None):
    """Make DMFNLoss's `term` NaN (or raise `exc`) on the calls numbered in `when`."""
    calls = []
    real_forward = DMFNLoss.forward

    def forward(self, *a, **k):
        calls.append(1)
        total, terms = real_forward(self, *a, **k)
        if len(calls) in when:
            if exc is not None:
                raise exc
            terms[term] = terms[term] * float("nan")
            total = sum(t.float() for t in terms.values())
        return total, terms

    monkeypatch.setattr(DMFNLoss, "forward", forward)


def test_nan_guard_skips_then_stops(tmp_path, monkeypatch, capsys):
    # call 2 is NaN (skipped, training goes on), then calls 5.. are NaN: stop after 3 in a row
    _bad_loss(monkeypatch, {2, 5, 6, 7, 8, 9})
    with pytest.raises(SystemExit, match=r"3 steps in a row .*\(align"):
        run(tmp_path, "--batch", 2, "--steps", 10, "--ckpt-every", 1, "--keep", 10, "--max-bad-steps", 3,
            "--val-every", 100, "--sample-every", 100)
    assert "non-finite loss (align, G); skipped (1 in a row)" in capsys.readouterr().out
    ckpts = C.list_checkpoints(tmp_path)
    assert [os.path.basename(p) for p in ckpts] == [f"ckpt_000000{i}.pt" for i in (1, 2, 3)]
    for p in ckpts:
        c = torch.load(p, weights_only=True)
        assert all(torch.isfinite(v).all() for v in c["G"].values())
    rows = R.read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_no_checkpoint_from_nan_weights(tmp_path):
    g = Generator(nf=8, n_blocks=1)
    assert C.nonfinite_params(g) == []
    with torch.no_grad():
        g.encoder[0].conv.weight[0, 0, 0, 0] = float("nan")
    assert C.nonfinite_params(g) == ["0:encoder.0.conv.weight"]


def test_ctrl_c_saves_and_exits(tmp_path, monkeypatch):
    _bad_loss(monkeypatch, {3}, exc=KeyboardInterrupt())
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--batch", 2, "--steps", 10, "--ckpt-every", 100, "--val-every", 100, "--sample-every", 100)
    assert e.value.code == 130
    assert [os.path.basename(p) for p in C.list_checkpoints(tmp_path)] == ["ckpt_0000002.pt"]
    assert torch.load(C.list_checkpoints(tmp_path)[0], weights_only=True)["step"] == 2


def _folder(path, n, size=48):
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        a = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(a).save(path / f"{i}.png")
    return path


def test_data_folder_bad_input(tmp_path, monkeypatch, capsys):
    data = _folder(tmp_path / "data", 6)
    (data / "00broken.jpg").write_bytes(b"not a jpeg")  # sorts into training; the last image is held out
    out = main(data, "--out", tmp_path / "r1", "--batch", 5, "--steps", 1, "--n-val", 1, "--max-bad-images", 0.5,
               "--channels-last", "--masks", "stroke")
    assert out["step"] == 1
    assert "skipped unreadable image" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unreadable"):
        main(data, "--out", tmp_path / "r2", "--batch", 5, "--steps", 1, "--n-val", 1, "--max-bad-images", 0.01)
    with pytest.raises(FileNotFoundError, match="not found"):
        main(tmp_path / "missing", "--out", tmp_path / "r3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        main(tmp_path / "empty", "--out", tmp_path / "r3")
    # real data without VGG weights is refused unless --random-vgg says so
    monkeypatch.setenv("DMFN_VGG19_WEIGHTS", str(tmp_path / "no_vgg.pth"))
    monkeypatch.setattr(sys.modules[__name__], "TINY", [a for a in TINY if a != "--random-vgg"])
    with pytest.raises(SystemExit, match="--random-vgg"):
        main(data, "--out", tmp_path / "r4", "--batch", 2, "--steps", 1)


def test_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size: 128\nlr-g: 0.001\nmasks: stroke\nlr_steps: [10, 20]\n")
    args = train.parse_args(["--config", str(cfg), "--size", "64"])
    assert args.size == 64 and args.lr_g == 0.001 and args.masks == "stroke" and args.lr_steps == [10, 20]
    assert args.batch == 4  # demo preset fills what neither set
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "bogus": 1}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "c.json")])


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    state = C.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    C.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def _tiny_step_setup():
    """A tiny reference G and D on the CPU, their optimizers, and one batch (image, mask, box) for train_step."""
    from dmfn_fast.training import build

    torch.manual_seed(0)
    G, D = build.models(8, 1, 4, "reference", "cpu", torch.contiguous_format, 0)
    image, mask = torch.rand(2, 3, 32, 32) * 2 - 1, torch.zeros(2, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return G, D, build.optimizers(G, D), image, mask, torch.tensor([[8, 8, 16, 16]] * 2)


@pytest.mark.parametrize("bad", ["G", "D"])
def test_train_step_drops_what_a_nonfinite_loss_computed(bad, monkeypatch):
    """The losses are read once both backwards are queued (the host waits for the GPU once per step): at the
    first read D's gradients exist and neither update has run. A non-finite G loss leaves G, D and both Adam
    states untouched with no gradients kept; a non-finite D loss keeps the G update and leaves D's weights
    and Adam state untouched (its BatchNorm statistics move in the forward, as before)."""
    import copy

    import dmfn_fast.training.step as S

    G, D, parts, image, mask, box = _tiny_step_setup()
    nan = float("nan")

    def crit(out, tgt, pred_real, pred_fake, *feats):
        loss = (out - tgt).abs().mean() + pred_fake.mean()
        return loss * (nan if bad == "G" else 1.0), {"rec": loss}
    if bad == "D":
        real_d_loss = S.rals_d_loss
        monkeypatch.setattr(S, "rals_d_loss", lambda r, f: real_d_loss(r, f) * nan)
    before_g, before_d = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    reads = []

    def finite(loss):
        reads.append((all(p.grad is not None for p in D.parameters()), bool(parts.opt_G.state)))
        return bool(torch.isfinite(loss))
    _, ok = S.train_step(G, D, S.RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, image, mask, box,
                         lambda: torch.autocast("cpu", enabled=False), finite)
    assert not ok
    assert reads[0] == (True, False)  # D's backward queued, G not yet updated
    g_moved = any(not torch.equal(v, before_g[k]) for k, v in G.state_dict().items())
    assert g_moved == (bad == "D") and bool(parts.opt_G.state) == (bad == "D")
    assert all(torch.equal(v, before_d[k]) for k, v in D.state_dict().items() if "running" not in k
               and "num_batches" not in k)
    assert not parts.opt_D.state and all(p.grad is None for p in D.parameters())
    if bad == "G":
        assert all(p.grad is None for p in G.parameters())


def test_step_terms_outlive_the_loss_outputs():
    """The terms train_step returns are copies, not the loss's own outputs: under torch.compile's
    reduce-overhead mode those live in CUDA graph memory that the next step's replay overwrites (on the
    H200 the e2e stage kept a step's terms past the next step and failed). Here the loss's outputs are
    overwritten in place after the step, as a replay would, and the terms keep their values."""
    import dmfn_fast.training.step as S

    G, D, parts, image, mask, box = _tiny_step_setup()
    outputs = []

    def crit(out, tgt, pred_real, pred_fake, *feats):
        rec = (out - tgt).abs().mean()
        loss = rec + pred_fake.float().mean()
        outputs.extend([rec, loss])
        return loss, {"rec": rec}
    terms, ok = S.train_step(G, D, S.RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, image, mask, box,
                             lambda: torch.autocast("cpu", enabled=False), lambda loss: True)
    assert ok and set(terms) == {"rec", "G", "D"}
    kept = {k: v.item() for k, v in terms.items()}
    assert kept["rec"] == outputs[0].item() and kept["G"] == outputs[1].item()
    with torch.no_grad():
        for t in outputs:
            t.fill_(float("nan"))
    assert {k: v.item() for k, v in terms.items()} == kept
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in terms.values())
    # a term that is not a scalar is refused with its name and shape
    with pytest.raises(ValueError, match=r"scalar tensors.*'rec': \(\(2,\)"):
        S.train_step(G, D, S.RealFake(D), lambda *a: (crit(*a)[0], {"rec": torch.zeros(2)}), parts.opt_G,
                     parts.opt_D, parts.scaler, image, mask, box, lambda: torch.autocast("cpu", enabled=False),
                     lambda loss: True)


def test_compile_compiles_every_module_of_the_step(tmp_path, monkeypatch):
    """--compile compiles G, D, the real+fake pair and the loss (with its VGG), and trains as eager does:
    traced by aot_eager (Inductor's CPU build takes minutes here; CUDA's Inductor is checked by
    benchmarks/gpu_check.sh), 3 steps give the eager run's weights and Adam states."""
    compile_, compiled = torch.compile, []

    def traced(m, mode=None):
        compiled.append((type(getattr(m, "module", m)).__name__, mode))
        return compile_(m, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", traced)
    run(tmp_path / "eager", "--batch", 4, "--steps", 3, "--ckpt-every", 3)
    assert not compiled
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run(tmp_path / "compiled", "--batch", 4, "--steps", 3, "--ckpt-every", 3, "--compile")
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] >= 5 and not torch._dynamo.utils.counters["graph_break"], dict(frames)  # D twice: x grad
    assert sorted(compiled) == [("DMFNLoss", "default"), ("Discriminator", "default"), ("Generator", "default"),
                                ("RealFake", "default")]
    a, b = (torch.load(tmp_path / d / "ckpt_0000003.pt", weights_only=True) for d in ("eager", "compiled"))
    for part in ("G", "D"):
        torch.testing.assert_close(b[part], a[part], rtol=1e-5, atol=1e-6, msg=lambda m: f"{part}: {m}")
    for part in ("opt_G", "opt_D"):
        torch.testing.assert_close(b[part]["state"], a[part]["state"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, env, why", [
    (["--cuda-graphs"], {}, "--cuda-graphs needs CUDA"),
    (["--cuda-graphs", "--compile"], {}, "both replay CUDA graphs"),
    (["--cuda-graphs"], {"cuda": True, "WORLD_SIZE": "2"}, "runs one process"),
])
def test_cuda_graphs_refused_before_work(tmp_path, capsys, monkeypatch, flags, env, why):
    """--cuda-graphs (dmfn_fast/training/graphed.py) where its graph cannot run: checked with the flags, before
    anything is built (a card is faked where the refusal needs one; the accepted runs are the GPU check's)."""
    if env.get("cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: env.get("bf16", True))
    if "WORLD_SIZE" in env:
        monkeypatch.setenv("WORLD_SIZE", env["WORLD_SIZE"])
    with pytest.raises(SystemExit) as e:
        train.parse_args(TINY + ["--out", str(tmp_path / "r"), *flags])
    assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, bf16", [(["--amp-dtype", "fp16"], True), ([], False), (["--amp-dtype", "bf16"], True)])
def test_cuda_graphs_take_every_autocast(tmp_path, monkeypatch, flags, bf16):
    """--cuda-graphs with --amp in fp16 (asked for, or the card has no bf16: GradScaler's checks and scale update run
    on the device after each replay) or bf16 passes the flag checks on a (faked) card."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    args = train.parse_args(TINY + ["--out", str(tmp_path / "r"), "--cuda-graphs", "--amp", *flags])
    assert args.cuda_graphs and args.amp
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, why", [
    (["--compile-mode", "reduce-overhead"], "applies only with --compile"),
    (["--compile", "--compile-mode", "reduce-overhead", "--device", "cpu"], "need CUDA"),
    (["--compile", "--device", "cpu"], "needs a C++ compiler"),
])
def test_compile_refused_before_work(tmp_path, capsys, monkeypatch, flags, why):
    if why.startswith("needs"):  # a machine without a C++ compiler
        monkeypatch.setenv("CXX", "")
        monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "r", *flags)
    assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fused_adam_state_moves_to_foreach():
    """On CUDA the optimizers are torch's fused Adam; a checkpoint of theirs resumes with foreach Adam (a CPU
    run) and the updates go on as the fused ones would (fused Adam runs on CPU too, so this checks it here)."""
    import copy

    from dmfn_fast.training import build

    G, D = build.models(8, 1, 4, "reference", "cpu", torch.contiguous_format, 0)
    fused = build.optimizers(G, D, device_type="cuda")
    assert fused.opt_G.defaults["fused"] and fused.opt_D.defaults["fused"]
    assert not build.optimizers(G, D).opt_G.defaults["fused"]
    torch.manual_seed(1)
    grads = [[torch.randn_like(p) for p in G.parameters()] for _ in range(3)]

    def step(opt, params, g):
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()
    for g in grads[:2]:
        step(fused.opt_G, list(G.parameters()), g)
    G2 = copy.deepcopy(G)
    foreach = torch.optim.Adam(G2.parameters(), lr=2e-4, betas=(0.5, 0.999))
    foreach.load_state_dict(copy.deepcopy(fused.opt_G.state_dict()))
    step(fused.opt_G, list(G.parameters()), grads[2])
    step(foreach, list(G2.parameters()), grads[2])
    for p, q in zip(G.parameters(), G2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [256, 64])
@pytest.mark.parametrize("channels_last", [True, False])
def test_crop_boxes_gathers_what_a_crop_per_image_gives(size, channels_last):
    """The local discriminator's crops: one gather where the boxes share a size (always, in training), a
    crop per image where they do not; both give the per-image crops (resized to 128 off 256 px), bit for
    bit, and their gradients; the gather's backward is one node, not a zero fill and an add per image."""
    import torch.nn.functional as F

    import dmfn_fast.training.step as S

    torch.manual_seed(0)
    n, half = 5, size // 2
    x = torch.randn(n, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    top, left = torch.randint(0, size - half + 1, (2, n))
    same = torch.stack([top, left, torch.full((n,), half), torch.full((n,), half)], 1)
    mixed = same.clone()
    mixed[0, 2:] = torch.tensor([half // 2, half // 4])

    def per_image(x, boxes):
        crops = [x[i:i + 1, :, t:t + h, l:l + w] for i, (t, l, h, w) in enumerate(boxes.tolist())]
        return torch.cat([c if c.shape[-2:] == (128, 128) else
                          F.interpolate(c, size=(128, 128), mode="bilinear", align_corners=False) for c in crops])
    g = torch.randn(n, 3, 128, 128)
    for boxes in (same, mixed):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = S.crop_boxes(xa, boxes), per_image(xb, boxes)
        assert got.shape == (n, 3, 128, 128) and torch.equal(got, want)
        (got * g).sum().backward()
        (want * g).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
    out = S.crop_boxes(x.clone().requires_grad_(), same)
    nodes, stack = set(), [out.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in nodes:
            nodes.add(f)
            stack += [nf for nf, _ in f.next_functions]
    assert not any("Select" in type(f).__name__ for f in nodes), {type(f).__name__ for f in nodes}
    with pytest.raises(ValueError, match="outside"):
        S.crop_boxes(x, same + torch.tensor([0, size, 0, 0]))


@pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "grad-scaler"])
def test_cuda_graphs_flag_trains_as_the_eager_step(tmp_path, monkeypatch, scaled):
    """train.py --cuda-graphs on the CPU, with the graph's body run eagerly as a replay runs it (capture=False;
    the capture is the GPU check's): 5 steps, 3 eager and 2 through the graphed step, give the eager run's
    weights and Adam states bit for bit, and the same log rows. Both runs use fused Adam, the graphed step's;
    scaled: both a GradScaler too (fp16's; this CPU runs fp32), its scale growing every other step, saved
    alike."""
    import functools

    from dmfn_fast.training import build, config, graphed

    optimizers = build.optimizers

    def fused(*a, **k):
        parts = optimizers(*a, **dict(k, fused=True))
        if scaled:
            parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=2)
        return parts
    monkeypatch.setattr(build, "optimizers", fused)
    monkeypatch.setattr(config, "_check_cuda_graphs", lambda p, a: None)
    monkeypatch.setattr(train, "GraphedStep", functools.partial(graphed.GraphedStep, capture=False))
    run(tmp_path / "eager", "--batch", 4, "--steps", 5, "--ckpt-every", 5)
    run(tmp_path / "graphs", "--batch", 4, "--steps", 5, "--ckpt-every", 5, "--cuda-graphs")
    a, b = (torch.load(tmp_path / d / "ckpt_0000005.pt", weights_only=True) for d in ("eager", "graphs"))
    for part in ("G", "D"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for part in ("opt_G", "opt_D"):
        sa, sb = a[part]["state"], b[part]["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), part
    assert a["scaler"] == b["scaler"] and (a["scaler"]["scale"] == 2.0 ** 18 if scaled else a["scaler"] is None)
    rows = [[{k: v for k, v in r.items() if k != "it_s"} for r in R.read_log(tmp_path / d / "log.jsonl")]
            for d in ("eager", "graphs")]
    assert rows[0] == rows[1] and len([r for r in rows[0] if r["kind"] == "train"]) == 5
