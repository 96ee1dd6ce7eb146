"""Shared benchmark settings. DMFN_BENCH_QUICK=1 (CI) shrinks sizes and rounds so the suite never rots."""
import os

import pytest
import torch

QUICK = os.environ.get("DMFN_BENCH_QUICK", "") not in ("", "0")


@pytest.fixture(scope="session")
def quick():
    return QUICK


def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: fused kernels run only there")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
