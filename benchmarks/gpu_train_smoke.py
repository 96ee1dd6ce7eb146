"""train.py as a user runs it, on one GPU: `--amp` (bf16), `--amp --amp-dtype fp16`, `--amp --cuda-graphs`
(bf16, then fp16) and `--amp --compile --compile-mode reduce-overhead`, 50 steps each at 256x256, batch 16, the
paper's model, the built-in demo set and a random VGG (no weights offline).
Passes when each run exits 0 and logs 50 training steps with finite losses; prints each run's speed.
--jobs N runs N at once, the compiled run first (its compile is host work the others' steps overlap; their
speeds are then shared-GPU figures).

    python benchmarks/gpu_train_smoke.py          # CUDA
    python benchmarks/gpu_train_smoke.py --dry    # CPU, tiny sizes: checks the script
"""
import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--dry", action="store_true", help="CPU, tiny model, 2 steps")
ap.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
args = ap.parse_args()
if args.jobs < 1:
    ap.error(f"--jobs must be at least 1, got {args.jobs}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2 if args.dry else 50
SIZES = (["--size", "32", "--batch", "2", "--nf", "8", "--n-blocks", "1", "--d-nf", "8"] if args.dry else
         ["--size", "256", "--batch", "16", "--nf", "64", "--n-blocks", "8", "--d-nf", "64"])
EVERY_20 = ["--val-every", "20", "--sample-every", "20", "--ckpt-every", "20"]  # evaluations between replays
RUNS = {"bf16": ["--amp"], "fp16": ["--amp", "--amp-dtype", "fp16"],
        # the whole step as one CUDA graph replay after 3 eager steps, with evaluations in between (one job at a
        # time: before the compiled run, which a cut stage then loses first)
        "bf16 cuda-graphs": ["--amp", "--cuda-graphs", *EVERY_20],
        # the same in fp16: GradScaler's scale read by the replays, its checks and update after each
        "fp16 cuda-graphs": ["--amp", "--amp-dtype", "fp16", "--cuda-graphs", *EVERY_20],
        # every module compiled, as CUDA graph replays, with validation, samples and checkpoints in between
        "bf16 compile-ro": ["--amp", "--compile", "--compile-mode", "reduce-overhead", *EVERY_20]}
if args.dry:  # the CPU has no CUDA graphs, and Inductor's CPU build of the step takes minutes
    RUNS.pop("bf16 compile-ro")
    RUNS.pop("bf16 cuda-graphs")
    RUNS.pop("fp16 cuda-graphs")


def run(tmp, name, flags):
    """One train.py run: its name, whether it passed, and what to print."""
    out = os.path.join(tmp, name)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--random-vgg", "--out", out, "--steps", str(STEPS),
           "--log-every", "1", "--val-every", str(STEPS), "--sample-every", str(STEPS),
           "--ckpt-every", str(STEPS)] + SIZES + ([] if args.dry else flags)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = []
    if os.path.exists(os.path.join(out, "log.jsonl")):
        rows = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r.get("kind") == "train"]
    losses = [v for r in rows for k, v in r.items() if k not in ("kind", "step", "lr", "it_s")]
    ok = p.returncode == 0 and len(rows) == STEPS and all(math.isfinite(v) for v in losses)
    speed = [r["it_s"] for r in rows[STEPS // 2:] if "it_s" in r]
    text = (f"[train.py {name}] rc={p.returncode} steps={len(rows)} finite={all(map(math.isfinite, losses))} "
            f"G {rows[0]['G']:.3f} -> {rows[-1]['G']:.3f} " if rows else f"[train.py {name}] rc={p.returncode} ")
    text += f" it/s (second half) {sum(speed) / max(len(speed), 1):.2f}  wall {wall:.0f} s"
    if not ok:
        text += "\n" + p.stdout[-2000:] + p.stderr[-3000:]
    return name, ok, text


# with several jobs the compiled run starts first: the longest, and its compile is host work
order = sorted(RUNS, key=lambda n: "compile" not in n) if args.jobs > 1 else list(RUNS)
failed = []
with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for done in concurrent.futures.as_completed([pool.submit(run, tmp, n, RUNS[n]) for n in order]):
        name, ok, text = done.result()
        print(text, flush=True)
        if not ok:
            failed.append(name)
print("train smoke:", "FAILED " + ", ".join(failed) if failed else "passed")
sys.exit(1 if failed else 0)
