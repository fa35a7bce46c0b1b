"""How a training run uses the machine, decided once at start-up: the micro-batch (searched on a GPU),
the data workers, the expected speed from a timed forward/backward of the real model, loss and crop.
Printed as a table, saved as RUN/plan.json, reused by a resumed run."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from modaseg.config import Config
from modaseg.data import batches_per_epoch, epoch_samples
from modaseg.distributed import any_rank
from modaseg.files import write_json_atomic
from modaseg.hardware import (
    FAULT_OOM_ENV,
    MicroBatchError,
    Precision,
    device_identity,
    fits_in_memory,
    plan_workers,
    probe_step,
    search_micro_batch,
)
from modaseg.manifest import Manifest

PLAN_NAME = "plan.json"
log = logging.getLogger("modaseg")


@dataclass
class Plan:
    """How the run uses the machine, decided at start-up, printed as a table and saved in the run folder
    (a resumed run reuses its micro-batch and workers)."""

    device: str
    hardware: str  # the GPU model and memory (or "cpu") the micro-batch was planned for
    precision: str  # fp32, bf16 or fp16
    precision_reason: str
    processes: int
    batch_size: int  # per process and loader batch (data.batch_size)
    micro_batch: int  # samples per forward/backward
    micro_batch_reason: str
    grad_accum: int  # loader batches per update (optim.grad_accum)
    workers: int
    workers_reason: str
    num_batches: int  # loader batches per epoch and process
    total_updates: int
    expected_images_per_s: float | None  # all processes, from a timed forward/backward (NaN if unmeasured)
    determinism: str

    @property
    def micro_steps(self) -> int:
        return self.batch_size // self.micro_batch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def rows(self) -> list[tuple[str, str]]:
        rate = self.expected_images_per_s
        return [
            ("device", f"{self.processes} process(es) on {self.device}"),
            ("precision", f"{self.precision}: {self.precision_reason}"),
            (
                "batch",
                f"micro-batch {self.micro_batch} x {self.micro_steps} micro-steps x accumulation "
                f"{self.grad_accum} x {self.processes} process(es) = global batch {self.global_batch}",
            ),
            ("micro-batch", self.micro_batch_reason),
            ("data workers", f"{self.workers} per process: {self.workers_reason}"),
            ("updates", f"{self.total_updates} ({self.num_batches} loader batches per epoch and process)"),
            (
                "expected speed",
                "not measured" if rate is None else f"{rate:.1f} images/s (first-step estimate)",
            ),
            ("repeatability", self.determinism),
        ]

    def text(self) -> str:
        """The plan as a rich table rendered to plain text (one log record: terminal, train.log, SLURM)."""
        import io

        from rich.console import Console
        from rich.table import Table

        table = Table(title="training plan", show_header=False)
        for key, value in self.rows():
            table.add_row(key, value)
        console = Console(file=io.StringIO(), width=110, color_system=None)
        console.print(table)
        return console.file.getvalue().rstrip()


def plan_run(
    cfg: Config,
    accelerator: Accelerator,
    model: nn.Module,
    loss_fn: nn.Module,
    manifest: Manifest,
    precision: Precision,
    determinism: str,
    device_reason: str,
) -> Plan:
    """Micro-batch (searched on a GPU, or reused from a resumed run's plan), workers and the expected
    speed from one timed forward/backward of the real model, loss and crop."""
    world = accelerator.num_processes
    info = manifest.splits["train"]
    samples = epoch_samples(info.num_samples, info.class_images, cfg.data.repeat_threshold)
    num_batches = cfg.train.steps_per_epoch or batches_per_epoch(
        samples, world, cfg.data.batch_size, cfg.optim.grad_accum
    )
    hardware = device_identity(accelerator.device)
    saved = _saved_plan(Path(cfg.train.output_dir), cfg, hardware)
    if any_rank(saved is None, accelerator.device):  # every rank reuses it, or every rank plans afresh
        saved = None
    micro, reason, seconds = _choose_micro_batch(
        cfg, accelerator, model, loss_fn, manifest.num_classes, saved
    )
    rate = None if seconds is None else world * micro / seconds
    if cfg.data.workers != "auto":
        workers, workers_reason = cfg.data.workers, "set in the config"
    elif saved is not None:
        workers, workers_reason = (
            saved["workers"],
            f"as planned when the run started ({saved['workers_reason']})",
        )
    else:
        workers, workers_reason = plan_workers(None if rate is None else rate / world)
    return Plan(
        device=f"{accelerator.device} ({device_reason})",
        hardware=hardware,
        precision=precision.label,
        precision_reason=precision.reason,
        processes=world,
        batch_size=cfg.data.batch_size,
        micro_batch=micro,
        micro_batch_reason=reason,
        grad_accum=cfg.optim.grad_accum,
        workers=workers,
        workers_reason=workers_reason,
        num_batches=num_batches,
        total_updates=math.ceil(num_batches / cfg.optim.grad_accum) * cfg.train.epochs,
        expected_images_per_s=rate,
        determinism=determinism,
    )


def _saved_plan(run_dir: Path, cfg: Config, hardware: str) -> dict | None:
    """The plan of the run being resumed, if it was made for the same per-process batch on the same
    device (GPU model and memory): a micro-batch that fit one GPU may not fit another."""
    try:
        saved = json.loads((run_dir / PLAN_NAME).read_text())
    except (OSError, ValueError):
        return None
    if cfg.train.resume == "none" or saved.get("batch_size") != cfg.data.batch_size:
        return None
    if saved.get("hardware") != hardware:
        log.info(
            "%s was planned on %s, this run is on %s: planning the micro-batch and workers again",
            PLAN_NAME,
            saved.get("hardware", "an unrecorded device"),
            hardware,
        )
        return None
    return saved


def _choose_micro_batch(
    cfg: Config, accelerator: Accelerator, model: nn.Module, loss_fn: nn.Module, num_classes: int, saved
) -> tuple[int, str, float | None]:
    """(micro-batch, why, seconds of one forward/backward at it). The probes run on the bare model
    before DDP wraps it (no collective), leave no gradient, and restore BatchNorm statistics."""
    device = accelerator.device
    batch = cfg.data.batch_size
    crop = (cfg.data.crop_height, cfg.data.crop_width)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    timings: dict[int, float] = {}

    def step(m: int) -> float:
        return probe_step(model, loss_fn, m, crop, num_classes, device, accelerator.autocast)

    def fits(m: int) -> bool:
        ok, seconds = fits_in_memory(device, lambda: step(m))
        if ok and seconds is not None:
            timings[m] = seconds
        return ok

    try:
        if cfg.train.micro_batch != "auto":
            micro, reason = cfg.train.micro_batch, "set in the config"
        elif saved is not None:
            micro, reason = saved["micro_batch"], "as planned when the run started"
        elif device.type == "cuda" or os.environ.get(FAULT_OOM_ENV, "").strip():
            error = None
            try:
                micro, tries = search_micro_batch(fits, batch)
            except MicroBatchError as e:  # raised after the gather, on every rank: none may wait in it
                micro, tries, error = 0, [], e
            # every rank uses the smallest any rank found (the devices may differ); 0 = none fits
            micro = int(accelerator.gather(torch.tensor([micro], device=device)).min())
            if micro == 0:
                raise error or MicroBatchError("even a micro-batch of 1 does not fit another rank's device")
            reason = "largest that fits the device memory; tried " + ", ".join(
                f"{m} {'fits' if ok else 'out of memory'}" for m, ok in tries
            )
        else:
            micro, reason = (
                batch,
                "data.batch_size (on CPU the search is off: out of memory is not recoverable)",
            )
        if micro not in timings:
            fits(micro)  # warm-up (first allocations, cuDNN autotuning): its time is not representative
        fits(micro)  # the expected speed, and a check that the step runs at all
        return micro, reason, timings.get(micro)
    finally:
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])


def save_plan(plan: Plan, run_dir: Path) -> None:
    write_json_atomic(run_dir / PLAN_NAME, {**dataclasses.asdict(plan), "micro_steps": plan.micro_steps})
