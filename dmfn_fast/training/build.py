"""Everything a run needs, from the parsed flags: processes and devices, models, optimizers, schedulers,
grad scaler, VGG, criterion and data. benchmarks/e2e_common.py builds through the same functions."""
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from ..data import InpaintDataset, collate, demo_images, list_images
from ..losses import DMFNLoss
from ..masks import MaskSource
from ..models import Discriminator, Generator
from ..vgg import HOW_TO, VGG19Features

DEMO_VAL = ("coffee", "rocket", "chelsea", "camera")  # held out from the demo's training set


# ---- processes, devices, precision, signals -------------------------------------------

def cpu_has_bf16():
    """Native bf16 on this CPU (AVX512-BF16/AMX); without it bf16 autocast is several times slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def runtime(args):
    """Join the process group under torchrun (RANK set), pick the device, memory format and autocast dtype,
    and seed. Returns a namespace: ddp, rank, world, master, device, cuda, memory_format, amp_dtype."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = 0, 1
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    device = torch.device(device)
    cuda = device.type == "cuda"
    channels_last = cuda if args.channels_last is None else args.channels_last
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
    elif args.amp and cpu_has_bf16():
        amp_dtype = torch.bfloat16
    elif args.amp and rank == 0:
        print("note: --amp: this CPU has no native bf16 (no AVX512-BF16/AMX), where bf16 autocast is several "
              "times slower than fp32; training in fp32", file=sys.stderr)
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, device=device, cuda=cuda,
                           memory_format=torch.channels_last if channels_last else torch.contiguous_format,
                           amp_dtype=amp_dtype)


def autocast(device_type, dtype, cache_enabled=True):
    """A factory of autocast contexts (None: off); cache_enabled=False for a CUDA graph capture."""
    return lambda: torch.autocast(device_type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache_enabled)


def all_ranks_finite(loss, ddp):
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if ddp:  # every rank must take the same branch, or the next all-reduce hangs
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


class StopOnSigterm:
    """SIGTERM (a scheduler, `kill`, torchrun passing it on) asks the run to stop after the current step.
    Under DDP every rank agrees on it once per step, so all ranks stop after the same step."""

    def __init__(self):
        self.asked = False
        self.previous = signal.signal(signal.SIGTERM, self._ask)

    def _ask(self, signum, frame):
        self.asked = True

    def now(self, ddp):
        flag = torch.tensor([float(self.asked)])
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self):
        signal.signal(signal.SIGTERM, self.previous)


# ---- models, optimizers, loss -------------------------------------------------------

@dataclass
class Parts:
    """What a checkpoint holds besides the step, RNGs and config: the bare (unwrapped) models and their
    optimizers, schedulers and grad scaler."""
    G: torch.nn.Module
    D: torch.nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sched_G: torch.optim.lr_scheduler.LRScheduler
    sched_D: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def generator(nf, n_blocks, impl, device, memory_format, seed):
    torch.manual_seed(seed)  # the same on every rank: identical initial weights
    return Generator(nf=nf, n_blocks=n_blocks, impl=impl).to(device, memory_format=memory_format)


def models(nf, n_blocks, d_nf, impl, device, memory_format, seed):
    G = generator(nf, n_blocks, impl, device, memory_format, seed)
    return G, Discriminator(nf=d_nf, impl=impl).to(device, memory_format=memory_format)


def optimizers(G, D, lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999), lr_steps=(100_000,), lr_gamma=0.5,
               device_type="cpu", amp_dtype=None, fused=None):
    """Adam for both, MultiStepLR for both, and the GradScaler (on only for fp16). Returns Parts.

    The decay follows the authors' order under both recipes: they step the schedulers before each
    update, so update number m (counting from 1) is the first at the decayed rate. Stepping after each
    update, as here, with every milestone one earlier is the same schedule.

    On CUDA, Adam is torch's fused kernel: the same update in one launch per step instead of the foreach
    path's dozens (the step is host-bound), and GradScaler then unscales and skips inside it, without
    reading found_inf on the host. Its state dict is the foreach one's, so checkpoints move either way.
    fused=True asks for it elsewhere too (a CUDA-graph step's tests on the CPU)."""
    if fused is None:
        fused = device_type == "cuda" or None  # None: torch's default (foreach) elsewhere
    opt_G = torch.optim.Adam(G.parameters(), lr=lr_g, betas=tuple(betas), fused=fused)
    opt_D = torch.optim.Adam(D.parameters(), lr=lr_d, betas=tuple(betas), fused=fused)
    milestones = [m - 1 for m in lr_steps]
    return Parts(G, D, opt_G, opt_D,
                 torch.optim.lr_scheduler.MultiStepLR(opt_G, milestones, lr_gamma),
                 torch.optim.lr_scheduler.MultiStepLR(opt_D, milestones, lr_gamma),
                 torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16))


def loud_warning(msg):
    bar = "!" * 78
    print(f"\n{bar}\n{msg}\n{bar}\n", file=sys.stderr, flush=True)
    warnings.warn(msg)


def vgg(weights="auto", random=False, demo=False, quiet=False, recipe="paper"):
    """VGG19 features for the perceptual losses. Random only with --random-vgg, or in the demo when no
    weights are found (loudly); real data without weights stops with how to supply them. `quiet`: a random
    VGG without the warning (benchmarks, where the weights do not matter)."""
    if random and quiet:
        return VGG19Features("random", recipe=recipe)
    if random:
        loud_warning("WARNING: --random-vgg: the perceptual losses use a RANDOM VGG19. "
                     "The model will not learn what the paper's model learns. Smoke tests only.")
        return VGG19Features("random", recipe=recipe)
    try:
        return VGG19Features(weights, recipe=recipe)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        if not (demo and weights == "auto"):
            raise SystemExit(f"{e}\nOr pass --random-vgg to train without them (smoke tests only).")
        loud_warning(f"WARNING: no VGG19 weights found, so this DEMO uses a RANDOM VGG19 for the perceptual "
                     f"losses: it shows the pipeline, not the paper's results. {HOW_TO}")
        return VGG19Features("random", recipe=recipe)


def criterion(vgg_features, impl, recipe="paper"):
    return DMFNLoss(vgg_features, impl=impl, recipe=recipe)


def training(args, rt):
    """Parts and criterion of a run from the flags, on rt's device (rt: runtime())."""
    G, D = models(args.nf, args.n_blocks, args.d_nf, args.impl, rt.device, rt.memory_format, args.seed)
    if rt.ddp and not rt.master:
        dist.barrier()  # rank 0 fetches the VGG weights first
    features = vgg(args.vgg_weights, args.random_vgg, demo=args.data is None, recipe=args.recipe)
    features = features.to(rt.device, memory_format=rt.memory_format)
    if rt.ddp and rt.master:
        dist.barrier()
    parts = optimizers(G, D, args.lr_g, args.lr_d, args.betas, args.lr_steps, args.lr_gamma, rt.device.type,
                       rt.amp_dtype)
    return parts, criterion(features, args.impl, args.recipe)


# ---- data -------------------------------------------------------------------------

def datasets(args, rank):
    """(train, val) InpaintDatasets: the demo photos, or DATA with its last --n-val held out (or --val-data)."""
    masks = MaskSource(args.masks, args.mask_dir, args.mask_probs, args.hole, args.jitter, args.center_mask,
                       invert=args.invert_masks, recipe=args.recipe)
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
    train = InpaintDataset(train_items, args.size, masks, args.seed, rank, train=True, min_scale=args.min_scale,
                           flip=args.hflip)
    val = InpaintDataset(val_items, args.size, masks, args.seed, train=False)
    return train, val


def val_batches(val_set, batch, device, memory_format):
    """The held-out set on the device, once: (image, mask) batches of at most 8."""
    loader = torch.utils.data.DataLoader(val_set, batch_size=min(8, batch), collate_fn=collate)
    return [(b["image"].to(device, memory_format=memory_format), b["mask"].to(device)) for b in loader]


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of (epoch, index) keys from step `start` on, without end. Each epoch is
    DistributedSampler's shuffle for that epoch, cut to whole batches; so one DataLoader, and one set of
    workers that keep prefetching across epochs, serves the whole run. A fresh loader per epoch restarted its
    workers and waited for its first batch each epoch: with the demo set (one batch an epoch at batch 16),
    every step (H100, s18: 2.95 it/s for a 33 ms step)."""

    def __init__(self, dataset, batch, seed, world, rank, start):
        self.dataset, self.batch, self.seed, self.start = dataset, batch, seed, start
        self.world, self.rank = world, rank

    def epoch(self, epoch):
        sampler = torch.utils.data.DistributedSampler(self.dataset, self.world, self.rank, shuffle=True,
                                                      seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        idx = list(sampler)
        return [[(epoch, i) for i in idx[b:b + self.batch]] for b in range(0, len(idx) // self.batch * self.batch,
                                                                            self.batch)]

    def __iter__(self):
        # DistributedSampler(drop_last=True) gives each rank len // world indices an epoch
        epoch, skip = divmod(self.start, len(self.dataset) // self.world // self.batch)
        while True:
            yield from self.epoch(epoch)[skip:]
            epoch, skip = epoch + 1, 0


def default_workers(cuda, world):
    """Data loader processes per rank when --workers is not given: none on a CPU run (the step needs the
    cores), else one per core this process may use, split among the ranks, at most 8. A CUDA-graph step at
    256 px takes 16 images every 33 ms (H100); one worker prepares about 250 demo images a second."""
    if not cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // world))


def train_batches(dataset, batch, seed, world, rank, start, workers, pin_memory):
    """An endless iterator over this rank's batches from step `start` on (resuming skips the batches the run
    has had), through one DataLoader whose workers live as long as the iterator."""
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=EpochBatches(dataset, batch, seed, world, rank,
                                                                                start),
                                            num_workers=workers, collate_fn=collate, pin_memory=pin_memory))
