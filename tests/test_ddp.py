"""train.py under DistributedDataParallel: 2 CPU processes, gloo, tiny model, 2 steps."""
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "32", "--nf", "8", "--n-blocks", "2", "--d-nf", "4", "--random-vgg", "--seed", "0",
        "--n-val", "2", "--log-every", "1", "--batch", "2", "--steps", "2", "--val-every", "2"]


def _worker(rank, world, port, out, extra=()):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    import train

    if "--compile" in extra:  # traced, not built: Inductor's CPU build of the step takes minutes here
        compile_ = torch.compile
        torch.compile = lambda m, mode=None: compile_(m, backend="aot_eager")
    result = train.main(TINY + list(extra) + ["--out", out])
    torch.save({"G": result["G"].state_dict(), "D": dict(result["D"].named_parameters()),
                "step": result["step"]}, os.path.join(out, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 2
    sys.path.insert(0, ROOT)
    from dmfn_fast.training import checkpoint as C, report as R
    from dmfn_fast.models import Generator

    torch.manual_seed(0)  # as train.py, right before it builds G
    init = Generator(nf=8, n_blocks=2)
    moved = False
    for part in ("G", "D"):
        for k, v in r0[part].items():
            assert torch.isfinite(v).all(), f"{part}.{k}"
            assert torch.equal(v, r1[part][k]), f"{part}.{k} differs between ranks"
    for k, v in init.state_dict().items():
        assert v.shape == r0["G"][k].shape
        moved |= not torch.equal(v, r0["G"][k])
    assert moved  # trained, not merely broadcast
    # rank 0 alone writes: one log, losses finite, one checkpoint
    rows = [r for r in R.read_log(tmp_path / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["G"], r["D"]])).all() for r in rows)
    assert [os.path.basename(p) for p in C.list_checkpoints(tmp_path)] == ["ckpt_0000002.pt"]


def test_ddp_with_compile_trains_as_without(tmp_path):
    """--compile under DDP (G and the real+fake pair compiled through their DDP wrappers, the bare D and the loss
    compiled beside them), traced by aot_eager: the ranks agree and end where the eager DDP run ends."""
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        out = tmp_path / name
        mp.spawn(_worker, args=(2, _free_port(), str(out), extra), nprocs=2, join=True)
        runs[name] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    (e0, _), (c0, c1) = runs["eager"], runs["compiled"]
    assert c0["step"] == c1["step"] == 2
    for part in ("G", "D"):
        for k, v in c0[part].items():
            assert torch.equal(v, c1[part][k]), f"{part}.{k} differs between ranks"
            torch.testing.assert_close(v, e0[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}: compiled vs eager")


def _sigterm_worker(rank, world, port, out):
    """Rank 1 alone gets SIGTERM during its step 2; records how each rank ended."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    import signal

    import train
    from dmfn_fast.losses import DMFNLoss

    calls, real_forward = [], DMFNLoss.forward

    def forward(self, *a, **k):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, *a, **k)

    DMFNLoss.forward = forward
    flags = TINY + ["--steps", "20", "--val-every", "100", "--ckpt-every", "100"]  # the last --steps wins
    try:
        train.main(flags + ["--out", out])
        code = 0
    except SystemExit as e:
        code = e.code
    with open(os.path.join(out, f"rank{rank}.code"), "w") as f:
        f.write(f"{code} {len(calls)}")


def test_ddp_sigterm_stops_every_rank_after_the_same_step(tmp_path):
    mp.spawn(_sigterm_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ends = [(tmp_path / f"rank{r}.code").read_text().split() for r in (0, 1)]
    assert ends == [["143", "2"], ["143", "2"]]  # both stopped after step 2, with the SIGTERM code
    from dmfn_fast.training import checkpoint as C

    assert [os.path.basename(p) for p in C.list_checkpoints(tmp_path)] == ["ckpt_0000002.pt"]  # rank 0 saved
