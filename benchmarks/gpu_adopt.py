"""Which alternative kernels the per-kernel breakdown measured faster than the kernels they replace, as the
switches that turn them on or off: gpu_check.sh runs the end-to-end stage with them, so one lease measures
the fastest kernels end to end without a second e2e run per switch. Prints the measured switches on one line
(NAME=1, NAME=0, or NAME=graphs for a kernel that won in GPU time only; an unmeasured one keeps its default)
and why to stderr.

    python benchmarks/gpu_adopt.py OUT_DIR [--gpu-time-only]   # reads OUT_DIR/breakdown.jsonl

--gpu-time-only: GPU time alone decides, for end-to-end rows that are GPU-bound (inference at batch 64, the
step as one CUDA graph), where the host time an eager step pays per kernel launch does not show.
"""
import json
import os
import sys

GROUP = "pieces bfloat16"  # the training dtype, N=16, 64x64, C=64
VGG = "VGG19 fwd+bwd bfloat16"  # the frozen VGG as the training step runs it, 256 px, batch 16
THIN = "G input conv bfloat16"  # the generator's 4 -> 64 5x5 convolution and ReLU, inference and training
THIN_D = "D input conv bfloat16"  # the discriminator's 3 -> 64 5x5 stride-2 convolution, training
L1 = "L1 loss terms fwd+bwd bfloat16"  # the loss's guided and feature-matching terms on a batch's VGG features
MARGIN = 0.97  # an opt-in must be at least 3% faster in GPU time: below that the medians do not separate
# ... and at most 1 / MARGIN (about 3%) slower per call (do_bench's ms, host time included) where both rows
# have it: the eager step is host-bound, and the VGG's bias+ReLU kernel saved 1.4 ms of GPU time per pass but
# cost 2.8 ms per call (its Triton launches and autograd nodes against ATen's adds; H200, s10)
# switch, the breakdown group, the opt-in kernels' rows, the rows of the default kernels they replace
RULES = [
    ("DMFN_WGRAD9", GROUP, ["fused wgrad kernel, 9 taps per program"], ["fused wgrad kernel"]),
    ("DMFN_WGRAD_TMA", GROUP, ["fused wgrad kernel, TMA 2-D tiles"], ["fused wgrad kernel"]),
    ("DMFN_TMA", GROUP, ["fused fwd kernel, TMA 2-D tiles", "fused grad kernel, TMA 2-D tiles",
                         "fused dgrad kernel, TMA 2-D tiles"],
     ["fused fwd kernel", "fused grad kernel (recompute + IN/ReLU bwd + suffix)", "fused dgrad kernel"]),
    ("DMFN_BIAS_ACT", VGG, ["bias+ReLU kernel"], ["ATen bias add, ReLU"]),
    ("DMFN_MAX_POOL", VGG, ["max-pool kernels"], ["ATen bias add, ReLU"]),  # that row: ATen's pools too
    # one switch for both models' input convolutions: their rows summed (row names unique across the two groups)
    ("DMFN_THIN_CONV", (THIN, THIN_D),
     ["fwd, batch 64: thin conv kernel", "fwd+bwd, batch 16: thin conv kernel",
      "D fwd+bwd, batch 16: thin conv kernel"],
     ["fwd, batch 64: cuDNN, bias, ReLU", "fwd+bwd, batch 16: cuDNN, bias, ReLU", "D fwd+bwd, batch 16: cuDNN"]),
    ("DMFN_L1_KERNEL", L1, ["L1 kernels"], ["ATen (the loss's formula)"]),
]


def decide(rows, per_call=True):
    """[(switch, adopted, reason)] from breakdown rows; an opt-in whose rows are missing is not adopted.
    per_call=False: GPU time alone decides."""
    def times(group, key="gpu_ms"):
        return {r["name"]: r[key] for r in rows if r.get("group", "").startswith(group) and r.get(key)}

    out = []
    for switch, group, new, old in RULES:
        gpu, call = times(group), times(group, "ms")
        if not all(n in gpu for n in new + old):
            out.append((switch, False, "not measured"))
            continue
        a, b = sum(gpu[n] for n in new), sum(gpu[n] for n in old)
        why = f"{a * 1e3:.1f} us against the default's {b * 1e3:.1f} us"
        ok = a < MARGIN * b
        if per_call and all(n in call for n in new + old):
            ca, cb = sum(call[n] for n in new), sum(call[n] for n in old)
            why += f" (per call {ca * 1e3:.1f} against {cb * 1e3:.1f} us)"
            ok = ok and ca <= cb / MARGIN
        out.append((switch, ok, why))
    # DMFN_WGRAD_TMA takes precedence over DMFN_WGRAD9 in dmfb._branches_wgrad: of two winners keep the faster
    on = {s: i for i, (s, adopted, _) in enumerate(out) if adopted}
    gpu = times(GROUP)
    if "DMFN_WGRAD9" in on and "DMFN_WGRAD_TMA" in on:
        t9, tt = gpu["fused wgrad kernel, 9 taps per program"], gpu["fused wgrad kernel, TMA 2-D tiles"]
        drop = "DMFN_WGRAD9" if tt <= t9 else "DMFN_WGRAD_TMA"
        i = on[drop]
        out[i] = (drop, False, out[i][2] + f", but the other wgrad ({min(t9, tt) * 1e3:.1f} us) is faster")
    return out


# switches whose default, "graphs", takes the kernel in a CUDA-graph step only (ops/_impl.py SWITCHES): where the
# per-call rule rejects a kernel that wins in GPU time, they keep that default instead of 0
GRAPHS = ("DMFN_BIAS_ACT", "DMFN_THIN_CONV", "DMFN_MAX_POOL", "DMFN_L1_KERNEL")


def values(rows, per_call=True, decisions=None):
    """{switch: value to set} for the measured switches: 1 adopted; "graphs" for a GRAPHS switch that won in
    GPU time only; else 0. decisions: decide(rows, per_call), where the caller has it already."""
    if decisions is None:
        decisions = decide(rows, per_call)
    gpu_wins = {switch for switch, on, _ in (decide(rows, per_call=False) if per_call else decisions) if on}
    return {switch: "1" if on else "graphs" if switch in GRAPHS and switch in gpu_wins else "0"
            for switch, on, why in decisions if why != "not measured"}


def main(folder, per_call=True):
    path = os.path.join(folder, "breakdown.jsonl")
    rows = []
    if os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut off by a timeout
                pass
    decisions = decide(rows, per_call)
    chosen = values(rows, per_call, decisions)
    for switch, on, why in decisions:
        print(f"adopt: {switch}={chosen.get(switch, 'its default')}: {why}", file=sys.stderr)
    # both ways: a switch's default may be on (DMFN_TMA on sm_90); unmeasured ones keep their default
    print(" ".join(f"{switch}={value}" for switch, value in chosen.items()))


if __name__ == "__main__":
    flags = [a for a in sys.argv[2:] if a != "--gpu-time-only"]
    if len(sys.argv) < 2 or flags:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR [--gpu-time-only]; got {sys.argv[1:]}")
    main(sys.argv[1], per_call="--gpu-time-only" not in sys.argv[2:])
