"""What a training run holds (`Run`), how it is built from a config (device, precision, shards, model,
loss, plan, optimizer, all prepared for DDP), and what it does besides the epoch loop that `train.py`
drives: open its folder, count and report updates, validate, export, summarise."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from rich.console import Console
from torch import nn

from modaseg.checkpoint import TrainerState, check_resume_setting
from modaseg.config import Config, ConfigError, dump_config, save_config, to_dict
from modaseg.console import UserError, progress_bar, setup_logging
from modaseg.data import CorruptDataError, TrainLoader, class_exposure
from modaseg.distributed import StopRequest, bare_model, broadcast_from_main, sync_buffers
from modaseg.ema import WeightAverage
from modaseg.evaluate import EvalResult, evaluate_split, write_report_files
from modaseg.files import (
    FolderBusy,
    FolderLock,
    json_safe,
    lock_folder,
    read_yaml,
    write_atomic,
    write_json_atomic,
)
from modaseg.hardware import (
    choose_device,
    configure_kernels,
    resolve_precision,
    tune_cpu_allocator,
)
from modaseg.losses import COMPONENTS, CompositeLoss, class_weights, format_class_weights
from modaseg.manifest import Manifest, ManifestError, check_shards, open_shards
from modaseg.metrics import render_table
from modaseg.model import EXPORT_META, Normalization, build_model, export_model, input_normalization
from modaseg.monitor import (
    DeferredLogFile,
    LogMeter,
    log_class_table,
    open_writer,
    report_skip,
    report_window,
)
from modaseg.plan import Plan, plan_run, save_plan
from modaseg.step import StepSync, TrainingDiverged, UpdateResult, build_optimizer, check_buffers_finite

log = logging.getLogger("modaseg")


class Preempted(Exception):
    """A stop was requested and a checkpoint holds everything: exit so the job can be requeued."""


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
    lock: FolderLock | None = None  # the run folder's lock file, held by the main process
    loader: TrainLoader | None = None
    writer: Any = None  # TensorBoard SummaryWriter on the main process
    progress: Any = None
    progress_task: Any = None
    average: WeightAverage | None = None  # train.ema_decay: what validation and exports use
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

    def open_run_folder(self, state: TrainerState, epochs: int) -> None:
        """The first write to the run folder, after the resume decision: its log, config, class names,
        plan, TensorBoard; then the training loader and the progress bar."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log_file.open(self.run_dir / "train.log")
            record_config_changes(self.run_dir, self.cfg, state)  # before config.yaml is rewritten
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_json_atomic(self.run_dir / EXPORT_META, {"classes": self.names})
            save_plan(self.plan, self.run_dir)
            weights = format_class_weights(torch.tensor(self.class_weights), self.names)
            self.writer = open_writer(self.run_dir, state.updates, dump_config(self.cfg), weights)
            log.info("%s", self.plan.text())  # on the terminal, in train.log and in SLURM's output file
            self.progress = progress_bar(True)
            total = self.plan.num_batches * epochs
            done = state.epoch * self.plan.num_batches + state.batch
            self.progress_task = self.progress.add_task("training", total=total, completed=done)
            self.progress.start()
        self.loader = TrainLoader(
            self.data_config,
            self.cfg.augment,
            self.manifest,
            "",  # the manifest's shard paths are absolute (open_shards)
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            seed=state.seed,
            num_batches=self.plan.num_batches,
            mask_dtype=torch.uint8,
            long_side=self.cfg.model.input_long_side,
        )

    def set_total_epochs(self, epochs: int) -> None:
        """The run's length once train.max_minutes has decided it: the progress bar follows."""
        if self.progress is not None:
            self.progress.update(self.progress_task, total=self.plan.num_batches * epochs)

    def record_update(
        self, state: TrainerState, update: UpdateResult, sync: StepSync, meter: LogMeter, where: str
    ) -> None:
        """Bookkeeping of one update: skipped updates and corrupt samples counted (and limited), the
        progress bar advanced, the logging window reported when due."""
        cfg = self.cfg
        state.skipped_samples += sync.skipped_samples
        if update.skipped in ("nonfinite_loss", "nonfinite_grad"):
            state.bad_steps += 1
            self.bad_in_a_row += 1
            report_skip(self.writer, update, sync, state.updates, where, state.bad_steps)
            check_buffers_finite(self.model, where)
            if self.bad_in_a_row > cfg.train.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_in_a_row} consecutive non-finite losses (train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}); lower optim.lr or check the data, then resume"
                )
        else:
            self.bad_in_a_row = 0
            if update.skipped == "scaler":
                state.scaler_skipped += 1
                report_skip(self.writer, update, sync, state.updates, where, state.scaler_skipped)
        if state.skipped_samples > cfg.data.max_corrupt_samples:
            raise CorruptDataError(
                f"{state.skipped_samples} corrupt training samples skipped, more than "
                f"data.max_corrupt_samples={cfg.data.max_corrupt_samples} (the log names them)"
            )
        if self.progress is not None:
            self.progress.update(
                self.progress_task, completed=state.epoch * self.plan.num_batches + state.batch
            )
        if (
            self.accelerator.is_main_process
            and state.updates % max(1, cfg.train.log_every // cfg.optim.grad_accum) == 0
        ):
            window = meter.close_window()
            report_window(
                self.writer,
                self.progress,
                self.progress_task,
                window,
                update,
                self.loss_parts,
                state.updates,
                where,
            )

    def weights_to_use(self):
        """The weight average swapped in when the run keeps one (rank 0's BatchNorm statistics on every
        rank), else the training weights as they are."""
        if self.average is None:
            return contextlib.nullcontext()
        return self.average.swapped_in(bare_model(self.accelerator, self.model), self.accelerator)

    def validate(self, split: str, use_average: bool = True) -> EvalResult:
        """Every rank scores its block of `split` with rank 0's BatchNorm statistics (the saved model),
        with the weight average when the run keeps one and `use_average`; a stop request aborts it on
        every rank (Preempted). cuDNN autotuning is off: eval sizes vary."""
        acc = self.accelerator
        sync_buffers(acc, self.model)
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        weights = self.weights_to_use() if use_average else contextlib.nullcontext()
        try:
            with weights:
                result = evaluate_split(
                    bare_model(acc, self.model),
                    self.data_config,
                    self.manifest,
                    split,
                    device=acc.device,
                    rank=acc.process_index,
                    world_size=acc.num_processes,
                    autocast=acc.autocast,
                    tta_flip=self.cfg.eval.tta_flip,
                    channels_last=self.cfg.model.channels_last,
                    keep_samples=self.cfg.train.overlay_samples if acc.is_main_process else 0,
                    normalization=self.normalization,
                    should_stop=lambda: self.stop.requested,
                    long_side=self.cfg.model.input_long_side,
                )
        finally:
            torch.backends.cudnn.benchmark = benchmark
        if result is None:
            raise Preempted  # the checkpoint says the validation is pending: the resumed run does it first
        return result

    def export(self, name: str, metrics: dict | None = None) -> None:
        """RUN/name as a standalone export of the current weights, or of their average (main process)."""
        with self.weights_to_use():  # collective: every rank swaps, rank 0 writes
            if self.accelerator.is_main_process:
                export_model(
                    bare_model(self.accelerator, self.model),
                    self.run_dir / name,
                    self.names,
                    self.normalization,
                    metrics,
                    self.cfg.model.input_long_side,
                )

    def write_summary(
        self, state: TrainerState, meter: LogMeter, result: EvalResult | None, which: str
    ) -> None:
        """The test table (terminal and RUN/eval-test/) and RUN/summary.json, valid JSON (NaN -> null)."""
        if result is not None:
            title = f"test: {result.num_samples} images, {which}"
            Console().print(render_table(result.report, title=title))
            write_report_files(result, self.run_dir / "eval-test", title)
            if self.writer is not None:
                self.writer.add_scalar("test/miou", result.report.miou, state.updates)
        if meter.images_seen == 0 and keep_finished_summary(self.run_dir, result, which, self.started):
            return
        device = self.accelerator.device
        summary = {
            "test": result.report.to_dict() if result is not None else None,
            "tested_model": which,
            "best_val_miou": state.best_miou if state.best_epoch >= 0 else None,
            "best_epoch": state.best_epoch if state.best_epoch >= 0 else None,
            "history": state.history,
            "updates": state.updates,
            "epochs": state.epoch,
            "wall_seconds": time.perf_counter() - self.started,
            "train_images_per_s": meter.images_per_s,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_memory_kind": "cuda" if device.type == "cuda" else "host RSS (rank 0)",
            "bad_steps": state.bad_steps,
            "scaler_skipped": state.scaler_skipped,
            "skipped_samples": state.skipped_samples,
            "processes": self.accelerator.num_processes,
            "precision": {"mode": self.plan.precision, "reason": self.plan.precision_reason},
            "plan": {**self.plan.__dict__, "micro_steps": self.plan.micro_steps},
            "config": to_dict(self.cfg),
            "config_changes": read_config_history(self.run_dir),
        }
        write_json_atomic(self.run_dir / "summary.json", json_safe(summary))
        test = f"test mIoU {result.report.miou:.4f}" if result is not None else "no test split"
        log.info(
            "done in %.0f s: %s; TensorBoard: tensorboard --logdir %s",
            summary["wall_seconds"],
            test,
            self.run_dir / "tensorboard",
        )

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
        if self.lock is not None:
            self.lock.release()
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
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        raise ConfigError(  # raised by every rank alike, before any collective
            "model.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel): set "
            "model.sync_batchnorm=false for CPU processes"
        )
    log_file = DeferredLogFile() if accelerator.is_main_process else None
    warn_empty_splits(manifest)
    stop = StopRequest()
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    determinism = configure_kernels(accelerator.device, cfg.train.deterministic, training=True)
    if accelerator.device.type == "cpu" and tune_cpu_allocator():
        log.info("CPU run: glibc malloc keeps large buffers in the heap (mmap/trim thresholds raised)")

    model = build_model(cfg.model, manifest.num_classes).to(accelerator.device)
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
    check_memory(cfg, model, loss_fn, manifest.num_classes, accelerator)  # before any full-size tensor
    # The micro-batch probes run on the plain model: with SyncBatchNorm, a rank that runs out of memory
    # would leave the others waiting in a BatchNorm all-reduce; the ranks agree on the result after.
    plan = plan_run(cfg, accelerator, model, loss_fn, manifest, precision, determinism, device.reason)
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)  # never the loader: see data.py
    if cfg.model.compile:  # after DDP wraps the plain module: its all-reduce overlaps backward
        model = torch.compile(model)
    average = None
    if cfg.train.ema_decay:
        average = WeightAverage(bare_model(accelerator, model), cfg.train.ema_decay)

    exposure = class_exposure(train_info.class_images, train_info.num_samples, cfg.data.repeat_threshold)
    log_class_table(manifest.classes, train_info.class_pixels, weights.tolist(), exposure)
    log.info("class weights: %s", format_class_weights(weights, manifest.classes))
    lock = lock_run_folder(accelerator, run_dir)  # last: a refusal above leaves no lock behind
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
        average=average,
        lock=lock,
    )


def lock_run_folder(accelerator: Accelerator, run_dir: Path) -> FolderLock | None:
    """One training per run folder: the main process takes RUN/.modaseg.lock (a second training there
    would replace the first one's checkpoints and results), every rank learns the outcome and refuses
    alike. A lock left by a killed training on this host is taken over with a warning."""
    refusal, lock = None, None
    if accelerator.is_main_process:
        try:
            lock, replaced = lock_folder(run_dir)
        except FolderBusy as e:
            refusal = str(e)
        except OSError as e:
            refusal = f"train.output_dir={run_dir}: cannot create its lock file: {e.strerror or e}"
        else:
            if replaced is not None:
                log.warning(
                    "%s: took over the lock of pid %s (started %s), which is no longer running",
                    run_dir,
                    replaced.get("pid"),
                    replaced.get("started"),
                )
    refusal = broadcast_from_main(accelerator, refusal)
    if refusal:
        raise FolderBusy(refusal)
    return lock


# ------------------------------------------------------------------------------------------------ memory

PROBE_SIDES = (64, 128)  # the two square sizes the activation bytes per pixel are measured at


def activation_bytes_per_pixel(
    model: nn.Module, loss_fn: nn.Module, num_classes: int, device: torch.device, autocast
) -> float:
    """Bytes that one forward of `model` and `loss_fn` keeps for the backward, per input pixel of one
    sample: the saved tensors at two small sizes, the difference divided by the pixels added (what does
    not grow with the image, the weights, cancels). A lower bound of a step's peak, which also holds
    gradients and temporaries. BatchNorm statistics are restored, the global RNG is not touched."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(0)
    saved_bytes = []
    try:
        for side in PROBE_SIDES:
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor, storages=storages) -> torch.Tensor:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
                return t

            images = torch.randn(1, 3, side, side, generator=gen).to(device)
            target = torch.randint(0, num_classes, (1, side, side), generator=gen).to(device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
                logits = model(images)
                loss, _ = loss_fn(logits.float(), target)
            saved_bytes.append(sum(storages.values()))
            del logits, loss
    finally:
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])
    small, large = (side * side for side in PROBE_SIDES)
    return max(0.0, (saved_bytes[1] - saved_bytes[0]) / (large - small))


def host_memory_available() -> int | None:
    """Bytes this machine can still give (MemAvailable), less where a cgroup limit (a SLURM job, a
    container) leaves less; None when unknown."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            left = max(0, int(limit) - used)
            found = left if found is None else min(found, left)
    except (OSError, ValueError):
        pass
    return found


def check_memory(cfg: Config, model: nn.Module, loss_fn: nn.Module, num_classes: int, accelerator) -> None:
    """Refuse, in one line and before any tensor of the training size exists, a crop whose smallest
    forward/backward cannot fit: the activations it keeps (measured per pixel on this model and loss)
    times the smallest micro-batch the run would use, against the device's memory (a GPU's total; on the
    CPU the memory available now, shared by this machine's processes of the run). Every rank measures
    the same model and decides the same. Anything that passes may still run out of memory later (the
    plan's micro-batch search handles that on a GPU); this catches what never could fit."""
    from modaseg.hardware import MEMORY_MARGIN, local_processes

    device = accelerator.device
    if device.type == "cuda":
        limit = int(MEMORY_MARGIN * torch.cuda.get_device_properties(device).total_memory)
        where = f"the {limit / 2**30:.1f} GB of {device}"
        micro = 1 if cfg.train.micro_batch == "auto" else cfg.train.micro_batch
    else:
        available = host_memory_available()
        if available is None:
            return
        processes = local_processes()
        limit = available // processes
        share = f", shared by {processes} processes" if processes > 1 else ""
        where = f"the {limit / 2**30:.1f} GB of memory available to this process ({available / 2**30:.1f} GB free{share})"
        micro = cfg.data.batch_size if cfg.train.micro_batch == "auto" else cfg.train.micro_batch
    per_pixel = activation_bytes_per_pixel(model, loss_fn, num_classes, device, accelerator.autocast)
    h, w = cfg.data.crop_height, cfg.data.crop_width
    need = per_pixel * h * w * micro
    if need > limit:
        raise ConfigError(
            f"data.crop_height x data.crop_width = {h} x {w}: one forward/backward of {micro} sample(s) keeps "
            f"at least {need / 2**30:.1f} GB of activations ({per_pixel:.0f} bytes per pixel with "
            f"model.encoder={cfg.model.encoder}), more than {where}; lower the crop"
            + (" or data.batch_size (or set train.micro_batch)" if micro > 1 else "")
        )


# ------------------------------------------------------------------------------------------------ history

CONFIG_HISTORY = "config-history.jsonl"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def record_config_changes(run_dir: Path, cfg: Config, state: TrainerState) -> dict | None:
    """A resumed run whose config differs from the run's config.yaml (another optim.lr, more epochs):
    the changed keys, old and new, appended to RUN/config-history.jsonl with the update they took effect
    at, and a warning, since the run's config.yaml (rewritten next) no longer repeats it bit for bit.
    Returns the record, None when nothing changed or nothing was resumed."""
    saved_path = run_dir / "config.yaml"
    if not (state.updates or state.epoch) or not saved_path.is_file():
        return None
    try:
        saved = read_yaml(saved_path, ConfigError)
    except UserError as e:
        log.warning("the run's config.yaml cannot be compared with this one (%s)", e)
        saved = None
    before = _flatten(saved) if isinstance(saved, dict) else {}
    now = _flatten(to_dict(cfg))
    changed = {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v}
    if not changed:
        return None
    record = {
        "at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "updates": state.updates,
        "epoch": state.epoch,
        "batch": state.batch,
        "changed": changed,
    }
    history = run_dir / CONFIG_HISTORY
    old = history.read_text() if history.is_file() else ""
    write_atomic(history, old + json.dumps(json_safe(record)) + "\n")
    log.warning(
        "resumed at update %d with another config: %s. From here the run differs from its first config "
        "and no longer repeats bit for bit from config.yaml alone; every change is kept in %s",
        state.updates,
        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()),
        history,
    )
    return record


def read_config_history(run_dir: Path) -> list[dict]:
    """The records of RUN/config-history.jsonl, oldest first (empty when the config never changed)."""
    try:
        lines = (run_dir / CONFIG_HISTORY).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"unreadable": line})
    return records


def keep_finished_summary(run_dir: Path, result: EvalResult | None, which: str, started: float) -> bool:
    """A finished run started again only evaluates: its summary.json keeps the training's wall time and
    speed (this process trained nothing), and the evaluation is appended under `reevaluations`. False
    when there is no readable summary to keep (then the caller writes one)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict):
        return False
    summary.setdefault("reevaluations", []).append(
        {
            "at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "test": result.report.to_dict() if result is not None else None,
            "tested_model": which,
            "wall_seconds": time.perf_counter() - started,
        }
    )
    summary["config_changes"] = read_config_history(run_dir)
    write_json_atomic(path, json_safe(summary))
    log.info(
        "training had finished before: %s keeps its numbers, this evaluation is added under reevaluations",
        path,
    )
    return True


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
