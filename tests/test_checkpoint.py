"""Checkpoints across precision and torch.compile changes, in one process with a real CPU Accelerator:
what a resumed run may change is never mistaken for corruption (nothing is renamed), and what it may not
change is refused with the files untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modaseg.checkpoint import (
    MODEL_NAME,
    SCALER_NAME,
    CheckpointMismatch,
    TrainerState,
    checkpoint_root,
    load_checkpoint,
    resume,
    save_checkpoint,
)

LAYOUT = {"num_batches": 4, "world_size": 1, "grad_accum": 1}


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def small_model(width: int = 4) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 2, 1))


def trained(model: nn.Module, kind: str = "sgd") -> torch.optim.Optimizer:
    """One step of SGD with momentum (or AdamW), so the optimizer has state to save."""
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def fresh_scaler() -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first use on
    return scaler


def save(acc, run_dir: Path, model: nn.Module, optimizer) -> Path:
    return save_checkpoint(acc, run_dir, TrainerState(updates=3, **LAYOUT), model, optimizer, keep_last=2)


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_checkpoint_without_a_scaler_loads_into_an_fp16_run_with_a_fresh_scaler(accelerator, tmp_path):
    """Saved by an fp32/bf16 run (no scaler.pt), resumed under fp16: a fresh loss scaler, nothing else."""
    model = small_model()
    path = save(accelerator, tmp_path, model, trained(model))
    assert not (path / SCALER_NAME).exists()
    other = small_model()
    accelerator.scaler = fresh_scaler()
    state = load_checkpoint(path, accelerator, other, trained(other))
    assert state.updates == 3
    assert_same_weights(other, model)
    assert accelerator.scaler.state_dict() == fresh_scaler().state_dict()


def test_scaler_is_restored_and_ignored_by_a_run_without_one(accelerator, tmp_path):
    model = small_model()
    accelerator.scaler = fresh_scaler()
    accelerator.scaler.update(new_scale=1024.0)
    path = save(accelerator, tmp_path, model, trained(model))
    assert (path / SCALER_NAME).is_file()

    accelerator.scaler = fresh_scaler()  # fp16 again: the calibrated scale comes back
    load_checkpoint(path, accelerator, small_model(), trained(small_model()))
    assert accelerator.scaler.get_scale() == 1024.0

    accelerator.scaler = None  # bf16 or fp32 now: scaler.pt is not needed
    other = small_model()
    load_checkpoint(path, accelerator, other, trained(other))
    assert_same_weights(other, model)


@pytest.mark.slow
def test_compiled_checkpoint_resumes_a_plain_model_and_a_plain_one_a_compiled_model(accelerator, tmp_path):
    """Weights saved under torch.compile's `_orig_mod.` names (as a compiled module's state_dict has them)
    resume a model that is not compiled, and plain weights resume a compiled one; `train.resume=auto`
    renames nothing."""
    model = small_model()
    path = save(accelerator, tmp_path, model, trained(model))
    compiled_names = torch.compile(model).state_dict()
    assert all(k.startswith("_orig_mod.") for k in compiled_names)
    save_file({k: v.contiguous() for k, v in compiled_names.items()}, str(path / MODEL_NAME))
    listing = sorted(p.name for p in checkpoint_root(tmp_path).iterdir())

    plain = small_model(4)
    plain.apply(lambda m: [p.data.zero_() for p in m.parameters(recurse=False)])
    state = resume(accelerator, tmp_path, "auto", plain, trained(plain), LAYOUT, lambda run: "")
    assert state is not None and state.updates == 3
    assert_same_weights(plain, model)

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / MODEL_NAME))
    target = small_model(4)
    compiled = torch.compile(target)
    state = resume(accelerator, tmp_path, "auto", compiled, trained(target), LAYOUT, lambda run: "")
    assert state is not None
    assert_same_weights(target, model)
    assert sorted(p.name for p in checkpoint_root(tmp_path).iterdir()) == listing
    assert set(load_file(str(path / MODEL_NAME))) == set(model.state_dict())


def test_checkpoint_of_another_model_is_refused_and_nothing_changes(accelerator, tmp_path):
    model = small_model(4)
    save(accelerator, tmp_path, model, trained(model))
    before = tree(tmp_path)
    wider = small_model(8)
    explain = lambda run: f"the run was trained with width 4 ({run.name})"  # noqa: E731
    with pytest.raises(CheckpointMismatch, match=r"does not fit this model .* width 4 .*Nothing was changed"):
        resume(accelerator, tmp_path, "auto", wider, trained(wider), LAYOUT, explain)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(("saved", "now"), [("sgd", "adamw"), ("adamw", "sgd")])
def test_checkpoint_of_another_optimizer_is_refused_and_nothing_changes(accelerator, tmp_path, saved, now):
    """optim.optimizer changed: an SGD state loaded into AdamW raises (it used to be taken for corruption
    and every checkpoint renamed corrupt-*), an AdamW state in SGD fails at the first step. Refused, with
    every file in place; the run's own optimizer then resumes."""
    model = small_model()
    save(accelerator, tmp_path, model, trained(model, saved))
    before = tree(tmp_path)
    other = small_model()
    with pytest.raises(CheckpointMismatch, match=rf"is {saved}'s, this run has optim.optimizer={now}"):
        resume(accelerator, tmp_path, "auto", other, trained(other, now), LAYOUT, lambda run: "")
    assert tree(tmp_path) == before
    assert resume(accelerator, tmp_path, "auto", other, trained(other, saved), LAYOUT, lambda run: "")


def test_shards_with_other_class_names_are_refused_and_nothing_changes(accelerator, tmp_path):
    """Same number of classes under other names: the weights fit, the labels would not. The run folder's
    modaseg.json says what the run was trained on."""
    import json

    model = small_model()
    optimizer = trained(model)
    save(accelerator, tmp_path, model, optimizer)
    (tmp_path / "modaseg.json").write_text(json.dumps({"classes": ["background", "bag"]}))
    before = tree(tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"trained on the classes \['background', 'bag'\]"):
        resume(accelerator, tmp_path, "auto", model, optimizer, LAYOUT, lambda run: "", ["background", "hat"])
    assert tree(tmp_path) == before
    state = resume(
        accelerator, tmp_path, "auto", model, optimizer, LAYOUT, lambda run: "", ["background", "bag"]
    )
    assert state is not None and state.updates == 3
