"""Training through the real `accelerate launch` with 2 CPU processes over gloo (tiny encoder and images)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, accelerate_cmd, clean_env, run_training, training_cmd
from safetensors.torch import load_file

from modaseg.checkpoint import list_checkpoints, read_state
from modaseg.distributed import EXIT_REQUEUE
from modaseg.step import FAULT_NAN_ENV

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


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


def test_non_finite_loss_is_skipped_on_every_rank(shard_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_training(run_dir, shard_dir, "train.epochs=1", env=clean_env(**{FAULT_NAN_ENV: "1,2"}))
    assert_ok(result)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bad_steps"] == 2
    assert "non-finite loss on 1 rank(s)" in (run_dir / "train.log").read_text()
    for t in weights(run_dir).values():
        assert torch.isfinite(t.float()).all()


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


def test_gradient_accumulation_matches_the_larger_batch(shard_dir, tmp_path):
    """k=2 micro-batches of 1 == one batch of 2 (same samples; BatchNorm frozen so batch statistics don't
    differ; plain SGD so the update is linear in the gradient)."""
    common = [
        "train.epochs=1",
        "train.steps_per_epoch=4",
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


def test_explicit_corrupt_checkpoint_is_a_clear_error(baseline, shard_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(list_checkpoints(baseline)[-1], ckpt)
    (ckpt / "optimizer.bin").write_bytes(b"garbage")
    result = run_training(tmp_path / "run", shard_dir, f"train.resume={ckpt}")
    assert result.returncode != 0
    assert f"checkpoint {ckpt} is corrupt or incomplete" in result.stderr + result.stdout
