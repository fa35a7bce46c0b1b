"""Checkpoints that survive preemption: atomic writes, keep-last-K, automatic resume with fallback, and
a run folder that a careless command can never destroy.

A checkpoint is `RUN/checkpoints/step-NNNNNNNN/`:
    model.safetensors     the bare model's weights (plain SMP keys: no DDP or torch.compile prefixes)
    optimizer.bin         the optimizer state (torch.save of tensors and numbers: read with weights_only)
    scaler.pt             the fp16 loss scaler, when the run has one
    ema.safetensors       the weight average (train.ema_decay), when the run keeps one
    rng_state_R.pt        each rank's torch / numpy / Python RNG states (weights_only too)
    trainer_state.json    epoch, batch within the epoch, optimizer updates, data-stream seed, history
It is written under `.tmp-*` and renamed when complete, so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one.

Resuming tells a config problem from corruption: a checkpoint whose tensors do not fit the model, whose
optimizer state is another optimizer's, or whose batch layout differs, is refused with one line naming
the config keys that differ and nothing on disk changes; only a checkpoint that fails to read is corrupt (renamed `corrupt-*`, the previous one
tried). Precision and torch.compile may change between a checkpoint and the run that resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from modaseg.console import UserError
from modaseg.distributed import bare_model, broadcast_from_main
from modaseg.ema import WeightAverage
from modaseg.files import fsync_dir, json_safe, write_json_atomic
from modaseg.model import EXPORT_META

log = logging.getLogger("modaseg")

STATE_NAME = "trainer_state.json"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.bin"
SCALER_NAME = "scaler.pt"
AVERAGE_NAME = "ema.safetensors"
PREFIX = "step-"
COMPILE_PREFIX = "_orig_mod."  # torch.compile's wrapper; never in what we save, stripped when found
# What a fresh start would overwrite or prune: their presence means an earlier run lives here.
RUN_RESULTS = ("checkpoints", "best", "final", "summary.json")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not fit this run's config: a config problem, never corruption."""


@dataclass
class TrainerState:
    """Where training stands; with the seed it determines the data stream after a resume."""

    epoch: int = 0  # current epoch (0-based); == epochs when training has finished
    batch: int = 0  # batches of `epoch` already trained (at an optimizer-update boundary)
    updates: int = 0  # optimizer updates so far (drives the learning-rate schedule)
    seed: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    bad_steps: int = 0  # updates skipped for a non-finite loss or gradient
    scaler_skipped: int = 0  # fp16 updates the loss scaler skipped (overflow while it calibrates)
    skipped_samples: int = 0  # corrupt samples skipped by the training stream so far
    history: list[dict] = field(default_factory=list)  # validation results per epoch
    pending_validation: bool = False  # saved at an epoch end, its validation not done yet
    planned_epochs: int = 0  # train.max_minutes: the epochs that fit the time; 0 = train.epochs decides
    budget_stage: int = 0  # train.max_minutes: 0 estimated, 1 first epoch measured, 2 validation measured
    spent_seconds: float = 0.0  # training and validation time so far (train.max_minutes)
    # The layout the batch positions refer to: resuming with another one would shift the data stream.
    num_batches: int = 0  # batches per epoch per process
    world_size: int = 0
    grad_accum: int = 0

    def layout(self) -> dict[str, int]:
        return {"num_batches": self.num_batches, "world_size": self.world_size, "grad_accum": self.grad_accum}


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial `.tmp-*` and `corrupt-*` folders are never listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.startswith(PREFIX) and p.name.removeprefix(PREFIX).isdigit() and (p / STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def write_state(checkpoint: str | Path, state: TrainerState) -> None:
    """(Re)write a checkpoint's trainer_state.json atomically, e.g. after the epoch's validation."""
    write_json_atomic(Path(checkpoint) / STATE_NAME, json_safe(asdict(state)))


def read_state(path: str | Path) -> TrainerState:
    try:
        return TrainerState(**json.loads((Path(path) / STATE_NAME).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_NAME}: {e}") from e


# ------------------------------------------------------------------------------------------------ saving


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: str | Path,
    state: TrainerState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    keep_last: int,
    average: WeightAverage | None = None,
) -> Path:
    """Collective: every rank calls it at the same update. Rank 0 writes the model, optimizer, scaler
    and state (identical on every rank under DDP); each rank writes its own RNG state."""
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{state.updates:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        weights = {
            k: v.detach().contiguous().cpu() for k, v in bare_model(accelerator, model).state_dict().items()
        }
        save_file(weights, str(tmp / MODEL_NAME))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / SCALER_NAME)
        if average is not None:
            save_file(average.state_dict(), str(tmp / AVERAGE_NAME))
        write_state(tmp, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.iterdir():  # every rank's file on disk before the rename makes the checkpoint count
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        old = root / f".old-{final.name}"
        if final.exists():  # the same update saved twice: move the old one aside, never delete it first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------ resuming


def earlier_run(run_dir: str | Path) -> list[str]:
    """What an earlier run left in `run_dir` that a fresh start would overwrite or prune."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_RESULTS if (run_dir / name).exists()]
    if found == ["checkpoints"] and not list_checkpoints(run_dir):
        return []  # only temporary or corrupt-* folders: nothing a fresh run would touch
    return found


def check_fresh_start(run_dir: str | Path, how: str) -> None:
    """A fresh start never deletes or overwrites what an earlier run left (its checkpoints would be pruned
    by keep-last, its best/ replaced by a worse model): refuse, and say how to continue or start elsewhere."""
    found = earlier_run(run_dir)
    if found:
        why = "train.resume=none" if how == "none" else "no checkpoint to resume"
        raise CheckpointError(
            f"{run_dir} holds an earlier run ({', '.join(found)}) and this would start afresh ({why}), "
            "overwriting it: continue it with train.resume=auto, or start elsewhere "
            "(train.output_dir=ANOTHER_FOLDER); to discard it, delete the folder yourself"
        )


def check_resume_setting(how: str) -> None:
    """train.resume names auto, none or an existing checkpoint folder: checked at start-up, before the
    processes build anything."""
    if how not in ("auto", "none") and not (Path(how) / STATE_NAME).is_file():
        raise CheckpointError(
            f"train.resume={how}: not a checkpoint folder (no {STATE_NAME}); give a RUN/checkpoints/step-N "
            "folder, auto (the run folder's newest) or none"
        )


def _saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path / MODEL_NAME), framework="pt") as f:
        names = f.keys()  # a safetensors handle, not a dict
        return {k.removeprefix(COMPILE_PREFIX): tuple(f.get_slice(k).get_shape()) for k in names}


def model_mismatch(path: Path, model: torch.nn.Module) -> str | None:
    """Why the checkpoint's weights do not fit `model` (names and shapes, read from the file's header
    without loading it), or None. Raises what safetensors raises for an unreadable file."""
    saved = _saved_shapes(path)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        return (
            f"{len(missing)} weights missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    differ = [k for k in wanted if wanted[k] != saved[k]]
    if differ:
        k = differ[0]
        return f"{len(differ)} weights differ in shape (e.g. {k}: checkpoint {saved[k]}, model {wanted[k]})"
    return None


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    average: WeightAverage | None = None,
) -> TrainerState:
    """Load one checkpoint into this rank (model, optimizer, scaler, RNG); raises on any failure."""
    from safetensors.torch import load_file

    state = read_state(path)
    weights = {k.removeprefix(COMPILE_PREFIX): v for k, v in load_file(str(path / MODEL_NAME)).items()}
    bare_model(accelerator, model).load_state_dict(weights)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
    scaler_file = path / SCALER_NAME
    if accelerator.scaler is not None:
        if scaler_file.is_file():
            accelerator.scaler.load_state_dict(torch.load(scaler_file, map_location="cpu", weights_only=True))
        else:
            log.info("%s was saved without a loss scaler (not fp16): starting a fresh one", path)
    if average is not None:
        if (path / AVERAGE_NAME).is_file():
            average.load_state_dict(load_file(str(path / AVERAGE_NAME)))
        else:
            log.info(
                "%s holds no weight average (train.ema_decay was 0): starting one from its weights", path
            )
            average.tensors = WeightAverage(bare_model(accelerator, model), average.decay).tensors
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    else:
        raise CheckpointError(f"{path}: no {rng_file.name} (saved by another number of processes?)")
    return state


def resume(
    accelerator: Accelerator,
    run_dir: str | Path,
    how: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: dict[str, int],
    explain_mismatch: Callable[[Path], str],
    classes: list[str] | None = None,
    average: WeightAverage | None = None,
) -> TrainerState | None:
    """Load the checkpoint that `how` names ("auto" = newest complete one, falling back to older ones
    when one is corrupt; "none"; or a path). Returns its state, or None for a fresh start (after checking
    that a fresh start destroys nothing). `explain_mismatch()` names the config keys that differ from
    the config saved in a checkpoint's run folder, for the refusal message. Rank 0 lists the checkpoints and checks that they
    fit; every rank follows its decisions."""
    check_resume_setting(how)
    candidates = [Path(how)] if how not in ("auto", "none") else []
    if how == "auto":
        candidates = broadcast_from_main(accelerator, list(reversed(list_checkpoints(run_dir))))
    if not candidates:
        refusal = None
        if accelerator.is_main_process:
            try:
                check_fresh_start(run_dir, how)
            except CheckpointError as e:
                refusal = str(e)
        refusal = broadcast_from_main(accelerator, refusal)
        if refusal:
            raise CheckpointError(refusal)
        return None
    bare = bare_model(accelerator, model)
    for path in candidates:
        verdict = None
        if accelerator.is_main_process:
            verdict = _fit_verdict(path, bare, optimizer, layout, explain_mismatch, classes)
        verdict = broadcast_from_main(accelerator, verdict)
        if verdict is not None and verdict[0] == "mismatch":
            raise CheckpointMismatch(verdict[1])
        error = verdict[1] if verdict is not None else ""
        if not error:
            try:
                state = load_checkpoint(path, accelerator, model, optimizer, average)
            except Exception as e:  # corrupt safetensors/optimizer files raise many different types
                error = f"{type(e).__name__}: {e}"
        agreed = accelerator.reduce(torch.tensor(float(not error), device=accelerator.device), "sum").item()
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


def optimizer_kind(param_group: dict) -> str:
    """The optim.optimizer whose state a parameter group holds, from the hyperparameters only it has."""
    if "betas" in param_group:
        return "adamw"
    return "sgd" if "momentum" in param_group else "unknown"


def optimizer_mismatch(path: Path, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the checkpoint's optimizer state does not fit `optimizer` (another optim.optimizer: loading it
    raises, or the first step does), or None. Memory-maps the file: nothing large is read."""
    saved = torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True, mmap=True)
    groups = saved["param_groups"]
    kinds = {optimizer_kind(g) for g in groups}
    wanted = optimizer_kind(optimizer.param_groups[0])
    if kinds != {wanted}:
        return f"its optimizer state is {', '.join(sorted(kinds))}'s, this run has optim.optimizer={wanted}"
    sizes, wanted_sizes = (
        [len(g["params"]) for g in groups],
        [len(g["params"]) for g in optimizer.param_groups],
    )
    if sizes != wanted_sizes:
        return f"its optimizer has parameter groups of {sizes} tensors, this run's has {wanted_sizes}"
    return None


def _fit_verdict(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: dict[str, int],
    explain_mismatch: Callable[[Path], str],
    classes: list[str] | None = None,
) -> tuple[str, str] | None:
    """("mismatch", message) for a checkpoint made with another config or format, ("corrupt", error) for
    one that cannot be read, None when it fits. Shards with the same number of classes under other names
    fit the weights, so the run folder's class names (modaseg.json) are compared too."""
    run = path.parent.parent
    if not (path / "rng_state_0.pt").is_file() and (path / "random_states_0.pkl").is_file():
        return (
            "mismatch",
            f"cannot resume {run}: checkpoint {path.name} was written by modaseg 0.1 (accelerate's format, "
            "with pickled RNG states this version does not unpickle); finish the run with that version, or "
            "start a new run (another train.output_dir). Nothing was changed on disk",
        )
    try:
        state = read_state(path)
        mismatch = model_mismatch(path, model)
        optimizer_differs = optimizer_mismatch(path, optimizer)
    except Exception as e:
        return ("corrupt", f"{type(e).__name__}: {e}")
    if mismatch:
        return (
            "mismatch",
            f"cannot resume {run}: checkpoint {path.name} does not fit this model ({mismatch}); "
            f"{explain_mismatch(run)}. Nothing was changed on disk: resume with the run's own config "
            f"({run / 'config.yaml'}), or start a new run (another train.output_dir)",
        )
    saved_classes = _run_classes(run)
    if classes is not None and saved_classes is not None and saved_classes != classes:
        return (
            "mismatch",
            f"cannot resume {run}: it was trained on the classes {saved_classes}, this run's shards have "
            f"{classes}. Nothing was changed on disk: resume with the run's own data.shards, or start a new "
            "run (another train.output_dir)",
        )
    if optimizer_differs:
        return (
            "mismatch",
            f"cannot resume {run}: checkpoint {path.name} does not fit this optimizer ({optimizer_differs}). "
            f"Nothing was changed on disk: resume with the run's own config ({run / 'config.yaml'}), or start "
            "a new run (another train.output_dir)",
        )
    if state.layout() != layout:
        return (
            "mismatch",
            f"cannot resume {run}: its checkpoints were made with {state.layout()}, this run has {layout}. "
            "Resume with the same process count, data.batch_size, optim.grad_accum and "
            "train.steps_per_epoch, or start a new run (another train.output_dir)",
        )
    return None


def _run_classes(run: Path) -> list[str] | None:
    """The class names a run folder was trained on (its modaseg.json), None when unknown."""
    try:
        names = json.loads((run / EXPORT_META).read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return names if isinstance(names, list) else None
