"""Which opt-in kernels the per-kernel breakdown measured faster than the defaults they replace, as the
switches that turn them on: gpu_check.sh runs the end-to-end stage with them, so one lease measures the
fastest kernels end to end without a second e2e run per opt-in. Prints the switches on one line (empty: none
won) and why to stderr.

    python benchmarks/gpu_adopt.py OUT_DIR      # reads OUT_DIR/breakdown.jsonl
"""
import json
import os
import sys

GROUP = "pieces bfloat16"  # the training dtype, N=16, 64x64, C=64
MARGIN = 0.97  # an opt-in must be at least 3% faster in GPU time: below that the medians do not separate
# switch, the opt-in kernels' rows, the rows of the default kernels they replace
RULES = [
    ("DMFN_WGRAD9", ["fused wgrad kernel, 9 taps per program"], ["fused wgrad kernel"]),
    ("DMFN_TMA", ["fused fwd kernel, TMA 2-D tiles", "fused grad kernel, TMA 2-D tiles",
                  "fused dgrad kernel, TMA 2-D tiles"],
     ["fused fwd kernel", "fused grad kernel (recompute + IN/ReLU bwd + suffix)", "fused dgrad kernel"]),
]


def decide(rows):
    """[(switch, adopted, reason)] from breakdown rows; an opt-in whose rows are missing is not adopted."""
    gpu = {r["name"]: r["gpu_ms"] for r in rows if r.get("group") == GROUP and r.get("gpu_ms")}
    out = []
    for switch, new, old in RULES:
        if not all(n in gpu for n in new + old):
            out.append((switch, False, "not measured"))
            continue
        a, b = sum(gpu[n] for n in new), sum(gpu[n] for n in old)
        out.append((switch, a < MARGIN * b, f"{a * 1e3:.1f} us against the default's {b * 1e3:.1f} us"))
    return out


def main(folder):
    path = os.path.join(folder, "breakdown.jsonl")
    rows = []
    if os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut off by a timeout
                pass
    decisions = decide(rows)
    for switch, on, why in decisions:
        print(f"adopt: {switch}={'1' if on else '0 (default kept)'}: {why}", file=sys.stderr)
    print(" ".join(f"{switch}=1" for switch, on, _ in decisions if on))


if __name__ == "__main__":
    main(sys.argv[1])
