"""Training losses: cross-entropy, softmax Focal, class-weighted soft Dice and Lovasz-softmax, alone or
as the weighted composite of `LossConfig`.

Every loss is computed in float32 from `logits.float()` with autocast switched off (a bf16/fp16 Dice
denominator over a 512x512 batch overflows or loses all precision), honours the ignore label, and returns
a finite zero with a zero gradient on a batch whose pixels are all ignored.

Why not SMP's losses (segmentation_models_pytorch 0.6; each is tested against SMP where they agree):
- SMP's multiclass `FocalLoss` is a one-vs-all *sigmoid* focal loss (a Python loop over classes); ours
  is the softmax focal loss of Lin et al. with per-class alpha, equal to SMP's
  `softmax_focal_loss_with_logits`, which has neither alpha nor an ignore label.
- SMP's `DiceLoss` averages over all C classes, counting classes absent from the batch as 0 loss, so its
  scale depends on how many classes a batch happens to contain; ours averages over the classes present
  in the (local or global) batch. With every class present the two are equal.
- SMP's `LovaszLoss` is Berman's reference: one sort per class. Ours sorts every class row in one
  batched sort and computes the Lovasz gradient without the float32 cancellation of the reference's
  `jaccard[1:] - jaccard[:-1]`; the value equals the reference (tests, float64 oracle).

The training path (`CompositeLoss`) never reads a value back to the host: no boolean indexing, no
`nonzero`/`bincount`/`.item()`, no branch on data, so every shape is static and a step can run under
torch.compile or a CUDA graph without a device sync per micro-batch (the tests run it on the meta
device, which has no data to read). Label values are checked on the host only (the loaders check them
before a batch reaches the device).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from modaseg.classes import IGNORE_INDEX
from modaseg.config import LossConfig

SCHEMES = ("none", "inverse", "power", "effective_number")
COMPONENTS = ("ce", "focal", "dice", "lovasz")


# --------------------------------------------------------------------------- class weights


def class_weights(
    class_pixels: Sequence[int],
    scheme: str,
    *,
    power: float = 0.5,
    beta: float = 0.9999,
    max_ratio: float = 10.0,
) -> Tensor:
    """Per-class weights from pixel counts (index = label value), float32 [C].

    Raw weights: "none" 1; "inverse" 1/f; "power" f**-power (0.5 = inverse square root); "effective_number"
    (1 - beta) / (1 - beta**n) (Cui et al. 2019), with f = n / sum(n). Then clipped to at most
    `max_ratio` x the smallest weight (a class with no pixels gets that maximum rather than infinity) and
    normalised to mean 1 over the classes. Every loss here divides by the sum of the weights it uses, so the
    normalisation only makes the printed numbers comparable across schemes.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"class weight scheme {scheme!r} is not one of {list(SCHEMES)}")
    counts = torch.as_tensor([int(c) for c in class_pixels], dtype=torch.float64)
    if counts.numel() == 0:
        raise ValueError("class_pixels is empty: need one pixel count per class")
    if (counts < 0).any():
        raise ValueError(f"class_pixels has negative counts: {list(class_pixels)}")
    if not max_ratio >= 1.0:
        raise ValueError(f"class_weight_max_ratio must be >= 1, got {max_ratio}")
    if scheme == "none":
        return torch.ones(counts.numel(), dtype=torch.float32)
    total = counts.sum()
    if total == 0:
        raise ValueError("class_pixels are all zero: cannot derive class weights (use scheme 'none')")
    with torch.no_grad():
        freq = counts / total
        if scheme == "inverse":
            raw = 1.0 / freq
        elif scheme == "power":
            if power < 0:
                raise ValueError(f"class_weight_power must be >= 0, got {power}")
            raw = freq.pow(-power)
        else:
            if not 0.0 < beta < 1.0:
                raise ValueError(f"effective_beta must be in (0, 1), got {beta}")
            raw = (1.0 - beta) / -torch.expm1(counts * math.log(beta))  # 1 - beta**n without cancellation
        smallest = raw[torch.isfinite(raw)].min()
        weights = raw.clamp(max=smallest * max_ratio)  # inf (no pixels) -> the clip value
        weights = weights / weights.mean()
    return weights.to(torch.float32)


def format_class_weights(weights: Tensor, class_names: Sequence[str]) -> str:
    """One line for the start-up log: `background=0.21 bag=1.73 ...`."""
    if len(class_names) != len(weights):
        raise ValueError(f"{len(weights)} class weights for {len(class_names)} class names")
    return " ".join(f"{n}={float(w):.3g}" for n, w in zip(class_names, weights, strict=True))


# --------------------------------------------------------------------------- input checks


def _check_inputs(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Validate shapes and labels; return (float32 logits, int64 target)."""
    if logits.dim() < 2 or target.dim() != logits.dim() - 1:
        raise ValueError(
            f"expected logits [B, C, ...] and target [B, ...], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in batch or spatial size"
        )
    if target.is_floating_point():
        raise ValueError(f"target must hold integer labels, got {target.dtype}")
    target = target.long()
    if target.device.type == "cpu":  # reading host memory; on a device it would be a sync per call
        num_classes = logits.shape[1]
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        if bad.any():
            values = sorted(set(target[bad].unique().tolist()))[:10]
            raise ValueError(
                f"target has labels outside 0..{num_classes - 1} that are not the ignore label "
                f"{ignore_index}: {values}"
            )
    return logits.float(), target


def _fp32(logits: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off around a loss; nothing to switch off on the meta device (shapes only, see the tests)."""
    if logits.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(logits.device.type, enabled=False)


def _weights_on(weights: Tensor | None, num_classes: int, like: Tensor) -> Tensor | None:
    if weights is None:
        return None
    weights = torch.as_tensor(weights, dtype=torch.float32, device=like.device)
    if weights.shape != (num_classes,):
        raise ValueError(f"class weights have shape {tuple(weights.shape)}, expected ({num_classes},)")
    return weights


# --------------------------------------------------------------------------- components (from log-probs)


def _cross_entropy(logp: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    valid = target != ignore_index
    # reduction="none" then a sum: nll_loss's own "sum"/"mean" has no deterministic CUDA kernel
    # (train.deterministic=true would refuse it).
    total = F.nll_loss(logp, target, weight=weight, ignore_index=ignore_index, reduction="none").sum()
    if weight is None:
        denom = valid.sum().to(logp.dtype)
    else:
        denom = (weight[target.masked_fill(~valid, 0)] * valid).sum()
    return total / denom.clamp_min(1e-12)  # all ignored: 0 / tiny = 0, not NaN


def _focal(logp: Tensor, target: Tensor, gamma: float, alpha: Tensor | None, ignore_index: int) -> Tensor:
    valid = target != ignore_index
    nll = F.nll_loss(logp, target, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    # (1 - p_t)**gamma; the clamp keeps the gradient finite where p_t == 1 for gamma < 1.
    modulator = (-torch.expm1(-nll)).clamp_min(1e-12).pow(gamma)
    if alpha is None:
        w = valid.to(logp.dtype)
    else:
        w = alpha[target.masked_fill(~valid, 0)] * valid
    return (w * modulator * nll).sum() / w.sum().clamp_min(1e-12)


def _dice_stats(probs: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """[3, C]: soft intersection, sum of probabilities and ground-truth pixel count per class, over
    non-ignored pixels. Sums, so they add up exactly across ranks."""
    num_classes = probs.shape[1]
    valid = target != ignore_index
    t = target.masked_fill(~valid, 0).reshape(-1)  # ignored pixels add 0 to class 0 below
    p_true = probs.gather(1, t.view(target.shape).unsqueeze(1)).reshape(-1)  # probability of the true class
    inter = probs.new_zeros(num_classes).scatter_add(0, t, p_true * valid.reshape(-1))
    dims = [0, *range(2, probs.dim())]
    psum = (probs * valid.unsqueeze(1)).sum(dims)
    count = torch.zeros(num_classes, dtype=torch.long, device=probs.device)
    count = count.scatter_add_(0, t, valid.reshape(-1).long()).to(probs.dtype)  # exact, as bincount
    return torch.stack([inter, psum, count])


def _all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum over ranks; the backward sums the gradients over ranks too, so each rank's slice gets
    world_size x d(global loss)/d(slice), which DDP's gradient averaging divides back."""
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        # Deprecated in favour of a private functional collective; this one has autograd on every torch >= 2.4.
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_reduce(x)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _dice_from_stats(stats: Tensor, weight: Tensor | None, smooth: float) -> Tensor:
    inter, psum, count = stats
    dice = (2.0 * inter + smooth) / (psum + count + smooth).clamp_min(1e-12)
    present = (count > 0).to(stats.dtype)
    w = present if weight is None else weight * present
    return ((1.0 - dice) * w).sum() / w.sum().clamp_min(1e-12)


_ONE_BITS = 0x3F800000  # float32 1.0 as int32; for floats in [0, 1] the bit pattern is order-preserving
_IGNORED_KEY = torch.iinfo(torch.int32).max  # above every (error, foreground) key: (0x3F800000 << 1) | 1


class _LovaszSoftmax(torch.autograd.Function):
    """Lovasz-softmax over the whole batch, classes="present", every class row in ONE batched sort.

    - Static shapes: all C classes get a row; a class absent from the ground truth gets a zero gradient
      and is left out of the mean by a mask, not by selecting rows (which would read the data back).
    - Each row is sorted by a 32-bit key packing (error descending, foreground bit): one sort along the
      rows of a [C, N] int32 tensor, so the sorted foreground flags come out of the key.
    - Ignored pixels are not compacted away: they get error 0 and the largest key, so they sort last in
      every row, after all the pixels that count, and their gradient is zeroed.
    - The Lovasz gradient uses the closed-form Jaccard increments (1/U_k for a foreground pixel,
      I_k / (U_{k-1} U_k) for a background one) instead of differences of nearly equal Jaccard values, so
      float32 stays accurate at millions of pixels.
    - Few [C, N] buffers, reused in place: on CPU every tensor over glibc's 32 MB mmap threshold is
      page-faulted afresh, which costs more than the arithmetic. The custom backward keeps one [C, N]
      gradient instead of autograd's chain of temporaries.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, target: Tensor, ignore_index: int) -> Tensor:
        batch, num_classes, *spatial = probs.shape
        labels = target.reshape(-1)
        n = labels.numel()
        valid = labels != ignore_index
        p = torch.empty((num_classes, n), dtype=probs.dtype, device=probs.device)  # our own copy
        p.view(num_classes, batch, *spatial).copy_(probs.detach().movedim(1, 0))
        fg = labels.unsqueeze(0) == torch.arange(num_classes, device=labels.device).unsqueeze(1)
        counts = fg.sum(1)  # ignored pixels match no class
        present = counts > 0
        num_present = present.sum().clamp_min(1).to(p.dtype)
        errors = p.neg_().add_(fg).abs_()  # |fg - p| in [0, 1], in place
        key = _ONE_BITS - errors.float().view(torch.int32)  # descending error...
        key <<= 1
        key |= fg  # ...then the foreground bit
        errors.masked_fill_(~valid, 0.0)
        key.masked_fill_(~valid, _IGNORED_KEY)  # ignored pixels last
        key, perm = key.sort(dim=1, stable=True)
        ignored_sorted = key == _IGNORED_KEY
        key &= 1
        fg_sorted = key.bool()
        acc = torch.float32 if n < 2**24 else torch.float64  # integer counts stay exact
        fg_seen = key.cumsum(1, dtype=acc)
        del key
        gts = counts.to(acc).unsqueeze(1)
        union = torch.arange(1, n + 1, device=p.device, dtype=acc).add(gts).sub_(fg_seen)  # |gt u first k|
        inter = fg_seen.neg_().add_(gts)  # |gt minus the first k|
        step = (union - 1.0).clamp_min_(1.0).mul_(union)
        inter.div_(step)
        torch.where(fg_sorted, union.reciprocal_(), inter, out=step)
        step.masked_fill_(ignored_sorted | ~present.unsqueeze(1), 0.0)  # the ignored tail, absent classes
        del inter, fg_sorted, ignored_sorted
        grad = union.scatter_(1, perm, step).to(p.dtype)  # pixel order
        del perm
        # Not torch.dot: BLAS accumulates naively, off by ~2e-5 at 1e6 pixels; sum() is pairwise.
        loss = torch.mul(errors, grad, out=step if step.dtype == grad.dtype else None).sum() / num_present
        # d|fg - p|/dp is -1 on the foreground: signed = grad - 2 grad fg, divided by K for the mean.
        signed = torch.addcmul(grad, grad, fg, value=-2.0, out=errors).div_(num_present)
        ctx.grad = signed.view(num_classes, batch, *spatial)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        out = ctx.grad.movedim(0, 1).to(grad_out.dtype) * grad_out
        # The [C, N] buffer would live as long as the graph's last reference (the loss tensor the trainer
        # still holds); once_differentiable means it is never needed again.
        ctx.grad = None
        return out, None, None


def _lovasz(probs: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    return _LovaszSoftmax.apply(probs, target, ignore_index)


# --------------------------------------------------------------------------- public components


def cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean cross-entropy over non-ignored pixels (class-weighted as torch does: divided by the summed
    weights of those pixels); 0 when all are ignored, where torch gives NaN."""
    with _fp32(logits):
        x, t = _check_inputs(logits, target, ignore_index)
        w = _weights_on(weight, x.shape[1], x)
        return _cross_entropy(F.log_softmax(x, 1), t, w, ignore_index)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Softmax focal loss: sum(alpha_t (1 - p_t)^gamma (-log p_t)) / sum(alpha_t) over non-ignored pixels.
    gamma=0 is exactly `cross_entropy(weight=alpha)`."""
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    with _fp32(logits):
        x, t = _check_inputs(logits, target, ignore_index)
        a = _weights_on(alpha, x.shape[1], x)
        return _focal(F.log_softmax(x, 1), t, gamma, a, ignore_index)


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    class_weights: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    smooth: float = 0.0,
    global_batch: bool = False,
) -> Tensor:
    """1 - soft Dice per class, weighted mean over the classes present in the batch's ground truth.

    `global_batch`: when torch.distributed is initialised, the per-class sums are all-reduced (with
    autograd) first, so every rank computes the Dice of the global batch; the value is the same on
    every rank."""
    with _fp32(logits):
        x, t = _check_inputs(logits, target, ignore_index)
        w = _weights_on(class_weights, x.shape[1], x)
        stats = _dice_stats(F.softmax(x, 1), t, ignore_index)
        if global_batch and _distributed():
            stats = _all_reduce_with_grad(stats)
        return _dice_from_stats(stats, w, smooth)


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Lovasz-softmax (Berman et al. 2018) over the whole batch, averaged over the classes present in
    the ground truth; takes logits (the reference takes probabilities)."""
    with _fp32(logits):
        x, t = _check_inputs(logits, target, ignore_index)
        return _lovasz(F.softmax(x, 1), t, ignore_index)


# --------------------------------------------------------------------------- composite


class CompositeLoss(nn.Module):
    """`ce * CE + focal * Focal + dice * Dice + lovasz * Lovasz` with the weights of `LossConfig`.

    One log-softmax is shared by all components. `forward` returns the differentiable total and each
    component with a non-zero weight, detached and unweighted, for logging. Components are per-rank
    values (except a `dice_global` Dice, equal on all ranks): the trainer averages them across ranks with
    one summed reduction per batch divided by the world size (the same as `accelerator.reduce(value, "mean")`).
    """

    def __init__(
        self,
        cfg: LossConfig,
        num_classes: int,
        class_weights: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.weights = {name: float(getattr(cfg, name)) for name in COMPONENTS}
        if any(w < 0 or not math.isfinite(w) for w in self.weights.values()) or not any(
            self.weights.values()
        ):
            raise ValueError(f"loss weights must be finite, >= 0 and not all 0, got {self.weights}")
        if cfg.focal_gamma < 0:
            raise ValueError(f"loss.focal_gamma must be >= 0, got {cfg.focal_gamma}")
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
            if class_weights.shape != (num_classes,):
                raise ValueError(
                    f"class_weights has shape {tuple(class_weights.shape)}, expected ({num_classes},)"
                )
            if not (torch.isfinite(class_weights).all() and (class_weights > 0).all()):
                raise ValueError(f"class_weights must be finite and > 0, got {class_weights.tolist()}")
        self.register_buffer("class_weights", class_weights)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.gamma = cfg.focal_gamma
        self.focal_alpha = cfg.focal_alpha
        self.ce_weighted = cfg.ce_weighted
        self.dice_global = cfg.dice_global

    def forward(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} channels, the loss was built for {self.num_classes} classes"
            )
        with _fp32(logits):
            x, t = _check_inputs(logits, target, self.ignore_index)
            logp = F.log_softmax(x, 1)
            probs = logp.exp() if self.weights["dice"] or self.weights["lovasz"] else None
            cw = self.class_weights
            parts: dict[str, Tensor] = {}
            if self.weights["ce"]:
                parts["ce"] = _cross_entropy(logp, t, cw if self.ce_weighted else None, self.ignore_index)
            if self.weights["focal"]:
                parts["focal"] = _focal(
                    logp, t, self.gamma, cw if self.focal_alpha else None, self.ignore_index
                )
            if self.weights["dice"]:
                stats = _dice_stats(probs, t, self.ignore_index)
                if self.dice_global and _distributed():
                    stats = _all_reduce_with_grad(stats)
                parts["dice"] = _dice_from_stats(stats, cw, 0.0)
            if self.weights["lovasz"]:
                parts["lovasz"] = _lovasz(probs, t, self.ignore_index)
            total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}

    def extra_repr(self) -> str:
        active = ", ".join(f"{n}={w:g}" for n, w in self.weights.items() if w)
        return f"{active}, gamma={self.gamma:g}, dice_global={self.dice_global}, classes={self.num_classes}"
