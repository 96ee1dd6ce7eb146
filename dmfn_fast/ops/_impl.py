"""How every op chooses between its fast path and its PyTorch reference.

`impl` is one of "auto" (the fast path where it runs and the op's benchmarks show it faster),
"reference" (always the reference) or "fast" (the fast path, or an error saying why it cannot run).
"fused", the old name of "fast", is still accepted (one DeprecationWarning). The environment variable
DMFN_IMPL=reference forces the reference everywhere, whatever `impl` says.

With a fast path (auto or fast) training also trades a little recompute for memory (recompute()):
DMFN_RECOMPUTE=0 turns that off.
"""
import os
import warnings
from typing import Callable, Optional

IMPLS = ("auto", "reference", "fast")
_ALIASES = {"fused": "fast"}  # deprecated spelling -> value; saved configs and scripts still use it
_warned = set()


def warn_once(key, message: str, category=RuntimeWarning, stacklevel: int = 3) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=stacklevel)


def check_impl(impl: str) -> str:
    """The one place `impl` is validated: returns its canonical value (aliases mapped)."""
    if impl in _ALIASES:
        new = _ALIASES[impl]
        warn_once(("alias", impl), f"dmfn_fast: impl={impl!r} is deprecated, use impl={new!r}",
                  DeprecationWarning, stacklevel=4)
        return new
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def has_hooks(module) -> bool:
    """Whether a module has hooks of its own that a fast path running its computation another way would skip:
    forward, forward-pre, backward and backward-pre (its parameters' and tensors' hooks still run)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def forced_reference() -> bool:
    return os.environ.get("DMFN_IMPL", "").strip().lower() == "reference"


def recompute(impl: str) -> bool:
    """Whether training recomputes cheap activations in backward instead of holding them from the forward
    (the frozen VGG's inner layers, the generator's norm+ReLU runs): impl auto or fast, unless
    DMFN_IMPL=reference or DMFN_RECOMPUTE=0. The values and gradients are the same either way."""
    return (check_impl(impl) != "reference" and not forced_reference()
            and os.environ.get("DMFN_RECOMPUTE", "1").strip() != "0")


def resolve(impl: str, why_not: Callable[[], str], *, op: str,
            missing: Optional[Callable[[], str]] = None,
            prefer_fast: Optional[Callable[[], bool]] = None) -> bool:
    """True when `op` should run its fast path.

    why_not(): "" when the fast path can run on this call's inputs, else why not (auto then takes the
        reference silently: a CPU tensor, say).
    missing(): "" when the fast path is installed, else why not (auto then takes the reference with one
        warning per op). Asked after why_not, so inputs the fast path never takes warn about nothing.
    prefer_fast(): the op's `auto` rule, where its benchmarks show the fast path faster (default: always).
    None of them is called when the reference is chosen anyway (impl="reference", DMFN_IMPL=reference,
    or auto's rule says reference): they may be costly (the centroid op loads or JIT-builds its extension).
    impl="fast" raises a RuntimeError with the reason instead of falling back."""
    impl = check_impl(impl)
    if impl == "reference" or forced_reference():
        return False
    if impl == "auto" and prefer_fast is not None and not prefer_fast():
        return False
    why = why_not()
    absent = "" if why or missing is None else missing()
    if not (why or absent):
        return True
    if impl == "fast":
        raise RuntimeError(f"impl='fast' was requested but the {op} fast path cannot run: {why or absent}")
    if absent:
        warn_once(("missing", op), f"dmfn_fast: {absent}; the {op} uses its PyTorch reference", stacklevel=4)
    return False
