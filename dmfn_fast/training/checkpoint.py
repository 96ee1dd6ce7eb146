"""Checkpoints: the format, atomic saving with rotation, RNG state, and the whole resume logic (what goes
into a checkpoint and how a run is restored from it)."""
import errno
import glob
import os
import random
import re
import shutil
import sys

import numpy as np
import torch

from ..models import TRAIN_FORMAT as FORMAT
from ..models import nonfinite_keys

CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A checkpoint did not fit on the disk; the message says where and how much space it needs."""


# ---- RNG state (weights_only-loadable: tensors, lists, ints) -------------------------

def rng_state():
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], torch.tensor(py_state[1], dtype=torch.int64), py_state[2]],
    }


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))


# ---- what a checkpoint holds ------------------------------------------------------

def make(parts, step, config, val):
    """The checkpoint dict of a run (`parts`: build.Parts) after `step` updates."""
    return {"format": FORMAT, "G": parts.G.state_dict(), "D": parts.D.state_dict(),
            "opt_G": parts.opt_G.state_dict(), "opt_D": parts.opt_D.state_dict(),
            "sched_G": parts.sched_G.state_dict(), "sched_D": parts.sched_D.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
            "step": step, "rng": rng_state(), "config": config, "val": val}


def restore(parts, ckpt):
    """Load a checkpoint dict into `parts` and the RNGs. Returns (step, last validation)."""
    parts.G.load_state_dict(ckpt["G"])
    parts.D.load_state_dict(ckpt["D"])
    parts.opt_G.load_state_dict(ckpt["opt_G"])
    parts.opt_D.load_state_dict(ckpt["opt_D"])
    parts.sched_G.load_state_dict(ckpt["sched_G"])
    parts.sched_D.load_state_dict(ckpt["sched_D"])
    if ckpt["scaler"] is not None:
        parts.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["val"]


def save(out_dir, parts, step, config, val, keep):
    """Save the run at `step` (see save_checkpoint), never from non-finite weights. Returns what to print."""
    bad = nonfinite_params(parts.G, parts.D)
    if bad:
        return f"NOT saving a checkpoint: non-finite weights in {bad[:3]}"
    return f"saved {save_checkpoint(out_dir, step, make(parts, step, config, val), keep)}"


def nonfinite_params(*modules):
    """Names of parameters or buffers holding NaN/Inf, as "module index:key"."""
    return [f"{i}:{k}" for i, m in enumerate(modules) for k in nonfinite_keys(m.state_dict())]


# ---- files ------------------------------------------------------------------------

def path_for(out_dir, step):
    return os.path.join(out_dir, f"ckpt_{step:07d}.pt")


def step_of(path):
    return int(CKPT_RE.search(path).group(1))


def list_checkpoints(out_dir):
    """Checkpoints in out_dir, oldest first."""
    paths = [p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt")) if CKPT_RE.search(p)]
    return sorted(paths, key=step_of)


def save_checkpoint(out_dir, step, ckpt, keep=3):
    """Write out_dir/ckpt_<step>.pt atomically (temp file, fsync, os.replace), then remove all but the newest
    `keep` at or before this step. A full disk raises DiskFull after removing the temp file, so every earlier
    checkpoint stays as it was. Returns the path."""
    path = path_for(out_dir, step)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # the rename below must not publish a file whose bytes are still in flight
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(e):
            need, free = _nbytes(ckpt), shutil.disk_usage(out_dir).free
            raise DiskFull(errno.ENOSPC, f"no space left in {os.path.abspath(out_dir)} for checkpoint "
                           f"{os.path.basename(path)}: it needs about {_mb(need)}, {_mb(free)} free. The earlier "
                           "checkpoints are intact; free some space, then continue with --resume") from None
        raise
    mine = [p for p in list_checkpoints(out_dir) if step_of(p) <= step]
    for old in mine[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def disk_full(e):
    """Whether an error (or its cause: torch.save wraps write errors) is a full disk or quota."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        e = e.__cause__ or e.__context__
    return False


def _nbytes(obj):
    """Bytes of the tensors in a nested checkpoint dict (about its file size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _mb(n):
    return f"{n / 2**20:.1f} MiB"


def load_checkpoint(path, mmap=False):
    """The checkpoint dict at `path`. mmap=True maps the tensors instead of reading them (a cheap look at
    its config)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dmfn-fast training checkpoint (format {FORMAT!r}); "
                         "a bare generator state dict (latest_G.pth) is for inference, not --resume")
    return ckpt


# ---- resuming ---------------------------------------------------------------------

def find_resume(spec, out_dir):
    """The checkpoint --resume names: a path, or "latest" (the newest in out_dir). Raises FileNotFoundError
    with what to do, before anything is built."""
    if spec == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint (ckpt_*.pt) in {out_dir}; pass --resume PATH, "
                                    "or start a new run without --resume")
        return found[-1]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--resume: checkpoint not found: {spec}")
    return spec


def check_resumable(ckpt, path, recipe):
    """Refuse to continue a run under another recipe (its losses, masks and schedule would change midway).
    Checkpoints from before recipes existed name none: they continue under `recipe`, with a note."""
    theirs = (ckpt.get("config") or {}).get("recipe")
    if theirs is None:
        print(f"note: {path} predates --recipe; continuing it under --recipe {recipe}", file=sys.stderr)
    elif theirs != recipe:
        raise ValueError(f"--resume: {path} was trained with --recipe {theirs}, not {recipe}; pass --recipe "
                         f"{theirs} to continue it, or start a new run")


def resume(path, parts, out_dir, master):
    """Restore a run from the checkpoint at `path` into `parts` (G, D, optimizers, schedulers, scaler, RNGs).
    On rank 0, also make out_dir continue from there: partial temp files of a killed save are removed, and
    the checkpoints and log rows after that step (another timeline) are moved to out_dir/previous-<time>/,
    never deleted. Returns (step, last validation)."""
    from . import report, rundir

    ckpt = load_checkpoint(path)
    step, val = restore(parts, ckpt)
    if master:
        for tmp in glob.glob(os.path.join(out_dir, "ckpt_*.pt.tmp")):
            os.remove(tmp)  # the partial write of a killed run: never a valid checkpoint
        later = [p for p in list_checkpoints(out_dir) if step_of(p) > step]
        log_path = os.path.join(out_dir, "log.jsonl")
        rows = report.read_log(log_path) if os.path.exists(log_path) else []
        if later or any(r.get("step", 0) > step for r in rows):
            aside = rundir.move_aside(out_dir, later)
            if os.path.exists(log_path):
                shutil.copy2(log_path, os.path.join(aside, "log.jsonl"))
            print(f"resuming at step {step}: the later checkpoints and log rows went to {aside}", file=sys.stderr)
        if os.path.exists(log_path):  # rewritten even when nothing is dropped: a cut-off last line goes
            report.rewrite_log(log_path, [r for r in rows if r.get("step", 0) <= step])
    return step, val
