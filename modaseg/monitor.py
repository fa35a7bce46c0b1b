"""What a training run reports while it runs: log lines, TensorBoard, the progress bar, per logging
window. Only the main process writes; the numbers come from StepSync, the same on every rank."""

from __future__ import annotations

import logging
import logging.handlers
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modaseg.console import plain_formatter
from modaseg.step import StepSync, UpdateResult

log = logging.getLogger("modaseg")


@dataclass
class Window:
    """One logging window's figures, as `LogMeter.close_window` returns them."""

    seconds: float
    images_per_s: float
    data_wait_fraction: float
    losses: list[float]  # [total, *parts], means over the window's finite micro-batches (NaN if none)


@dataclass
class LogMeter:
    """Sums over the current logging window (reset by `close_window`) and over the whole run."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    images: int = 0
    loss_sums: list[float] = field(default_factory=list)
    finite_batches: int = 0
    train_seconds: float = 0.0  # closed windows, for the run's mean images/s
    images_seen: int = 0

    def restart(self) -> None:
        """Start a window now: after a window is reported, at an epoch's end, after a validation."""
        self.start, self.data_wait, self.images = time.perf_counter(), 0.0, 0
        self.loss_sums, self.finite_batches = [], 0

    def add_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def add_update(self, sync: StepSync, images: int) -> None:
        """`images`: trained in the update over all ranks."""
        self.images += images
        self.images_seen += images
        if not self.loss_sums:
            self.loss_sums = [0.0] * len(sync.loss_sums)
        self.loss_sums = [a + b for a, b in zip(self.loss_sums, sync.loss_sums, strict=True)]
        self.finite_batches += sync.finite_batches

    def close_window(self) -> Window:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        n = self.finite_batches
        losses = [v / n for v in self.loss_sums] if n else [math.nan] * max(1, len(self.loss_sums))
        window = Window(elapsed, self.images / elapsed, self.data_wait / elapsed, losses)
        self.train_seconds += elapsed
        self.restart()
        return window

    def end_epoch(self) -> None:
        """Count the unlogged tail of the epoch as training time, without reporting it."""
        self.train_seconds += time.perf_counter() - self.start
        self.restart()

    @property
    def images_per_s(self) -> float:
        return self.images_seen / max(self.train_seconds, 1e-9)


def report_window(
    writer, progress, task, window: Window, update: UpdateResult, parts: list[str], step: int, where: str
) -> None:
    """The log line, TensorBoard scalars and progress-bar text of one window (main process only)."""
    if writer is not None:
        writer.add_scalar("train/loss", window.losses[0], step)
        for name, value in zip(parts, window.losses[1:], strict=True):
            writer.add_scalar(f"train/loss_{name}", value, step)
        writer.add_scalar("train/lr", update.lr, step)
        if math.isfinite(update.grad_norm):
            writer.add_scalar("train/grad_norm", update.grad_norm, step)
        writer.add_scalar("perf/images_per_s", window.images_per_s, step)
        writer.add_scalar("perf/data_wait_fraction", window.data_wait_fraction, step)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            writer.add_scalar("perf/gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30, step)
    if progress is not None:
        progress.update(
            task,
            description=f"loss {window.losses[0]:.4f} lr {update.lr:.1e} {window.images_per_s:.1f} img/s",
        )
    log.info(
        "%s update %d loss %.4f lr %.2e %.1f img/s data-wait %.0f%%",
        where,
        step,
        window.losses[0],
        update.lr,
        window.images_per_s,
        100 * window.data_wait_fraction,
    )


def report_skip(writer, update: UpdateResult, sync: StepSync, step: int, where: str, total: int) -> None:
    """A skipped update, labelled by cause in the log and in TensorBoard (train/skipped_update: 1 = a
    non-finite loss, 2 = non-finite gradients, 3 = the fp16 loss scaler)."""
    codes = {"nonfinite_loss": 1, "nonfinite_grad": 2, "scaler": 3}
    if writer is not None:
        writer.add_scalar("train/skipped_update", codes[update.skipped], step)
    if update.skipped == "nonfinite_loss":
        log.warning(
            "non-finite loss on %d rank(s) at %s: update skipped (%d so far)",
            sync.nonfinite_ranks,
            where,
            total,
        )
    elif update.skipped == "nonfinite_grad":
        log.warning("non-finite gradient norm at %s: update skipped (%d so far)", where, total)
    else:
        log.info("fp16 loss scaler skipped the update at %s (overflow; %d so far)", where, total)


def report_validation(writer, result, step: int, names: list[str]) -> None:
    """Validation scalars, the confusion matrix and prediction overlays in TensorBoard."""
    from modaseg.visualize import colorize, confusion_figure, figure_to_array, side_by_side

    r = result.report
    writer.add_scalar("val/miou", r.miou, step)
    writer.add_scalar("val/miou_without_background", r.macro_no_background["iou"], step)
    writer.add_scalar("val/pixel_accuracy", r.pixel_accuracy, step)
    for i, name in enumerate(names):
        if not np.isnan(r.iou[i]):
            writer.add_scalar(f"val_iou/{name}", r.iou[i], step)
            writer.add_scalar(f"val_f1/{name}", r.f1[i], step)
    writer.add_image(
        "val/confusion", figure_to_array(confusion_figure(result.matrix, names)), step, dataformats="HWC"
    )
    for i, (image, truth, pred) in enumerate(result.samples):
        panel = side_by_side(image, colorize(truth, len(names)), colorize(pred, len(names)))
        writer.add_image(f"val_overlay/{i}", panel, step, dataformats="HWC")


class DeferredLogFile:
    """The run folder's train.log, opened only once the run may write there (after the resume decision):
    until then the main process's log records wait in memory, so a refused resume leaves the folder's
    log exactly as it was. The records reach stderr at once either way."""

    def __init__(self) -> None:
        self.buffer = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
        self.file: logging.FileHandler | None = None
        logging.getLogger().addHandler(self.buffer)

    def open(self, path: Path) -> None:
        """Append the waiting records to `path` and every later one (the format of console.setup_logging)."""
        self.file = logging.FileHandler(path)
        self.file.setFormatter(plain_formatter(0))
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        self.buffer.setTarget(None)
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        root.addHandler(self.file)

    def close(self) -> None:
        """Stop logging to the file; records never written (the run stopped before `open`) are dropped."""
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        self.buffer.buffer.clear()
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()


def open_writer(run_dir: Path, updates: int, config_text: str, class_weights: str):
    """TensorBoard writer of the run; a resumed run purges what was logged after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=updates + 1 if updates else None)
    writer.add_text("config", "```yaml\n" + config_text + "\n```", updates)
    writer.add_text("class_weights", class_weights)
    return writer


def log_class_table(names: list[str], pixels: list[int], weights: list[float], exposure: list[float]) -> None:
    total = max(1, sum(pixels))
    log.info("class            pixels    weight  exposure")
    for i, name in enumerate(names):
        log.info("%-14s %7.3f%% %8.3f %8.2fx", name, 100 * pixels[i] / total, weights[i], exposure[i])
