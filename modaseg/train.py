"""Train an SMP U-Net on modaseg shards, on CPU processes, one GPU, many GPUs or many nodes.

    accelerate launch --config_file launch/cpu-2proc.yaml modaseg/train.py --config configs/demo.yaml \
        optim.lr=3e-4 data.batch_size=8
    modaseg-train --config configs/demo.yaml [overrides] [--print-config]    (one process)

The run: build it (run.py), resume or start, then per epoch train, save a checkpoint, validate; finally
test the best model and write the summary. Exit code 0 = finished; 75 (EXIT_REQUEUE) = stopped by
SIGTERM/SIGUSR1 after a checkpoint, run the same command again to resume; 2 = a config or input error.
Under `accelerate launch` these are each rank's codes: a user error is rank 0's one line and exit 2 on
every rank, after which the launcher prints torch's ChildFailedError summary (naming those codes) and
exits 1 itself, as it does for any rank that fails; one process (`modaseg-train`) exits 2 plainly.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch modaseg/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modaseg.budget import epochs_for_budget
from modaseg.checkpoint import PREFIX, TrainerState, checkpoint_root, resume, save_checkpoint, write_state
from modaseg.config import Config, dump_config, load_config
from modaseg.console import run_cli
from modaseg.distributed import (
    EXIT_REQUEUE,
    any_rank,
    bare_model,
    broadcast_from_main,
    check_replicas,
    sync_buffers,
)
from modaseg.monitor import LogMeter, report_validation
from modaseg.run import Preempted, Run, build_run, explain_config_differences
from modaseg.step import (
    InjectNaN,
    LossSums,
    StepSync,
    apply_update,
    learning_rate,
    set_train_mode,
    train_batch,
)

log = logging.getLogger("modaseg")


def train(cfg: Config) -> int:
    run = build_run(cfg)
    try:
        state = resume_or_start(run)
        meter = LogMeter()
        while state.epoch < total_epochs(cfg, state):
            epoch, first_batch, started = state.epoch, state.batch, time.perf_counter()
            train_one_epoch(run, state, epoch, meter)
            trained = time.perf_counter()
            if cfg.train.max_minutes and state.budget_stage == 0:  # a resumed epoch scaled to a whole one
                epoch_s = (trained - started) * run.plan.num_batches / (run.plan.num_batches - first_batch)
                fit_epochs_to_budget(run, state, epoch_s, None, state.spent_seconds + trained - started)
            validations = len(state.history)
            save_and_validate(run, state, epoch)
            meter.restart()  # the checkpoint and the validation are not training time
            state.spent_seconds += time.perf_counter() - started
            if cfg.train.max_minutes and state.budget_stage == 1 and len(state.history) > validations:
                validation_s = time.perf_counter() - trained
                fit_epochs_to_budget(run, state, trained - started, validation_s, state.spent_seconds)
        return finish(run, state, meter)
    except Preempted:
        log.warning("checkpoint saved; exiting with code %d so the job can be requeued", EXIT_REQUEUE)
        return EXIT_REQUEUE
    finally:
        run.close()


def total_epochs(cfg: Config, state: TrainerState) -> int:
    """train.epochs, or what train.max_minutes decided after the first epoch (kept in the checkpoints)."""
    return state.planned_epochs or cfg.train.epochs


def fit_epochs_to_budget(
    run: Run, state: TrainerState, epoch_s: float | None, validation_s: float | None, spent_s: float
) -> None:
    """train.max_minutes: the epochs that fit the time, decided three times, each from better figures: at
    the start from the plan's timed step (train.epochs if it has none), after the first epoch from its
    time, after the first validation from the last epoch's time and the validation's (final). Until one
    is measured, a validation is estimated at half a training step per image (twice with flip TTA).
    Rank 0 decides for every rank; the learning-rate schedule follows the planned epochs."""
    cfg, plan = run.cfg, run.plan
    trained_per_epoch = plan.num_batches * cfg.data.batch_size * plan.processes
    stage = state.budget_stage
    if epoch_s is None and plan.expected_images_per_s:
        epoch_s = trained_per_epoch / plan.expected_images_per_s
    num_val = run.manifest.splits["val"].num_samples
    if validation_s is None and epoch_s:
        validation_s = 0.5 * epoch_s / trained_per_epoch * num_val * (2 if cfg.eval.tta_flip else 1)
    done = state.epoch + (stage == 0 and spent_s > 0)  # after the first epoch, before its checkpoint
    epochs = cfg.train.epochs
    if epoch_s:
        done_validations = sum(1 for h in state.history if h["epoch"] > 0)
        epochs = epochs_for_budget(
            cfg.train.max_minutes * 60,
            spent_s=spent_s,
            epoch_s=epoch_s,
            validation_s=validation_s if num_val else 0.0,
            val_every=cfg.train.val_every,
            done_epochs=done,
            done_validations=done_validations,
            most=cfg.train.epochs,
        )
    state.planned_epochs = broadcast_from_main(run.accelerator, epochs)
    state.budget_stage = stage + 1 if spent_s > 0 else 0
    run.set_total_epochs(state.planned_epochs)
    how = ("estimated from the plan's timed step", "first epoch measured", "epoch and validation measured")
    log.info(
        "train.max_minutes=%g (%s; %.0f s spent): an epoch takes %.0f s, a validation %.0f s: %d epochs "
        "(%d updates), at most train.epochs=%d",
        cfg.train.max_minutes,
        how[min(stage + (spent_s > 0), 2)],
        spent_s,
        epoch_s or math.nan,
        validation_s or math.nan,
        state.planned_epochs,
        total_updates(run, state),
        cfg.train.epochs,
    )


def total_updates(run: Run, state: TrainerState) -> int:
    """Updates of the whole run: the length of the learning-rate schedule."""
    return math.ceil(run.plan.num_batches / run.plan.grad_accum) * total_epochs(run.cfg, state)


def resume_or_start(run: Run) -> TrainerState:
    """Load the newest usable checkpoint (one made with another config is refused, and nothing on disk
    changes), or start afresh where that destroys nothing; only then write to the run folder."""
    cfg, acc, plan = run.cfg, run.accelerator, run.plan
    layout = {
        "num_batches": plan.num_batches,
        "world_size": acc.num_processes,
        "grad_accum": cfg.optim.grad_accum,
    }
    explain = explain_config_differences(cfg, run.names)
    state = resume(
        acc, run.run_dir, cfg.train.resume, run.model, run.optimizer, layout, explain, run.names, run.average
    )
    state = state or TrainerState(seed=cfg.train.seed, **layout)
    if cfg.train.max_minutes and not state.planned_epochs:
        fit_epochs_to_budget(run, state, None, None, 0.0)  # an estimate until the first epoch is measured
    run.open_run_folder(state, total_epochs(cfg, state))
    nan_batches = InjectNaN.batches_from_env()  # fault injection, wired once
    if nan_batches and acc.is_main_process:
        first = state.epoch * plan.num_batches + state.batch
        run.loss_fn = InjectNaN(run.loss_fn, nan_batches, plan.micro_steps, first)
    if state.epoch >= total_epochs(cfg, state):
        log.info(
            "training already finished (epoch %d of %d): final evaluation only",
            state.epoch,
            total_epochs(cfg, state),
        )
    if state.pending_validation:  # preempted during the validation that follows an epoch's checkpoint
        validate_epoch(run, state, checkpoint_root(run.run_dir) / f"{PREFIX}{state.updates:08d}")
    if cfg.train.validate_before_training and state.updates == 0 and run.manifest.splits["val"].num_samples:
        result = run.validate("val")
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
        sync = StepSync.reduce(acc, sums, run.stop.requested, skipped)  # the one collective of an update
        lr = learning_rate(state.updates, total_updates(run, state), cfg.optim)
        fp16 = plan.precision == "fp16"
        update = apply_update(acc, run.model, run.optimizer, sync, lr, cfg.optim.grad_clip, fp16)
        state.updates, state.batch = state.updates + 1, b + 1
        if run.average is not None and not update.skipped:
            run.average.update(bare_model(acc, run.model))
        meter.add_update(sync, images)
        run.record_update(state, update, sync, meter, f"epoch {epoch} batch {b + 1}/{plan.num_batches}")
        sums, skipped, images = LossSums(run.loss_parts, acc.device), 0, 0
        if sync.stop:  # the agreed flag only: a local one may have changed since the reduce
            save_and_exit_for_requeue(run, state)
        if (
            cfg.train.checkpoint_every
            and state.updates % cfg.train.checkpoint_every == 0
            and b + 1 < plan.num_batches
        ):
            save(run, state)
    meter.end_epoch()


def save(run: Run, state: TrainerState) -> Path:
    return save_checkpoint(
        run.accelerator, run.run_dir, state, run.model, run.optimizer, run.cfg.train.keep_last, run.average
    )


def save_and_exit_for_requeue(run: Run, state: TrainerState) -> None:
    log.warning(
        "stop requested (signal %s): saving a checkpoint at update %d", run.stop.signal, state.updates
    )
    save(run, state)
    raise Preempted


def save_and_validate(run: Run, state: TrainerState, epoch: int) -> None:
    """The epoch's checkpoint first, so a preemption during a long validation loses nothing (the resumed
    run validates this epoch before going on), then the validation when due."""
    cfg, acc = run.cfg, run.accelerator
    state.epoch, state.batch = epoch + 1, 0
    due = (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == total_epochs(cfg, state)
    state.pending_validation = due and run.manifest.splits["val"].num_samples > 0
    checkpoint = save(run, state)
    if state.pending_validation:
        validate_epoch(run, state, checkpoint)
    if any_rank(run.stop.requested, acc.device):  # a signal after the epoch's last update:
        raise Preempted  # the checkpoint has it all


def validate_epoch(run: Run, state: TrainerState, checkpoint: Path) -> None:
    """Validation of the epoch that just ended: history, TensorBoard, the best export, and the
    checkpoint's state rewritten to say the validation is done."""
    result = run.validate("val")
    report = result.report
    state.history.append({"epoch": state.epoch, "updates": state.updates, "val_miou": report.miou})
    state.pending_validation = False
    log.info(
        "epoch %d validation: mIoU %.4f (%.4f without background), pixel accuracy %.4f",
        state.epoch,
        report.miou,
        report.macro_no_background["iou"],
        report.pixel_accuracy,
    )
    if run.writer is not None:
        report_validation(run.writer, result, state.updates, run.names)
    if report.miou > state.best_miou:
        state.best_miou, state.best_epoch = report.miou, state.epoch
        run.export("best", {"val_miou": report.miou, "epoch": state.epoch})
    if run.accelerator.is_main_process and checkpoint.is_dir():  # not when resumed from another folder
        write_state(checkpoint, state)


def finish(run: Run, state: TrainerState, meter: LogMeter) -> int:
    """Check the replicas, export the final model, test the best one, write summary.json."""
    acc = run.accelerator
    sync_buffers(acc, run.model)  # rank 0's BatchNorm statistics, as when a validation ran last
    check_replicas(acc, run.model)
    run.export("final")
    if state.best_epoch < 0:  # no validation ran (an empty val split): the final model is the best known
        run.export("best", {"val_miou": None})
    acc.wait_for_everyone()
    best = run.run_dir / "best" / "model.safetensors"
    tested = "final model (no validation)" if state.best_epoch < 0 else "final model (best/ is missing)"
    if state.best_epoch >= 0 and broadcast_from_main(acc, best.is_file()):  # rank 0 reads the folder
        from safetensors.torch import load_file

        bare_model(acc, run.model).load_state_dict(load_file(str(best)))
        tested = f"best checkpoint (epoch {state.best_epoch})"
    loaded_best = tested.startswith("best")  # best/ holds the weights to test, averaged or not
    result = (
        run.validate("test", use_average=not loaded_best) if run.manifest.splits["test"].num_samples else None
    )
    if acc.is_main_process:
        run.write_summary(state, meter, result, tested)
    return 0


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
