"""End to end on one GPU: generator forward+backward, inference and the full training step, per variant.

    python benchmarks/gpu_e2e.py OUT_DIR          # CUDA: 256x256, generator/train batch 16, inference batch 64
    python benchmarks/gpu_e2e.py OUT_DIR --dry    # CPU, kernels interpreted, tiny sizes: checks the script

Variants (benchmarks/e2e_common.py):
- baseline: fp32, NCHW, reference ops (the authors' setting);
- amp: bf16 autocast, channels-last;
- amp+compile: amp with torch.compile of G, and in the training step of G, D and the loss with its VGG (as
  train.py --compile does);
- fast: amp with the fused DMFB and the centroid extension; training recomputes cheap activations in
  backward to save memory, and the step is timed once more without that, "fast (no recompute)";
- fast+compile: fast compiled as amp+compile is (G's compiled graph does not take the recompute regions);
- fast+compile-ro and amp+compile-ro: mode="reduce-overhead" (CUDA graph replays), the generator's
  forward+backward and the training step;
- the training step without its finite-flag reads, "(no flag reads)";
- on CUDA also amp+graphs and fast+graphs: the generator's forward and backward, or the inference forward,
  captured as CUDA graphs (the GPU time without the host cost).
Appends one JSON object per measurement to OUT_DIR/e2e.jsonl as it goes, the compiled variants last (their
compilation is the slowest part). Times are medians of CUDA-event-timed calls after warm-up; the training
step's MFU counts the reference model's FLOPs (torch's counter) against the datasheet bf16 peak; peak memory
is torch's max_memory_allocated over the timed calls. Rows timed with their GPU-time split also hold their
20 longest kernels; training-step rows their first two steps' loss terms (the same weights and batch in every
variant, so compiled and eager must agree) and their GPU and host time per part of the step.
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--dry", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
ap.add_argument("--only", help="comma-separated variants to run, e.g. fast+compile (default: all); a variant as "
                               "CASE:VARIANT runs in that case alone (generator, step or inference)")
args = ap.parse_args()
INDUCTOR_NORMS = "fast+compile-ro-inductor-norms"  # --only name of the generator row with DMFN_COMPILED_NORMS=0
# every variant --only can name (want() holds its callers to it); a misspelt name would run nothing
VARIANTS = ("fast", "amp", "baseline", "fast+graphs", "amp+graphs", "amp+compile", "fast+compile", "fast+compile-ro",
            "amp+compile-ro", "fast (no recompute)", "fast (no flag reads)", "fast+compile (no flag reads)",
            INDUCTOR_NORMS)
CASES = ("generator", "step", "inference")
for _name in (args.only.split(",") if args.only else ()):
    _case, _, _variant = _name.rpartition(":")
    if _variant not in VARIANTS or _case not in ("",) + CASES:
        ap.error(f"--only: no variant {_name!r}; the variants: {', '.join(VARIANTS)}, each also as CASE:VARIANT "
                 f"with CASE one of {', '.join(CASES)}")
if args.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_common import (bf16_peak, build_generator, build_training, count_flops, gpu_ms_by_region,  # noqa: E402
                        host_ms_by_region, kernel_and_op_ms)

CUDA = torch.cuda.is_available() and not args.dry
DEV = "cuda" if CUDA else "cpu"
# --dry checks the script, not the times: one call of each kind (an interpreted fast step takes about 4 s)
SIZE, BATCH, INFER_BATCH, NF, NB, D_NF, ROUNDS, WARM, PROFILED = (
    (256, 16, 64, 64, 8, 64, 10, 3, 3) if CUDA else (32, 2, 2, 8, 1, 8, 1, 1, 1))
os.makedirs(args.out, exist_ok=True)
LOG = os.path.join(args.out, "e2e.jsonl")
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
torch.backends.cudnn.allow_tf32 = True


def median_ms(fn, rounds=ROUNDS, warm=WARM):
    for _ in range(warm):
        fn()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in ev), torch.cuda.max_memory_allocated() / 2 ** 20
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, None


# Kernel classes for the GPU-time breakdown, matched on the kernel name in this order.
KERNEL_CLASSES = [("fused DMFB (ours)", ("branches_", "in_stats", "in_apply", "in_bwd", "suffix_sum")),
                  ("inductor", ("triton_",)),
                  ("conv/matmul libraries", ("xmma", "cudnn", "conv", "gemm", "cutlass", "sm90", "sm80", "wgrad",
                                             "dgrad", "fprop", "implicit")),
                  ("centroid (ours)", ("dmfn_fast_cuda", "plane_sums", "channel_sums", "grad_planes",
                                       "grad_channels", "finish"))]


def kernel_class(name):
    return next((c for c, keys in KERNEL_CLASSES if any(k in name.lower() for k in keys)), "other")


def gpu_by_class(fn, steps=3, top=20):
    """GPU time per call (kernels only), its split by kernel class, in ms, the `top` longest kernels [name cut
    to 240 characters (ATen's generic kernels name their functor past 90), class, ms per call] and the `top`
    ATen ops whose own launches took the most ([op, input shapes, ms per call])."""
    split = {}
    per, ops = kernel_and_op_ms(fn, steps, ops=top)
    for name, t in per.items():
        cls = kernel_class(name)
        split[cls] = split.get(cls, 0.0) + t
    longest = [[n[:240], kernel_class(n), round(t, 3)] for n, t in sorted(per.items(), key=lambda kv: -kv[1])[:top]]
    return round(sum(split.values()), 3), {k: round(v, 3) for k, v in sorted(split.items())}, longest, ops


def record(case, variant, fn, flop=0, images=0, rounds=ROUNDS, classes=False):
    row = dict(case=case, variant=variant, device=torch.cuda.get_device_name() if CUDA else "cpu (dry)")
    on = opt_in() if variant.startswith("fast") else []
    if on:
        row["opt_in"] = on
    train = case.startswith("train step")
    t0 = time.perf_counter()
    try:
        if train:  # the first steps from the fixed weights and batch, which compiled and eager must agree on (the
            # second's terms follow from the first's gradients and update), are the first warm-up calls
            firsts = [fn() for _ in range(min(2, WARM))]
            row.update(first_step_ok=all(bool(ok) for _, ok in firsts),
                       first_steps_terms=[{k: float(v) for k, v in terms.items()} for terms, _ in firsts])
        ms, peak = median_ms(fn, rounds, WARM - min(2, WARM) if train else WARM)
        row.update(ms=ms, peak_mem_mib=peak, wall_s_incl_warmup=time.perf_counter() - t0)
        if classes and CUDA:
            try:
                row["gpu_ms"], row["gpu_ms_by_class"], row["top_kernels"], row["top_ops"] = gpu_by_class(fn)
                row["gpu_ms_kernels_only"] = True  # user annotations left out (gpu_summary.kernels_only)
                if train:  # which parts of the step its GPU time goes to
                    row["gpu_ms_by_region"] = gpu_ms_by_region(fn, DEV)
            except Exception as e:  # noqa: BLE001: keep the timing
                row["gpu_ms_error"] = f"{type(e).__name__}: {e}"[:300]
        if classes and train:  # where the step's host time goes
            try:
                row["host_ms_by_region"] = host_ms_by_region(fn, DEV, PROFILED)
            except Exception as e:  # noqa: BLE001: keep the timing
                row["host_ms_error"] = f"{type(e).__name__}: {e}"[:300]
        if images:
            row["images_per_s"] = images / ms * 1e3
        if flop:
            row["tflops"] = flop / ms / 1e9
            if bf16_peak(DEV):
                row["mfu_pct"] = 100 * row["tflops"] / bf16_peak(DEV)
    except Exception as e:  # noqa: BLE001: one failed variant must not stop the others
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        row["wall_s_to_error"] = time.perf_counter() - t0  # how much of a lease it cost (compiles included)
        traceback.print_exc()
    with open(LOG, "a") as f:
        f.write(json.dumps(row) + "\n")
    msg = f"{row['ms']:9.3f} ms" if "ms" in row else "ERROR " + row["error"][:200]
    extra = "".join(f"  {k}={row[k]:.4g}" for k in ("gpu_ms", "images_per_s", "tflops", "mfu_pct", "peak_mem_mib",
                                                       "wall_s_incl_warmup") if row.get(k) is not None)
    if row.get("gpu_ms_by_class"):
        extra += f"  by class {row['gpu_ms_by_class']}"
    for k in ("host_ms_by_region", "gpu_ms_by_region"):
        if row.get(k):
            extra += f"  {k.split('_by')[0].replace('_', ' ')} {row[k]}"
    print(f"[{case}] {variant}: {msg}{extra}", flush=True)
    for name, cls, t in row.get("top_kernels", [])[:10]:
        print(f"    {t:7.3f} ms  {cls:22s} {name[:160]}", flush=True)
    for op, shapes, t in row.get("top_ops", [])[:6]:
        print(f"    {t:7.3f} ms  launched by {op} {shapes[:120]}", flush=True)


def _built(build, variant):
    """build(variant), or, if building fails, a function that raises its error (record() logs it). A
    compiled variant starts from cleared torch.compile caches and CUDA graph pools: its modules are new, so
    the graphs of the variants before it would only count against Dynamo's 8 recompiles per function (past
    which it runs eagerly) and hold their memory."""
    if "+compile" in variant:
        torch._dynamo.reset()
    try:
        return build(variant)
    except Exception as e:  # noqa: BLE001: one failed variant must not stop the others
        traceback.print_exc()
        err = e  # the handler's end unbinds `e`, in a closure too: fail() raised NameError in its place

        def fail():
            raise err
        return fail


def gen_input(batch, mf):
    torch.manual_seed(1)
    img = torch.rand(batch, 3, SIZE, SIZE, device=DEV) * 2 - 1
    mask = (torch.rand(batch, 1, SIZE, SIZE, device=DEV) > 0.5).float()
    return torch.cat([img * (1 - mask), mask], 1).contiguous(memory_format=mf)


def autocast(dtype):
    return torch.autocast(DEV, dtype=dtype or torch.float32, enabled=dtype is not None)


def gen_fwd_bwd(variant):
    G, fwd, dtype, mf = build_generator(variant, NF, NB, DEV)
    x = gen_input(BATCH, mf)

    def step():
        if variant.endswith("-ro"):  # cudagraph trees: a new iteration, last one's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(dtype):
            y = fwd(x)
        y.float().sum().backward()
        for p in G.parameters():
            p.grad = None
    return G, x, step


def inference(variant):
    G, fwd, dtype, mf = build_generator(variant, NF, NB, DEV)
    G.eval()
    x = gen_input(INFER_BATCH, mf)

    def run():
        if variant.endswith("-ro"):  # cudagraph trees: the last call's output may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), autocast(dtype):
            return fwd(x)
    return run


def graphed_gen_fwd_bwd(base):
    """G's forward and backward as CUDA graphs (torch.cuda.make_graphed_callables): no Python runs per call,
    so this times the GPU work of `base` (amp or fast) with the host cost gone."""
    G, _, dtype, mf = build_generator(base, NF, NB, DEV)
    x = gen_input(BATCH, mf)
    with torch.autocast(DEV, dtype=dtype, cache_enabled=False):  # graphs need autocast's cache off
        Gg = torch.cuda.make_graphed_callables(G, (x,))

    def step():
        with torch.autocast(DEV, dtype=dtype, cache_enabled=False):
            y = Gg(x)
        y.float().sum().backward()
        for p in G.parameters():
            p.grad = None
    return step


def graphed_inference(base):
    """The inference forward of `base` captured once as a CUDA graph and replayed."""
    G, _, dtype, mf = build_generator(base, NF, NB, DEV)
    G.eval()
    x = gen_input(INFER_BATCH, mf)

    def run():
        with torch.no_grad(), torch.autocast(DEV, dtype=dtype, cache_enabled=False):
            return G(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning) outside the capture
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


gflop = {}
ONLY = set(args.only.split(",")) if args.only else None



def want(variant, case=None):
    """Whether --only asks for the variant, in every case or (as "CASE:VARIANT", CASE one of generator, step,
    inference) in this case alone: "generator:amp+compile" compiles the generator without the step."""
    assert variant in VARIANTS and case in (None,) + CASES, (variant, case)
    return ONLY is None or variant in ONLY or (case is not None and f"{case}:{variant}" in ONLY)


def label(variant):
    """Compiled fast variants: "(traced)" where Inductor traces into the fused kernels (the CUDA default)."""
    from dmfn_fast.ops import dmfb
    if dmfb._USE_TRITON_OP and variant.startswith("fast+compile"):
        variant += " (traced)"
    return variant


def opt_in():
    """The alternative kernels this run's fast variants take on this card (gpu_check.sh sets the switches as
    its breakdown measured them): "wgrad9" (DMFN_WGRAD9=1), "tma (eager)" (DMFN_TMA, on by default on sm_90;
    compiled graphs keep the row kernels), "wgrad tma (eager)" (DMFN_WGRAD_TMA, on by default with DMFN_TMA
    since s10; it takes precedence over wgrad9); and these four, "(eager)" where their switch is 1, "(in
    CUDA-graph steps)" where it is graphs (their default): "bias+relu kernel" (DMFN_BIAS_ACT: the VGG's and
    the generator's first convolutions add their bias under the ReLU in one kernel), "thin conv kernel"
    (DMFN_THIN_CONV: the generator's input convolution and ReLU, and the discriminator's two input
    convolutions, in ops/thin_conv.py's kernels), "max-pool kernels" (DMFN_MAX_POOL: the VGG's pools without
    indices, ops/max_pool.py), "L1 loss kernels" (DMFN_L1_KERNEL: the loss's guided and feature-matching terms,
    ops/l1_loss.py)."""
    from dmfn_fast.ops import bias_act, dmfb, l1_loss, max_pool, thin_conv
    on = []
    tma = CUDA and dmfb._TMA and torch.cuda.get_device_capability()[0] >= 9
    if CUDA and dmfb._taps9(torch.bfloat16, torch.device(DEV)) and not (tma and dmfb._WGRAD_TMA):
        on.append("wgrad9")
    if tma:
        on.append("tma (eager)")
    if tma and dmfb._WGRAD_TMA:
        on.append("wgrad tma (eager)")
    for mod, name in ((bias_act, "bias+relu kernel"), (thin_conv, "thin conv kernel"),
                      (max_pool, "max-pool kernels"), (l1_loss, "L1 loss kernels")):
        if mod._AUTO == "1":
            on.append(f"{name} (eager)")
        elif mod._AUTO == "graphs":  # the switches' default (ops/_impl.py); the generator's thin conv anywhere
            on.append(f"{name} (in CUDA-graph steps{', and G' if mod is thin_conv else ''})")
    return on


def main():
    G, x, _ = gen_fwd_bwd("baseline")
    gflop["gen_fwd"] = count_flops(lambda: G(x))
    del G, x
    eager = ("fast", "amp", "baseline")
    for v in [v for v in eager if want(v, "generator")]:
        _, _, step = gen_fwd_bwd(v)
        record(f"generator fwd+bwd {SIZE}px batch {BATCH}", label(v), step, 3 * gflop["gen_fwd"], classes=True)
    for v in [v for v in ("fast", "amp") if want(v, "inference")]:
        record(f"inference {SIZE}px batch {INFER_BATCH}", label(v), inference(v),
               gflop["gen_fwd"] * INFER_BATCH // BATCH, images=INFER_BATCH, classes=True)
    step = build_training("baseline", SIZE, BATCH, NF, NB, D_NF, DEV)
    gflop["train"] = count_flops(step)
    del step
    for v in [v for v in eager if want(v, "step")]:
        step = build_training(v, SIZE, BATCH, NF, NB, D_NF, DEV)
        record(f"train step {SIZE}px batch {BATCH}", label(v), step, gflop["train"], images=BATCH, classes=True)
        del step
    if want("fast (no recompute)"):  # what the fast path's memory saving (recompute in backward) costs
        os.environ["DMFN_RECOMPUTE"] = "0"
        try:
            step = _built(lambda v: build_training(v, SIZE, BATCH, NF, NB, D_NF, DEV), "fast")
            record(f"train step {SIZE}px batch {BATCH}", "fast (no recompute)", step, gflop["train"], images=BATCH)
            del step
        finally:
            os.environ.pop("DMFN_RECOMPUTE")
    if want("fast (no flag reads)"):  # what the step's finite-flag reads cost: they wait for the GPU
        step = _built(lambda v: build_training(v, SIZE, BATCH, NF, NB, D_NF, DEV, read_flags=False), "fast")
        record(f"train step {SIZE}px batch {BATCH}", "fast (no flag reads)", step, gflop["train"], images=BATCH)
        del step
    # the training step as one CUDA graph replay (train.py --cuda-graphs; on the CPU its body runs eagerly)
    for v in [v for v in ("fast", "amp") if want(f"{v}+graphs", "step")]:
        step = _built(lambda v: build_training(v, SIZE, BATCH, NF, NB, D_NF, DEV, graphs=True), v)
        record(f"train step {SIZE}px batch {BATCH}", f"{v}+graphs", step, gflop["train"], images=BATCH,
               classes=True)
        del step
    if CUDA:
        # CUDA graphs: the same GPU work with no host cost per call (how far the host holds each variant back)
        for v in [v for v in ("fast", "amp") if want(f"{v}+graphs", "generator")]:
            step = _built(graphed_gen_fwd_bwd, v)
            record(f"generator fwd+bwd {SIZE}px batch {BATCH}", f"{v}+graphs", step, 3 * gflop["gen_fwd"])
            del step
        for v in [v for v in ("fast", "amp") if want(f"{v}+graphs", "inference")]:
            run = _built(graphed_inference, v)
            record(f"inference {SIZE}px batch {INFER_BATCH}", f"{v}+graphs", run,
                   gflop["gen_fwd"] * INFER_BATCH // BATCH, images=INFER_BATCH)
            del run
    # CUDA graphs of the compiled graphs, for both sides: the generator target's strongest baseline is the
    # faster of amp+compile and amp+compile-ro
    for v in [v for v in ("fast+compile-ro", "amp+compile-ro") if CUDA and not args.no_compile and want(v)]:
        step = _built(lambda v: gen_fwd_bwd(v)[2], v)
        record(f"generator fwd+bwd {SIZE}px batch {BATCH}", label(v), step, 3 * gflop["gen_fwd"], classes=True)
        del step
    if CUDA and not args.no_compile and want(INDUCTOR_NORMS):  # the A/B of dmfb.COMPILED_NORMS' default
        from dmfn_fast.ops import dmfb
        real, dmfb.COMPILED_NORMS = dmfb.COMPILED_NORMS, False
        try:
            step = _built(lambda v: gen_fwd_bwd(v)[2], "fast+compile-ro")
            record(f"generator fwd+bwd {SIZE}px batch {BATCH}", label("fast+compile-ro") + ", Inductor norms", step,
                   3 * gflop["gen_fwd"], classes=True)
            del step
        finally:
            dmfb.COMPILED_NORMS = real
    if CUDA and not args.no_compile:
        # torch.compile variants last (compiling is the slowest part); in fast+compile the fused ops are
        # traced by Inductor on CUDA, labelled "traced" (DMFN_TRITON_OP=0: opaque custom ops, unlabelled).
        for v in [v for v in ("amp+compile", "fast+compile") if want(v, "generator")]:
            step = _built(lambda v: gen_fwd_bwd(v)[2], v)
            record(f"generator fwd+bwd {SIZE}px batch {BATCH}", label(v), step, 3 * gflop["gen_fwd"], classes=True)
            del step
        # The training step with G, D and the loss compiled (train.py --compile), the likeliest winners first
        # (a stage cut by its time limit keeps the rows before); -ro: their launches as CUDA graph replays
        # (train.py --compile --compile-mode reduce-overhead), against the same for the reference.
        for v in [v for v in ("fast+compile", "amp+compile", "fast+compile-ro", "amp+compile-ro") if want(v, "step")]:
            step = _built(lambda v: build_training(v, SIZE, BATCH, NF, NB, D_NF, DEV), v)
            record(f"train step {SIZE}px batch {BATCH}", label(v), step, gflop["train"], images=BATCH, classes=True)
            del step
        for v in [v for v in ("amp+compile", "fast+compile", "fast+compile-ro", "amp+compile-ro")
                  if want(v, "inference")]:
            record(f"inference {SIZE}px batch {INFER_BATCH}", label(v), _built(inference, v),
                   gflop["gen_fwd"] * INFER_BATCH // BATCH, images=INFER_BATCH, classes=True)
        if want("fast+compile (no flag reads)"):  # a diagnosis, not a target: last, where a time limit cuts first
            step = _built(lambda v: build_training(v, SIZE, BATCH, NF, NB, D_NF, DEV, read_flags=False),
                          "fast+compile")
            record(f"train step {SIZE}px batch {BATCH}", label("fast+compile") + " (no flag reads)", step,
                   gflop["train"], images=BATCH)
            del step
    print("e2e done", flush=True)


if __name__ == "__main__":
    main()
