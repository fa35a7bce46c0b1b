"""Checkpoints that survive preemption: atomic writes, keep-last-K, automatic resume with fallback.

A checkpoint is `RUN/checkpoints/step-NNNNNNNN/`: what `accelerator.save_state` writes (model as
safetensors, optimizer, scaler, per-rank RNG) plus `trainer_state.json` (epoch, batch within the epoch,
optimizer updates, data-stream seed). It is written under `.tmp-*` and renamed when complete, so a
kill at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from modaseg.console import UserError

log = logging.getLogger("modaseg")

STATE_NAME = "trainer_state.json"
PREFIX = "step-"


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for."""


@dataclass
class TrainerState:
    """Where training stands; with the seed it determines the data stream after a resume."""

    epoch: int = 0  # current epoch (0-based); == epochs when training has finished
    batch: int = 0  # batches of `epoch` already trained (at an optimizer-update boundary)
    updates: int = 0  # optimizer updates so far (drives the learning-rate schedule)
    seed: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    bad_steps: int = 0  # non-finite losses skipped so far
    skipped_samples: int = 0  # corrupt samples skipped by the training stream so far
    history: list[dict] = field(default_factory=list)  # validation results per epoch
    pending_validation: bool = False  # saved at an epoch end, its validation not done yet
    # The layout the batch positions refer to: resuming with another one would shift the data stream.
    num_batches: int = 0  # batches per epoch per process
    world_size: int = 0
    grad_accum: int = 0


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial `.tmp-*` folders are never listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def save_checkpoint(
    accelerator: Accelerator, run_dir: str | Path, state: TrainerState, keep_last: int
) -> Path:
    """Collective: every rank must call it at the same step."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{state.updates:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_state(tmp, state)
        _fsync_dir(tmp)
        old = root / f".old-{final.name}"
        if final.exists():  # the same step saved twice: move the old one aside, never delete it first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_state(checkpoint: str | Path, state: TrainerState) -> None:
    """(Re)write a checkpoint's trainer_state.json atomically, e.g. after the epoch's validation."""
    path = Path(checkpoint) / STATE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(path: str | Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((Path(path) / STATE_NAME).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_NAME}: {e}") from e


def resume(accelerator: Accelerator, run_dir: str | Path, how: str) -> TrainerState | None:
    """Load the checkpoint that `how` names ("auto" = newest complete one, falling back to older ones
    when one is corrupt; "none"; or a path). Returns its state, or None for a fresh start."""
    if how == "none":
        return None
    if how == "auto":
        candidates = list(reversed(list_checkpoints(run_dir)))
        if not candidates:
            return None
    else:
        candidates = [Path(how)]
        if not (candidates[0] / STATE_NAME).is_file():
            raise CheckpointError(f"train.resume={how}: not a checkpoint folder (no {STATE_NAME})")
    for path in candidates:
        try:
            state = read_state(path)
            accelerator.load_state(str(path))
            ok, error = 1.0, ""
        except Exception as e:  # corrupt safetensors/optimizer files raise many different types
            ok, error = 0.0, f"{type(e).__name__}: {e}"
        # Every rank must resume from the same checkpoint: agree before going on.
        agreed = accelerator.reduce(torch.tensor(ok, device=accelerator.device), "sum").item()
        if agreed == accelerator.num_processes:
            log.info(
                "resumed from %s (epoch %d, batch %d, %d updates)",
                path,
                state.epoch,
                state.batch,
                state.updates,
            )
            return state
        if how != "auto":
            raise CheckpointError(
                f"checkpoint {path} is corrupt or incomplete: {error or 'failed on another rank'}"
            )
        log.warning(
            "checkpoint %s is unusable (%s); trying the previous one", path, error or "failed on another rank"
        )
        if accelerator.is_main_process:  # out of the listing, or keep_last would prune the good ones
            os.replace(path, path.with_name(f"corrupt-{path.name}"))
        accelerator.wait_for_everyone()
    raise CheckpointError(f"no usable checkpoint in {checkpoint_root(run_dir)}: every one failed to load")
