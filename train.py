"""Train DMFN with the paper's recipe.

    python train.py --amp                      # built-in demo set, a few minutes on a CPU
    python train.py DATA --amp --vgg-weights vgg19.pth --masks rect
    torchrun --nproc_per_node=4 train.py DATA --amp --batch 4   # global batch 16

DATA is a folder of images (searched recursively) or a list file. Every flag can also come
from --config FILE (YAML or JSON, keys named like the flags). See the README, section "Training".
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dmfn_fast import training as T
from dmfn_fast.data import InpaintDataset, collate, demo_images, list_images
from dmfn_fast.losses import DMFNLoss
from dmfn_fast.masks import KINDS, MaskSource
from dmfn_fast.models import Discriminator, Generator
from dmfn_fast.vgg import HOW_TO, VGG19Features

# Paper defaults; the demo (no DATA) replaces those still unset by this CPU-sized preset.
PAPER = dict(size=256, batch=16, steps=100_000, n_val=8, min_scale=1.0, log_every=50, sample_every=500,
             val_every=1000, ckpt_every=2000, nf=64, n_blocks=8, d_nf=64)
DEMO = dict(size=64, batch=4, steps=100, n_val=4, min_scale=0.4, log_every=5, sample_every=25,
            val_every=25, ckpt_every=25, nf=32, n_blocks=4, d_nf=16)
DEMO_VAL = ("coffee", "rocket", "chelsea", "camera")  # held out from the demo's training set


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("data", nargs="?", help="image folder or list file; omit for the built-in demo set")
    a("--config", help="YAML or JSON file of options (keys as the flags, - or _)")
    a("--out", default="runs/dmfn", help="output folder: checkpoints, log, samples, curves")
    a("--val-data", help="held-out images (folder or list); default: the last --n-val images of DATA")
    a("--n-val", type=int, help="held-out images when --val-data is not given (8; demo 4)")
    a("--size", type=int, help="training size, divisible by 4 (256; demo 64)")
    a("--batch", type=int, help="batch per process; global batch = batch x processes (16; demo 4)")
    a("--steps", type=int, help="total G+D updates (100000; demo 100)")
    a("--min-scale", type=float, help="random crop side as a fraction of the short side: U(min, 1) (1.0; demo 0.4)")
    a("--lr-g", type=float, default=2e-4)
    a("--lr-d", type=float, default=2e-4)
    a("--betas", type=float, nargs=2, default=[0.5, 0.999])
    a("--lr-steps", type=int, nargs="+", default=[100_000], help="MultiStepLR milestones")
    a("--lr-gamma", type=float, default=0.5)
    a("--nf", type=int, help="generator width (64; demo 32)")
    a("--n-blocks", type=int, help="DMFB blocks (8; demo 4)")
    a("--d-nf", type=int, help="discriminator width (64; demo 16)")
    a("--masks", choices=KINDS, default="rect")
    a("--mask-dir", help="folder of mask PNGs for irregular / mixed masks")
    a("--mask-probs", help="for mixed masks, e.g. rect=0.5,stroke=0.3,irregular=0.2")
    a("--hole", type=int, help="rect hole side (size/2, 128 at 256)")
    a("--jitter", type=int, help="max px each side of a rect hole shrinks (16 at 256, scaled)")
    a("--center-mask", action="store_true", help="rect holes at the centre instead of random")
    a("--amp", action="store_true", help="CUDA: bf16 autocast (fp16 + GradScaler without bf16); CPU: bf16")
    a("--amp-dtype", choices=("auto", "bf16", "fp16"), default="auto",
      help="with --amp: auto picks as above (fp32 on a CPU without native bf16); bf16/fp16 force it")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    a("--compile", action="store_true", help="torch.compile the generator")
    a("--impl", choices=("auto", "reference", "fused"), default="auto", help="DMFB / alignment loss kernels")
    a("--seed", type=int, default=0)
    a("--deterministic", action="store_true",
      help="deterministic kernels (slower on CUDA); the DMFB then uses its PyTorch reference, since the fused "
           "kernels sum with atomics (with --impl fused this is an error)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    a("--workers", type=int, help="data loader processes per rank (CUDA: 4; CPU: 0)")
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


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.config:  # the file sets defaults; flags on the command line win
        with open(args.config) as f:
            if args.config.endswith(".json"):
                cfg = json.load(f)
            else:
                import yaml
                cfg = yaml.safe_load(f)
        cfg = {k.replace("-", "_"): v for k, v in (cfg or {}).items()}
        unknown = set(cfg) - set(vars(args)) | ({"config"} & set(cfg))
        if unknown:
            p.error(f"unknown keys in {args.config}: {', '.join(sorted(unknown))}")
        p.set_defaults(**cfg)
        args = p.parse_args(argv)
    preset = DEMO if args.data is None else PAPER
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.size % 4 or args.size < 32:
        p.error(f"--size must be divisible by 4 and >= 32, got {args.size}")
    return args


def loud_warning(msg):
    bar = "!" * 78
    print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr, flush=True)
    warnings.warn(msg)


def build_vgg(args, demo):
    if args.random_vgg:
        loud_warning("WARNING: --random-vgg: the perceptual losses use a RANDOM VGG19. "
                     "The model will not learn what the paper's model learns. Smoke tests only.")
        return VGG19Features("random")
    try:
        return VGG19Features(args.vgg_weights)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        if not (demo and args.vgg_weights == "auto"):
            raise SystemExit(f"{e}\nOr pass --random-vgg to train without them (smoke tests only).")
        loud_warning(f"WARNING: no VGG19 weights found, so this DEMO uses a RANDOM VGG19 for the perceptual "
                     f"losses: it shows the pipeline, not the paper's results. {HOW_TO}")
        return VGG19Features("random")


def make_datasets(args, masks, rank):
    if args.data is None:
        photos = demo_images()
        val_items = [x for x in photos if x[0] in DEMO_VAL][: args.n_val]
        train_items = [x for x in photos if x[0] not in DEMO_VAL]
    else:
        items = list_images(args.data)
        if args.val_data:
            train_items, val_items = items, list_images(args.val_data)[: args.n_val]
        else:
            n_val = min(args.n_val, len(items) - 1)
            train_items, val_items = items[: len(items) - n_val], items[len(items) - n_val:]
    train = InpaintDataset(train_items, args.size, masks, args.seed, rank, train=True, min_scale=args.min_scale)
    val = InpaintDataset(val_items, args.size, masks, args.seed, train=False)
    return train, val


def main(argv=None):
    args = parse_args(argv)
    demo = args.data is None

    # ---- processes and devices
    ddp = int(os.environ.get("RANK", -1)) != -1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    else:
        rank, world = 0, 1
    master = rank == 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    channels_last = cuda if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    np.random.seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif cuda:
        torch.backends.cudnn.benchmark = True
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = None
    if args.amp and args.amp_dtype != "auto":
        amp_dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    elif args.amp and cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif args.amp and T.cpu_has_bf16():
        amp_dtype = torch.bfloat16
    elif args.amp and master:
        print("note: --amp: this CPU has no native bf16 (no AVX512-BF16/AMX), where bf16 autocast is several "
              "times slower than fp32; training in fp32", file=sys.stderr)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- data
    masks = MaskSource(args.masks, args.mask_dir, _parse_probs(args.mask_probs), args.hole, args.jitter,
                       args.center_mask)
    train_set, val_set = make_datasets(args, masks, rank)
    steps_per_epoch = len(train_set) // (args.batch * world)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images is fewer than the global batch "
                         f"{args.batch} x {world}; lower --batch")
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    val_batches = [(b["image"].to(device, memory_format=memory_format), b["mask"].to(device))
                   for b in torch.utils.data.DataLoader(val_set, batch_size=min(8, args.batch), collate_fn=collate)]

    # ---- models, loss, optimizers
    torch.manual_seed(args.seed)  # the same on every rank: identical initial weights
    G = Generator(nf=args.nf, n_blocks=args.n_blocks, impl=args.impl).to(device, memory_format=memory_format)
    D = Discriminator(nf=args.d_nf).to(device, memory_format=memory_format)
    if ddp and not master:
        dist.barrier()  # rank 0 fetches the VGG weights first
    vgg = build_vgg(args, demo).to(device, memory_format=memory_format)
    if ddp and master:
        dist.barrier()
    criterion = DMFNLoss(vgg, impl=args.impl)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=tuple(args.betas))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=tuple(args.betas))
    sched_G = torch.optim.lr_scheduler.MultiStepLR(opt_G, args.lr_steps, args.lr_gamma)
    sched_D = torch.optim.lr_scheduler.MultiStepLR(opt_D, args.lr_steps, args.lr_gamma)

    step, last_val = 0, None
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    if args.resume:
        path = args.resume
        if path == "latest":
            found = T.list_checkpoints(args.out)
            if not found:
                raise SystemExit(f"--resume: no checkpoint in {args.out}")
            path = found[-1]
        ckpt = T.load_checkpoint(path)
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
        opt_G.load_state_dict(ckpt["opt_G"])
        opt_D.load_state_dict(ckpt["opt_D"])
        sched_G.load_state_dict(ckpt["sched_G"])
        sched_D.load_state_dict(ckpt["sched_D"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        T.set_rng_state(ckpt["rng"])
        step, last_val = ckpt["step"], ckpt["val"]
        if master:
            print(f"resumed from {path} at step {step}")
            log_file = os.path.join(args.out, "log.jsonl")
            if os.path.exists(log_file):  # forget what was logged after the checkpoint
                rows = [r for r in T.read_log(log_file) if r["step"] <= step]
                with open(log_file, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)

    # The generator step calls the bare D (frozen, no gradient sync); the D step calls it
    # through DDP, real and fake in one forward of the wrapper so DDP sees one pass.
    G_raw, D_raw = G, D
    D_pair = T.RealFake(D)
    if ddp:
        G = DDP(G, device_ids=[device.index] if cuda else None)
        D_pair = DDP(D_pair, device_ids=[device.index] if cuda else None)
    if args.compile:
        G = torch.compile(G)

    def checkpoint(reason=""):
        bad = T.nonfinite_params(G_raw, D_raw)
        if bad:
            print(f"NOT saving a checkpoint: non-finite weights in {bad[:3]}", file=sys.stderr)
            return None
        ckpt = {"format": T.FORMAT, "G": G_raw.state_dict(), "D": D_raw.state_dict(),
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "sched_G": sched_G.state_dict(), "sched_D": sched_D.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": step, "rng": T.rng_state(), "config": _plain(vars(args)), "val": last_val}
        path = T.save_checkpoint(args.out, step, ckpt, args.keep)
        _say(f"saved {path}{reason}")
        if os.path.exists(log_path):
            T.plot_losses(log_path, os.path.join(args.out, "loss_curve.png"))
        return path

    # ---- logging (rank 0 only)
    log_path = os.path.join(args.out, "log.jsonl")
    tb = None
    if master:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(_plain(vars(args)), f, indent=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(args.out, "tb"))
        except ImportError:
            pass
        nparams = sum(p.numel() for p in G_raw.parameters())
        print(f"{'demo set' if demo else args.data}: {len(train_set)} train / {len(val_set)} val images, "
              f"{args.size}px, batch {args.batch} x {world} process(es) = {args.batch * world}, "
              f"G {nparams / 1e6:.2f}M params, {device}, amp {amp_dtype}, {args.steps} steps")
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, disable=not master, dynamic_ncols=True, smoothing=0.1)

    def log(row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def validate_and_sample():
        nonlocal last_val
        last_val = T.validate(G_raw, val_batches, autocast())
        last_val["step"] = step
        log({"kind": "val", **last_val})
        _say("val  step {step}: PSNR {psnr:.2f} dB (hole {psnr_hole:.2f}), SSIM {ssim:.4f} (hole {ssim_hole:.4f})"
             .format(**last_val))

    def sample():
        image, mask = val_batches[0]
        out = T.inpaint_batch(G_raw, image, mask, autocast())
        T.save_grid(os.path.join(args.out, "samples", f"step_{step:07d}.png"), image, mask, out)

    # ---- the loop
    epoch, skip = divmod(step, steps_per_epoch)
    batches = _epoch_batches(train_set, args, world, rank, epoch, skip, workers, cuda)
    sums, n_sum, t0, bad_steps, bad_images = {}, 0, time.time(), 0, {}
    G.train()
    D.train()
    try:
        while step < args.steps:
            batch = next(batches, None)
            if batch is None:
                epoch += 1
                batches = _epoch_batches(train_set, args, world, rank, epoch, 0, workers, cuda)
                continue
            for path, why in batch["bad"]:
                if path not in bad_images:
                    bad_images[path] = why
                    bar.write(f"warning: skipped unreadable image {path} ({why}); {len(bad_images)} so far")
            if len(bad_images) > args.max_bad_images * len(train_set):
                raise SystemExit(f"{len(bad_images)} of {len(train_set)} images are unreadable "
                                 f"(more than --max-bad-images {args.max_bad_images}), e.g. "
                                 + "; ".join(f"{p}: {w}" for p, w in list(bad_images.items())[:3]))
            image = batch["image"].to(device, memory_format=memory_format, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            box = batch["box"]

            terms, ok = T.train_step(G, D_raw, D_pair, criterion, opt_G, opt_D, scaler, image, mask, box,
                                     autocast, lambda loss: _all_ranks_finite(loss, ddp))
            if not ok:  # the G update of a step whose D loss is non-finite stays; D's is skipped
                bad_steps += 1
                named = ", ".join(k for k, v in terms.items() if not torch.isfinite(v)) or "on another rank"
                bar.write(f"warning: step {step + 1}: non-finite loss ({named}); skipped ({bad_steps} in a row)")
                if bad_steps >= args.max_bad_steps:
                    raise SystemExit(f"stopping: {bad_steps} steps in a row with non-finite losses ({named}); "
                                     "try a lower --lr-g / --lr-d, or without --amp")
                continue
            bad_steps = 0
            sched_G.step()
            sched_D.step()
            step += 1

            vals = {k: v.item() for k, v in terms.items()}
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            n_sum += 1
            bar.update(1)
            bar.set_postfix(G=f"{vals['G']:.3f}", rec=f"{vals['rec']:.3f}", D=f"{vals['D']:.3f}", refresh=False)
            if not master:
                continue
            if step % args.log_every == 0 or step == args.steps:
                it_s = n_sum / (time.time() - t0)
                row = {"kind": "train", "step": step, **{k: v / n_sum for k, v in sums.items()},
                       "lr": sched_G.get_last_lr()[0], "it_s": it_s}
                log(row)
                bar.write(f"step {step:6d}  G {row['G']:.4f}  rec {row['rec']:.4f}  guided {row['guided']:.4f}  "
                          f"fm_vgg {row['fm_vgg']:.4f}  align {row['align']:.4f}  adv {row['adv']:.4f}  "
                          f"fm_dis {row['fm_dis']:.4f}  D {row['D']:.4f}  ({it_s:.2f} it/s)")
                sums, n_sum, t0 = {}, 0, time.time()
            if step % args.val_every == 0 or step == args.steps:
                validate_and_sample()
            if step % args.sample_every == 0 or step == args.steps:
                sample()
            if step % args.ckpt_every == 0 or step == args.steps:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if master:
            checkpoint(" (interrupted)")
        print(f"interrupted at step {step}", file=sys.stderr)
        _cleanup(ddp, tb)
        raise SystemExit(130)
    bar.close()
    _cleanup(ddp, tb)
    return {"step": step, "val": last_val, "G": G_raw, "D": D_raw}


def _epoch_batches(dataset, args, world, rank, epoch, skip, workers, cuda):
    """An iterator over one epoch's batches, the first `skip` left out (for resuming)."""
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    dataset.epoch = epoch
    idx = list(sampler)
    idx = idx[skip * args.batch: len(idx) // args.batch * args.batch]
    return iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=idx, num_workers=workers,
                                            collate_fn=collate, pin_memory=cuda, drop_last=True))


def _all_ranks_finite(loss, ddp):
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if ddp:  # every rank must take the same branch, or the next all-reduce hangs
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _parse_probs(s):
    if not s:
        return None
    if isinstance(s, dict):
        return {k: float(v) for k, v in s.items()}
    try:
        return {k.strip(): float(v) for k, v in (kv.split("=") for kv in s.split(","))}
    except ValueError:
        raise SystemExit(f"--mask-probs must look like rect=0.5,stroke=0.5, got {s!r}") from None


def _plain(d):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _say(msg):
    from tqdm import tqdm
    tqdm.write(msg)


def _cleanup(ddp, tb):
    if tb is not None:
        tb.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
