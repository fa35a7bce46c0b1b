"""modaseg.run through the real CLI: what a run refuses before it allocates anything."""

from __future__ import annotations

import time

import pytest
from conftest import ROOT, run_training_cli

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
