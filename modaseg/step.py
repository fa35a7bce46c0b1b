"""One training batch and one optimizer update: micro-batches, the one collective per update, and the
rules for skipping an update.

Protocol, per optimizer update (a group of `grad_accum` loader batches, each split into micro-batches):
every rank runs forward and backward on every micro-batch, even one whose loss is not finite (its NaN
gradients spread through DDP's all-reduce, so no rank waits on a backward another skipped, and the
autograd graph is freed at once). Then ONE all-reduce (`StepSync`) tells every rank how many ranks saw
a non-finite loss, whether any rank was asked to stop, how many corrupt samples were skipped, and the
loss sums to log. Every rank takes the same decision from the same numbers: step, skip, or stop.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from modaseg.config import OptimConfig
from modaseg.console import UserError
from modaseg.distributed import bare_model
from modaseg.model import Normalization, preprocess

FAULT_NAN_ENV = "MODASEG_FAULT_NAN_BATCHES"  # drills: comma-separated global batch indices whose loss is NaN


def learning_rate(update: int, total_updates: int, cfg: OptimConfig) -> float:
    """Linear warmup then poly/cosine/constant decay, as a pure function of the update count:
    nothing to checkpoint beyond the count, and a resumed run gets the same rates."""
    if update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / cfg.warmup_steps
    progress = min(1.0, (update - cfg.warmup_steps) / max(1, total_updates - cfg.warmup_steps))
    if cfg.schedule == "poly":
        return cfg.lr * (1.0 - progress) ** cfg.poly_power
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on norms and biases (standard for conv nets with BatchNorm)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class InjectNaN(nn.Module):
    """Fault injection for tests and drills, wired once around the loss: the loss of the global batch
    indices listed in MODASEG_FAULT_NAN_BATCHES becomes NaN (on the rank this wraps). It counts its own
    calls, one per micro-batch, from the position training resumes at."""

    def __init__(self, loss_fn: nn.Module, batches: set[int], micro_steps: int, first_batch: int):
        super().__init__()
        self.loss_fn, self.batches, self.micro_steps = loss_fn, batches, micro_steps
        self.calls = first_batch * micro_steps

    @staticmethod
    def batches_from_env() -> set[int]:
        return {int(i) for i in os.environ.get(FAULT_NAN_ENV, "").split(",") if i.strip()}

    def forward(self, logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, parts = self.loss_fn(logits, target)
        if self.calls // self.micro_steps in self.batches:
            loss = loss * float("nan")
        self.calls += 1
        return loss, parts


class LossSums:
    """This rank's loss values over the batches of an update group, on the device (no host sync per
    batch): sums over the micro-batches whose loss was finite, how many those were, and how many were not."""

    def __init__(self, parts: list[str], device: torch.device):
        self.parts = parts
        self.sums = torch.zeros(1 + len(parts), device=device)
        self.finite = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), device=device)

    def add(self, loss: Tensor, parts: dict[str, Tensor]) -> None:
        values = torch.stack([loss.detach().float(), *(parts[p].float() for p in self.parts)])
        ok = torch.isfinite(values).all()
        self.sums += torch.where(ok, values, torch.zeros_like(values))
        self.finite += ok
        self.nonfinite += ~ok


@dataclass
class StepSync:
    """What the ranks agree on once per update: the result of ONE all-reduce, the same on every rank."""

    nonfinite_ranks: int  # ranks that saw a non-finite loss in the group: the update is skipped
    stop: bool  # some rank was asked to stop (SIGTERM/SIGUSR1): save and exit after this update
    skipped_samples: int  # corrupt samples the ranks' loaders skipped since the last update
    finite_batches: int  # micro-batches with a finite loss, over all ranks
    loss_sums: list[float]  # [total, *parts] summed over those micro-batches and ranks

    @staticmethod
    def pack(local: LossSums, stop: bool, skipped: int) -> Tensor:
        flags = torch.tensor([float(stop), float(skipped)], device=local.sums.device)
        return torch.cat(
            [(local.nonfinite > 0).float().reshape(1), flags, local.finite.reshape(1), local.sums]
        )

    @classmethod
    def unpack(cls, reduced: Tensor) -> StepSync:
        values = reduced.tolist()  # the one host synchronisation of an update
        return cls(int(values[0]), values[1] > 0, int(values[2]), int(values[3]), values[4:])

    @classmethod
    def reduce(cls, accelerator: Accelerator, local: LossSums, stop: bool, skipped: int) -> StepSync:
        return cls.unpack(accelerator.reduce(cls.pack(local, stop, skipped), "sum"))


def train_batch(
    accelerator: Accelerator,
    model: nn.Module,
    loss_fn: nn.Module,
    batch: dict,
    sums: LossSums,
    *,
    micro_steps: int,
    divisor: int,
    sync_gradients: bool,
    normalization: Normalization,
    channels_last: bool,
) -> None:
    """Forward and backward of one loader batch in `micro_steps` equal chunks; gradients are all-reduced
    only on the last chunk of the group's last batch (`sync_gradients`). `divisor` = chunks in the
    update group, so the accumulated gradient is the mean over the group."""
    device = accelerator.device
    images = preprocess(batch["image"].to(device, non_blocking=True), normalization, channels_last)
    target = batch["mask"].to(device, non_blocking=True).long()  # uint8 on the host: 8x less to copy
    for k, (x, y) in enumerate(zip(images.chunk(micro_steps), target.chunk(micro_steps), strict=True)):
        last = k == micro_steps - 1
        sync = contextlib.nullcontext() if sync_gradients and last else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                logits = model(x)
            loss, parts = loss_fn(logits, y)  # float32 inside, whatever the autocast dtype
            accelerator.backward(loss / divisor)
        sums.add(loss, parts)
        del logits, loss, parts  # nothing of this micro-batch's graph outlives it


@dataclass
class UpdateResult:
    lr: float
    grad_norm: float  # NaN when the update was skipped before the norm was taken
    skipped: str  # "" = stepped; "nonfinite_loss", "nonfinite_grad" or "scaler" otherwise


def apply_update(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sync: StepSync,
    lr: float,
    grad_clip: float,
    fp16: bool,
) -> UpdateResult:
    """Step, or skip, as every rank decides alike from `sync` and the all-reduced gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    result = UpdateResult(lr, math.nan, "")
    if sync.nonfinite_ranks:
        result.skipped = "nonfinite_loss"
    else:
        # The norm of the all-reduced gradients (the same on every rank); no clipping when grad_clip is 0.
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        result.grad_norm = float(norm)
        if not math.isfinite(result.grad_norm) and not fp16:
            result.skipped = "nonfinite_grad"
        else:
            optimizer.step()  # under fp16 the loss scaler skips a step whose gradients overflowed
            if accelerator.optimizer_step_was_skipped:
                result.skipped = "scaler"
    optimizer.zero_grad(set_to_none=True)
    return result


def set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    """Training mode; BatchNorm layers stay in eval mode when frozen (tiny per-process batches)."""
    model.train()
    if freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def check_buffers_finite(model: nn.Module, where: str) -> None:
    """A skipped update undoes nothing the forward pass wrote: NaN activations leave NaN BatchNorm
    statistics, and the model is unusable from there. Collective (every rank calls it at the same update):
    the ranks hold their own statistics, so they agree on the first non-finite one and all stop with the
    same error; a rank stopping alone would be killed by the launcher with the reason unsaid."""
    bare = bare_model(None, model)
    local = next(
        (
            name
            for name, buffer in bare.named_buffers()
            if buffer.is_floating_point() and not torch.isfinite(buffer).all()
        ),
        None,
    )
    found = [(0, local)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        names: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(names, local)
        found = list(enumerate(names))
    bad = [(rank, name) for rank, name in found if name is not None]
    if bad:
        rank, name = bad[0]
        ranks = "" if len(found) == 1 else f" on rank {rank} ({len(bad)} of {len(found)} ranks)"
        raise TrainingDiverged(
            f"{name} became non-finite{ranks} at {where}: the model is unusable from here; resume from the "
            "last checkpoint with a lower optim.lr (or optim.mixed_precision=bf16 instead of fp16)"
        )


class TrainingDiverged(UserError, RuntimeError):
    """Training cannot go on (non-finite losses or statistics): resume from a checkpoint with other settings."""
