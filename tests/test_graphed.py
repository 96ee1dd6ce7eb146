"""The CUDA-graph training step (dmfn_fast/training/graphed.py): on the CPU, what its graph holds run eagerly
as a replay runs it (capture=False), against train_step; on a GPU, captured and replayed
(test_cuda_graphed_step_trains_as_train_step, in gpu_check.sh's tests-centroid stage; its e2e and
train-smoke stages run it at the paper's size)."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dmfn_fast.models import DMFB, UpBlock
from dmfn_fast.training import build, graphed
from dmfn_fast.training.step import RealFake, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(seed=0, init_scale=None):
    """A tiny G (fused path where it runs: here the reference), D, the paper's loss with a random VGG, fused
    Adam (its found_inf is what the graphed step skips with), and 5 batches whose boxes move. init_scale: a
    GradScaler on (fp16's) with that scale, growing after every step without an inf."""
    torch.manual_seed(seed)
    G, D = build.models(8, 1, 4, "auto", "cpu", torch.contiguous_format, seed)
    crit = build.criterion(build.vgg(random=True, quiet=True), "auto")
    parts = build.optimizers(G, D, fused=True)
    if init_scale is not None:
        parts.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for i in range(5):
        image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        mask = torch.zeros(2, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1
        box = torch.tensor([[i, 2 * i, 16, 16], [16 - i, 3, 16, 16]])
        batches.append((image, mask, box))
    return G, D, crit, parts, batches


def eager_steps(G, D, crit, parts, batches):
    out = []
    for image, mask, box in batches:
        out.append(train_step(G, D, RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, image, mask, box,
                              lambda: torch.autocast("cpu", enabled=False), lambda t: bool(torch.isfinite(t))))
    return out


def graphed_steps(G, D, crit, parts, batches, warmup=2):
    step = graphed.GraphedStep(G, D, RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, warmup=warmup,
                               capture=False)
    return [step(*b) for b in batches], step


def assert_same(a, b):
    assert a[3].scaler.state_dict() == b[3].scaler.state_dict()
    for part in ("G", "D"):
        sa, sb = getattr(a[3], part).state_dict(), getattr(b[3], part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    for opt in ("opt_G", "opt_D"):
        sa, sb = getattr(a[3], opt).state_dict()["state"], getattr(b[3], opt).state_dict()["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), opt


def test_graphed_step_updates_as_train_step_bit_for_bit():
    """2 eager warm-up steps, then 3 as a replay runs them: the same weights, Adam states and terms as 5 of
    train_step (the same ops in the same order; fused Adam's found_inf = 0 changes nothing)."""
    a, b = setup(), setup()
    eager = eager_steps(*a[:4], a[4])
    graph, step = graphed_steps(*b[:4], b[4])
    assert step.inputs is not None  # the last 3 ran the graph's body
    for (te, oke), (tg, okg) in zip(eager, graph):
        assert oke and okg and list(te) == list(tg) and all(torch.equal(te[k], tg[k]) for k in te)
    assert_same(a, b)


def test_graphed_step_runs_in_a_graph_region(monkeypatch):
    """Its warm-up steps and the body its graph holds run inside _impl.graphs(), where the kernels whose switch
    is "graphs" (their default) are taken; train_step outside it does not."""
    from dmfn_fast import losses
    from dmfn_fast.ops import _impl
    depths = []
    real = losses.l1_loss.use_fast
    monkeypatch.setattr(losses.l1_loss, "use_fast", lambda *a: depths.append(_impl._graphed) or real(*a))
    a = setup()
    eager_steps(*a[:4], a[4][:1])
    assert depths and set(depths) == {0}
    depths.clear()
    graphed_steps(*a[:4], a[4][:3], warmup=1)
    assert depths and set(depths) == {1} and _impl._graphed == 0


def test_graphed_step_with_a_grad_scaler_updates_as_train_step():
    """fp16's GradScaler: the loss scaled in the graph, then, with no host read, each update skipped where its
    gradients overflow, Adam unscaling them, and the scale backed off or grown as train_step's scaler.step and
    update do. From 2^120, growing after each step, the scale doubles three times, then step 4's gradients
    overflow (skipped, halved) and step 5 grows it again: the same scales, weights, Adam states and terms
    as 5 of train_step, bit for bit."""
    a, b = setup(init_scale=2.0 ** 120), setup(init_scale=2.0 ** 120)
    eager, scales_e = [], []
    for batch in a[4]:
        eager += eager_steps(*a[:4], [batch])
        scales_e.append(a[3].scaler.get_scale() / 2.0 ** 120)
    step = graphed.GraphedStep(b[0], b[1], RealFake(b[1]), b[2], b[3].opt_G, b[3].opt_D, b[3].scaler, warmup=2,
                               capture=False)
    graph, scales_g = [], []
    for batch in b[4]:
        graph.append(step(*batch))
        scales_g.append(b[3].scaler.get_scale() / 2.0 ** 120)
    assert scales_e == scales_g == [2, 4, 8, 4, 8], (scales_e, scales_g)
    for (te, oke), (tg, okg) in zip(eager, graph):
        assert oke and okg and list(te) == list(tg) and all(torch.equal(te[k], tg[k]) for k in te)
    assert_same(a, b)


@pytest.mark.parametrize("init_scale", [None, 2.0 ** 16], ids=["no-scaler", "grad-scaler"])
@pytest.mark.parametrize("bad", ["G", "D"])
def test_graphed_step_skips_as_train_step(bad, init_scale, monkeypatch):
    """A non-finite G loss skips both updates, a non-finite D loss D's, on the device (found_inf), and the step
    says so; the next good step then updates as train_step's does after its skip (Adam's moments and step
    count as if the bad step never ran). With a GradScaler, a non-finite G loss leaves its scale alone (train_step
    calls no update) and a non-finite D loss's gradients do not back it off (D is not stepped)."""
    import dmfn_fast.training.step as S

    nan, state = float("nan"), {"n": 0}

    def poisoned(crit):
        def call(*args):
            state["n"] += 1
            loss, terms = crit(*args)
            return (loss * nan if bad == "G" and state["n"] == 2 else loss), terms
        return call

    real_d = S.rals_d_loss

    def d_loss(r, f):
        state["d"] = state.get("d", 0) + 1
        return real_d(r, f) * (nan if bad == "D" and state["d"] == 2 else 1.0)
    results = []
    for run in ("eager", "graphed"):
        state.clear()
        state["n"] = 0
        monkeypatch.setattr(S, "rals_d_loss", d_loss)
        monkeypatch.setattr(graphed, "rals_d_loss", d_loss)
        G, D, crit, parts, batches = setup(init_scale=init_scale)
        args = (G, D, poisoned(crit), parts, batches[:2])
        steps = eager_steps(*args) if run == "eager" else graphed_steps(*args, warmup=1)[0]
        after_bad = copy.deepcopy((G.state_dict(), D.state_dict(), parts.opt_G.state_dict(),
                                   parts.opt_D.state_dict(), parts.scaler.state_dict()))
        args = (G, D, poisoned(crit), parts, batches[2:3])
        steps += eager_steps(*args) if run == "eager" else [graphed_steps(*args, warmup=0)[0][0]]
        assert [ok for _, ok in steps] == [True, False, True]
        results.append((G, D, crit, parts, after_bad))
    (Ge, De, *_, bad_e), (Gg, Dg, *_, bad_g) = results
    for se, sg in zip(bad_e, bad_g):  # right after the bad step
        flat_e, flat_g = torch.utils._pytree.tree_leaves(se), torch.utils._pytree.tree_leaves(sg)
        assert len(flat_e) == len(flat_g) and all(
            torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_e, flat_g))
    assert_same(results[0][:4], results[1][:4])


def test_graphed_body_reads_nothing_on_the_host():
    """Nothing in the graph's body may wait for the GPU (a capture fails on it): no op that reads a tensor's
    value on the host or sizes its output by the data."""
    host_reads = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "equal"}
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))
    G, D, crit, parts, batches = setup()
    step = graphed.GraphedStep(G, D, RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, warmup=1,
                               capture=False)
    step(*batches[0])
    body = step._body

    def watched():
        with Watch():
            body()
    step._body = watched
    step(*batches[1])
    assert len(seen) > 100 and not host_reads & set(seen), sorted(host_reads & set(seen))


def test_graphed_step_refuses_what_its_graph_cannot_hold():
    G, D, crit, parts, batches = setup()
    plain = build.optimizers(G, D)
    with pytest.raises(ValueError, match="fused Adam"):
        graphed.GraphedStep(G, D, RealFake(D), crit, plain.opt_G, plain.opt_D, plain.scaler, capture=False)
    step = graphed.GraphedStep(G, D, RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, warmup=0,
                               capture=False)
    image, mask, box = batches[0]
    step(image, mask, box)
    with pytest.raises(ValueError, match="batches of one shape"):
        step(image[:1], mask[:1], box[:1])
    with pytest.raises(ValueError, match="boxes of one size"):
        step(image, mask, torch.tensor([[0, 0, 16, 16], [0, 0, 8, 8]]))
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        step(image, mask, torch.tensor([[20, 0, 16, 16], [0, 0, 16, 16]]))


def norm_cancelled_biases(G):
    """Names of G's biases that an affine-free instance norm right after cancels: their gradients are zero but
    for rounding, which Adam's normalised steps turn into moves of about lr either way."""
    names = []
    for prefix, m in G.named_modules():
        if isinstance(getattr(m, "norm", None), torch.nn.InstanceNorm2d) and isinstance(m, torch.nn.Sequential):
            names.append(f"{prefix}.conv.bias")
        elif isinstance(m, UpBlock):
            names.append(f"{prefix}.deconv.bias")
        elif isinstance(m, DMFB):
            names += [f"{prefix}.{c}.bias" for c in ("c1", "d1", "d2", "d3", "d4", "c2")]
    return names


def test_norm_cancelled_biases_have_no_gradient():
    """The biases left out of the graphed step's weight check: every one is G's, and in float64 its gradient
    is zero to rounding (1e-12 of the largest), while every other parameter's is not."""
    torch.manual_seed(0)
    G = build.models(8, 1, 4, "reference", "cpu", torch.contiguous_format, 0)[0].double()
    names = norm_cancelled_biases(G)
    params = dict(G.named_parameters())
    assert len(names) == 3 + 6 + 1 + 2 * 2 and set(names) <= set(params)  # encoder, DMFB, decoder
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    G(x).square().mean().backward()
    top = max(p.grad.abs().max().item() for p in params.values())
    for name, p in params.items():
        assert (p.grad.abs().max().item() <= 1e-12 * top) == (name in names), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the capture and replays (CPU: the body)")
@pytest.mark.parametrize("init_scale", [None, 2.0 ** 16], ids=["no-scaler", "grad-scaler"])
def test_cuda_graphed_step_trains_as_train_step(init_scale):
    """On a GPU, captured and replayed (1 eager step, then 4 replays with moving boxes), against 5 train_step
    calls: the same terms per step to 1e-4, the same Adam step counts, and the same weights but for the
    rounding of gradients summed in another order (the bilinear resizes' backward adds atomically): Adam's
    first steps move a weight by about lr whatever its gradient's size, so an element whose tiny gradient
    flips sign differs by up to 2 lr; such elements must stay rare (mean difference 1e-6, not the lr that a
    stale input or weight gives everywhere). Not the biases an instance norm cancels (norm_cancelled_biases):
    their gradients are all rounding, so every element moves about lr either way (H100, s18: encoder.1's
    1.2e-3 apart, 6 lr). The generator's reference path, fp32 without TF32: the capture
    is what is checked here, the fused kernels under a graph by gpu_check's e2e and train-smoke stages. With
    fp16's GradScaler (its scale doubling after each step, read by the captured loss scaling): the same scales."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runs = []
        for graphs in (False, True):
            torch.manual_seed(0)
            G, D = build.models(8, 1, 4, "reference", "cuda", torch.channels_last, 0)
            crit = build.criterion(build.vgg(random=True, quiet=True).cuda(), "auto")
            parts = build.optimizers(G, D, device_type="cuda")
            if init_scale is not None:
                parts.scaler = torch.amp.GradScaler("cuda", init_scale=init_scale, growth_interval=1)
            _, _, _, _, batches = setup()
            batches = [(x.cuda().contiguous(memory_format=torch.channels_last), m.cuda(), b.pin_memory())
                       for x, m, b in batches]
            if graphs:
                step = graphed.GraphedStep(G, D, RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, warmup=1)
                out = [step(*b) for b in batches]
                assert step.graph is not None
            else:
                out = eager_steps(G, D, crit, parts, batches)
            runs.append((out, G, D, parts))
        (eager, *_), (graph, *_) = runs
        assert runs[0][3].scaler.state_dict() == runs[1][3].scaler.state_dict()
        for (te, oke), (tg, okg) in zip(eager, graph):
            assert oke and okg and list(te) == list(tg)
            torch.testing.assert_close(torch.stack(list(tg.values())), torch.stack(list(te.values())), rtol=1e-4,
                                       atol=1e-6)
        lr = runs[0][3].opt_G.param_groups[0]["lr"]
        noise = norm_cancelled_biases(runs[0][1])
        for i in (1, 2):
            for (name, a), b in zip(runs[1][i].named_parameters(), runs[0][i].parameters()):
                if i == 1 and name in noise:
                    continue
                d = (a - b).abs()
                assert d.max() <= 2.5 * lr and d.mean() <= 1e-6, (name, d.max().item(), d.mean().item())
        for opt in ("opt_G", "opt_D"):
            sa, sb = (getattr(r[3], opt).state_dict()["state"] for r in runs)
            assert all(torch.equal(sa[k]["step"].cpu(), sb[k]["step"].cpu()) for k in sa)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
