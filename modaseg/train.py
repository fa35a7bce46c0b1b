"""Train an SMP U-Net on modaseg shards, on CPU processes, one GPU, many GPUs or many nodes.

    accelerate launch --config_file launch/cpu-2proc.yaml modaseg/train.py --config configs/demo.yaml \
        optim.lr=3e-4 data.batch_size=8
    modaseg-train --config configs/demo.yaml          (one process)

Reads top to bottom: set up, resume, loop (accumulate, clip, step, log, checkpoint), validate,
save the best, final test evaluation. Exit code 0 = finished; EXIT_REQUEUE = stopped by SIGTERM/SIGUSR1
after a checkpoint, resume with the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch modaseg/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from modaseg.checkpoint import PREFIX as CHECKPOINT_PREFIX
from modaseg.checkpoint import TrainerState, checkpoint_root, resume, save_checkpoint, write_state
from modaseg.config import Config, OptimConfig, load_config, save_config, to_dict
from modaseg.data import batches_per_epoch, class_exposure, close_train_loaders, train_loader
from modaseg.evaluate import EvalResult, evaluate_split, write_report_files
from modaseg.hardware import resolve_precision
from modaseg.losses import CompositeLoss, class_weights
from modaseg.manifest import check_shards, read_manifest
from modaseg.metrics import render_table
from modaseg.model import EXPORT_META, build_model, export_model, input_normalization, preprocess

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint saved after a signal; run the same command again
# Fault injection for tests and drills: comma-separated global batch indices whose loss becomes NaN.
FAULT_NAN_ENV = "MODASEG_FAULT_NAN_BATCHES"
log = logging.getLogger("modaseg")


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; the ranks agree on it at the next update and save together.
    Further signals while saving only set the flag again, so they cannot interrupt a write."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


def tune_cpu_allocator() -> bool:
    """glibc serves every buffer over 32 MB with a fresh mmap and unmaps it on free, so each large
    activation of a CPU training step is page-faulted again on every step. Raising the mmap and trim
    thresholds keeps them in the heap (benchmarks/README.md: ~20% faster CPU steps). No-op elsewhere."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or not ctypes.util.find_library("c"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1))


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


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (standard for conv nets with BatchNorm).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def setup_logging(accelerator: Accelerator, run_dir: Path) -> None:
    """Main process: rich on a terminal, plain lines otherwise (SLURM output files); also RUN/train.log.
    Other ranks: warnings only."""
    handlers: list[logging.Handler] = []
    if accelerator.is_main_process:
        if sys.stderr.isatty():
            from rich.logging import RichHandler

            handlers.append(RichHandler(show_path=False))
        else:
            handlers.append(logging.StreamHandler(sys.stderr))
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    fmt = "%(asctime)s %(levelname)s " + f"[rank {accelerator.process_index}] %(message)s"
    for h in handlers:
        if h.__class__.__name__ != "RichHandler":
            h.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING, handlers=handlers, force=True
    )


def warn_config_changes(saved: Path, cfg: Config) -> None:
    """A run folder being resumed keeps its config.yaml history in train.log: list what changed."""
    if not saved.is_file():
        return
    try:
        old = to_dict(load_config(saved))
    except ValueError as e:
        log.warning("the previous %s cannot be read (%s); replacing it", saved, e)
        return
    new = to_dict(cfg)
    changed = [
        f"{section}.{key}: {old[section][key]!r} -> {value!r}"
        for section, values in new.items()
        for key, value in values.items()
        if old[section].get(key) != value
    ]
    if changed:
        log.warning("config differs from the one saved in %s: %s", saved, "; ".join(changed))


def set_train_mode(model: torch.nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def bare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module without DDP and torch.compile wrappers: its state dict has the plain SMP keys."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics. DDP broadcasts buffers only at the start of a
    forward pass, so after the last step of an epoch each rank holds its own; validating those would
    score a model that differs from the one rank 0 saves."""
    if accelerator.num_processes > 1:
        for buffer in bare_model(accelerator, model).buffers():
            torch.distributed.broadcast(buffer, src=0)


def check_replicas(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """DDP keeps replicas identical by construction; verify it (a cheap float64 checksum per rank) rather
    than trust it, so a silent divergence never ships as a checkpoint."""
    bare = bare_model(accelerator, model)
    with torch.no_grad():
        checksum = torch.stack([t.double().sum() for t in [*bare.parameters(), *bare.buffers()]]).sum()
    sums = accelerator.gather(checksum.reshape(1).to(accelerator.device))
    if not torch.equal(sums, sums[:1].expand_as(sums)):
        raise RuntimeError(f"model replicas differ across ranks after training: checksums {sums.tolist()}")


def log_class_table(names, pixels, weights, exposure) -> None:
    total = max(1, sum(pixels))
    log.info("class            pixels    weight  exposure")
    for i, name in enumerate(names):
        log.info("%-14s %7.3f%% %8.3f %8.2fx", name, 100 * pixels[i] / total, float(weights[i]), exposure[i])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="modaseg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=8")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg: Config = load_config(args.config, args.overrides)
    try:
        return train(cfg)
    finally:
        close_train_loaders()  # whatever happened: persistent workers must not outlive the trainer


def train(cfg: Config) -> int:
    # ---------------------------------------------------------------- set up
    on_cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.optim.mixed_precision, torch.device("cuda" if on_cuda else "cpu"))
    accelerator = Accelerator(cpu=not on_cuda, mixed_precision=precision.mode)
    run_dir = Path(cfg.train.output_dir)
    setup_logging(accelerator, run_dir)
    stop = StopRequest()
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if device.type == "cpu" and tune_cpu_allocator():
        log.info("CPU run: glibc malloc keeps large buffers in the heap (mmap/trim thresholds raised)")

    manifest = read_manifest(cfg.data.shards)
    for split in ("train", "val", "test"):
        check_shards(manifest, cfg.data.shards, split)
    names, num_classes = manifest.classes, manifest.num_classes
    train_info = manifest.splits["train"]
    if accelerator.is_main_process:
        warn_config_changes(run_dir / "config.yaml", cfg)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / EXPORT_META).write_text(json.dumps({"classes": names}, indent=1))

    model = build_model(cfg.model, num_classes)
    normalization = input_normalization(cfg.model)
    if cfg.model.sync_batchnorm and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.compile:
        model = torch.compile(model)
    weights = class_weights(
        train_info.class_pixels,
        cfg.loss.class_weights,
        power=cfg.loss.class_weight_power,
        beta=cfg.loss.effective_beta,
        max_ratio=cfg.loss.class_weight_max_ratio,
    )
    loss_fn = CompositeLoss(cfg.loss, num_classes, weights.to(device), ignore_index=manifest.ignore_index)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)  # never the loader: see data.py

    num_batches = cfg.train.steps_per_epoch or batches_per_epoch(
        train_info.num_samples, world, cfg.data.batch_size, cfg.optim.grad_accum
    )
    accum = cfg.optim.grad_accum
    updates_per_epoch = math.ceil(num_batches / accum)
    total_updates = updates_per_epoch * cfg.train.epochs
    exposure = class_exposure(train_info.class_images, train_info.num_samples, cfg.data.repeat_threshold)
    log.info(
        "%d process(es) on %s, mixed precision %s; %d train images -> %d batches/epoch/process of %d, "
        "accumulation %d (global batch %d), %d updates in all",
        world,
        device,
        f"{precision.label} ({precision.reason})",
        train_info.num_samples,
        num_batches,
        cfg.data.batch_size,
        accum,
        cfg.data.batch_size * accum * world,
        total_updates,
    )
    log_class_table(names, train_info.class_pixels, weights.tolist(), exposure)

    # ---------------------------------------------------------------- resume
    layout = {"num_batches": num_batches, "world_size": world, "grad_accum": accum}
    state = resume(accelerator, run_dir, cfg.train.resume) or TrainerState(seed=cfg.train.seed, **layout)
    resumed_layout = {k: getattr(state, k) for k in layout}
    if resumed_layout != layout:
        raise RuntimeError(
            f"cannot resume {run_dir}: its checkpoints were made with {resumed_layout}, this run has {layout}. "
            "Resume with the same process count, data.batch_size, optim.grad_accum and train.steps_per_epoch, "
            "or start a new run (train.resume=none, or another train.output_dir)."
        )
    if state.epoch >= cfg.train.epochs:
        log.info(
            "training already finished (epoch %d of %d); running the final evaluation only",
            state.epoch,
            cfg.train.epochs,
        )

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=state.updates + 1 if state.updates else None
        )
        writer.add_text(
            "config", "```yaml\n" + (run_dir / "config.yaml").read_text() + "\n```", state.updates
        )
        writer.add_text(
            "class_weights", " | ".join(f"{n}: {w:.3f}" for n, w in zip(names, weights.tolist(), strict=True))
        )
    progress = TrainProgress(accelerator, total_updates * accum)

    if cfg.train.validate_before_training and state.updates == 0:
        result = validate(accelerator, model, cfg, manifest, "val")
        state.history.append({"epoch": 0, "updates": 0, "val_miou": result.report.miou})
        log.info("validation before training: mIoU %.4f", result.report.miou)
        if writer is not None:
            log_validation(writer, result, 0, names)

    if state.pending_validation:  # preempted during the validation that follows a checkpoint
        validate_epoch(accelerator, model, cfg, manifest, state, writer, run_dir)
        if accelerator.is_main_process:
            write_state(checkpoint_root(run_dir) / f"{CHECKPOINT_PREFIX}{state.updates:08d}", state)

    # ---------------------------------------------------------------- train
    start_time = time.perf_counter()
    images_seen = 0
    bad_in_a_row = 0
    train_seconds = 0.0
    nan_batches = {int(i) for i in os.environ.get(FAULT_NAN_ENV, "").split(",") if i.strip()}
    for epoch in range(state.epoch, cfg.train.epochs):
        set_train_mode(model, cfg.model.freeze_batchnorm)
        batches = iter(
            train_loader(
                cfg.data,
                cfg.augment,
                manifest,
                cfg.data.shards,
                rank=rank,
                world_size=world,
                seed=state.seed,
                epoch=epoch,
                num_batches=num_batches,
                mask_dtype=torch.uint8,
            )
        )
        if state.batch:
            log.info("fast-forwarding %d batches of epoch %d to the resume point", state.batch, epoch)
            for _ in range(state.batch):  # their skipped samples are already in state.skipped_samples
                next(batches)
        sums, summed = torch.zeros(0), 0  # loss values summed over ranks, and over `summed` batches
        window_start, data_wait, window_images = time.perf_counter(), 0.0, 0
        group_bad = False
        for b in range(state.batch, num_batches):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t0
            is_update = (b + 1) % accum == 0 or b + 1 == num_batches
            group = min(accum, num_batches - (b // accum) * accum)  # the last group may be short

            images = preprocess(
                batch["image"].to(device, non_blocking=True), normalization, cfg.model.channels_last
            )
            target = batch["mask"].to(device, non_blocking=True).long()  # uint8 on the host: 8x less to copy
            sync = contextlib.nullcontext() if is_update else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    logits = model(images)
                loss, parts = loss_fn(logits, target)  # float32 inside, whatever the autocast dtype
                if epoch * num_batches + b in nan_batches and rank == 0:
                    loss = loss * float("nan")
                # One collective per batch, BEFORE backward (a rank that skipped backward while another
                # all-reduces gradients would hang DDP): non-finite flags, stop requests, loss values to log.
                values = torch.stack(
                    [
                        (~torch.isfinite(loss)).float(),
                        torch.tensor(float(stop.requested), device=device),
                        torch.tensor(float(batch["skipped"]), device=device),
                        loss.detach().float().nan_to_num(0.0, 0.0, 0.0),
                        *(v.float().nan_to_num(0.0, 0.0, 0.0) for v in parts.values()),
                    ]
                )
                values = accelerator.reduce(values, "sum")
                state.skipped_samples += int(values[2])  # the same total on every rank
                if values[0] == 0:
                    accelerator.backward(loss / group)
            if values[0] > 0:  # some rank saw NaN/inf: every rank drops this update
                group_bad = True
                state.bad_steps += 1
                bad_in_a_row += 1
                log.warning(
                    "non-finite loss on %d rank(s) at epoch %d batch %d: update skipped (%d so far)",
                    int(values[0]),
                    epoch,
                    b,
                    state.bad_steps,
                )
                check_batchnorm_finite(model, epoch, b)
                if bad_in_a_row > cfg.train.max_bad_steps:
                    raise RuntimeError(
                        f"{bad_in_a_row} consecutive non-finite losses (train.max_bad_steps="
                        f"{cfg.train.max_bad_steps}); lower optim.lr or check the data"
                    )
            else:
                bad_in_a_row = 0
                sums = values[3:] if sums.numel() == 0 else sums + values[3:]
                summed += 1
            window_images += len(batch["key"]) * world
            images_seen += len(batch["key"]) * world
            if state.skipped_samples > cfg.data.max_corrupt_samples:
                raise RuntimeError(
                    f"{state.skipped_samples} corrupt training samples skipped, more than "
                    f"data.max_corrupt_samples={cfg.data.max_corrupt_samples}"
                )

            if is_update:
                lr = learning_rate(state.updates, total_updates, cfg.optim)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                grad_norm = float("nan")
                if group_bad:
                    optimizer.zero_grad(set_to_none=True)
                else:
                    if cfg.optim.grad_clip > 0:
                        grad_norm = float(
                            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.updates += 1
                state.batch = b + 1
                group_bad = False
                progress.advance(group)

                if writer is not None and (state.updates % max(1, cfg.train.log_every // accum) == 0):
                    elapsed = time.perf_counter() - window_start
                    mean = (sums / (world * summed)).tolist() if summed else [float("nan")] * (1 + len(parts))
                    writer.add_scalar("train/loss", mean[0], state.updates)
                    for name, v in zip(parts, mean[1:], strict=True):
                        writer.add_scalar(f"train/loss_{name}", v, state.updates)
                    writer.add_scalar("train/lr", lr, state.updates)
                    if not math.isnan(grad_norm):
                        writer.add_scalar("train/grad_norm", grad_norm, state.updates)
                    writer.add_scalar("perf/images_per_s", window_images / elapsed, state.updates)
                    writer.add_scalar("perf/data_wait_fraction", data_wait / elapsed, state.updates)
                    if torch.cuda.is_available():
                        writer.add_scalar(
                            "perf/gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30, state.updates
                        )
                    progress.describe(epoch, mean[0], lr, window_images / elapsed)
                    log.info(
                        "epoch %d batch %d/%d update %d loss %.4f lr %.2e %.1f img/s data-wait %.0f%%",
                        epoch,
                        b + 1,
                        num_batches,
                        state.updates,
                        mean[0],
                        lr,
                        window_images / elapsed,
                        100 * data_wait / elapsed,
                    )
                    train_seconds += elapsed
                    sums, summed = torch.zeros(0), 0
                    window_start, data_wait, window_images = time.perf_counter(), 0.0, 0

                if values[1] > 0:  # the agreed flag only: a local one may have changed since the reduce
                    log.warning(
                        "stop requested (signal %s): saving a checkpoint at update %d",
                        stop.signal,
                        state.updates,
                    )
                    save_checkpoint(accelerator, run_dir, state, cfg.train.keep_last)
                    progress.close()
                    if writer is not None:
                        writer.close()
                    log.warning(
                        "checkpoint saved; exiting with code %d so the job can be requeued", EXIT_REQUEUE
                    )
                    return EXIT_REQUEUE
                if (
                    cfg.train.checkpoint_every
                    and state.updates % cfg.train.checkpoint_every == 0
                    and b + 1 < num_batches
                ):
                    save_checkpoint(accelerator, run_dir, state, cfg.train.keep_last)
        train_seconds += time.perf_counter() - window_start

        # ------------------------------------------------------------ save, then validate
        # The checkpoint comes first: a preemption during a long validation then loses nothing, and
        # the resumed run validates this epoch before going on (pending_validation).
        state.epoch, state.batch = epoch + 1, 0
        state.pending_validation = (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs
        checkpoint = save_checkpoint(accelerator, run_dir, state, cfg.train.keep_last)
        if state.pending_validation:
            validate_epoch(accelerator, model, cfg, manifest, state, writer, run_dir)
            if accelerator.is_main_process:
                write_state(checkpoint, state)
    progress.close()
    check_replicas(accelerator, model)

    # ---------------------------------------------------------------- final evaluation
    if accelerator.is_main_process:
        export_model(bare_model(accelerator, model), run_dir / "final", names, input_normalization(cfg.model))
    accelerator.wait_for_everyone()
    bare = bare_model(accelerator, model)
    if (run_dir / "best" / "model.safetensors").is_file():
        from safetensors.torch import load_file

        bare.load_state_dict(load_file(str(run_dir / "best" / "model.safetensors")))
    result = validate(accelerator, model, cfg, manifest, "test")
    wall = time.perf_counter() - start_time
    if accelerator.is_main_process:
        from rich.console import Console

        title = f"test: {result.num_samples} images, best checkpoint (epoch {state.best_epoch})"
        Console(stderr=False).print(render_table(result.report, title=title))
        write_report_files(result, run_dir / "eval-test", title)
        peak = (
            torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        )
        summary = {
            "test": result.report.to_dict(),
            "best_val_miou": state.best_miou,
            "best_epoch": state.best_epoch,
            "history": state.history,
            "updates": state.updates,
            "epochs": state.epoch,
            "wall_seconds": wall,
            "train_images_per_s": images_seen / max(train_seconds, 1e-9),
            "peak_memory_gb": peak,
            "peak_memory_kind": "cuda" if torch.cuda.is_available() else "host RSS (rank 0)",
            "bad_steps": state.bad_steps,
            "skipped_samples": state.skipped_samples,
            "processes": world,
            "config": to_dict(cfg),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        if writer is not None:
            writer.add_scalar("test/miou", result.report.miou, state.updates)
            writer.close()
        log.info(
            "done in %.0f s: test mIoU %.4f; TensorBoard: tensorboard --logdir %s",
            wall,
            result.report.miou,
            run_dir / "tensorboard",
        )
    accelerator.end_training()
    return 0


def validate_epoch(
    accelerator: Accelerator, model, cfg: Config, manifest, state: TrainerState, writer, run_dir: Path
) -> None:
    """Validation of the epoch that just ended: history, TensorBoard, and the best export."""
    result = validate(accelerator, model, cfg, manifest, "val")
    miou = result.report.miou
    state.history.append({"epoch": state.epoch, "updates": state.updates, "val_miou": miou})
    state.pending_validation = False
    log.info(
        "epoch %d validation: mIoU %.4f (%.4f without background), pixel accuracy %.4f",
        state.epoch,
        miou,
        result.report.macro_no_background["iou"],
        result.report.pixel_accuracy,
    )
    if writer is not None:
        log_validation(writer, result, state.updates, manifest.classes)
    if miou > state.best_miou:
        state.best_miou, state.best_epoch = miou, state.epoch
        if accelerator.is_main_process:
            metrics = {"val_miou": miou, "epoch": state.epoch}
            export_model(
                bare_model(accelerator, model),
                run_dir / "best",
                manifest.classes,
                input_normalization(cfg.model),
                metrics=metrics,
            )


def check_batchnorm_finite(model: torch.nn.Module, epoch: int, batch: int) -> None:
    """A skipped step undoes nothing the forward pass wrote: NaN activations leave NaN running statistics."""
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and not torch.isfinite(buffer).all():
            raise RuntimeError(
                f"{name} became non-finite at epoch {epoch} batch {batch}: the model is unusable from here; "
                "resume from the last checkpoint with a lower optim.lr (or optim.mixed_precision=bf16 instead of fp16)"
            )


def validate(accelerator: Accelerator, model, cfg: Config, manifest, split: str) -> EvalResult:
    sync_buffers(accelerator, model)
    return evaluate_split(
        bare_model(accelerator, model),
        cfg.data,
        manifest,
        split,
        device=accelerator.device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        autocast=accelerator.autocast,
        tta_flip=cfg.eval.tta_flip,
        channels_last=cfg.model.channels_last,
        keep_samples=cfg.train.overlay_samples if accelerator.is_main_process else 0,
        normalization=input_normalization(cfg.model),
    )


def log_validation(writer, result: EvalResult, step: int, names: list[str]) -> None:
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


class TrainProgress:
    """rich progress bar on an interactive main process; nothing elsewhere (log lines cover it)."""

    def __init__(self, accelerator: Accelerator, total: int) -> None:
        self.bar = None
        if accelerator.is_main_process and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("training", total=total)
            self.bar.start()

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.advance(self.task, n)

    def describe(self, epoch: int, loss: float, lr: float, rate: float) -> None:
        if self.bar:
            self.bar.update(
                self.task, description=f"epoch {epoch} loss {loss:.4f} lr {lr:.1e} {rate:.1f} img/s"
            )

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None


if __name__ == "__main__":
    sys.exit(main())
