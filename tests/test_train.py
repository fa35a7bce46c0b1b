"""Training through the real CLIs: `accelerate launch` with 2 CPU processes over gloo (tiny encoder and
images), `modaseg-train` as one process where the launcher adds nothing to what is tested. GPU tests
(marked gpu) skip without CUDA."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    ROOT,
    accelerate_cmd,
    clean_env,
    free_port,
    gpu_env,
    host_gpus,
    make_shards,
    modaseg_train_cmd,
    require_gpus,
    run_training,
    run_training_cli,
    training_cmd,
)
from safetensors.torch import load_file

from modaseg.checkpoint import checkpoint_root, list_checkpoints, read_state
from modaseg.config import load_config
from modaseg.distributed import EXIT_REQUEUE
from modaseg.hardware import FAULT_OOM_ENV, FAULT_OOM_RANK_ENV
from modaseg.plan import PLAN_NAME
from modaseg.step import FAULT_NAN_ENV

pytestmark = pytest.mark.slow
MULTI = pytest.mark.multiprocess  # starts 2 training processes over gloo


# The update is linear in the gradient and no statistic depends on how a batch is split: BatchNorm frozen,
# plain SGD, no augmentation, cross-entropy only, fp32 (bf16 rounds a sum of halves differently from the
# whole, and `auto` is bf16 on a CPU with AVX512_BF16). Runs that split the same batches differently agree.
LINEAR_UPDATE = [
    "optim.mixed_precision=no",
    "model.freeze_batchnorm=true",
    "optim.optimizer=sgd",
    "optim.momentum=0.0",
    "optim.weight_decay=0.0",
    "optim.grad_clip=0",
    "augment.hflip_p=0",
    "augment.color_jitter_p=0",
    "augment.scale_min=1.0",
    "augment.scale_max=1.0",
    "loss.focal=0",
    "loss.dice=0",
    "loss.lovasz=0",
    "loss.ce=1",
]


def weights(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name / "model.safetensors"))


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def baseline(shard_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-process, 2-epoch run that the other tests compare against."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    assert_ok(run_training(run_dir, shard_dir, "train.validate_before_training=true"))
    return run_dir


@MULTI
def test_run_finishes_with_checkpoints_tensorboard_and_summary(baseline):
    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["epochs"] == 2 and summary["bad_steps"] == 0 and summary["skipped_samples"] == 0
    assert list_checkpoints(baseline), "no checkpoint written"
    assert (baseline / "best" / "config.json").is_file() and (
        baseline / "final" / "model.safetensors"
    ).is_file()
    assert (baseline / "config.yaml").is_file()
    assert (baseline / "eval-test" / "metrics.json").is_file()
    # The model learned something: validation mIoU after training is above the untrained baseline.
    history = summary["history"]
    assert history[0]["updates"] == 0
    assert max(h["val_miou"] for h in history[1:]) > history[0]["val_miou"]


@MULTI
def test_validation_scores_the_model_that_is_saved(baseline, shard_dir, tmp_path):
    """The best export, evaluated on its own by modaseg-eval with the same 2-process split, gives exactly
    the validation mIoU training recorded (each rank validates rank 0's BatchNorm statistics)."""
    summary = json.loads((baseline / "summary.json").read_text())
    out = tmp_path / "eval"
    cmd = [
        *accelerate_cmd(2),
        "-m",
        "modaseg.evaluate",
        "--checkpoint",
        str(baseline / "best"),
        "--shards",
        str(shard_dir),
        "--split",
        "val",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["macro"]["iou"] == summary["best_val_miou"]


@MULTI
def test_tensorboard_has_scalars_images_and_config(baseline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(baseline / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    )
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/loss_focal",
        "train/loss_dice",
        "train/loss_lovasz",
        "train/lr",
        "train/grad_norm",
        "perf/images_per_s",
        "perf/data_wait_fraction",
        "val/miou",
        "val_iou/background",
    ):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    images = set(acc.Tags()["images"])
    assert "val/confusion" in images and "val_overlay/0" in images
    assert "config/text_summary" in acc.Tags()["tensors"]
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert all(v == v and v > 0 for v in losses)


@MULTI
def test_resume_after_sigterm_is_bitwise_identical(baseline, shard_dir, tmp_path):
    """SIGTERM mid-run: the ranks agree, save together, exit with the requeue code; the same command then
    resumes and ends with exactly the weights of the uninterrupted run."""
    run_dir = tmp_path / "run"
    cmd = training_cmd(run_dir, shard_dir, "train.validate_before_training=true")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = run_dir / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and " update 3 " in log.read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)  # what SLURM does to the job step; torchrun forwards it to the ranks
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    text = log.read_text()
    assert "stop requested" in text and f"exiting with code {EXIT_REQUEUE}" in text, out[-3000:]
    saved = list_checkpoints(run_dir)
    assert saved and read_state(saved[-1]).updates >= 3
    assert not (run_dir / "summary.json").exists()

    assert_ok(run_training(run_dir, shard_dir, "train.validate_before_training=true"))
    assert "resumed from" in (run_dir / "train.log").read_text()
    final, expected = weights(run_dir), weights(baseline)
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), f"{key} differs after resume"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == json.loads((baseline / "summary.json").read_text())["updates"]


@MULTI
def test_non_finite_loss_is_skipped_on_every_rank(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(run_dir, shard_dir, "train.epochs=1", env=clean_env(**{FAULT_NAN_ENV: "1,2"}))
    assert_ok(result)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bad_steps"] == 2
    assert "non-finite loss on 1 rank(s)" in (run_dir / "train.log").read_text()
    for t in weights(run_dir).values():
        assert torch.isfinite(t.float()).all()


@MULTI
def test_too_many_non_finite_losses_stop_with_a_clear_error(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(
        run_dir,
        shard_dir,
        "train.epochs=1",
        "train.max_bad_steps=1",
        env=clean_env(**{FAULT_NAN_ENV: "0,1,2"}),
    )
    assert result.returncode != 0
    assert "consecutive non-finite losses (train.max_bad_steps=1)" in result.stderr + result.stdout


@MULTI
def test_gradient_accumulation_matches_the_larger_batch(shard_dir, tmp_path):
    """k=2 micro-batches of 1 == one batch of 2 (same samples; BatchNorm frozen so batch statistics don't
    differ; plain SGD so the update is linear in the gradient)."""
    common = ["train.epochs=1", "train.steps_per_epoch=4", *LINEAR_UPDATE]
    big, small = tmp_path / "big", tmp_path / "small"
    assert_ok(
        run_training(
            big, shard_dir, *common, "data.batch_size=2", "optim.grad_accum=1", "train.steps_per_epoch=2"
        )
    )
    assert_ok(run_training(small, shard_dir, *common, "data.batch_size=1", "optim.grad_accum=2"))
    a, b = weights(big), weights(small)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@MULTI
def test_resume_auto_skips_a_corrupt_checkpoint_and_matches_from_the_epoch_boundary(
    baseline, shard_dir, tmp_path
):
    """The baseline's two epoch-end checkpoints, the newer one truncated: resume=auto falls back to the
    end of epoch 1, trains epoch 2 again, and ends bitwise equal to the uninterrupted run."""
    import shutil

    epoch_ends = [p for p in list_checkpoints(baseline) if read_state(p).batch == 0]
    assert [read_state(p).epoch for p in epoch_ends] == [1, 2]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for path in epoch_ends:
        shutil.copytree(path, run_dir / "checkpoints" / path.name)
    shutil.copytree(
        baseline / "checkpoints" / epoch_ends[0].name, run_dir / "checkpoints" / ".tmp-step-99999999"
    )
    newest = run_dir / "checkpoints" / epoch_ends[1].name / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as after a crash of the storage

    assert_ok(run_training(run_dir, shard_dir))
    text = (run_dir / "train.log").read_text()
    assert f"checkpoint {run_dir / 'checkpoints' / epoch_ends[1].name} is unusable" in text
    assert f"resumed from {run_dir / 'checkpoints' / epoch_ends[0].name} (epoch 1, batch 0" in text
    final, expected = weights(run_dir), weights(baseline)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@MULTI
def test_explicit_corrupt_checkpoint_is_a_clear_error(baseline, shard_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(list_checkpoints(baseline)[-1], ckpt)
    (ckpt / "optimizer.bin").write_bytes(b"garbage")
    result = run_training(tmp_path / "run", shard_dir, f"train.resume={ckpt}")
    assert result.returncode != 0
    assert f"checkpoint {ckpt} is corrupt or incomplete" in result.stderr + result.stdout


# ------------------------------------------------------------------------------------------------
# A failed start: one line, exit 2, nothing written


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`: relative path -> sha256 (folders: "dir")."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The `modaseg-train: error: ...` line of a failed start, asserted to be printed exactly once (rank 0
    only) with no traceback through modaseg's code; the launcher may add its own failure summary."""
    lines = [line for line in result.stderr.splitlines() if "modaseg-train: error:" in line]
    output = result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("modaseg-train: error: "), output[-6000:]
    assert f'File "{ROOT / "modaseg"}' not in output, output[-6000:]
    assert result.returncode != 0
    return lines[0]


def rank_exit_codes(launcher_output: str) -> dict[int, int]:
    """Each failed rank's exit code, from the failure summary of torchrun (inside accelerate launch)."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s+: (-?\d+)", launcher_output)
    return {int(rank): int(code) for rank, code in found}


@pytest.fixture(scope="module")
def shards_13(synth_dataset, tmp_path_factory) -> Path:
    """The same images with scarf/tie merged into headwear: 13 classes where shard_dir has 14."""
    tmp = tmp_path_factory.mktemp("shards13")
    (tmp / "merge.json").write_text('{"13": 12}')
    return make_shards(synth_dataset, tmp / "shards", "--category-map", str(tmp / "merge.json"))


@MULTI
def test_resume_with_another_config_changes_nothing_then_the_right_config_resumes(
    baseline, shard_dir, shards_13, tmp_path
):
    """A run stopped after epoch 1 (the baseline without its last checkpoint), resumed with another encoder
    or with shards of another class count: refused in one line naming what differs, and not one byte of the
    run folder changes (no checkpoint renamed corrupt-*, config.yaml, train.log, best/ untouched). The right
    config then resumes from epoch 1 and ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(baseline, run_dir)
    epoch_1, epoch_2 = list_checkpoints(run_dir)
    shutil.rmtree(epoch_2)
    before = tree_hashes(run_dir)
    same = "train.validate_before_training=true"

    result = run_training(run_dir, shard_dir, same, "model.encoder=resnet34")
    line = one_error_line(result)
    assert f"cannot resume {run_dir}: checkpoint {epoch_1.name} does not fit this model" in line
    assert "model.encoder='resnet18' (this run: 'resnet34')" in line and "Nothing was changed on disk" in line
    assert rank_exit_codes(result.stderr)[0] == 2
    assert tree_hashes(run_dir) == before

    line = one_error_line(run_training(run_dir, shards_13, same))
    assert f"14 classes (this run's shards: 13, data.shards={shards_13})" in line
    assert tree_hashes(run_dir) == before

    assert_ok(run_training(run_dir, shard_dir, same))
    updates = read_state(epoch_1).updates
    assert (
        f"resumed from {epoch_1} (epoch 1, batch 0, {updates} updates)" in (run_dir / "train.log").read_text()
    )
    final, expected = weights(run_dir), weights(baseline)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resume_none_in_an_existing_run_is_refused_and_nothing_changes(baseline, shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline, run_dir)
    before = tree_hashes(run_dir)
    result = run_training_cli(run_dir, shard_dir, "train.resume=none")
    line = one_error_line(result)
    assert result.returncode == 2
    assert f"{run_dir} holds an earlier run (checkpoints, best, final, summary.json)" in line
    assert "continue it with train.resume=auto" in line
    assert tree_hashes(run_dir) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.val_every=0", "train.val_every: must be >= 1 (epochs), got 0"),
        ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
        ("data.eval_batch_size=0", "data.eval_batch_size: must be >= 1, got 0"),
        ("train.collective_timeout_minutes=0", "train.collective_timeout_minutes: must be > 0, got 0.0"),
    ],
)
def test_out_of_range_values_stop_before_the_run_folder_exists(shard_dir, tmp_path, override, message):
    run_dir = tmp_path / "run"
    result = run_training_cli(run_dir, shard_dir, override)
    assert message in one_error_line(result)
    assert result.returncode == 2
    assert not run_dir.exists()


def test_a_run_folder_that_is_a_file_is_one_line(shard_dir, tmp_path):
    run_dir = tmp_path / "notes.txt"
    run_dir.write_text("not a run")
    result = run_training_cli(run_dir, shard_dir)
    assert f"train.output_dir={run_dir}: exists and is not a folder" in one_error_line(result)
    assert result.returncode == 2 and run_dir.read_text() == "not a run"


MISSING = "MISSING"  # replaced by a path that does not exist


@MULTI
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("data.batch_size=two", "data.batch_size: expected an integer, got 'two'"),
        (f"data.shards={MISSING}", f"no manifest.json in {MISSING}"),
        (f"train.resume={MISSING}", f"train.resume={MISSING}: not a checkpoint folder"),
        ("model.encoder=resnet999", "model.encoder='resnet999' is not an SMP encoder; did you mean resnet"),
        (
            "optim.mixed_precision=fp16",
            "optim.mixed_precision=fp16: fp16 mixed precision needs a CUDA device",
        ),
        ("model.sync_batchnorm=true", "model.sync_batchnorm=true needs GPUs"),
    ],
    ids=["typo", "type", "shards", "resume", "encoder", "fp16-on-cpu", "sync-batchnorm-on-cpu"],
)
def test_user_errors_under_the_launcher_are_one_line_from_rank_0(shard_dir, tmp_path, override, message):
    missing = str(tmp_path / "missing")
    run_dir = tmp_path / "run"
    result = run_training(run_dir, shard_dir, override.replace(MISSING, missing))
    assert message.replace(MISSING, missing) in one_error_line(result)
    assert rank_exit_codes(result.stderr)[0] == 2
    assert not run_dir.exists()


def test_print_config_prints_the_resolved_yaml_that_loads_back(tmp_path):
    """--print-config: the resolved YAML on stdout, exit 0, nothing else done; an unquoted `no` (YAML's
    false) is full precision."""
    config = ROOT / "configs" / "tiny.yaml"
    overrides = [
        "optim.mixed_precision=no",
        "optim.lr=3e-4",
        "data.batch_size=8",
        f"train.output_dir={tmp_path / 'r'}",
    ]
    result = subprocess.run(
        modaseg_train_cmd("--config", str(config), *overrides, "--print-config"),
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "printed.yaml").write_text(result.stdout)
    printed = load_config(tmp_path / "printed.yaml")
    assert printed == load_config(config, overrides)
    assert printed.optim.mixed_precision == "no" and printed.optim.lr == 3e-4
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------
# Empty splits


def reject_constant(name: str):
    raise ValueError(f"summary.json holds {name}, which is not JSON")


@MULTI
@pytest.mark.parametrize("split", ["1,0,0", "0.7,0.3,0"])
def test_empty_val_or_test_split_trains_with_a_warning_and_a_valid_summary(synth_dataset, tmp_path, split):
    shards = make_shards(synth_dataset, tmp_path / "shards", "--split", split)
    run_dir = tmp_path / "run"
    result = run_training(run_dir, shards, "train.epochs=1", "train.steps_per_epoch=2")
    assert_ok(result)
    log = (run_dir / "train.log").read_text()
    assert "the test split is empty: no final test evaluation" in log
    summary = json.loads((run_dir / "summary.json").read_text(), parse_constant=reject_constant)
    assert summary["test"] is None and summary["updates"] == 2
    assert "epoch -1" not in log + result.stdout + result.stderr + json.dumps(summary)
    if split == "1,0,0":
        assert "the val split is empty" in log
        assert summary["best_val_miou"] is None and summary["best_epoch"] is None and summary["history"] == []
        assert summary["tested_model"] == "final model (no validation)"
        best, final = weights(run_dir, "best"), weights(run_dir, "final")
        assert all(torch.equal(best[k], final[k]) for k in final)
    else:
        assert summary["best_epoch"] == 1 and 0 <= summary["best_val_miou"] <= 1
        assert [h["epoch"] for h in summary["history"]] == [1]


def test_empty_train_split_is_one_line_whose_advice_works(synth_dataset, tmp_path):
    empty = make_shards(synth_dataset, tmp_path / "empty", "--split", "0,0.5,0.5")
    run_dir = tmp_path / "run"
    result = run_training_cli(run_dir, empty)
    line = one_error_line(result)
    assert result.returncode == 2 and not run_dir.exists()
    assert (
        f"data.shards={empty}: the train split is empty (the shards were cut with --split 0,0.5,0.5)" in line
    )
    advice = re.search(r"--out NEW_FOLDER (--split \S+), then train with data.shards=NEW_FOLDER", line)
    assert advice, line
    fixed = make_shards(synth_dataset, tmp_path / "fixed", *advice.group(1).split())
    result = run_training_cli(run_dir, fixed, "train.epochs=1", "train.steps_per_epoch=1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["updates"] == 1


# ------------------------------------------------------------------------------------------------
# Preemption at an epoch end


def training_workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes that `accelerate launch` started, by rank."""
    workers = {}
    for child in psutil.Process(launcher.pid).children():
        rank = child.environ().get("RANK")
        if rank is not None:
            workers[int(rank)] = child
    assert sorted(workers) == [0, 1], workers
    return workers


def wait_for(path_or_paths, proc: subprocess.Popen, timeout: float = 300) -> None:
    paths = path_or_paths if isinstance(path_or_paths, list | tuple) else [path_or_paths]
    deadline = time.time() + timeout
    while not any(p.exists() for p in paths):
        assert proc.poll() is None, f"training ended before {paths[0]} appeared"
        assert time.time() < deadline, f"{paths[0]} never appeared"
        time.sleep(0.005)


@MULTI
def test_sigterm_during_validation_exits_for_requeue_and_the_resumed_run_validates_first(
    baseline, shard_dir, tmp_path
):
    """SIGTERM to both training processes (as `scancel --signal=TERM` sends it) right after the epoch's
    checkpoint appears, i.e. during that epoch's validation: both ranks exit 75, the checkpoint says the
    validation is pending, and the same command resumes, validates epoch 1 first, and ends with the
    uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    overrides = ("train.validate_before_training=true", "data.eval_batch_size=1")  # a longer validation
    epoch_end = checkpoint_root(run_dir) / list_checkpoints(baseline)[0].name
    proc = subprocess.Popen(
        training_cmd(run_dir, shard_dir, *overrides),
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(epoch_end, proc)
        for worker in training_workers(proc).values():
            worker.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert rank_exit_codes(out) == {0: EXIT_REQUEUE, 1: EXIT_REQUEUE}, out[-5000:]
    state = read_state(epoch_end)
    assert state.pending_validation and [h["epoch"] for h in state.history] == [0], out[-5000:]
    assert list_checkpoints(run_dir) == [epoch_end]
    assert not (run_dir / "summary.json").exists()

    assert_ok(run_training(run_dir, shard_dir, *overrides))
    text = (run_dir / "train.log").read_text()
    after = text[text.index(f"resumed from {epoch_end}") :]
    assert after.index("epoch 1 validation: mIoU") < after.index("epoch 1 batch 1/")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    final, expected = weights(run_dir), weights(baseline)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@MULTI
def test_a_stop_that_reaches_one_rank_while_the_epoch_checkpoint_is_written_stops_both(
    baseline, shard_dir, tmp_path
):
    """SIGTERM to rank 1 only, while the end-of-epoch checkpoint is being written (no validation due):
    the ranks agree on the stop instead of reading their own flag, so both exit 75 (rank 0 used to
    train on alone and fail in the next collective); the same command resumes to the baseline's weights."""
    run_dir = tmp_path / "run"
    epoch_end = checkpoint_root(run_dir) / list_checkpoints(baseline)[0].name
    proc = subprocess.Popen(
        training_cmd(run_dir, shard_dir, "train.val_every=2"),
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for([epoch_end.with_name(f".tmp-{epoch_end.name}"), epoch_end], proc)
        training_workers(proc)[1].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert rank_exit_codes(out) == {0: EXIT_REQUEUE, 1: EXIT_REQUEUE}, out[-5000:]
    assert_ok(run_training(run_dir, shard_dir, "train.val_every=2"))
    final, expected = weights(run_dir), weights(baseline)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------------
# Hardware fit and devices


@MULTI
def test_micro_batch_auto_splits_the_batch_when_memory_runs_out(shard_dir, tmp_path):
    """MODASEG_FAULT_OOM_ABOVE=1: every probe above 1 sample runs out of memory, so a batch of 4 is trained
    as 4 micro-steps of 1, as plan.json and the printed plan say, with the weights of micro-batch 4. A
    resumed run keeps the plan's micro-batch without searching again."""
    common = ["train.epochs=1", "train.steps_per_epoch=2", "data.batch_size=4", *LINEAR_UPDATE]
    auto, whole = tmp_path / "auto", tmp_path / "whole"
    result = run_training(
        auto,
        shard_dir,
        *common,
        "train.micro_batch=auto",
        env=clean_env(COLUMNS="200", **{FAULT_OOM_ENV: "1"}),
    )
    assert_ok(result)
    plan = json.loads((auto / PLAN_NAME).read_text())
    assert plan["micro_batch"] == 1 and plan["micro_steps"] == 4
    assert "tried 4 out of memory, 2 out of memory, 1 fits" in plan["micro_batch_reason"]
    assert "micro-batch 1 x 4 micro-steps x accumulation 1 x 2 process(es) = global batch 8" in result.stderr

    assert_ok(run_training(whole, shard_dir, *common, "train.micro_batch=4"))
    assert json.loads((whole / PLAN_NAME).read_text())["micro_steps"] == 1
    a, b = weights(whole), weights(auto)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)

    assert_ok(run_training(auto, shard_dir, *common, "train.micro_batch=auto"))  # no fault: would be 4
    resumed = json.loads((auto / PLAN_NAME).read_text())
    assert resumed["micro_batch"] == 1 and resumed["micro_batch_reason"] == "as planned when the run started"


@MULTI
def test_compiled_model_under_ddp_saves_plain_weights_resumes_and_tests_the_best(shard_dir, tmp_path):
    """model.compile=true with 2 processes: DDP wraps the plain module and torch.compile the DDP module, so
    checkpoints and exports hold SMP's own names (no `_orig_mod.`), a resumed run accepts the checkpoint,
    and the final test loads best/ into the model."""
    run_dir = tmp_path / "run"
    common = ["model.compile=true", "train.steps_per_epoch=1", "train.overlay_samples=0"]
    assert_ok(run_training(run_dir, shard_dir, *common, "train.epochs=1"))
    (checkpoint,) = list_checkpoints(run_dir)
    for saved in (checkpoint / "model.safetensors", run_dir / "best" / "model.safetensors"):
        assert not [k for k in load_file(str(saved)) if "_orig_mod" in k or k.startswith("module.")], saved
    assert_ok(run_training(run_dir, shard_dir, *common, "train.epochs=2", "train.resume=auto"))
    assert f"resumed from {checkpoint} (epoch 1, batch 0" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["tested_model"].startswith("best checkpoint")


@pytest.mark.gpu
def test_sync_batchnorm_probe_with_one_rank_out_of_memory_agrees_without_hanging(shard_dir, tmp_path):
    """model.sync_batchnorm=true on 2 GPUs, and only rank 1 runs out of memory above a micro-batch of 1:
    the probes make no collective (no SyncBatchNorm yet), so rank 0 never waits in a BatchNorm all-reduce
    that rank 1 does not make; both then train with the smallest micro-batch any rank found. (SyncBatchNorm
    has no CPU kernel: on CPU processes the setting is refused with one line, tested above.)"""
    require_gpus(2)
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(ROOT / "launch" / "gpu-8.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        *training_cmd(run_dir, shard_dir)[len(accelerate_cmd()) :],
        "train.device=cuda",
        "model.sync_batchnorm=true",
        "data.batch_size=4",
        "train.micro_batch=auto",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.collective_timeout_minutes=1",  # a hang fails in a minute, not after the test's timeout
    ]
    env = gpu_env(**{FAULT_OOM_ENV: "1", FAULT_OOM_RANK_ENV: "1"})
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert_ok(result)
    plan = json.loads((run_dir / PLAN_NAME).read_text())
    assert plan["micro_batch"] == 1 and plan["micro_steps"] == 4


@pytest.mark.parametrize(
    "how", ["train.device=cuda", "CUDA_VISIBLE_DEVICES=0", "SLURM_GPUS_ON_NODE=1", "gpu-1.yaml", "gpu-8.yaml"]
)
def test_a_gpu_asked_for_without_usable_cuda_is_one_line_not_a_cpu_run(shard_dir, tmp_path, how):
    """Asked for by the config, by the device ids a launcher or the user set, or by a SLURM GPU allocation:
    without usable CUDA the run stops at start-up with why and what to do, before writing anything.
    gpu-8.yaml (the README's 8-GPU command) stops so too, rather than train as 8 CPU processes."""
    if how in ("CUDA_VISIBLE_DEVICES=0", "gpu-1.yaml", "gpu-8.yaml") and host_gpus():
        pytest.skip("this host has a usable GPU 0: the run would (rightly) train on it")
    run_dir = tmp_path / "run"
    if how.endswith(".yaml"):  # the launch config's gpu_ids: accelerate sets CUDA_VISIBLE_DEVICES to them
        # (over the suite's empty CUDA_VISIBLE_DEVICES, which hides every GPU)
        cmd = [
            str(Path(sys.executable).with_name("accelerate")),
            "launch",
            "--config_file",
            str(ROOT / "launch" / how),
            "--main_process_port",
            str(free_port()),
            *training_cmd(run_dir, shard_dir)[len(accelerate_cmd()) :],
        ]
        result = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
        if how == "gpu-1.yaml":  # accelerate's one-process launcher
            assert "returned non-zero exit status 2" in result.stderr, result.stderr[-3000:]
        else:  # torchrun's failure summary: rank 0 ended with the user-error code
            assert rank_exit_codes(result.stderr).get(0) == 2, result.stderr[-3000:]
        asked = "CUDA_VISIBLE_DEVICES=0" + (",1,2,3,4,5,6,7" if how == "gpu-8.yaml" else "")
    elif how == "train.device=cuda":
        result = run_training_cli(run_dir, shard_dir, how)
        asked = how
    else:
        var, value = how.split("=")
        result = run_training_cli(run_dir, shard_dir, env=clean_env(**{var: value}))
        asked = how
    line = one_error_line(result)
    assert line.startswith("modaseg-train: error: a GPU was asked for (") and asked in line, line
    why = re.search(r"\) but (no NVIDIA driver|no CUDA device|the NVIDIA driver|this torch)", line)
    assert why, line
    if why.group(1) in ("no NVIDIA driver", "no CUDA device"):  # a CUDA 12 build would not help here
        assert "CUDA 12" not in line and "run on a machine or SLURM job with a GPU" in line, line
    assert line.endswith("or run on CPU with train.device=cpu"), line
    assert how.endswith(".yaml") or result.returncode == 2
    assert not run_dir.exists()


def test_deterministic_kernels_train_end_to_end_on_cpu(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_training_cli(
        run_dir, shard_dir, "train.deterministic=true", "train.epochs=1", "train.steps_per_epoch=2"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    plan = json.loads((run_dir / PLAN_NAME).read_text())
    assert plan["determinism"].startswith("deterministic kernels")
    assert json.loads((run_dir / "summary.json").read_text())["updates"] == 2


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_training_step_on_a_gpu(shard_dir, tmp_path, precision):
    """One update through the real CLI with train.device=cuda; under fp16 the loss scaler is used and
    saved with the checkpoint."""
    require_gpus(1)
    run_dir = tmp_path / "run"
    result = run_training_cli(
        run_dir,
        shard_dir,
        "train.device=cuda",
        f"optim.mixed_precision={precision}",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        env=gpu_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["precision"]["mode"] == precision and summary["updates"] == 1
    assert summary["plan"]["device"].startswith("cuda") and summary["peak_memory_kind"] == "cuda"
    (checkpoint,) = list_checkpoints(run_dir)
    assert (checkpoint / "scaler.pt").is_file() == (precision == "fp16")
    assert all(torch.isfinite(t.float()).all() for t in weights(run_dir).values())


@pytest.mark.gpu
def test_evaluation_on_one_and_two_gpus_agrees(baseline, shard_dir, tmp_path):
    """modaseg-eval of the same model on 1 GPU and on 2 (DDP over NCCL, each GPU half the split): the
    same confusion matrix."""
    require_gpus(2)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launches = {
        1: ["--config_file", str(ROOT / "launch" / "gpu-1.yaml"), "--gpu_ids", "all"],  # the host's own
        2: ["--config_file", str(ROOT / "launch" / "gpu-8.yaml"), "--num_processes", "2"],
    }
    for n, launch in launches.items():
        cmd = [
            accelerate,
            "launch",
            *launch,
            "--main_process_port",
            str(free_port()),
            "-m",
            "modaseg.evaluate",
            "--checkpoint",
            str(baseline / "best"),
            "--shards",
            str(shard_dir),
            "--split",
            "val",
            "--batch-size",
            "1",
            "--workers",
            "1",
            "--mixed-precision",
            "no",
            "--out",
            str(tmp_path / f"gpus{n}"),
        ]
        result = subprocess.run(cmd, cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    one, two = ((tmp_path / f"gpus{n}" / "confusion.csv").read_text() for n in (1, 2))
    assert one == two


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"optim:\n  lr: 0.1 # caf\xe9\n", "not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
        (b"optim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' given twice (line 2 and line 3); keep one of them"),
    ],
    ids=["latin-1", "duplicate-key"],
)
def test_a_config_file_not_utf8_or_with_a_key_twice_is_one_line(tmp_path, capsys, content, message):
    from modaseg.train import main

    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"modaseg-train: error: {config}: {message}\n"


@MULTI
def test_weight_average_is_what_is_exported_and_a_resume_continues_it_bit_for_bit(shard_dir, tmp_path):
    """train.ema_decay: final/ holds the average (not the training weights of the last checkpoint), and a
    run resumed from the end of epoch 1 ends with exactly the uninterrupted run's average."""
    import shutil

    average = ["train.ema_decay=0.9"]
    first = tmp_path / "first"
    assert_ok(run_training(first, shard_dir, *average))
    epoch_ends = [p for p in list_checkpoints(first) if read_state(p).batch == 0]
    assert [read_state(p).epoch for p in epoch_ends] == [1, 2]
    assert all((p / "ema.safetensors").is_file() for p in epoch_ends)
    trained = load_file(str(epoch_ends[1] / "model.safetensors"))
    exported = weights(first)
    assert not all(torch.equal(exported[k], trained[k]) for k in trained), "final/ is not the average"

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(epoch_ends[0], resumed / "checkpoints" / epoch_ends[0].name)
    assert_ok(run_training(resumed, shard_dir, *average))
    assert "resumed from" in (resumed / "train.log").read_text()
    again = weights(resumed)
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_max_minutes_sizes_the_epochs_and_the_schedule_ends_with_them(shard_dir, tmp_path):
    """train.max_minutes: three decisions in the log (estimate, first epoch, first validation), the run
    trains the planned epochs (kept in the checkpoint) and its learning rate has decayed to the end."""
    run_dir = tmp_path / "run"
    budget = ["train.max_minutes=0.5", "train.epochs=60", "train.val_every=2", "optim.warmup_steps=0"]
    result = run_training_cli(run_dir, shard_dir, *budget)
    assert_ok(result)
    text = (run_dir / "train.log").read_text()
    decisions = re.findall(r"train\.max_minutes=0\.5 \(([^;]+);.*: (\d+) epochs", text)
    assert [how for how, _ in decisions] == [
        "estimated from the plan's timed step",
        "first epoch measured",
        "epoch and validation measured",
    ], text[-3000:]
    planned = int(decisions[-1][1])
    state = read_state(list_checkpoints(run_dir)[-1])
    assert state.planned_epochs == planned and state.budget_stage == 2 and state.epoch == planned
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == planned < 60
    rates = [float(x) for x in re.findall(r" lr ([0-9.e+-]+) ", text)]
    assert rates[-1] < 0.2 * max(rates), "the schedule did not run to its end"
