"""train.py when things go wrong, on the tiny demo run of test_train.py: the run folder belongs to the user
(lock, refusal, --overwrite), kill -9 mid-save, a full disk, a cut-off log line, SIGTERM, bad flags."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from dmfn_fast.losses import DMFNLoss  # noqa: E402
from dmfn_fast.training import build, checkpoint as C, report as R, rundir  # noqa: E402

TINY = ["--size", "32", "--nf", "8", "--n-blocks", "2", "--d-nf", "4", "--random-vgg", "--seed", "0",
        "--n-val", "2", "--log-every", "1", "--val-every", "100", "--sample-every", "100"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, *args):
    return train.main(TINY + ["--out", str(out)] + [str(a) for a in args])


def names(folder):
    return sorted(os.path.basename(p) for p in C.list_checkpoints(folder))


def train_steps(log):
    return [r["step"] for r in R.read_log(log) if r["kind"] == "train"]


def refused(capsys, out, *args):
    """Run, expecting an argparse-style refusal (exit 2); returns its message."""
    with pytest.raises(SystemExit) as e:
        run(out, *args)
    assert e.value.code == 2
    return capsys.readouterr().err


def assert_same_state(a, b):
    for part in ("G", "D"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs"
    for part in ("opt_G", "opt_D"):
        for i, s in a[part]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, b[part]["state"][i][k]), f"{part} state {i}.{k}"
    assert a["step"] == b["step"] and a["sched_G"] == b["sched_G"]


# ---- bad flags: refused before anything is built ---------------------------------------------------

BAD = {
    "--batch 0": ["--batch", "0"],
    "--log-every 0": ["--log-every", "0"],
    "--ckpt-every -1": ["--ckpt-every", "-1"],
    "--val-every 0": ["--val-every", "0"],
    "--n-val 0": ["--n-val", "0"],
    "--steps -5": ["--steps", "-5"],
    "--keep 0": ["--keep", "0"],
    "--lr-g=-1e-4": ["--lr-g=-1e-4"],
    "--lr-d 0": ["--lr-d", "0"],
    "--betas 0.5 1.0": ["--betas", "0.5", "1.0"],
    "--betas -0.1 0.9": ["--betas", "-0.1", "0.9"],
    "--mask-probs": ["--masks", "mixed", "--mask-probs", "rect=half"],
    "--device bogus": ["--device", "bogus"],
    "--device cuda:64": ["--device", "cuda:64"],  # no such GPU here, with or without CUDA
}


@pytest.fixture
def no_build(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(build, "training", fail)
    monkeypatch.setattr(build, "runtime", fail)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_flag_refused_before_work(tmp_path, capsys, no_build, name):
    err = refused(capsys, tmp_path / "out", *BAD[name])
    assert f"train.py: error: {name.split()[0].split('=')[0]}" in err, err  # names the flag
    assert not (tmp_path / "out").exists()


CONFIGS = {
    "string for an int": ("batch: four\n", "batch"),
    "float for an int": ("batch: 4.5\n", "batch"),
    "bool for an int": ("steps: true\n", "steps"),
    "one beta": ("betas: 0.5\n", "betas"),
    "string for a flag": ("amp: 'yes'\n", "amp"),
    "list for a path": ("out: [a, b]\n", "out"),
    "not a mapping": ("- batch\n- 4\n", "mapping"),
    "bad choice": ("masks: circles\n", "masks"),
    "range from the file": ("keep: 0\n", "--keep"),
    "unknown key": ("bacth: 4\n", "bacth"),
    "not yaml": ("batch: [4\n", "does not parse"),
}


@pytest.mark.parametrize("text,named", list(CONFIGS.values()), ids=list(CONFIGS))
def test_bad_config_refused_before_work(tmp_path, capsys, no_build, text, named):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    err = refused(capsys, tmp_path / "out", "--config", cfg)
    assert named in err, err


def test_missing_config_unwritable_out_and_nothing_to_resume(tmp_path, capsys, no_build):
    assert "No such file" in refused(capsys, tmp_path / "out", "--config", tmp_path / "nope.yaml")
    (tmp_path / "file").write_text("x")
    assert "cannot write to --out" in refused(capsys, tmp_path / "file" / "out")
    assert "no checkpoint" in refused(capsys, tmp_path / "empty", "--resume")
    assert "checkpoint not found" in refused(capsys, tmp_path / "empty", "--resume", tmp_path / "x.pt")


# ---- the run folder ---------------------------------------------------------------------------------

def test_new_run_into_used_folder_refused_then_overwrite_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "out"
    run(out, "--batch", 5, "--steps", 3, "--ckpt-every", 1, "--keep", 5)
    before = {n: (out / n).read_bytes() for n in names(out) + ["log.jsonl"]}
    err = refused(capsys, out, "--batch", 5, "--steps", 2, "--ckpt-every", 1)
    assert "holds another run" in err and "--overwrite" in err and "--resume" in err
    assert {n: (out / n).read_bytes() for n in before} == before  # untouched

    # the old run's higher-numbered checkpoints used to make rotation delete the new ones
    run(out, "--batch", 5, "--steps", 2, "--ckpt-every", 1, "--keep", 1, "--overwrite")
    assert names(out) == ["ckpt_0000002.pt"]
    assert train_steps(out / "log.jsonl") == [1, 2]
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert {n: (aside / n).read_bytes() for n in before} == before  # kept, byte for byte
    assert (aside / "config.json").exists() and (aside / "samples").is_dir()


def test_locked_folder_refused_naming_the_pid(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dmfn_fast.training import rundir; "
         "f = rundir.lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = refused(capsys, out, "--steps", 1)
        assert f"in use by another training run (PID {holder.pid})" in err, err
    finally:
        holder.kill()  # kill -9: the OS drops the lock with the process
        holder.wait()
    rundir.lock(str(out)).close()  # no stale lock


# ---- crashes ------------------------------------------------------------------------------------------

KILL_DURING_SECOND_SAVE = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    import train
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # the second checkpoint: half its bytes reach the disk, then kill -9
        calls.append(1)
        if len(calls) == 2:
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    torch.save = save
    train.main(sys.argv[1:])
""")


def test_kill9_during_checkpoint_write_then_resume_is_exact(tmp_path):
    # batch 5 of 16 photos: 3 steps an epoch, so the resumed run skips 2 batches and crosses an epoch
    flags = ["--batch", 5, "--steps", 4, "--ckpt-every", 2]
    run(tmp_path / "straight", *flags)
    out = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE.format(root=ROOT)]
                       + TINY + ["--out", str(out)] + [str(a) for a in flags], cwd=ROOT, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert names(out) == ["ckpt_0000002.pt"] and (out / "ckpt_0000004.pt.tmp").exists()

    run(out, *flags, "--resume")
    assert names(out) == ["ckpt_0000002.pt", "ckpt_0000004.pt"] and not (out / "ckpt_0000004.pt.tmp").exists()
    assert_same_state(torch.load(tmp_path / "straight" / "ckpt_0000004.pt", weights_only=True),
                      torch.load(out / "ckpt_0000004.pt", weights_only=True))
    # the killed run had logged steps 3 and 4: logged once each after the resume, the old rows kept aside
    assert train_steps(out / "log.jsonl") == [1, 2, 3, 4]
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert train_steps(aside / "log.jsonl") == [1, 2, 3, 4]


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as on a disk that fills up."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_keeps_earlier_checkpoints_and_resume_works(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def open_(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return FullDisk(f, 4096) if str(path).endswith("ckpt_0000003.pt.tmp") else f

    monkeypatch.setattr(C, "open", open_, raising=False)
    with pytest.raises(SystemExit) as e:
        run(out, "--batch", 2, "--steps", 4, "--ckpt-every", 1, "--keep", 5)
    msg = str(e.value.code)
    assert f"no space left in {out}" in msg and "ckpt_0000003.pt: it needs about" in msg and "--resume" in msg
    assert names(out) == ["ckpt_0000001.pt", "ckpt_0000002.pt"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    for p in C.list_checkpoints(out):
        C.load_checkpoint(p)  # intact

    monkeypatch.undo()  # space freed
    assert run(out, "--batch", 2, "--steps", 4, "--ckpt-every", 1, "--keep", 5, "--resume")["step"] == 4
    assert names(out)[-1] == "ckpt_0000004.pt"


def test_cut_off_log_line_is_dropped_on_resume(tmp_path):
    out = tmp_path / "out"
    run(out, "--batch", 2, "--steps", 2, "--ckpt-every", 1)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "G": 1.2')  # the crash cut the last line
    with pytest.warns(UserWarning, match=r"line 4 is not valid JSON \(cut off by a crash"):
        run(out, "--batch", 2, "--steps", 3, "--ckpt-every", 1, "--resume")
    assert train_steps(out / "log.jsonl") == [1, 2, 3]
    assert [r["step"] for r in R.read_log(out / "log.jsonl") if r["kind"] == "val"] == [2, 3]


def test_sigterm_saves_and_exits_143(tmp_path, monkeypatch):
    calls, real_forward = [], DMFNLoss.forward

    def forward(self, *a, **k):  # SIGTERM arrives during step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, *a, **k)

    monkeypatch.setattr(DMFNLoss, "forward", forward)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--batch", 2, "--steps", 10, "--ckpt-every", 100)
    assert e.value.code == 143
    assert names(tmp_path) == ["ckpt_0000003.pt"]  # the step under way finished, then saved
    assert train_steps(tmp_path / "log.jsonl") == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is previous
