"""How every op chooses between its fast path and its PyTorch reference.

`impl` is one of "auto" (fast where it can run), "reference" (always the
reference) or "fused" (fast, or an error). The environment variable
DMFN_IMPL=reference forces the reference everywhere, whatever `impl` says.
"""
import os
import warnings

IMPLS = ("auto", "reference", "fused")
_warned = set()


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def forced_reference() -> bool:
    return os.environ.get("DMFN_IMPL", "").strip().lower() == "reference"


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_fast(impl: str, can_run: bool, why_not: str = "") -> bool:
    """True when the fast path should run. `can_run` says it could for this call."""
    check_impl(impl)
    if impl == "reference" or forced_reference():
        return False
    if impl == "fused" and not can_run:
        raise RuntimeError(f"impl='fused' was requested but the fast path cannot run: {why_not}")
    return can_run
