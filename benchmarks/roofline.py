"""What the card allows: FLOPs, bytes and the time they take at a card's ceilings, for every case the GPU
benchmarks time. Runs on the CPU in seconds (fake tensors: shapes only, no arithmetic), so it says nothing
about speed by itself; it is the arithmetic half of a "beyond the card" argument, the GPU runs are the other.

    python benchmarks/roofline.py OUT_DIR                     # the benchmarks' full sizes, H200 ceilings
    python benchmarks/roofline.py OUT_DIR --copy-tbs 3.0 --tensor-tflops 600   # another card's
    python benchmarks/roofline.py OUT_DIR --dry               # tiny sizes (CI)

Every aten op a case runs is recorded with its FLOPs (torch's FLOP counter; the fused DMFB ops counted as the
convolutions they compute, the backward's recompute included) and the bytes of its tensor inputs and
outputs. Floors, summed over ops:
- `flop_floor_ms`: the FLOPs at the tensor peak (fp32 as TF32, at half the bf16 rate), nothing else;
- `op_floor_ms`: each op at its own roofline, max(FLOPs / peak, bytes / copy bandwidth), as if every op were a
  perfect kernel of its own (no fusion across ops);
- per kernel class (convolutions and matmuls, the fused DMFB ops, the centroid op, everything else) the same.
Also the bytes autograd saves for backward (distinct storages), and the peak memory (PeakBytes: the
parameters, gradients and Adam state, plus the most bytes alive at once), for the memory target. Writes OUT_DIR/roofline.json and prints one table.
"""
import argparse
import json
import os
import sys
import weakref
from collections import defaultdict

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--dry", action="store_true", help="tiny sizes: checks the script (CI)")
# The H200's ceilings as measured in benchmarks/RESULTS.md (second session): device-to-device copy (read +
# write), bf16 8192^3 matmul under do_bench. The datasheet's dense bf16 peak is 989 TFLOP/s.
ap.add_argument("--copy-tbs", type=float, default=4.16, help="copy bandwidth, TB/s, read + write")
ap.add_argument("--tensor-tflops", type=float, default=714.0, help="bf16 tensor-core rate, TFLOP/s")
args = ap.parse_args()
os.environ["TRITON_INTERPRET"] = "1"  # the fused ops' CPU path; fake tensors launch nothing

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import VARIANTS  # noqa: E402

from dmfn_fast.models import DMFB, Generator  # noqa: E402
from dmfn_fast.ops import dmfb as dmfb_ops  # noqa: E402
from dmfn_fast.ops.centroid_align import centroid_align_loss  # noqa: E402
from dmfn_fast.training import build  # noqa: E402
from dmfn_fast.training.step import RealFake, train_step  # noqa: E402

# sizes: (image, batch, inference batch, nf, blocks, d_nf, branch N, branch C, branch HW, centroid shape)
FULL = (256, 16, 64, 64, 8, 64, 16, 64, 64, (16, 512, 32, 32))
DRY = (32, 2, 2, 8, 1, 8, 2, 8, 8, (2, 16, 8, 8))
SIZE, BATCH, INFER_BATCH, NF, NB, D_NF, BN, BC, BHW, CENTROID = DRY if args.dry else FULL

# The fused DMFB ops' FLOPs, as multiples of their forward's four 3x3 convolutions (2 * pixels * 4*9*C*C):
# backward = dgrad + wgrad; with IN+ReLU the backward also recomputes the branches.
_FUSED_FLOPS = {"dmfb_branches": 1, "dmfb_branches_in_relu": 1, "dmfb_branches_backward": 2,
                "dmfb_branches_in_relu_backward": 3}
_SKIP = ("prim.", "profiler.", "aten.detach", "aten.empty", "aten.lift_fresh", "aten._local_scalar_dense",
         "aten.set_", "aten.alias")


def _kernel_class(name):
    if name.startswith("dmfn_fast.dmfb") or name.startswith("dmfn_fast.instance_norm"):
        return "fused DMFB (ours)"
    if name.startswith("dmfn_fast."):
        return "centroid (ours)"
    if any(k in name for k in ("convolution", "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")):
        return "conv/matmul"
    return "other (memory-bound)"


class Recorder(TorchDispatchMode):
    """Per op: name, FLOPs, bytes of tensor inputs + outputs. Views and allocations move no data."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if func.is_view or name.startswith(_SKIP):
            return out
        flops = 0
        if func._overloadpacket in flop_registry:
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        elif name.split(".")[1] in _FUSED_FLOPS and name.startswith("dmfn_fast."):
            h, w = args[0], args[1]  # h [N, C, H, W]; w packed [4, 9, C, C]
            flops = 2 * h.numel() // h.shape[1] * w.numel() * _FUSED_FLOPS[name.split(".")[1]]
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        fp32 = bool(flops) and tensors[0].dtype == torch.float32  # TF32 dots: half the bf16 rate
        self.ops.append((name, flops, nbytes, fp32))
        return out


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Distinct storages autograd saves for backward while active, and their bytes."""

    def __init__(self):
        self.storages, self.held = {}, []

        def pack(t):
            s = t.untyped_storage()
            self.storages[s._cdata] = s.nbytes()
            self.held.append(s)  # a freed storage's address may be reused: hold each (fake: no memory)
            return t
        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self):
        return sum(self.storages.values())


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create while active (each counted until it is freed): with the
    persistent state beside it, the peak a GPU run's max_memory_allocated reports. On the H200 runs this
    model gave 8871 / 5049 / 4793 MiB for the baseline / amp / fast training step, measured 8913 / 5157 / 4898
    (allocator rounding and cuDNN workspaces are not modelled)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.seen:
                s = t.untyped_storage()
                self.seen.add(s._cdata)
                self.live += s.nbytes()
                weakref.finalize(s, self._free, s._cdata, s.nbytes())
        self.peak = max(self.peak, self.live)
        return out


MODE = FakeTensorMode(allow_non_fake_inputs=True)


def fake_module(m, memory_format=torch.contiguous_format, dtype=None):
    """m with every parameter and buffer replaced by a fake tensor of the same shape (built real, on the
    CPU: fake modules cannot be constructed in place)."""
    m = m.to(memory_format=memory_format) if dtype is None else m.to(dtype=dtype, memory_format=memory_format)
    for sub in m.modules():
        for n, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[n] = torch.nn.Parameter(MODE.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for n, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[n] = MODE.from_tensor(b)
    return m


def rand(*shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    with MODE:
        return torch.randn(*shape, dtype=dtype).contiguous(memory_format=memory_format)


def state_bytes(*modules, adam=True):
    """Parameters, their gradients and (adam) Adam's two moments, in bytes."""
    n = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if not p.requires_grad)
    return frozen + n * (4 if adam else 2)


def _impl(variant):
    return {"reference": "reference", "auto": "fast"}[VARIANTS[variant][2]]


def _autocast(variant):
    dtype = VARIANTS[variant][0]
    return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)


def branch_case(variant):
    """branch op + IN + ReLU, forward+backward, bf16, channels-last (issue 11's op target)."""
    cl = torch.channels_last
    h = rand(BN, BC, BHW, BHW, dtype=torch.bfloat16, memory_format=cl).requires_grad_()
    ws = [rand(BC, BC, 3, 3, dtype=torch.bfloat16).requires_grad_() for _ in range(4)]
    bs = [rand(BC, dtype=torch.bfloat16).requires_grad_() for _ in range(4)]

    def run():
        if _impl(variant) == "fast":
            t = dmfb_ops.branches_in_relu(h, ws, bs)
        else:
            t = dmfb_ops.instance_norm_act_reference(dmfb_ops.dmfb_branches_reference(h, ws, bs), relu=True)
        torch.autograd.grad(t, [h, *ws, *bs], torch.ones_like(t))  # as gpu_breakdown.py: no accumulation
    return run, 0


def block_case(variant):
    """One DMFB (4*C -> C -> 4*C), forward+backward, bf16, channels-last."""
    m = fake_module(DMFB(4 * BC, BC, impl=_impl(variant)), torch.channels_last, torch.bfloat16)
    x = rand(BN, 4 * BC, BHW, BHW, dtype=torch.bfloat16, memory_format=torch.channels_last).requires_grad_()

    def run():
        y = m(x)
        torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y))
    return run, state_bytes(m, adam=False)


def _generator(variant):
    mf = torch.channels_last if VARIANTS[variant][1] else torch.contiguous_format
    return fake_module(Generator(nf=NF, n_blocks=NB, impl=_impl(variant)), mf), mf


def generator_case(variant):
    """G forward+backward at the training batch, as gpu_e2e.py times it."""
    G, mf = _generator(variant)
    x = rand(BATCH, 4, SIZE, SIZE, memory_format=mf)

    def run():
        with _autocast(variant):
            y = G(x)
        y.float().sum().backward()
        for p in G.parameters():  # as gpu_e2e.py
            p.grad = None
    return run, state_bytes(G, adam=False)


def inference_case(variant):
    G, mf = _generator(variant)
    G.eval()
    x = rand(INFER_BATCH, 4, SIZE, SIZE, memory_format=mf)

    def run():
        with torch.no_grad(), _autocast(variant):
            G(x)
    return run, state_bytes(G, adam=False) // 2


def train_case(variant):
    """The full training step (G update with D frozen, then D), built as train.py builds it."""
    dtype, channels_last, _, _ = VARIANTS[variant]
    mf = torch.channels_last if channels_last else torch.contiguous_format
    G, D = build.models(NF, NB, D_NF, _impl(variant), "cpu", mf, 0)
    vgg = build.vgg(random=True, quiet=True)
    G, D, vgg = fake_module(G, mf), fake_module(D, mf), fake_module(vgg, mf)
    crit = build.criterion(vgg, _impl(variant))
    parts = build.optimizers(G, D, device_type="cpu", amp_dtype=dtype)
    image = rand(BATCH, 3, SIZE, SIZE, memory_format=mf)
    with MODE:
        mask = torch.zeros(BATCH, 1, SIZE, SIZE)
    q = SIZE // 4
    box = torch.tensor([[q, q, 2 * q, 2 * q]] * BATCH)

    def run():  # the finite checks read a value: fake tensors have none, and they move no data
        train_step(G, D, RealFake(D), crit, parts.opt_G, parts.opt_D, parts.scaler, image, mask, box,
                   lambda: _autocast(variant), lambda loss: True)
    return run, state_bytes(G, D) + state_bytes(vgg)


def centroid_case(variant, dtype):
    f = rand(*CENTROID, dtype=dtype, memory_format=torch.channels_last).requires_grad_()
    tgt = rand(*CENTROID, dtype=dtype, memory_format=torch.channels_last)

    def run():
        torch.autograd.grad(centroid_align_loss(f, tgt, impl=_impl(variant)), f)
    return run, 0


CASES = [
    ("branch op + IN + ReLU fwd+bwd", branch_case, ("amp", "fast")),
    ("one DMFB fwd+bwd", block_case, ("amp", "fast")),
    (f"generator fwd+bwd {SIZE}px batch {BATCH}", generator_case, ("baseline", "amp", "fast")),
    (f"inference {SIZE}px batch {INFER_BATCH}", inference_case, ("amp", "fast")),
    (f"train step {SIZE}px batch {BATCH}", train_case, ("baseline", "amp", "fast", "fast (no recompute)")),
    ("centroid op fwd+bwd bf16", lambda v: centroid_case(v, torch.bfloat16), ("amp", "fast")),
    ("centroid op fwd+bwd fp32", lambda v: centroid_case(v, torch.float32), ("amp", "fast")),
]


def account(case, variant, make):
    plain = variant.endswith(" (no recompute)")  # the fast path without its memory saving (DMFN_RECOMPUTE=0)
    if plain:
        os.environ["DMFN_RECOMPUTE"] = "0"
    try:
        run, fixed_bytes = make(variant.split(" ")[0])
        with MODE:
            run()  # as the GPU runs: Adam's state exists and autotuning is done before the measured call
        rec, saved, live = Recorder(), SavedBytes(), PeakBytes()
        with MODE, rec, saved:
            run()
        with MODE, live:  # apart: SavedBytes holds what it counts
            run()
    finally:
        if plain:
            os.environ.pop("DMFN_RECOMPUTE")
    bw, peak = args.copy_tbs * 1e12, args.tensor_tflops * 1e12
    by = defaultdict(lambda: dict(gflop=0.0, gbytes=0.0, op_floor_ms=0.0, ops=0))
    flop_ms = 0.0
    for name, flops, nbytes, fp32 in rec.ops:
        c = by[_kernel_class(name)]
        c["gflop"] += flops / 1e9
        c["gbytes"] += nbytes / 1e9
        t_flop = flops / (peak / 2 if fp32 else peak)
        flop_ms += t_flop * 1e3
        c["op_floor_ms"] += max(t_flop, nbytes / bw) * 1e3
        c["ops"] += 1
    row = dict(case=case, variant=variant, gflop=sum(op[1] for op in rec.ops) / 1e9,
               gbytes=sum(op[2] for op in rec.ops) / 1e9, flop_floor_ms=flop_ms, op_floor_ms=sum(c["op_floor_ms"] for c in by.values()),
               ops=len(rec.ops), saved_mib=saved.nbytes / 2**20, state_mib=fixed_bytes / 2**20,
               peak_mib=(fixed_bytes + live.peak) / 2**20,
               by_class={k: dict(v) for k, v in sorted(by.items())},
               copy_tbs=args.copy_tbs, tensor_tflops=args.tensor_tflops)
    return row


def main():
    os.makedirs(args.out, exist_ok=True)
    rows = [account(case, v, make) for case, make, variants in CASES for v in variants]
    with open(os.path.join(args.out, "roofline.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"ceilings: copy {args.copy_tbs} TB/s, tensor {args.tensor_tflops} TFLOP/s")
    print(f"{'case':42s} {'variant':19s} {'GFLOP':>9s} {'GB':>7s} {'flop floor':>10s} {'op floor':>9s} "
          f"{'conv floor':>10s} {'saved MiB':>9s} {'peak MiB':>8s}")
    for r in rows:
        conv = sum(v["op_floor_ms"] for k, v in r["by_class"].items() if k != "other (memory-bound)")
        print(f"{r['case']:42s} {r['variant']:19s} {r['gflop']:9.1f} {r['gbytes']:7.2f} {r['flop_floor_ms']:8.3f}ms "
              f"{r['op_floor_ms']:7.3f}ms {conv:8.3f}ms {r['saved_mib']:9.0f} {r['peak_mib']:8.0f}")


if __name__ == "__main__":
    main()
