"""modaseg.run through the real CLI: what a run refuses before it allocates anything, and the run
folder's lock."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
from conftest import ROOT, clean_env, modaseg_train_cmd, run_training, run_training_cli

from modaseg.checkpoint import list_checkpoints
from modaseg.config import load_config
from modaseg.distributed import EXIT_REQUEUE
from modaseg.files import LOCK_NAME
from modaseg.run import CONFIG_HISTORY

pytestmark = pytest.mark.slow


def test_a_crop_the_machine_cannot_hold_is_one_line_before_allocating(shard_dir, tmp_path):
    """8192 x 8192 (under the config's ceiling) x 2 samples keeps ~190 GB of activations: refused from the
    bytes per pixel measured on the model, in one line and seconds, instead of growing until the kernel
    kills the process; the run folder is never created."""
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    result = run_training_cli(run_dir, shard_dir, "data.crop_height=8192", "data.crop_width=8192")
    elapsed = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if "modaseg-train: error:" in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-4000:]
    assert "data.crop_height x data.crop_width = 8192 x 8192: one forward/backward of 2 sample(s)" in lines[0]
    assert "bytes per pixel with model.encoder=resnet18), more than the" in lines[0]
    assert "lower the crop or data.batch_size" in lines[0]
    assert f'File "{ROOT / "modaseg"}' not in result.stderr
    assert not run_dir.exists() and elapsed < 120


@pytest.mark.multiprocess
def test_a_second_training_in_a_busy_run_folder_is_refused_by_every_rank(shard_dir, tmp_path):
    """Training A (one process) holds RUN/.modaseg.lock; training B in the same folder under `accelerate
    launch` with 2 processes is refused in one line from rank 0 naming A's pid, rank 0 exits 2, and A goes
    on; A stopped by SIGTERM (exit 75, checkpoint) releases the lock, and the same command resumes."""
    run_dir = tmp_path / "run"
    a = subprocess.Popen(
        modaseg_train_cmd(
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            f"data.shards={shard_dir}",
            f"train.output_dir={run_dir}",
            "train.epochs=50",
        ),
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (run_dir / LOCK_NAME).exists():
            assert a.poll() is None and time.time() < deadline, "training A never took the lock"
            time.sleep(0.05)
        b = run_training(run_dir, shard_dir)
        assert a.poll() is None, "training A must go on"
        lines = [line for line in b.stderr.splitlines() if "modaseg-train: error:" in line]
        assert len(lines) == 1, b.stderr[-6000:]
        assert f"this run folder is in use by another training (pid {a.pid} on this host" in lines[0]
        assert f'File "{ROOT / "modaseg"}' not in b.stdout + b.stderr
        assert rank_exit_codes(b.stderr).get(0) == 2, b.stderr[-6000:]
        a.send_signal(signal.SIGTERM)
        out, _ = a.communicate(timeout=300)
    finally:
        a.kill()
    assert a.returncode == EXIT_REQUEUE, out[-5000:]
    assert not (run_dir / LOCK_NAME).exists() and list_checkpoints(run_dir)


def rank_exit_codes(launcher_output: str) -> dict[int, int]:
    """Each failed rank's exit code, from the failure summary of torchrun (inside accelerate launch)."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s+: (-?\d+)", launcher_output)
    return {int(rank): int(code) for rank, code in found}


def test_a_finished_run_started_again_keeps_its_summary_and_a_changed_resume_keeps_history(
    shard_dir, tmp_path
):
    """Started again when finished: summary.json keeps the training's wall time and speed (it used to be
    overwritten with the re-run's seconds and 0 img/s), the evaluation is added under reevaluations.
    Resumed with another optim.lr and more epochs: a warning that names the changes and says the run no
    longer repeats bit for bit, the changes appended to config-history.jsonl with the update they start at,
    config.yaml updated, and the summary listing them."""
    run_dir = tmp_path / "run"
    result = run_training_cli(run_dir, shard_dir, "train.epochs=1")
    assert result.returncode == 0, result.stderr[-4000:]
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["train_images_per_s"] > 0 and first["config_changes"] == []

    result = run_training_cli(run_dir, shard_dir, "train.epochs=1")
    assert result.returncode == 0, result.stderr[-4000:]
    again = json.loads((run_dir / "summary.json").read_text())
    reevaluation = again.pop("reevaluations")
    assert again == first
    assert len(reevaluation) == 1 and reevaluation[0]["test"] == first["test"]
    assert not (run_dir / CONFIG_HISTORY).exists(), "the same config is no change"

    updates = first["updates"]
    result = run_training_cli(run_dir, shard_dir, "train.epochs=2", "optim.lr=1e-3")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed at update {updates} with another config: optim.lr 0.003 -> 0.001" in result.stderr
    assert "train.epochs 1 -> 2" in result.stderr and "no longer repeats bit for bit" in result.stderr
    (record,) = [json.loads(line) for line in (run_dir / CONFIG_HISTORY).read_text().splitlines()]
    assert record["changed"] == {"optim.lr": [0.003, 0.001], "train.epochs": [1, 2]}
    assert (record["updates"], record["epoch"]) == (updates, 1)
    assert load_config(run_dir / "config.yaml").optim.lr == 1e-3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config_changes"] == [record] and summary["epochs"] == 2
