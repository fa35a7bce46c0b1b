"""What a training run holds (`Run`) and how it is built from a config: the device and precision, the
shards, the model and loss, the plan (micro-batch, accumulation, workers, expected speed), the
optimizer, all prepared for DDP. `train.py` drives it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch import nn

from modaseg.checkpoint import TrainerState, check_resume_setting
from modaseg.config import Config, ConfigError
from modaseg.console import UserError, progress_bar, setup_logging
from modaseg.data import TrainLoader, batches_per_epoch, class_exposure
from modaseg.distributed import StopRequest
from modaseg.files import write_json_atomic
from modaseg.hardware import (
    FAULT_OOM_ENV,
    MicroBatchError,
    choose_device,
    configure_kernels,
    fits_in_memory,
    plan_workers,
    probe_step,
    resolve_precision,
    search_micro_batch,
    tune_cpu_allocator,
)
from modaseg.losses import COMPONENTS, CompositeLoss, class_weights, format_class_weights
from modaseg.manifest import Manifest, ManifestError, check_shards, open_shards
from modaseg.model import EXPORT_META, Normalization, build_model, input_normalization
from modaseg.monitor import DeferredLogFile, log_class_table
from modaseg.step import build_optimizer

log = logging.getLogger("modaseg")
PLAN_NAME = "plan.json"


@dataclass
class Plan:
    """How the run uses the machine, decided at start-up, printed as a table and saved in the run folder
    (a resumed run reuses its micro-batch and workers)."""

    device: str
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

    def table(self):
        from rich.table import Table

        table = Table(title="training plan", show_header=False)
        rate = self.expected_images_per_s
        rows = [
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
        for key, value in rows:
            table.add_row(key, value)
        return table


@dataclass
class Run:
    """Everything a training run holds. Built once by `build_run`; `close` ends what it started."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    manifest: Manifest
    model: nn.Module  # prepared: DDP-wrapped when there are several processes
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    normalization: Normalization
    plan: Plan
    class_weights: list[float]
    stop: StopRequest
    log_file: DeferredLogFile | None = None  # the main process's train.log, opened after the resume decision
    loader: TrainLoader | None = None
    writer: Any = None  # TensorBoard SummaryWriter on the main process
    progress: Any = None
    progress_task: Any = None
    bad_in_a_row: int = 0  # consecutive skipped updates (non-finite), for train.max_bad_steps
    started: float = field(default_factory=time.perf_counter)

    @property
    def loss_parts(self) -> list[str]:
        """The loss components with a non-zero weight, in the order the loss reports them."""
        return [name for name in COMPONENTS if getattr(self.cfg.loss, name)]

    @property
    def names(self) -> list[str]:
        return self.manifest.classes

    @property
    def data_config(self):
        """The data settings with the planned worker count in place of `auto`."""
        return dataclasses.replace(self.cfg.data, workers=self.plan.workers)

    def close(self) -> None:
        """End workers, the progress bar, TensorBoard and the process group, on every exit path. The stop
        handlers stay (a signal now only sets the flag); train.main then ignores stop signals."""
        if self.loader is not None:
            self.loader.close()
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        if self.log_file is not None:
            self.log_file.close()
        self.accelerator.end_training()


def build_run(cfg: Config) -> Run:
    """Device, precision, shards, model, loss, plan, optimizer. Every input is checked before the
    processes join (a mistake costs a second, and no process waits on one that failed), and nothing is
    written to the run folder, not even its log, until the resume decision (train.py) has been taken."""
    device = choose_device(cfg.train.device)
    try:
        precision = resolve_precision(cfg.optim.mixed_precision, torch.device(device.type))
    except ValueError as e:
        raise ConfigError(f"optim.mixed_precision={cfg.optim.mixed_precision}: {e}") from e
    manifest = open_shards(cfg.data.shards, cfg.data.mix)  # one folder or several, absolute shard paths
    for split in ("train", "val", "test"):
        check_shards(manifest, "", split)
    check_train_split(manifest, cfg.data.shards)
    check_resume_setting(cfg.train.resume)
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.output_dir={run_dir}: exists and is not a folder")
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.collective_timeout_minutes))
    accelerator = Accelerator(
        cpu=device.type == "cpu", mixed_precision=precision.mode, kwargs_handlers=[timeout]
    )
    setup_logging(accelerator.is_main_process, accelerator.process_index)
    log_file = DeferredLogFile() if accelerator.is_main_process else None
    warn_empty_splits(manifest)
    stop = StopRequest()
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    determinism = configure_kernels(accelerator.device, cfg.train.deterministic, training=True)
    if accelerator.device.type == "cpu" and tune_cpu_allocator():
        log.info("CPU run: glibc malloc keeps large buffers in the heap (mmap/trim thresholds raised)")

    model = build_model(cfg.model, manifest.num_classes).to(accelerator.device)
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_info = manifest.splits["train"]
    weights = class_weights(
        train_info.class_pixels,
        cfg.loss.class_weights,
        power=cfg.loss.class_weight_power,
        beta=cfg.loss.effective_beta,
        max_ratio=cfg.loss.class_weight_max_ratio,
    )
    loss_fn = CompositeLoss(
        cfg.loss, manifest.num_classes, weights.to(accelerator.device), manifest.ignore_index
    )
    plan = plan_run(cfg, accelerator, model, loss_fn, manifest, precision, determinism, device.reason)
    if cfg.model.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)  # never the loader: see data.py

    exposure = class_exposure(train_info.class_images, train_info.num_samples, cfg.data.repeat_threshold)
    log_class_table(manifest.classes, train_info.class_pixels, weights.tolist(), exposure)
    log.info("class weights: %s", format_class_weights(weights, manifest.classes))
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        run_dir=run_dir,
        manifest=manifest,
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        normalization=input_normalization(cfg.model),
        plan=plan,
        class_weights=weights.tolist(),
        stop=stop,
        log_file=log_file,
    )


def check_train_split(manifest: Manifest, shards: str | list[str]) -> None:
    """An empty train split stops the run at once, saying how to get one that trains."""
    if manifest.splits["train"].num_samples:
        return
    cut = ",".join(f"{manifest.split_fractions.get(s, 0):g}" for s in ("train", "val", "test"))
    how = f" (the shards were cut with --split {cut})" if isinstance(shards, str) else ""
    raise ManifestError(
        f"data.shards={shards}: the train split is empty{how}, nothing to "
        "train on: shard the dataset again into a new folder with a train share, e.g. modaseg-shard "
        "--annotations ... --images ... --out NEW_FOLDER --split 0.6,0.25,0.15, then train with "
        "data.shards=NEW_FOLDER"
    )


def warn_empty_splits(manifest: Manifest) -> None:
    for split, consequence in (
        ("val", "no validation: best/ will be the final model and summary.json has no best_val_miou"),
        ("test", "no final test evaluation"),
    ):
        if manifest.splits[split].num_samples == 0:
            log.warning("the %s split is empty: %s", split, consequence)


def plan_run(
    cfg: Config,
    accelerator: Accelerator,
    model: nn.Module,
    loss_fn: nn.Module,
    manifest: Manifest,
    precision,
    determinism: str,
    device_reason: str,
) -> Plan:
    """Micro-batch (searched on a GPU, or reused from a resumed run's plan), workers and the expected
    speed from one timed forward/backward of the real model, loss and crop."""
    world = accelerator.num_processes
    info = manifest.splits["train"]
    num_batches = cfg.train.steps_per_epoch or batches_per_epoch(
        info.num_samples, world, cfg.data.batch_size, cfg.optim.grad_accum
    )
    saved = _saved_plan(Path(cfg.train.output_dir), cfg)
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


def _saved_plan(run_dir: Path, cfg: Config) -> dict | None:
    """The plan of the run being resumed, if it was made for the same per-process batch."""
    try:
        saved = json.loads((run_dir / PLAN_NAME).read_text())
    except (OSError, ValueError):
        return None
    if cfg.train.resume == "none" or saved.get("batch_size") != cfg.data.batch_size:
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


def save_plan(run: Run) -> None:
    if run.accelerator.is_main_process:
        write_json_atomic(
            run.run_dir / PLAN_NAME, {**dataclasses.asdict(run.plan), "micro_steps": run.plan.micro_steps}
        )


def start_loader(run: Run, state: TrainerState) -> TrainLoader:
    return TrainLoader(
        run.data_config,
        run.cfg.augment,
        run.manifest,
        "",  # the manifest's shard paths are absolute (open_shards)
        rank=run.accelerator.process_index,
        world_size=run.accelerator.num_processes,
        seed=state.seed,
        num_batches=run.plan.num_batches,
        mask_dtype=torch.uint8,
        long_side=run.cfg.model.input_long_side,
    )


def start_progress(run: Run, done: int) -> None:
    """The rich progress bar over the run's loader batches (main process, interactive terminal)."""
    if run.accelerator.is_main_process:
        run.progress = progress_bar(True)
        total = run.plan.num_batches * run.cfg.train.epochs
        run.progress_task = run.progress.add_task("training", total=total, completed=done)
        run.progress.start()


def explain_config_differences(cfg: Config, classes: list[str]):
    """For a checkpoint that does not fit: the model settings and classes that differ between the run
    folder it came from (its config.yaml and modaseg.json) and this run."""

    def explain(run_folder: Path) -> str:
        from modaseg.config import load_config, to_dict

        try:
            saved = to_dict(load_config(run_folder / "config.yaml"))
            saved_classes = json.loads((run_folder / EXPORT_META).read_text())["classes"]
        except (OSError, ValueError, KeyError, UserError) as e:
            return f"the run's own config cannot be read to compare ({e})"
        now = to_dict(cfg)
        differ = [
            f"model.{k}={saved['model'].get(k)!r} (this run: {v!r})"
            for k, v in now["model"].items()
            if saved["model"].get(k) != v and k not in ("compile", "encoder_weights", "channels_last")
        ]
        if saved_classes != classes:
            differ.append(
                f"{len(saved_classes)} classes (this run's shards: {len(classes)}, data.shards={cfg.data.shards})"
            )
        return "the run was trained with " + (
            "; ".join(differ) if differ else "the same model settings (the weights file differs)"
        )

    return explain
