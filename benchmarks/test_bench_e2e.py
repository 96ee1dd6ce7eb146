"""End-to-end: generator inference and one full training step, in the variants of one run:
baseline (fp32, NCHW, reference ops, as the authors), amp (bf16 autocast + channels-last), amp+compile
(torch.compile of amp's generator; in the training step of every module), fast (amp + fused DMFB + alignment
extension), fast+compile, and their reduce-overhead modes (-ro). benchmarks/summarize.py turns the JSON into
the speedup table.

CUDA: 256x256, inference batch 1/16/64, training batch 16. CPU (or DMFN_BENCH_QUICK=1): tiny shapes so
the harness never rots; CPU numbers are CPU numbers, nothing more."""
import pytest
import torch

from dmfn_fast.training.build import cpu_has_bf16
from e2e_common import (VARIANTS, bf16_peak, build_generator, build_training, count_flops, profile_shares,
                         run_timed)
from conftest import QUICK

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if QUICK:  # no CUDA, or DMFN_BENCH_QUICK=1
    SIZE, INFER_BATCHES, NF, NB, ROUNDS, WARMUP = 64, (1,), 16, 2, 3, 1
else:
    SIZE, INFER_BATCHES, NF, NB, ROUNDS, WARMUP = 256, (1, 16, 64), 64, 8, 20, 5


def _skip_unrunnable(variant):
    if VARIANTS[variant][3] and not CUDA:
        pytest.skip("torch.compile variant is timed on CUDA only (compiling on CPU takes minutes)")
    if VARIANTS[variant][0] is not None and not CUDA and not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16, where bf16 autocast is several times slower than fp32; "
                    "train.py --amp also stays fp32 here")


@pytest.mark.parametrize("batch", INFER_BATCHES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generator_inference(benchmark, variant, batch):
    _skip_unrunnable(variant)
    G, fwd, dtype, mf = build_generator(variant, NF, NB, DEVICE)
    G.eval()
    x = torch.rand(batch, 4, SIZE, SIZE, device=DEVICE) * 2 - 1
    x = x.contiguous(memory_format=mf)

    def run():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
            return fwd(x)

    benchmark.group = f"inference {SIZE}px batch {batch} ({DEVICE})"
    flops = count_flops(lambda: G(x[:1])) * batch
    med, peak = run_timed(benchmark, run, DEVICE, ROUNDS, WARMUP)
    info = benchmark.extra_info
    info.update(variant=variant, images_per_s=batch / med, tflops=flops / med / 1e12, peak_mem_mb=peak)
    if bf16_peak(DEVICE):
        info["pct_peak"] = 100 * info["tflops"] / bf16_peak(DEVICE)
    assert torch.isfinite(run()).all()


TRAIN_BATCH, TRAIN_SIZE, D_NF = (2, 64, 16) if QUICK else (16, 256, 64)
_train_flops = {}


def _train_step_flops():
    """Model FLOPs of one training step, counted on the reference structure (custom kernels are opaque
    to the counter), so every variant is credited with the same work."""
    if "v" not in _train_flops:
        step = build_training("baseline", TRAIN_SIZE, TRAIN_BATCH, NF, NB, D_NF, DEVICE)
        _train_flops["v"] = count_flops(step)
    return _train_flops["v"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step(benchmark, variant):
    _skip_unrunnable(variant)
    benchmark.group = f"train step {TRAIN_SIZE}px batch {TRAIN_BATCH} ({DEVICE})"
    flops = _train_step_flops()
    step = build_training(variant, TRAIN_SIZE, TRAIN_BATCH, NF, NB, D_NF, DEVICE)
    med, peak = run_timed(benchmark, step, DEVICE, ROUNDS if CUDA else 2, WARMUP)
    terms, ok = step()
    assert ok and all(torch.isfinite(v) for v in terms.values())
    info = benchmark.extra_info
    info.update(variant=variant, images_per_s=TRAIN_BATCH / med, tflops=flops / med / 1e12, peak_mem_mb=peak,
                profile_share=profile_shares(step, DEVICE, steps=3 if CUDA else 1))
    if bf16_peak(DEVICE):
        info["pct_peak"] = 100 * info["tflops"] / bf16_peak(DEVICE)
