"""The fast training step trains the same model as the baseline: from the same weights and batch,
`fast` (bf16 autocast, channels-last, fused DMFB on CUDA, alignment extension) gives the baseline's
(fp32, NCHW, reference ops) losses within bf16 tolerance, and a second step still agrees."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from e2e_common import build_training  # noqa: E402  (the benchmark's own step builder)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fast_and_baseline_steps_give_the_same_losses(device):
    size, batch, nf, nb, d_nf = (64, 2, 16, 2, 16) if device == "cpu" else (256, 4, 64, 8, 64)
    base = build_training("baseline", size, batch, nf, nb, d_nf, device)
    fast = build_training("fast", size, batch, nf, nb, d_nf, device)
    for step_no in range(2):
        tb, ok_b = base()
        tf, ok_f = fast()
        assert ok_b and ok_f
        assert set(tb) == set(tf) == {"rec", "guided", "fm_vgg", "align", "adv", "fm_dis", "G", "D"}
        for k in tb:
            a, b = tb[k].item(), tf[k].item()
            # bf16 keeps 8 bits of mantissa: ~0.4% per op, a few % through a deep net. The alignment term
            # squares a small difference of relu4_1 centroids, which bf16 VGG features move by ~1e-2: up to
            # ~15% of that term (the C++ op itself matches the reference to 1e-6 on the same features).
            rel = 0.25 if k == "align" else 5e-2
            assert b == pytest.approx(a, rel=rel, abs=1e-4), f"step {step_no} term {k}: baseline {a} fast {b}"
