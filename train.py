"""Train DMFN with the paper's recipe.

    python train.py --amp                      # built-in demo set, a few minutes on a CPU
    python train.py DATA --amp --vgg-weights vgg19.pth --masks rect
    torchrun --nproc_per_node=4 train.py DATA --amp --batch 4   # global batch 16

DATA is a folder of images (searched recursively) or a list file. Every flag can also come
from --config FILE (YAML or JSON, keys named like the flags). See the README, section "Training".
Exit status: 0 done; 1 stopped by a problem during training (message says which); 2 refused before
any work (a bad flag or config, --out in use or holding another run); 130 Ctrl-C; 143 SIGTERM
(both save a checkpoint first).
"""
import gc
import json
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

try:  # importing dmfn_fast refuses a bad DMFN_* environment switch: exit 2, as for a bad flag, before any work
    from dmfn_fast.training import build, checkpoint, config, report, rundir
    from dmfn_fast.training.graphed import GraphedStep
    from dmfn_fast.training.step import RealFake, train_step
except ValueError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    return config.parse_args(argv, description=__doc__)


def main(argv=None):
    args = parse_args(argv)
    lock = None
    try:
        try:  # refuse a busy or foreign --out, or a missing checkpoint, before anything is built
            if int(os.environ.get("RANK", 0)) == 0:
                lock = rundir.claim(args.out, args.resume, args.overwrite)
            resume_from = checkpoint.find_resume(args.resume, args.out) if args.resume else None
            if resume_from:  # refuse early; mapped, not read: train() loads the tensors
                checkpoint.check_resumable(checkpoint.load_checkpoint(resume_from, mmap=True), resume_from,
                                           args.recipe)
        except (rundir.Refused, FileNotFoundError, ValueError) as e:
            config.build_parser().error(str(e))
        return train(args, resume_from)
    finally:
        if lock is not None:
            lock.close()


def train(args, resume_from=None):
    # ---- build: processes, data, models, optimizers, loss
    rt = build.runtime(args)
    autocast = build.autocast(rt.device.type, rt.amp_dtype)
    train_set, val_set = build.datasets(args, rt.rank)
    steps_per_epoch = len(train_set) // (args.batch * rt.world)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images is fewer than the global batch "
                         f"{args.batch} x {rt.world}; lower --batch")
    workers = args.workers if args.workers is not None else build.default_workers(rt.cuda, rt.world)
    val_batches = build.val_batches(val_set, args.batch, rt.device, rt.memory_format)
    parts, criterion = build.training(args, rt)
    step, last_val = 0, None
    if resume_from:
        step, last_val = checkpoint.resume(resume_from, parts, args.out, rt.master)
        if rt.master:
            print(f"resumed from {resume_from} at step {step}")

    # The generator step calls the bare D (frozen, no gradient sync); the D step calls it
    # through DDP, real and fake in one forward of the wrapper so DDP sees one pass.
    G, D_pair = parts.G, RealFake(parts.D)
    if rt.ddp:
        G = DDP(G, device_ids=[rt.device.index] if rt.cuda else None)
        D_pair = DDP(D_pair, device_ids=[rt.device.index] if rt.cuda else None)
    D = parts.D
    if args.compile:  # every module of the step; the bare parts stay eager for validation and checkpoints
        G, D, D_pair, criterion = (torch.compile(m, mode=args.compile_mode) for m in (G, D, D_pair, criterion))
    graphs = args.compile and args.compile_mode in ("reduce-overhead", "max-autotune")
    step_fn = None  # --cuda-graphs: the whole step as one CUDA graph replay after 3 eager steps
    if args.cuda_graphs:
        step_fn = GraphedStep(G, D, D_pair, criterion, parts.opt_G, parts.opt_D, parts.scaler, rt.amp_dtype)
    if args.compile and rt.master:
        print(f"--compile ({args.compile_mode}): the first steps compile G, D and the loss, which takes a minute "
              "or more (minutes on a CPU); the steps after run the compiled graphs", file=sys.stderr)

    # ---- reporting (rank 0 writes)
    config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    log = None
    if rt.master:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=1)
        log = report.Log(args.out)
        nparams = sum(p.numel() for p in parts.G.parameters())
        print(f"{args.data or 'demo set'}: {len(train_set)} train / {len(val_set)} val images, {args.size}px, "
              f"batch {args.batch} x {rt.world} process(es) = {args.batch * rt.world}, G {nparams / 1e6:.2f}M "
              f"params, {rt.device}, amp {rt.amp_dtype}, {args.steps} steps")
    bar = tqdm(total=args.steps, initial=step, disable=not rt.master, dynamic_ncols=True, smoothing=0.1)

    # ---- the loop
    batches = build.train_batches(train_set, args.batch, args.seed, rt.world, rt.rank, step, workers, rt.cuda)
    sums, n_sum, t0, bad_steps, bad_images = None, 0, time.time(), 0, {}
    sigterm, code = build.StopOnSigterm(), 0
    G.train()
    parts.D.train()
    try:
        while step < args.steps:
            batch = next(batches)
            for path, why in batch["bad"]:
                if path not in bad_images:
                    bad_images[path] = why
                    bar.write(f"warning: skipped unreadable image {path} ({why}); {len(bad_images)} so far")
            if len(bad_images) > args.max_bad_images * len(train_set):
                raise SystemExit(f"{len(bad_images)} of {len(train_set)} images are unreadable (more than "
                                 f"--max-bad-images {args.max_bad_images}), e.g. "
                                 + "; ".join(f"{p}: {w}" for p, w in list(bad_images.items())[:3]))
            image = batch["image"].to(rt.device, memory_format=rt.memory_format, non_blocking=True)
            mask = batch["mask"].to(rt.device, non_blocking=True)

            if graphs:  # CUDA graph trees: a new step, whose replays may reuse the last step's output memory
                torch.compiler.cudagraph_mark_step_begin()
            if step_fn is not None:
                terms, ok = step_fn(image, mask, batch["box"])
            else:
                terms, ok = train_step(G, D, D_pair, criterion, parts.opt_G, parts.opt_D, parts.scaler, image,
                                       mask, batch["box"], autocast, lambda loss: build.all_ranks_finite(loss, rt.ddp))
            if not ok:  # the G update of a step whose D loss is non-finite stays; D's is skipped
                bad_steps += 1
                named = ", ".join(k for k, v in terms.items() if not torch.isfinite(v)) or "on another rank"
                bar.write(f"warning: step {step + 1}: non-finite loss ({named}); skipped ({bad_steps} in a row)")
                if bad_steps >= args.max_bad_steps:
                    raise SystemExit(f"stopping: {bad_steps} steps in a row with non-finite losses ({named}); "
                                     "try a lower --lr-g / --lr-d, or without --amp")
                continue
            bad_steps = 0
            lr = parts.opt_G.param_groups[0]["lr"]  # the rate this update used
            parts.sched_G.step()
            parts.sched_D.step()
            step += 1

            # The terms stay on the device until a log line: reading them each step would make the host wait
            # for the step's last kernels before it may issue the next step's.
            names = tuple(terms)
            sums = torch.stack([terms[k] for k in names]) + (sums if n_sum else 0)
            n_sum += 1
            bar.update(1)
            stop = sigterm.now(rt.ddp)  # every rank agrees, so all stop after this same step
            last = step == args.steps or stop
            if rt.master and (step % args.log_every == 0 or last):
                row = {"kind": "train", "step": step, **dict(zip(names, (sums / n_sum).tolist())),
                       "lr": lr, "it_s": n_sum / (time.time() - t0)}
                log.write(row)
                bar.write(report.train_line(row))
                bar.set_postfix(G=f"{row['G']:.3f}", rec=f"{row['rec']:.3f}", D=f"{row['D']:.3f}", refresh=False)
                sums, n_sum, t0 = None, 0, time.time()
            if rt.master and (step % args.val_every == 0 or step == args.steps):
                last_val = {**report.validate(parts.G, val_batches, autocast()), "step": step}
                log.write({"kind": "val", **last_val})
                bar.write(report.val_line(last_val))
            if rt.master and (step % args.sample_every == 0 or step == args.steps):
                image, mask = val_batches[0]
                out = report.inpaint_batch(parts.G, image, mask, autocast())
                report.save_grid(os.path.join(args.out, "samples", f"step_{step:07d}.png"), image, mask, out)
            if rt.master and (step % args.ckpt_every == 0 or last):
                bar.write(checkpoint.save(args.out, parts, step, config_dict, last_val, args.keep))
                report.plot_losses(log.path, os.path.join(args.out, "loss_curve.png"))
            if stop:
                bar.write(f"stopped by SIGTERM at step {step}")
                code = 143
                break
    except KeyboardInterrupt:
        if rt.master:
            bar.write(checkpoint.save(args.out, parts, step, config_dict, last_val, args.keep) + " (interrupted)")
            report.plot_losses(log.path, os.path.join(args.out, "loss_curve.png"))
        print(f"interrupted at step {step}", file=sys.stderr)
        code = 130
    except OSError as e:  # a full disk: a checkpoint (DiskFull says how much it needs), the log or a sample
        if not checkpoint.disk_full(e):
            raise
        code = f"stopping: {e.strerror if isinstance(e, checkpoint.DiskFull) else f'no space left in {args.out}: {e}'}"
    finally:
        bar.close()
        sigterm.close()
        batches = None  # noqa: F841  (its loader's workers end here, not at exit)
        if log is not None:
            log.close()
        if rt.ddp:
            # The DDP wrappers' reducers hold the process group. Freed after the group is destroyed, they drop
            # its last reference inside their dealloc, with the GIL held, while gloo's threads may still need
            # the GIL to release the last collective's tensors: a deadlock (seen once in CI). Free them first.
            G = D_pair = None  # noqa: F841
            gc.collect()
            torch.distributed.destroy_process_group()
    if code:
        raise SystemExit(code)
    return {"step": step, "val": last_val, "G": parts.G, "D": parts.D}


if __name__ == "__main__":
    main()
