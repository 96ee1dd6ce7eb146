"""Same model check over many steps: train on the demo set twice from the same seed, `baseline` (fp32,
reference ops) and `fast` (bf16 autocast, channels-last, fused/extension ops where they run), then plot
both loss curves and report the largest relative gap of the smoothed G and rec losses.

    python benchmarks/loss_curves.py OUT_DIR [--steps 200] [extra train.py flags]"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VARIANTS = {"baseline": ["--impl", "reference", "--no-channels-last"],
            "fast": ["--amp", "--amp-dtype", "bf16", "--impl", "auto", "--channels-last"]}


def losses(log):
    rows = [json.loads(line) for line in open(log) if '"kind": "train"' in line]
    return np.array([r["step"] for r in rows]), {k: np.array([r[k] for r in rows]) for k in ("G", "rec", "D")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=200)
    args, extra = ap.parse_known_args()
    curves = {}
    for name, flags in VARIANTS.items():
        out = os.path.join(args.out, name)
        if not os.path.exists(os.path.join(out, "log.jsonl")):
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", out, "--steps", str(args.steps),
                   "--log-every", "1", "--val-every", str(args.steps), "--sample-every", str(args.steps),
                   "--ckpt-every", str(args.steps), *flags, *extra]
            subprocess.run(cmd, check=True)
        curves[name] = losses(os.path.join(out, "log.jsonl"))

    def smooth(x, k=20):
        return np.convolve(x, np.ones(k) / k, mode="valid")

    report = {}
    for k in ("G", "rec"):
        a, b = smooth(curves["baseline"][1][k]), smooth(curves["fast"][1][k])
        report[f"max_rel_gap_{k}"] = float(np.max(np.abs(a - b) / np.abs(a)))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, k in zip(axes, ("G", "rec", "D")):
        for name, (steps, vals) in curves.items():
            ax.plot(steps, vals[k], label=name, alpha=0.8)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss_curves.png"), dpi=80)
    json.dump(report, open(os.path.join(args.out, "loss_curves.json"), "w"), indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
