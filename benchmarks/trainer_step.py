"""The trainer's own training step, for the benchmarks: the model, loss and optimizer built as
modaseg/run.py builds them, prepared by accelerate (DDP when launched with several processes), and one
update = `step.train_batch` per loader batch + the `StepSync` all-reduce + `step.apply_update`, exactly
as `train.train_one_epoch` runs them."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from modaseg.config import Config
from modaseg.hardware import Precision, resolve_precision
from modaseg.losses import CompositeLoss, class_weights
from modaseg.model import build_model, input_normalization
from modaseg.step import LossSums, StepSync, apply_update, build_optimizer, train_batch

NUM_CLASSES = 14
PIXELS = [int(1e6 / (i + 1) ** 2) for i in range(NUM_CLASSES)]  # a ModaNet-like imbalance for the weights


def trainer_step(cfg: Config, micro_batch: int | None = None):
    """(accelerator, precision, model, step(batch) -> None) for `cfg` (model, loss, optim sections)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision: Precision = resolve_precision(cfg.optim.mixed_precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision.mode)
    model = build_model(cfg.model, NUM_CLASSES).to(accelerator.device)
    weights = class_weights(PIXELS, cfg.loss.class_weights, power=cfg.loss.class_weight_power)
    loss_fn = CompositeLoss(cfg.loss, NUM_CLASSES, weights.to(accelerator.device))
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    parts = [name for name in ("ce", "focal", "dice", "lovasz") if getattr(cfg.loss, name)]
    normalization = input_normalization(cfg.model)
    micro_steps = cfg.data.batch_size // (micro_batch or cfg.data.batch_size)

    def step(batch: dict) -> None:
        sums = LossSums(parts, accelerator.device)
        for k in range(cfg.optim.grad_accum):
            train_batch(
                accelerator,
                model,
                loss_fn,
                batch,
                sums,
                micro_steps=micro_steps,
                divisor=cfg.optim.grad_accum * micro_steps,
                sync_gradients=k == cfg.optim.grad_accum - 1,
                normalization=normalization,
                channels_last=cfg.model.channels_last,
            )
        sync = StepSync.reduce(accelerator, sums, False, 0)
        apply_update(
            accelerator, model, optimizer, sync, cfg.optim.lr, cfg.optim.grad_clip, precision.mode == "fp16"
        )

    return accelerator, precision, model, step


def random_batch(batch: int, height: int, width: int, device: torch.device) -> dict:
    """A loader-shaped batch: uint8 images, uint8 masks (a strip of ignore pixels), keys."""
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, device=device)
    mask = torch.randint(0, NUM_CLASSES, (batch, height, width), dtype=torch.uint8, device=device)
    mask[:, :8] = 255
    return {"image": images, "mask": mask, "key": [str(i) for i in range(batch)], "skipped": 0}
