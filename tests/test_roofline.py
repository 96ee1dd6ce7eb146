"""benchmarks/roofline.py (the FLOP and byte accounting behind RESULTS.md's floors) runs, and counts what the
kernels compute: the reference branch op is its twelve 3x3 convolutions (four forward, four dgrad, four wgrad),
the fused op those plus the backward's recompute, and the fused op saves less for backward."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "roofline.py"), str(out), "--dry"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return {(r["case"].split(" 32px")[0], r["variant"]): r for r in json.loads((out / "roofline.json").read_text())}


def test_every_case_and_floor(rows):
    cases = {c for c, _ in rows}
    assert {"branch op + IN + ReLU fwd+bwd", "one DMFB fwd+bwd", "generator fwd+bwd", "inference",
            "train step", "centroid op fwd+bwd bf16", "centroid op fwd+bwd fp32"} == cases, cases
    for key, r in rows.items():
        assert r["ops"] > 0 and r["gbytes"] > 0, key
        assert r["op_floor_ms"] >= r["flop_floor_ms"] > 0 or r["gflop"] == 0, key
        assert abs(sum(c["op_floor_ms"] for c in r["by_class"].values()) - r["op_floor_ms"]) < 1e-6, key
    for v in ("baseline", "amp", "fast"):
        assert rows[("train step", v)]["state_mib"] > 0 and rows[("train step", v)]["saved_mib"] > 0


def test_branch_flops_and_saved_bytes(rows):
    N, C, HW = 2, 8, 8  # roofline.py's --dry branch shape
    fwd = 2 * N * HW * HW * 4 * 9 * C * C / 1e9
    ref, fused = rows[("branch op + IN + ReLU fwd+bwd", "amp")], rows[("branch op + IN + ReLU fwd+bwd", "fast")]
    assert ref["gflop"] == pytest.approx(3 * fwd, rel=1e-9)
    assert fused["gflop"] == pytest.approx(4 * fwd, rel=1e-9)
    assert fused["by_class"]["fused DMFB (ours)"]["gflop"] == pytest.approx(4 * fwd, rel=1e-9)
    assert fused["saved_mib"] < ref["saved_mib"]
    assert fused["gbytes"] < ref["gbytes"]


def test_summary_rates_from_the_counts():
    """gpu_summary sets each end-to-end row's GPU time per kernel class against roofline.py's FLOPs for the
    same case and eager base variant: the rates the convolution libraries and our kernels reached."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_summary

    counts = [{"case": "train step 256px batch 16", "variant": "fast",
               "by_class": {"conv/matmul": {"gflop": 7000.0}, "fused DMFB (ours)": {"gflop": 600.0}}},
              {"case": "train step 256px batch 16", "variant": "fast (no recompute)",
               "by_class": {"conv/matmul": {"gflop": 6000.0}}}]
    rows = [{"case": "train step 256px batch 16", "variant": "fast+compile (traced)",
             "gpu_ms_by_class": {"conv/matmul libraries": 20.0, "fused DMFB (ours)": 4.0, "inductor": 9.0}},
            {"case": "train step 256px batch 16", "variant": "fast (no recompute)",
             "gpu_ms_by_class": {"conv/matmul libraries": 15.0}},
            {"case": "train step 32px batch 2", "variant": "fast", "gpu_ms_by_class": {"conv/matmul libraries": 1.0}}]
    gpu_summary.achieved(rows, counts)
    assert rows[0]["achieved"] == {"conv/matmul libraries TFLOP/s": 350.0, "fused DMFB (ours) TFLOP/s": 150.0}
    assert rows[1]["achieved"] == {"conv/matmul libraries TFLOP/s": 400.0}
    assert "achieved" not in rows[2]
    assert gpu_summary.latest_roofline(), "a committed benchmarks/results/*-cpu-roofline.json"
