"""The training step as one CUDA graph (train.py --cuda-graphs): captured once, replayed every step.

The eager step is host-bound with the fused ops: the H200's host took 69 ms per step to issue 35 ms of GPU
work (benchmarks/RESULTS.md, tenth session). A replay issues the whole step's forward and backward, G's and
D's, at once. Per step the host copies the batch into the graph's input buffers, replays, and runs the two
fused Adam updates, which skip on the device when a loss is not finite (Adam's found_inf, which GradScaler
uses the same way), and with fp16's GradScaler its inf checks and scale update: no host read inside the step,
then one read of the step's flag, as train_step's.

The same updates as train_step, bit for bit (tests/test_graphed.py). The first `warmup` steps run eagerly
through train_step (the Triton autotuners, cuDNN and the extension settle there), on the stream the capture
then uses. It needs CUDA, one process, fused Adam, and every batch of one shape with crop boxes of one size
(train.py's always are).
"""
import torch

from ..losses import rals_d_loss
from ..ops import _impl
from .build import all_ranks_finite, autocast
from .step import check_boxes, crop_pixels, gather_crops, generate, global_view, train_step


class GraphedStep:
    """step(image, mask, box) -> (terms, ok), the updates of train_step(G, D, D_pair, criterion, opt_G, opt_D,
    scaler, image, mask, box, ...). capture=False runs what the graph holds eagerly, each call from unset
    gradients as a replay's (the CPU tests)."""

    def __init__(self, G, D, D_pair, criterion, opt_G, opt_D, scaler, amp_dtype=None, warmup=3, capture=True):
        if not all(opt.defaults.get("fused") for opt in (opt_G, opt_D)):
            raise ValueError("a CUDA-graph step needs fused Adam: its found_inf skips an update on the device")
        self.models, self.opts, self.scaler = (G, D, D_pair, criterion), (opt_G, opt_D), scaler
        self.amp_dtype, self.warmup, self.capture = amp_dtype, warmup, capture
        self.steps, self.graph, self.inputs = 0, None, None
        self.stream = None  # warm-up and capture on one side stream of the batch's device

    def __call__(self, image, mask, box):
        # the kernels that win only where the GPU's time alone counts (_impl.graphs), warm-up steps included
        with _impl.graphs():
            if not self.capture:
                return self._step(image, mask, box)
            with torch.cuda.device(image.device):  # streams and replays on the batch's card (--device cuda:1)
                if self.stream is None:
                    self.stream = torch.cuda.Stream()
                return self._step(image, mask, box)

    def _step(self, image, mask, box):
        if self.inputs is None and self.steps < self.warmup:
            self.steps += 1
            return self._eager(image, mask, box)
        if self.inputs is None:  # the graph's input buffers, shaped like this batch
            self.inputs = (torch.empty_like(image), torch.empty_like(mask),
                           torch.empty(box.shape, dtype=torch.long, device=image.device))
            self.crop = tuple(box[0, 2:].tolist())
        self._load(image, mask, box)
        if self.graph is not None:
            self.graph.replay()
        elif self.capture:
            self._record()
        else:
            self._unset_grads()
            self._body()
        self._update()
        self.steps += 1
        terms = dict(zip(self.names, self.values.clone().unbind()))  # the next replay overwrites values
        return terms, not bool(self.bad_d)  # the one read of the step, as train_step's

    def _eager(self, image, mask, box):
        G, D, D_pair, criterion = self.models

        def run():  # train_step with this step's autocast (fp32 off, bf16 on), one process
            return train_step(G, D, D_pair, criterion, *self.opts, self.scaler, image, mask, box,
                              autocast(image.device.type, self.amp_dtype), lambda loss: all_ranks_finite(loss, False))
        if self.stream is None:
            return run()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = run()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _load(self, image, mask, box):
        """This batch into the input buffers, refused if its shape or its boxes' size differ from the first's
        (the graph holds the first's) or a box leaves the image."""
        x, m, b = self.inputs
        if image.shape != x.shape or mask.shape != m.shape or box.shape != b.shape:
            raise ValueError(f"a CUDA-graph step takes batches of one shape: image {tuple(x.shape)}, mask "
                             f"{tuple(m.shape)}, boxes {tuple(b.shape)}; got {tuple(image.shape)}, "
                             f"{tuple(mask.shape)}, {tuple(box.shape)}")
        boxes = check_boxes(box, *x.shape[-2:])
        if any((h, w) != self.crop for _, _, h, w in boxes):
            raise ValueError(f"a CUDA-graph step takes crop boxes of one size ({self.crop[0]} x {self.crop[1]}), "
                             f"got {boxes}")
        x.copy_(image, non_blocking=True)
        m.copy_(mask, non_blocking=True)
        b.copy_(box, non_blocking=True)

    def _update(self):
        """The two Adam updates, each skipped on the device where train_step skips it (fused Adam's found_inf:
        1 leaves the parameters, moments and step count as they were). With a GradScaler (fp16), what
        train_step's scaler.step and update do, with no host read: each update also skipped where its
        gradients are not finite, Adam unscaling them, then the scale updated from the updates train_step
        steps (G's, and D's unless its loss is not finite), or left alone where G's loss is not finite
        (train_step calls no update then)."""
        opt_g, opt_d = self.opts
        if not self.scaler.is_enabled():
            _fused_step(opt_g, self.bad_g)
            _fused_step(opt_d, self.bad_d)
            return
        sc = self.scaler
        scale, tracker = sc._scale, sc._growth_tracker  # the device tensors GradScaler.update changes in place
        inf_g, inf_d = _grads_not_finite(opt_g, scale.device), _grads_not_finite(opt_d, scale.device)
        _fused_step(opt_g, torch.maximum(inf_g, self.bad_g), scale)
        _fused_step(opt_d, torch.maximum(inf_d, self.bad_d), scale)
        new_scale, new_tracker = scale.clone(), tracker.clone()
        torch._amp_update_scale_(new_scale, new_tracker, inf_g + inf_d * (1 - self.bad_d), sc.get_growth_factor(),
                                 sc.get_backoff_factor(), sc.get_growth_interval())
        keep = self.bad_g > 0
        scale.copy_(torch.where(keep, scale, new_scale))
        tracker.copy_(torch.where(keep, tracker, new_tracker))

    def _unset_grads(self):
        """Gradients unset, so the backward writes fresh ones: the graph holds writes, not additions."""
        for model in self.models[:2]:
            for p in model.parameters():
                p.grad = None

    def _record(self):
        self._unset_grads()
        if self.scaler.is_enabled():  # its scale made now, not by the capture (a replay would reset it)
            self.scaler.scale(torch.ones((), device=self.inputs[0].device))
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        # thread_local: the data loader's pin-memory thread keeps working while this thread captures
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self._body()
        graph.replay()  # capturing ran nothing
        self.graph = graph  # only a whole capture is replayed after

    def _body(self):
        """train_step's forward and backward, G's then D's, on the input buffers, with device ops only; sets
        the terms (names, values) and the flags bad_g, bad_d (1.0 where a loss is not finite; bad_d also
        when bad_g, since train_step drops the D update then too)."""
        G, D, D_pair, criterion = self.models
        image, mask, box = self.inputs
        pix = crop_pixels(box, *self.crop, *image.shape[-2:])

        def crops(t):
            return gather_crops(t, pix)
        amp = autocast(image.device.type, self.amp_dtype, cache_enabled=False)  # a graph needs the cache off
        D.requires_grad_(False)
        with amp():
            out = generate(G, image, mask)
            pred_fake, feats_fake = D(crops(out), global_view(out))
            pred_real, feats_real = D(crops(image), global_view(image))
            loss_g, terms = criterion(out, image, pred_real, pred_fake, feats_fake, feats_real)
        self.scaler.scale(loss_g).backward()
        D.requires_grad_(True)
        fake = out.detach()
        with amp():
            pred_real, pred_fake = D_pair(crops(image), global_view(image), crops(fake), global_view(fake))
            loss_d = rals_d_loss(pred_real.float(), pred_fake.float())
        self.scaler.scale(loss_d).backward()
        self.names = (*terms, "G", "D")
        self.values = torch.stack([v.detach().float() for v in (*terms.values(), loss_g, loss_d)])
        self.bad_g = (~torch.isfinite(loss_g.detach())).float()
        self.bad_d = torch.maximum(self.bad_g, (~torch.isfinite(loss_d.detach())).float())


def _fused_step(opt, found_inf, grad_scale=None):
    """opt.step() (fused Adam) with the skip flag and the scale its gradients carry, as GradScaler.step sets them."""
    opt.found_inf = found_inf
    if grad_scale is not None:
        opt.grad_scale = grad_scale
    try:
        opt.step()
    finally:
        del opt.found_inf
        if grad_scale is not None:
            del opt.grad_scale


def _grads_not_finite(opt, device):
    """1.0 where one of opt's gradients holds an inf or NaN, else 0.0, on the device: GradScaler's check before a
    fused optimizer's step (the gradients multiplied by 1, per dtype, as it does)."""
    found = torch.zeros((), device=device)
    one = torch.ones((), device=device)
    by_dtype = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    return found
