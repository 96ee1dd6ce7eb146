"""How every op chooses between its fast path and its PyTorch reference.

`impl` is one of "auto" (the fast path where it runs and the op's benchmarks show it faster),
"reference" (always the reference) or "fast" (the fast path, or an error saying why it cannot run).
"fused", the old name of "fast", is still accepted (one DeprecationWarning). The environment variable
DMFN_IMPL=reference forces the reference everywhere, whatever `impl` says.

With a fast path (auto or fast) training also trades a little recompute for memory (recompute()):
DMFN_RECOMPUTE=0 turns that off.

Every environment switch the package reads is in SWITCHES, with the values it takes; `import dmfn_fast`
refuses any other value (check_environment), and so does each read (env_switch).
"""
import contextlib
import difflib
import os
import warnings
from typing import Callable, Optional

IMPLS = ("auto", "reference", "fast")
_ALIASES = {"fused": "fast"}  # deprecated spelling -> value; saved configs and scripts still use it
_warned = set()

# Each switch's values, its default first (what unset or empty means). Read leniently, a typo such as
# DMFN_IMPL=refrence or DMFN_TMA=false would quietly run the other path, so any other value is refused.
SWITCHES = {
    "DMFN_IMPL": ("auto", "reference"),  # reference: every op's PyTorch reference, whatever impl says
    "DMFN_RECOMPUTE": ("1", "0"),  # 0: training holds cheap activations instead of recomputing them
    # Kernels that save GPU time but cost host time per call (Triton launches, autograd nodes), so impl="auto"
    # takes them by default only in a step replayed as one CUDA graph (graphs(): train.py --cuda-graphs), where
    # the GPU's time alone counts: H200, s15, the graphed step 37.3 -> 29.7 ms with the four, while per call
    # each was slower than ATen in the host-bound eager step. 1: everywhere; 0: never.
    "DMFN_BIAS_ACT": ("graphs", "1", "0"),  # the convolutions' bias + activation kernel (VGG, generator)
    "DMFN_THIN_CONV": ("graphs", "1", "0"),  # the thin-input convolution kernel (D's two; G's takes it anyway)
    "DMFN_MAX_POOL": ("graphs", "1", "0"),  # the index-free max-pool kernels (the VGG's pools)
    "DMFN_L1_KERNEL": ("graphs", "1", "0"),  # the loss's L1 kernels (guided and feature-matching terms)
    "DMFN_TRITON_OP": ("1", "0"),  # 0: the fused DMFB ops opaque to torch.compile
    "DMFN_COMPILED_NORMS": ("1", "0"),  # 0: Inductor's own instance norms under torch.compile
    "DMFN_TMA": ("1", "0"),  # 0: no TMA branch kernels (sm_90)
    "DMFN_WGRAD9": ("0", "1"),  # 1: the 9-tap weight-gradient kernel (sm_90)
    "DMFN_WGRAD_TMA": ("1", "0"),  # 0: no TMA weight-gradient kernel (sm_90)
    # the centroid extension's kernel plans, read by its C++ per call (benchmark A/B switches)
    "DMFN_CENTROID_WAVES": ("1", "2", "3", "4"),
    "DMFN_CENTROID_BLOCK_FINISH": ("0", "1"),
    "DMFN_CENTROID_PIXELS": ("0", "1"),
    "DMFN_CENTROID_GRAD_ROWS": ("4", "1", "2"),
    # by Triton kernels: the forward (1), both passes (2), both with the forward in whole planes (3), the
    # forward in whole planes alone (4)
    "DMFN_CENTROID_TRITON": ("0", "1", "2", "3", "4"),
    # 1: the Triton sums (TRITON 1 to 4) read map b's pixels half a run (with INTERLEAVE: an image) ahead of map a's
    "DMFN_CENTROID_APART": ("0", "1"),
    # 1: the Triton pair sums (TRITON 1 and 2) take each image's steps in turn, so its programs read adjacent steps
    "DMFN_CENTROID_INTERLEAVE": ("0", "1"),
    # 1: each Triton pair-sums program (TRITON 1 and 2) reads one map: map a's programs first, then map b's
    "DMFN_CENTROID_ONE_MAP": ("0", "1"),
}
# DMFN_* variables that are not switches: a file (the VGG weights), the build's and the benchmarks' own
OTHER_VARIABLES = ("DMFN_VGG19_WEIGHTS", "DMFN_NO_EXT", "DMFN_BENCH_QUICK", "DMFN_CUDA_VENV")


def env_switch(name: str) -> str:
    """Switch `name`'s value: its default when unset or empty, else the set value (spaces stripped, lower
    case) if the switch takes it; a ValueError saying what it takes otherwise."""
    values = SWITCHES[name]
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return values[0]
    if value not in values:
        raise ValueError(f"the environment variable {name}={raw!r} is not one of {', '.join(values)}: set one of "
                         f"them, or unset it for the default ({values[0]})")
    return value


def any_switch_set(names) -> bool:
    """Whether any of these switches is set (not blank), whatever its value (env_switch checks values)."""
    for name in names:  # a loop, not any() over a generator: torch.compile traces the callers
        if os.environ.get(name, "").strip():
            return True
    return False


def check_environment() -> None:
    """Refuse, in one ValueError, every switch set to a value it does not take; warn once about each DMFN_*
    variable the package does not read (a misspelt switch would do nothing)."""
    bad = []
    for name in SWITCHES:
        try:
            env_switch(name)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ValueError("dmfn_fast: " + "; ".join(bad))
    known = (*SWITCHES, *OTHER_VARIABLES)
    for name in sorted(os.environ):
        if name.startswith("DMFN_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warn_once(("unknown variable", name), f"dmfn_fast does not read the environment variable {name}{hint}; "
                      "it has no effect", stacklevel=2)


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


_graphed = 0  # depth of graphs() regions


@contextlib.contextmanager
def graphs():
    """Marks work that a CUDA graph will replay (train.py --cuda-graphs: its eager warm-up steps, so the kernels
    compile and tune there, and its capture): there a switch set to "graphs" is on (switch_on)."""
    global _graphed
    _graphed += 1
    try:
        yield
    finally:
        _graphed -= 1


def switch_on(value: str) -> bool:
    """A kernel switch's value ("graphs", "1" or "0", read once at import) for this call: "graphs" is on
    inside graphs() only."""
    return value == "1" or (value == "graphs" and _graphed > 0)


def forced_reference() -> bool:
    return env_switch("DMFN_IMPL") == "reference"


def recompute(impl: str) -> bool:
    """Whether training recomputes cheap activations in backward instead of holding them from the forward
    (the frozen VGG's inner layers, the generator's norm+ReLU runs): impl auto or fast, unless
    DMFN_IMPL=reference or DMFN_RECOMPUTE=0. The values and gradients are the same either way."""
    return check_impl(impl) != "reference" and not forced_reference() and env_switch("DMFN_RECOMPUTE") == "1"


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
