"""The log meter's windows and the run's log file that waits for the resume decision."""

from __future__ import annotations

import logging
import math

from modaseg.console import setup_logging
from modaseg.monitor import DeferredLogFile, LogMeter
from modaseg.step import StepSync


def sync(losses: list[float], finite: int) -> StepSync:
    return StepSync(nonfinite_ranks=0, stop=False, skipped_samples=0, finite_batches=finite, loss_sums=losses)


def test_a_window_averages_losses_over_finite_batches_and_counts_images_per_second():
    meter = LogMeter()
    meter.start -= 2.0  # the window began 2 s ago
    meter.add_wait(0.5)
    meter.add_update(sync([6.0, 4.0], finite=2), images=8)
    meter.add_update(sync([3.0, 2.0], finite=1), images=8)
    window = meter.close_window()
    assert window.losses == [3.0, 2.0]  # (6 + 3) / 3, (4 + 2) / 3
    assert 7.9 < window.images_per_s * window.seconds / 2 < 8.1  # 16 images in ~2 s
    assert 0.24 < window.data_wait_fraction < 0.26
    assert meter.images_seen == 16 and meter.images == 0  # the next window starts empty


def test_a_window_without_a_finite_batch_reports_nan_not_zero():
    meter = LogMeter()
    meter.add_update(sync([0.0, 0.0], finite=0), images=4)
    assert all(math.isnan(v) for v in meter.close_window().losses)


def test_restart_leaves_time_before_it_out_of_the_run_rate():
    meter = LogMeter()
    meter.start -= 100.0  # a validation that took 100 s
    meter.restart()
    meter.add_update(sync([1.0], finite=1), images=4)
    meter.end_epoch()
    assert meter.train_seconds < 1.0


def test_the_log_file_gets_the_records_from_before_it_was_opened(tmp_path):
    setup_logging(True, 0)
    log = logging.getLogger("modaseg")
    deferred = DeferredLogFile()
    log.info("decided before the run folder may be written")
    deferred.open(tmp_path / "train.log")
    log.info("after")
    deferred.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "decided before the run folder may be written",
        "after",
    ]
    assert all(" INFO [rank 0] " in line for line in lines)
