"""torch.compile of the fused DMFB ops against their eager runs and float64, op by op (one GPU run).

    python benchmarks/gpu_compile_parity.py OUT_DIR          # CUDA
    python benchmarks/gpu_compile_parity.py OUT_DIR --dry    # CPU, kernels interpreted (opaque ops): checks the script

The eager fused path is held to the reference by tests/test_dmfb_cuda.py; a compiled graph runs the same
kernels through Inductor, so it must give what eager gives. For fp32 (IEEE dots) and bf16 one compiled
function runs every op forward and backward; then the generator (bf16 autocast, fp32) eager and compiled.
Prints, and appends to OUT_DIR/compile_parity.jsonl, the relative L2 error of each output and input
gradient: eager vs float64, compiled vs float64, compiled vs eager.
"""
import argparse
import copy
import json
import os
import sys
import traceback

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--dry", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
args = ap.parse_args()
if args.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from dmfn_fast.models import DMFB, Generator  # noqa: E402
from dmfn_fast.ops import dmfb as ops  # noqa: E402

CUDA = torch.cuda.is_available() and not args.dry
DEV = "cuda" if CUDA else "cpu"
N, C, HW, IMG = (2, 64, 16, 64) if CUDA else (1, 16, 5, 16)
os.makedirs(args.out, exist_ok=True)
LOG = os.path.join(args.out, "compile_parity.jsonl")
torch._dynamo.config.cache_size_limit = 64
BACKEND = "inductor" if CUDA else "aot_eager"  # --dry: traced, not compiled (no C++ build on the CPU)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEV)  # noqa: E731
    cl = lambda t: t.to(dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
    block = DMFB(4 * C, C, impl="fast").to(DEV)
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, 0.0, 0.05 if name.endswith("weight") else 0.5)
    return dict(
        x=cl(r(N, C, HW, HW, scale=2.0) + 1.0), res=cl(r(N, C, HW, HW)), h=cl(r(N, C, HW, HW)),
        ws=[r(C, C, 3, 3, scale=1 / (3 * C ** 0.5)).to(dtype) for _ in range(4)],
        bs=[r(C, scale=0.1).to(dtype) for _ in range(4)], xb=cl(r(N, 4 * C, HW, HW)), block=block.to(dtype))


def run_ops(t, fns, seed=1):
    """Forward and backward of every op; returns {name: [output, input grads...]}, all detached."""
    leaves = {k: ([v.detach().clone().requires_grad_() for v in t[k]] if isinstance(t[k], list)
                  else t[k].detach().clone().requires_grad_()) for k in ("x", "res", "h", "ws", "bs", "xb")}
    leaves["h2"] = leaves["h"].detach().clone().requires_grad_()
    leaves["ws2"] = [w.detach().clone().requires_grad_() for w in leaves["ws"]]
    block = t["block"]
    block.zero_grad()
    outs = fns(leaves, block)
    g = torch.Generator(device="cpu").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(DEV)).sum() for o in outs.values())
    loss.backward()
    res = {
        "instance_norm_act relu": [outs["in_relu"], leaves["x"].grad],
        "instance_norm_act res": [outs["in_res"], leaves["res"].grad],
        "branches_in_relu": [outs["bir"], leaves["h"].grad] + [w.grad for w in leaves["ws"]],
        "dmfb_branches": [outs["br"], leaves["h2"].grad] + [w.grad for w in leaves["ws2"]],
        "DMFB block": [outs["block"], leaves["xb"].grad] + [p.grad for n, p in block.named_parameters()
                                                           if n.endswith("weight")],
    }
    return {k: [v.detach().clone() for v in vs] for k, vs in res.items()}


def fast_fns(lv, block):
    return {"in_relu": ops.instance_norm_act(lv["x"], relu=True),
            "in_res": ops.instance_norm_act(lv["x"].detach() * 0.5, res=lv["res"]),
            "bir": ops.branches_in_relu(lv["h"], lv["ws"], lv["bs"]),
            "br": ops.dmfb_branches(lv["h2"], lv["ws2"], [b.detach() for b in lv["bs"]]),
            "block": ops.dmfb_block_fused(lv["xb"], block.params())}


def ref_fns(lv, block):
    return {"in_relu": ops.instance_norm_act_reference(lv["x"], relu=True),
            "in_res": ops.instance_norm_act_reference(lv["x"].detach() * 0.5, res=lv["res"]),
            "bir": torch.relu(torch.nn.functional.instance_norm(
                ops.dmfb_branches_reference(lv["h"], lv["ws"], lv["bs"]), eps=ops.EPS)),
            "br": ops.dmfb_branches_reference(lv["h2"], lv["ws2"], [b.detach() for b in lv["bs"]]),
            "block": ops.dmfb_block_reference(lv["xb"], block.params())}


def log(row):
    row = dict(row, triton_op=ops._USE_TRITON_OP)  # Inductor traced into the kernels (the CUDA default)
    with open(LOG, "a") as f:
        f.write(json.dumps(row) + "\n")
    errs = "  ".join(f"{k}={row[k]}" for k in ("eager_vs_f64", "compiled_vs_f64", "compiled_vs_eager") if k in row)
    mode = row["mode"] + (" traced" if row["triton_op"] else "")
    print(f"[{mode}] {row['case']}: {row.get('error', errs)}", flush=True)


def fmt(xs):
    return "[" + ", ".join(f"{x:.2e}" for x in xs) + "]"


def compare(mode, eager, compiled, exact):
    for case in eager:
        e, c, x = eager[case], compiled[case], exact[case]
        log(dict(mode=mode, case=case, device=torch.cuda.get_device_name() if CUDA else "cpu (dry)",
                 eager_vs_f64=fmt(rel(a, b) for a, b in zip(e, x)),
                 compiled_vs_f64=fmt(rel(a, b) for a, b in zip(c, x)),
                 compiled_vs_eager=fmt(rel(a, b) for a, b in zip(c, e))))


def ops_mode(mode, dtype, tf32):
    torch._dynamo.reset()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
        t = inputs(dtype)
        t64 = {k: ([w.double() for w in v] if isinstance(v, list) else copy.deepcopy(v).double())
               for k, v in t.items()}
        exact = run_ops(t64, ref_fns)
        eager = run_ops(t, fast_fns)
        compiled = run_ops(t, torch.compile(fast_fns, backend=BACKEND))
    compare(mode, eager, compiled, exact)


def generator_mode(mode, dtype, grad):
    """Generator forward at N x 64 x 64: eager fast, compiled fast (the training graph when grad, else the
    inference graph), the fp32 reference, all against float64. dtype bf16: under autocast."""
    torch._dynamo.reset()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.manual_seed(0)
        G = Generator(impl="fast").to(DEV)
        G64 = Generator(impl="reference", init=False).to(DEV).double()
        G64.load_state_dict({k: v.double() for k, v in G.state_dict().items()})
        x = torch.cat([torch.rand(N, 3, IMG, IMG, device=DEV) * 2 - 1,
                       (torch.rand(N, 1, IMG, IMG, device=DEV) > 0.5).float()], 1)
        compiled = torch.compile(G, backend=BACKEND)
        amp = torch.autocast(DEV, dtype=dtype, enabled=dtype != torch.float32)
        with torch.no_grad():
            exact = G64(x.double())
            with amp:
                eager, ref = G(x), G.forward_unchecked(x, reference=True)
        with torch.set_grad_enabled(grad), amp:
            y_c = compiled(x)
    graph = "training graph" if grad else "inference graph"
    log(dict(mode=mode, case=f"Generator forward, {graph} (reference vs f64: {rel(ref, exact):.2e})",
             eager_vs_f64=fmt([rel(eager, exact)]), compiled_vs_f64=fmt([rel(y_c, exact)]),
             compiled_vs_eager=fmt([rel(y_c, eager)])))


# Most telling first (a timeout keeps what ran): fp32 IEEE shows bugs above rounding; bf16 is what
# fast+compile runs. About 70 s on an H200.
CASES = [("fp32 ieee", "ops", torch.float32, False), ("bf16", "ops", torch.bfloat16, False),
         ("bf16 autocast", "gen-train", torch.bfloat16, False), ("fp32 ieee", "gen-train", torch.float32, False)]
for mode, what, dtype, tf32 in [CASES[0], CASES[3]] if args.dry else CASES:
    try:
        if what == "ops":
            ops_mode(mode, dtype, tf32)
        else:
            generator_mode(mode, dtype, grad=what == "gen-train")
    except Exception as e:  # noqa: BLE001: one failed case must not stop the others
        traceback.print_exc()
        log(dict(mode=mode, case=what, error=f"{type(e).__name__}: {e}"[:500]))
print("compile parity done", file=sys.stderr)
