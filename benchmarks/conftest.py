"""Shared benchmark settings, and the summary table printed at the end of `pytest benchmarks/`.

Sizes follow the device: with CUDA the real sizes, without it tiny ones (CPU numbers only prove the harness
runs). DMFN_BENCH_QUICK=1 forces the tiny sizes on CUDA too."""
import os

import pytest
import torch

from e2e_common import sync  # noqa: F401  (the benchmarks import it from here)

QUICK = os.environ.get("DMFN_BENCH_QUICK", "") not in ("", "0") or not torch.cuda.is_available()
_RESULTS = []  # (group, variant, median s, extra_info) of every benchmark that ran


@pytest.fixture(scope="session")
def quick():
    return QUICK


def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: fused kernels run only there")


def skip_unless_runs(impl, dtype):
    """Skip a case that cannot run here: impl "fast" needs CUDA and Triton; half precision is timed on CUDA only
    (a CPU run in fp32 proves the harness)."""
    if impl == "fast":
        cuda_or_skip()
        from dmfn_fast.ops.dmfb import triton_unavailable_reason

        if triton_unavailable_reason():
            pytest.skip(triton_unavailable_reason())
    if not torch.cuda.is_available() and dtype != "fp32":
        pytest.skip("half precision is timed only on CUDA")


def time_case(benchmark, fn, group, label, **info):
    """fn timed by pytest-benchmark (synchronized), after one warm-up call (compiles, autotuning, cuDNN's
    algorithm search); on CUDA also the CUDA-timed median (triton.testing.do_bench) in extra_info, printed
    under `label`. info: extra_info (impl, dtype, ...)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run():
        out = fn()
        sync(device)
        return out

    run()
    benchmark.group = group
    benchmark.extra_info.update(info)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        benchmark.extra_info.update(cuda_median_ms=ms)
        print(f"[{label} bench] {group} {info.get('impl', '')}: {ms:.3f} ms (CUDA median)")
    benchmark(run)


@pytest.fixture(autouse=True)
def _fresh_compile():
    """Each benchmark compiles its own new modules: the graphs of those before would only count against
    Dynamo's 8 recompiles per function (past which it runs eagerly) and hold their CUDA graph pools."""
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _collect_result(request):
    """After each benchmark, keep its group, variant and median for the summary table."""
    yield
    bm = request.node.funcargs.get("benchmark")
    stats = getattr(getattr(bm, "stats", None), "stats", None)
    if stats is None:
        return
    info = dict(bm.extra_info)
    variant = info.get("variant") or info.get("impl") or request.node.callspec.id
    _RESULTS.append((bm.group or request.node.originalname, variant, stats.median, info))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """Each group's variants side by side: median, and speedup over the group's reference/baseline/amp."""
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("dmfn-fast benchmark summary (medians; CPU rows prove the harness, not speed)")
    groups = {}
    for group, variant, med, info in _RESULTS:
        groups.setdefault(group, {})[variant] = (med, info)
    for group in sorted(groups):
        vs = groups[group]
        base_name = next((b for b in ("reference", "baseline", "amp") if b in vs), None)
        base = vs[base_name][0] if base_name else None
        for variant, (med, info) in sorted(vs.items(), key=lambda kv: -kv[1][0]):
            cuda_ms = info.get("cuda_median_ms")
            extra = f"  CUDA median {cuda_ms:.3f} ms" if cuda_ms else ""
            speed = f"  {base / med:5.2f}x vs {base_name}" if base and variant != base_name else ""
            tr.write_line(f"{group[:58]:58s} {str(variant)[:14]:14s} {med * 1e3:10.3f} ms{speed}{extra}")
