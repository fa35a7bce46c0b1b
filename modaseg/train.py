"""Train an SMP U-Net on modaseg shards, on CPU processes, one GPU, many GPUs or many nodes.

    accelerate launch --config_file launch/cpu-2proc.yaml modaseg/train.py --config configs/demo.yaml \
        optim.lr=3e-4 data.batch_size=8
    modaseg-train --config configs/demo.yaml [overrides] [--print-config]    (one process)

The run: build it (run.py), resume or start, then per epoch train, save a checkpoint, validate; finally
test the best model and write the summary. Exit code 0 = finished; 75 (EXIT_REQUEUE) = stopped by
SIGTERM/SIGUSR1 after a checkpoint, run the same command again to resume; 2 = a config or input error.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch modaseg/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from rich.console import Console

from modaseg.checkpoint import PREFIX, TrainerState, checkpoint_root, resume, save_checkpoint, write_state
from modaseg.config import Config, dump_config, load_config, save_config, to_dict
from modaseg.console import run_cli
from modaseg.data import CorruptDataError
from modaseg.distributed import (
    EXIT_REQUEUE,
    any_rank,
    bare_model,
    broadcast_from_main,
    check_replicas,
    sync_buffers,
)
from modaseg.evaluate import EvalResult, evaluate_split, write_report_files
from modaseg.files import json_safe, write_json_atomic
from modaseg.losses import format_class_weights
from modaseg.metrics import render_table
from modaseg.model import EXPORT_META, export_model
from modaseg.monitor import LogMeter, open_writer, report_skip, report_validation, report_window
from modaseg.run import Run, build_run, explain_config_differences, save_plan, start_loader, start_progress
from modaseg.step import (
    InjectNaN,
    LossSums,
    StepSync,
    TrainingDiverged,
    UpdateResult,
    apply_update,
    check_buffers_finite,
    learning_rate,
    set_train_mode,
    train_batch,
)

log = logging.getLogger("modaseg")


class Preempted(Exception):
    """A stop was requested and a checkpoint holds everything: exit so the job can be requeued."""


def train(cfg: Config) -> int:
    run = build_run(cfg)
    try:
        state = resume_or_start(run)
        meter = LogMeter()
        for epoch in range(state.epoch, cfg.train.epochs):
            train_one_epoch(run, state, epoch, meter)
            save_and_validate(run, state, epoch)
        return finish(run, state, meter)
    except Preempted:
        log.warning("checkpoint saved; exiting with code %d so the job can be requeued", EXIT_REQUEUE)
        return EXIT_REQUEUE
    finally:
        run.close()


def resume_or_start(run: Run) -> TrainerState:
    """Load the newest usable checkpoint (a checkpoint made with another config is refused and nothing
    on disk changes), or start afresh where that destroys nothing; only then write to the run folder (its
    log, config, plan and class names) and open TensorBoard, the loader and the progress bar."""
    cfg, acc = run.cfg, run.accelerator
    layout = {
        "num_batches": run.plan.num_batches,
        "world_size": acc.num_processes,
        "grad_accum": cfg.optim.grad_accum,
    }
    explain = explain_config_differences(cfg, run.names)
    state = resume(acc, run.run_dir, cfg.train.resume, run.model, run.optimizer, layout, explain)
    state = state or TrainerState(seed=cfg.train.seed, **layout)
    if acc.is_main_process:  # the first write to the run folder
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.log_file.open(run.run_dir / "train.log")
        save_config(cfg, run.run_dir / "config.yaml")
        write_json_atomic(run.run_dir / EXPORT_META, {"classes": run.names})
        weights = format_class_weights(torch.tensor(run.class_weights), run.names)
        run.writer = open_writer(run.run_dir, state.updates, dump_config(cfg), weights)
        Console(stderr=True).print(run.plan.table())
    save_plan(run)
    nan_batches = InjectNaN.batches_from_env()  # fault injection, wired once
    if nan_batches and acc.is_main_process:
        first = state.epoch * run.plan.num_batches + state.batch
        run.loss_fn = InjectNaN(run.loss_fn, nan_batches, run.plan.micro_steps, first)
    run.loader = start_loader(run, state)
    start_progress(run, done=state.epoch * run.plan.num_batches + state.batch)
    if state.epoch >= cfg.train.epochs:
        log.info(
            "training already finished (epoch %d of %d): final evaluation only", state.epoch, cfg.train.epochs
        )
    if state.pending_validation:  # preempted during the validation that follows an epoch's checkpoint
        validate_epoch(run, state, checkpoint_root(run.run_dir) / f"{PREFIX}{state.updates:08d}")
    if cfg.train.validate_before_training and state.updates == 0 and run.manifest.splits["val"].num_samples:
        result = validate(run, "val")
        state.history.append({"epoch": 0, "updates": 0, "val_miou": result.report.miou})
        log.info("validation before training: mIoU %.4f", result.report.miou)
        if run.writer is not None:
            report_validation(run.writer, result, 0, run.names)
    return state


def train_one_epoch(run: Run, state: TrainerState, epoch: int, meter: LogMeter) -> None:
    """The epoch's batches from the resume point: forward/backward per micro-batch, one agreement per
    update (StepSync), step or skip, log, and a checkpoint when due or when a stop was agreed."""
    cfg, acc, plan = run.cfg, run.accelerator, run.plan
    set_train_mode(run.model, cfg.model.freeze_batchnorm)
    run.loader.set_epoch(epoch)
    batches = iter(run.loader)
    if state.batch:
        log.info("fast-forwarding %d batches of epoch %d to the resume point", state.batch, epoch)
        for _ in range(state.batch):  # their skipped samples are already in state.skipped_samples
            next(batches)
    sums, skipped, images = LossSums(run.loss_parts, acc.device), 0, 0
    for b in range(state.batch, plan.num_batches):
        waited = time.perf_counter()
        batch = next(batches)
        meter.add_wait(time.perf_counter() - waited)
        group_start = b - b % plan.grad_accum
        group = min(plan.grad_accum, plan.num_batches - group_start)  # the last group may be short
        is_update = b + 1 == group_start + group
        train_batch(
            acc,
            run.model,
            run.loss_fn,
            batch,
            sums,
            micro_steps=plan.micro_steps,
            divisor=group * plan.micro_steps,
            sync_gradients=is_update,
            normalization=run.normalization,
            channels_last=cfg.model.channels_last,
        )
        skipped += batch["skipped"]
        images += len(batch["key"]) * acc.num_processes
        if not is_update:
            continue
        sync = StepSync.reduce(acc, sums, run.stop.requested, skipped)
        lr = learning_rate(state.updates, plan.total_updates, cfg.optim)
        update = apply_update(
            acc, run.model, run.optimizer, sync, lr, cfg.optim.grad_clip, plan.precision == "fp16"
        )
        state.updates, state.batch = state.updates + 1, b + 1
        meter.add_update(sync, images)
        record_update(run, state, update, sync, meter, f"epoch {epoch} batch {b + 1}/{plan.num_batches}")
        sums, skipped, images = LossSums(run.loss_parts, acc.device), 0, 0
        if sync.stop:  # the agreed flag only: a local one may have changed since the reduce
            save_and_exit_for_requeue(run, state)
        if (
            cfg.train.checkpoint_every
            and state.updates % cfg.train.checkpoint_every == 0
            and b + 1 < plan.num_batches
        ):
            save_checkpoint(acc, run.run_dir, state, run.model, run.optimizer, cfg.train.keep_last)
    meter.end_epoch()


def record_update(
    run: Run, state: TrainerState, update: UpdateResult, sync: StepSync, meter: LogMeter, where: str
) -> None:
    """Bookkeeping of one update: skipped updates and corrupt samples counted (and limited), the
    progress bar advanced, the logging window reported when due."""
    cfg = run.cfg
    state.skipped_samples += sync.skipped_samples
    if update.skipped in ("nonfinite_loss", "nonfinite_grad"):
        state.bad_steps += 1
        run.bad_in_a_row += 1
        report_skip(run.writer, update, sync, state.updates, where, state.bad_steps)
        check_buffers_finite(run.model, where)
        if run.bad_in_a_row > cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{run.bad_in_a_row} consecutive non-finite losses (train.max_bad_steps={cfg.train.max_bad_steps}); "
                "lower optim.lr or check the data, then resume"
            )
    else:
        run.bad_in_a_row = 0
        if update.skipped == "scaler":
            state.scaler_skipped += 1
            report_skip(run.writer, update, sync, state.updates, where, state.scaler_skipped)
    if state.skipped_samples > cfg.data.max_corrupt_samples:
        raise CorruptDataError(
            f"{state.skipped_samples} corrupt training samples skipped, more than "
            f"data.max_corrupt_samples={cfg.data.max_corrupt_samples} (the log names them)"
        )
    if run.progress is not None:
        run.progress.update(run.progress_task, completed=state.epoch * run.plan.num_batches + state.batch)
    if (
        run.accelerator.is_main_process
        and state.updates % max(1, cfg.train.log_every // cfg.optim.grad_accum) == 0
    ):
        report_window(
            run.writer,
            run.progress,
            run.progress_task,
            meter.close_window(),
            update,
            run.loss_parts,
            state.updates,
            where,
        )


def save_and_exit_for_requeue(run: Run, state: TrainerState) -> None:
    log.warning(
        "stop requested (signal %s): saving a checkpoint at update %d", run.stop.signal, state.updates
    )
    save_checkpoint(run.accelerator, run.run_dir, state, run.model, run.optimizer, run.cfg.train.keep_last)
    raise Preempted


def save_and_validate(run: Run, state: TrainerState, epoch: int) -> None:
    """The epoch's checkpoint first, so a preemption during a long validation loses nothing (the resumed
    run validates this epoch before going on), then the validation when due."""
    cfg = run.cfg
    state.epoch, state.batch = epoch + 1, 0
    due = (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs
    state.pending_validation = due and run.manifest.splits["val"].num_samples > 0
    checkpoint = save_checkpoint(
        run.accelerator, run.run_dir, state, run.model, run.optimizer, cfg.train.keep_last
    )
    if state.pending_validation:
        validate_epoch(run, state, checkpoint)
    if any_rank(run.stop.requested, run.accelerator.device):  # a signal after the epoch's last update
        raise Preempted  # the checkpoint has it all


def validate_epoch(run: Run, state: TrainerState, checkpoint: Path) -> None:
    """Validation of the epoch that just ended: history, TensorBoard, the best export, and the
    checkpoint's state rewritten to say the validation is done."""
    result = validate(run, "val")
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
    if run.writer is not None:
        report_validation(run.writer, result, state.updates, run.names)
    if miou > state.best_miou:
        state.best_miou, state.best_epoch = miou, state.epoch
        if run.accelerator.is_main_process:
            bare = bare_model(run.accelerator, run.model)
            metrics = {"val_miou": miou, "epoch": state.epoch}
            export_model(
                bare,
                run.run_dir / "best",
                run.names,
                run.normalization,
                metrics,
                run.cfg.model.input_long_side,
            )
    if run.accelerator.is_main_process and checkpoint.is_dir():  # not when resumed from another folder
        write_state(checkpoint, state)


def validate(run: Run, split: str) -> EvalResult:
    """Every rank scores its block of `split` with rank 0's BatchNorm statistics (the saved model); a
    stop request aborts it on every rank (Preempted). cuDNN autotuning is off: eval sizes vary."""
    acc = run.accelerator
    sync_buffers(acc, run.model)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        result = evaluate_split(
            bare_model(acc, run.model),
            run.data_config,
            run.manifest,
            split,
            device=acc.device,
            rank=acc.process_index,
            world_size=acc.num_processes,
            autocast=acc.autocast,
            tta_flip=run.cfg.eval.tta_flip,
            channels_last=run.cfg.model.channels_last,
            keep_samples=run.cfg.train.overlay_samples if acc.is_main_process else 0,
            normalization=run.normalization,
            should_stop=lambda: run.stop.requested,
            long_side=run.cfg.model.input_long_side,
        )
    finally:
        torch.backends.cudnn.benchmark = benchmark
    if result is None:
        raise Preempted  # the checkpoint says the validation is pending: the resumed run does it first
    return result


def finish(run: Run, state: TrainerState, meter: LogMeter) -> int:
    """Check the replicas, export the final model, test the best one, write summary.json."""
    acc, names = run.accelerator, run.names
    sync_buffers(acc, run.model)  # rank 0's BatchNorm statistics, as when a validation ran last
    check_replicas(acc, run.model)
    bare = bare_model(acc, run.model)
    if acc.is_main_process:
        export_model(
            bare, run.run_dir / "final", names, run.normalization, None, run.cfg.model.input_long_side
        )
        if state.best_epoch < 0:  # no validation ran (an empty val split): the final model is the best known
            export_model(
                bare,
                run.run_dir / "best",
                names,
                run.normalization,
                {"val_miou": None},
                run.cfg.model.input_long_side,
            )
    acc.wait_for_everyone()
    best = run.run_dir / "best" / "model.safetensors"
    tested = "final model (no validation)" if state.best_epoch < 0 else "final model (best/ is missing)"
    if state.best_epoch >= 0 and broadcast_from_main(acc, best.is_file()):  # rank 0 reads the folder
        from safetensors.torch import load_file

        bare.load_state_dict(load_file(str(best)))
        tested = f"best checkpoint (epoch {state.best_epoch})"
    result = validate(run, "test") if run.manifest.splits["test"].num_samples else None
    if acc.is_main_process:
        write_summary(run, state, meter, result, tested)
    return 0


def write_summary(
    run: Run, state: TrainerState, meter: LogMeter, result: EvalResult | None, which: str
) -> None:
    """The test table (terminal and RUN/eval-test/) and RUN/summary.json, valid JSON (NaN -> null)."""
    if result is not None:
        title = f"test: {result.num_samples} images, {which}"
        Console().print(render_table(result.report, title=title))
        write_report_files(result, run.run_dir / "eval-test", title)
        if run.writer is not None:
            run.writer.add_scalar("test/miou", result.report.miou, state.updates)
    summary = {
        "test": result.report.to_dict() if result is not None else None,
        "tested_model": which,
        "best_val_miou": state.best_miou if state.best_epoch >= 0 else None,
        "best_epoch": state.best_epoch if state.best_epoch >= 0 else None,
        "history": state.history,
        "updates": state.updates,
        "epochs": state.epoch,
        "wall_seconds": time.perf_counter() - run.started,
        "train_images_per_s": meter.images_per_s,
        "peak_memory_gb": peak_memory_gb(run.accelerator.device),
        "peak_memory_kind": "cuda" if run.accelerator.device.type == "cuda" else "host RSS (rank 0)",
        "bad_steps": state.bad_steps,
        "scaler_skipped": state.scaler_skipped,
        "skipped_samples": state.skipped_samples,
        "processes": run.accelerator.num_processes,
        "precision": {"mode": run.plan.precision, "reason": run.plan.precision_reason},
        "plan": {**run.plan.__dict__, "micro_steps": run.plan.micro_steps},
        "config": to_dict(run.cfg),
    }
    write_json_atomic(run.run_dir / "summary.json", json_safe(summary))
    test = f"test mIoU {result.report.miou:.4f}" if result is not None else "no test split"
    log.info(
        "done in %.0f s: %s; TensorBoard: tensorboard --logdir %s",
        summary["wall_seconds"],
        test,
        run.run_dir / "tensorboard",
    )


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="modaseg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 data.batch_size=8")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_cli("modaseg-train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
