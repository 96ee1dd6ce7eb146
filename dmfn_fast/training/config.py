"""train.py's flags, the --config file, the demo/paper presets, and their checks: every value is checked
here, before any work starts, so a typo never costs a training run."""
import argparse
import json
import os

from ..masks import KINDS
from ..ops._impl import IMPLS
from ..recipes import RECIPES

# Paper defaults; the demo (no DATA) replaces those still unset by this CPU-sized preset.
PAPER = dict(size=256, batch=16, steps=100_000, n_val=8, min_scale=1.0, log_every=50, sample_every=500,
             val_every=1000, ckpt_every=2000, nf=64, n_blocks=8, d_nf=64)
DEMO = dict(size=64, batch=4, steps=100, n_val=4, min_scale=0.4, log_every=5, sample_every=25,
            val_every=25, ckpt_every=25, nf=32, n_blocks=4, d_nf=16)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help shows each fixed default once, from the parser; preset-dependent ones say theirs in the text."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in h and action.option_strings:
            h += " (default: %(default)s)"
        return h


def build_parser(description=None):
    p = argparse.ArgumentParser(prog="train.py", description=description, formatter_class=_Help)
    a = p.add_argument
    a("data", nargs="?", help="image folder or list file; omit for the built-in demo set")
    a("--config", help="YAML or JSON file of options (keys as the flags, - or _)")
    a("--out", default="runs/dmfn", help="run folder: checkpoints, log, samples, curves (one run per folder)")
    a("--overwrite", action="store_true",
      help="start a new run in an --out that holds another run: its files move to OUT/previous-<time>/")
    a("--val-data", help="held-out images (folder or list); default: the last --n-val images of DATA")
    a("--n-val", type=int, help="held-out images when --val-data is not given (8; demo 4)")
    a("--size", type=int, help="training size, divisible by 4 (256; demo 64)")
    a("--batch", type=int, help="batch per process; global batch = batch x processes (16; demo 4)")
    a("--steps", type=int, help="total G+D updates (100000; demo 100)")
    a("--min-scale", type=float, help="random crop side as a fraction of the short side: U(min, 1) (1.0; demo 0.4)")
    a("--recipe", choices=RECIPES, default="paper",
      help="paper: the authors' code where the paper is silent, the paper where their code contradicts it; "
           "authors: their public training code throughout (README: Departures from the authors' code)")
    a("--lr-g", type=float, default=2e-4, help="generator Adam learning rate")
    a("--lr-d", type=float, default=2e-4, help="discriminator Adam learning rate")
    a("--betas", type=float, nargs=2, default=[0.5, 0.999], help="Adam betas")
    a("--lr-steps", type=int, nargs="+", default=[100_000],
      help="MultiStepLR milestones: update number m is the first at lr x gamma (the authors' order)")
    a("--lr-gamma", type=float, default=0.5, help="learning-rate factor at each milestone")
    a("--nf", type=int, help="generator width (64; demo 32)")
    a("--n-blocks", type=int, help="DMFB blocks (8; demo 4)")
    a("--d-nf", type=int, help="discriminator width (64; demo 16)")
    a("--masks", choices=KINDS, default="rect", help="training hole shapes")
    a("--mask-dir", help="folder of mask PNGs for irregular / mixed masks")
    a("--mask-probs", help="for mixed masks, e.g. rect=0.5,stroke=0.3,irregular=0.2")
    a("--hole", type=int, help="rect hole side (size/2, 128 at 256)")
    a("--jitter", type=int, help="max px each side of a rect hole shrinks (16 at 256, scaled)")
    a("--center-mask", action="store_true", help="rect holes at the centre instead of random")
    a("--invert-masks", action="store_true", help="mask files mark the known pixels white: swap hole and known")
    a("--hflip", action="store_true",
      help="random horizontal flips of the training crops (the authors' code has none; off in both recipes)")
    a("--amp", action="store_true", help="CUDA: bf16 autocast (fp16 + GradScaler without bf16); CPU: bf16")
    a("--amp-dtype", choices=("auto", "bf16", "fp16"), default="auto",
      help="with --amp: auto picks as above (fp32 on a CPU without native bf16); bf16/fp16 force it")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    a("--compile", action="store_true",
      help="torch.compile the generator, the discriminator and the loss (with its VGG)")
    a("--compile-mode", choices=COMPILE_MODES, default="default",
      help="with --compile: torch.compile's mode; reduce-overhead replays CUDA graphs (CUDA only)")
    a("--cuda-graphs", action="store_true",
      help="run each training step as one CUDA graph replay (after 3 eager steps): no Python or launches per "
           "op, for the eager step's host time (CUDA, one process; not with --compile)")
    a("--impl", choices=IMPLS + ("fused",), default="auto",
      help="DMFB and alignment-loss kernels: auto (fast where measured faster), reference, fast "
           "('fused': old name of fast)")
    a("--seed", type=int, default=0, help="seed of weights, crops and masks")
    a("--deterministic", action="store_true",
      help="deterministic kernels (slower on CUDA); the DMFB then uses its PyTorch reference, since the fused "
           "kernels sum with atomics (with --impl fast this is an error)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    a("--workers", type=int, help="data loader processes per rank (CUDA: the cores per rank, at most 8; CPU: 0)")
    a("--vgg-weights", default="auto", help="torchvision vgg19 .pth (auto: DMFN_VGG19_WEIGHTS, hub cache, download)")
    a("--random-vgg", action="store_true", help="train with a RANDOM VGG19 (smoke tests only)")
    a("--log-every", type=int, help="steps between log lines (50; demo 5)")
    a("--sample-every", type=int, help="steps between sample grids (500; demo 25)")
    a("--val-every", type=int, help="steps between validations (1000; demo 25)")
    a("--ckpt-every", type=int, help="steps between checkpoints (2000; demo 25)")
    a("--keep", type=int, default=3, help="checkpoints kept")
    a("--resume", nargs="?", const="latest", help="a checkpoint, or (no value) the latest in --out")
    a("--max-bad-steps", type=int, default=10, help="stop after this many non-finite steps in a row")
    a("--max-bad-images", type=float, default=0.05, help="stop when this fraction of images is unreadable")
    return p


def parse_args(argv=None, description=None):
    """Flags over the --config file over the preset (demo without DATA, else the paper's). Any bad value
    exits with an argparse error (code 2) naming it."""
    p = build_parser(description)
    args = p.parse_args(argv)
    if args.config:  # the file sets defaults; flags on the command line win
        p.set_defaults(**read_config(p, args.config))
        args = p.parse_args(argv)
    preset = DEMO if args.data is None else PAPER
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check(p, args)
    return args


def read_config(p, path):
    """The --config file as {dest: value}, each value checked against its flag's type and choices."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        p.error(f"--config {path}: {e.strerror}")
    try:
        if path.endswith(".json"):
            cfg = json.loads(text)
        else:
            import yaml
            cfg = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001: yaml and json raise their own error types
        p.error(f"--config {path} does not parse: {e}")
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        p.error(f"--config {path} must be a mapping of option: value, not a {type(cfg).__name__}")
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    out, unknown = {}, []
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            unknown.append(str(key))
            continue
        out[dest] = _config_value(p, path, key, actions[dest], value)
    if unknown:
        p.error(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    return out


def _config_value(p, path, key, action, value):
    def bad(expected):
        p.error(f"--config {path}: {key}: expected {expected}, got {value!r}")

    def one(v):
        if action.type in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                bad("an integer" if action.type is int else "a number")
            if action.type is int and isinstance(v, float):
                bad("an integer")
            try:
                v = action.type(v)
            except ValueError:
                bad("an integer" if action.type is int else "a number")
        elif not isinstance(v, str) and not (action.dest == "mask_probs" and isinstance(v, dict)):
            bad("a string")
        if action.choices is not None and v not in action.choices:
            bad(f"one of {', '.join(map(str, action.choices))}")
        return v

    if action.nargs == 0:  # on/off flags
        if not isinstance(value, bool) and not (value is None and action.default is None):
            bad("true or false")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        value = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            bad(f"a list of {action.nargs}")
        if action.nargs == "+" and not value:
            bad("a non-empty list")
        return [one(v) for v in value]
    if value is None:
        return None
    return one(value)


def check(p, a):
    """Ranges and combinations; argparse-style errors (exit 2) before anything is built."""
    if a.size % 4 or a.size < 32:
        p.error(f"--size must be divisible by 4 and >= 32, got {a.size}")
    for name in ("batch", "steps", "n_val", "log_every", "sample_every", "val_every", "ckpt_every", "keep",
                 "nf", "n_blocks", "d_nf", "max_bad_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for name in ("lr_g", "lr_d", "lr_gamma"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if not all(0 <= b < 1 for b in a.betas):
        p.error(f"--betas must both lie in [0, 1), got {' '.join(map(str, a.betas))}")
    if any(s < 1 for s in a.lr_steps):
        p.error(f"--lr-steps milestones must be at least 1, got {' '.join(map(str, a.lr_steps))}")
    if not 0 < a.min_scale <= 1:
        p.error(f"--min-scale must lie in (0, 1], got {a.min_scale}")
    if not 0 <= a.max_bad_images <= 1:
        p.error(f"--max-bad-images is a fraction in [0, 1], got {a.max_bad_images}")
    for name in ("hole", "jitter", "workers"):
        if getattr(a, name) is not None and getattr(a, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(a, name)}")
    if a.hole is not None and not 0 < a.hole <= a.size:
        p.error(f"--hole must lie in 1..--size ({a.size}), got {a.hole}")
    if a.masks == "irregular" and not a.mask_dir:
        p.error("--masks irregular needs --mask-dir, a folder of mask PNGs")
    if a.overwrite and a.resume:
        p.error("--overwrite starts a new run and --resume continues one: pass one of them")
    if a.device != "auto":
        from ..io import device_problem

        problem = device_problem(a.device)
        if problem:
            p.error(f"--device {problem}")
    if a.compile_mode != "default" and not a.compile:
        p.error(f"--compile-mode {a.compile_mode} applies only with --compile: add --compile, or drop it")
    if a.compile:
        _check_compile(p, a)
    if a.cuda_graphs:
        _check_cuda_graphs(p, a)
    a.mask_probs = _parse_probs(p, a.mask_probs)


def _on_cpu(a):
    """Whether --device puts the run on the CPU (auto: where there is no CUDA)."""
    import torch

    return a.device.startswith("cpu") or (a.device == "auto" and not torch.cuda.is_available())


def _check_cuda_graphs(p, a):
    """What a CUDA-graph step needs (dmfn_fast/training/graphed.py), before any work."""
    if a.compile:
        p.error("--cuda-graphs and --compile both replay CUDA graphs: for graphs of the compiled step use "
                "--compile --compile-mode reduce-overhead, else drop --compile")
    if _on_cpu(a):
        p.error("--cuda-graphs needs CUDA; this run is on the CPU: drop --cuda-graphs")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("--cuda-graphs runs one process; under torchrun drop it (each rank's step stays eager)")


def _check_compile(p, a):
    """What torch.compile's Inductor needs, before any work: Triton on CUDA, a C++ compiler on a CPU, and
    CUDA for the modes that replay CUDA graphs."""
    import importlib.util
    import shutil

    on_cpu = _on_cpu(a)
    if on_cpu and a.compile_mode in ("reduce-overhead", "max-autotune"):  # torch would run without graphs
        p.error(f"--compile-mode {a.compile_mode} replays CUDA graphs, which need CUDA; this run is on the CPU: "
                "use --compile-mode default")
    if not on_cpu and importlib.util.find_spec("triton") is None:
        p.error("--compile on CUDA needs Triton (pip install triton), which is not installed; or drop --compile")
    if on_cpu and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        p.error("--compile on a CPU needs a C++ compiler (g++ or clang++; or set CXX); none was found: install "
                "one, or drop --compile")


def _parse_probs(p, s):
    if not s:
        return None
    if isinstance(s, dict):
        items = s.items()
    else:
        try:
            items = [kv.split("=") for kv in s.split(",")]
            items = [(k, v) for k, v in items]
        except ValueError:
            p.error(f"--mask-probs must look like rect=0.5,stroke=0.5, got {s!r}")
    try:
        probs = {str(k).strip(): float(v) for k, v in items}
    except (TypeError, ValueError):
        p.error(f"--mask-probs must look like rect=0.5,stroke=0.5, got {s!r}")
    if any(k not in KINDS or k == "mixed" for k in probs) or any(v < 0 for v in probs.values()) \
            or not sum(probs.values()) > 0:
        p.error(f"--mask-probs takes non-negative weights of {', '.join(k for k in KINDS if k != 'mixed')}, "
                f"got {s!r}")
    return probs
