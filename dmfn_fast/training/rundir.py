"""The output folder (--out) is the user's property: one run at a time (an OS lock), and a new run never
mixes with, or deletes, another run's files."""
import fcntl
import glob
import os
import time

# What a run writes; anything else in the folder is left alone.
RUN_FILES = ("ckpt_*.pt", "ckpt_*.pt.tmp", "log.jsonl", "log.jsonl.tmp", "config.json", "loss_curve.png",
             "samples", "tb")


class Refused(Exception):
    """The folder cannot be used as asked; the message says why and what to do."""


def lock(out_dir):
    """Take an exclusive flock on OUT/.lock, holding our PID, for as long as the returned file stays open.
    The OS drops it when the process dies (even by kill -9), so no stale lock is left behind."""
    path = os.path.join(out_dir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise Refused(f"--out {out_dir} is in use by another training run (PID {pid}); wait for it to end, "
                      "stop it, or pick another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def run_files(out_dir):
    return sorted({p for pat in RUN_FILES for p in glob.glob(os.path.join(out_dir, pat))})


def claim(out_dir, resume, overwrite):
    """Make and lock out_dir for this run. A new run (no --resume) into a folder holding another run's files
    is refused, unless `overwrite`: then they are moved into out_dir/previous-<time>/, never deleted.
    Returns the open lock file (keep it open for the run). Raises Refused."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise Refused(f"cannot write to --out {out_dir}: {e.strerror}; pick a folder you can write to") from None
    held = lock(out_dir)
    found = run_files(out_dir)
    if found and not resume:
        if not overwrite:
            held.close()
            names = ", ".join(os.path.basename(p) for p in found[:4]) + (", ..." if len(found) > 4 else "")
            raise Refused(f"--out {out_dir} holds another run ({names}). Continue it with --resume, pick another "
                          "--out, or pass --overwrite to move its files into a previous-<time> folder there")
        aside = move_aside(out_dir, found)
        print(f"--overwrite: moved the previous run's files to {aside}")
    return held


def move_aside(out_dir, paths):
    aside = os.path.join(out_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(aside):  # two moves within a second
        aside = os.path.join(out_dir, time.strftime("previous-%Y%m%d-%H%M%S") + f"-{n}")
        n += 1
    os.makedirs(aside)
    for p in paths:
        os.replace(p, os.path.join(aside, os.path.basename(p)))
    return aside
