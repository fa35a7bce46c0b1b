"""The pieces of one training step that have logic, without processes: the learning-rate schedule, the
one collective per update (pack/unpack), the skip decisions, micro-batch accumulation, NaN injection."""

from __future__ import annotations

import itertools

import pytest

from modaseg.config import OptimConfig
from modaseg.step import learning_rate


@pytest.mark.parametrize("schedule", ["poly", "cosine", "constant"])
def test_learning_rate_schedule(schedule):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule=schedule)
    rates = [learning_rate(u, 100, cfg) for u in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(rates[:10]))
    if schedule == "constant":
        assert rates[-1] == 1.0
    else:
        assert rates[-1] < 0.05 and all(a >= b for a, b in itertools.pairwise(rates[10:]))


def _nan_statistics_worker(out: str) -> None:
    import json
    import os

    import torch.distributed as dist
    from torch import nn

    from modaseg.step import TrainingDiverged, check_buffers_finite

    rank = dist.get_rank()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    if rank == 1:
        model[1].running_var[2] = float("nan")  # NaN activations reached this rank's statistics only
    try:
        check_buffers_finite(model, "epoch 0 batch 3/4")
        said = None
    except TrainingDiverged as e:
        said = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(said, f)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_non_finite_statistics_on_one_rank_stop_every_rank_with_the_same_reason(tmp_path):
    """Two gloo ranks, BatchNorm statistics non-finite on rank 1 only: both raise the same one-line error
    naming the buffer and the rank (rank 0 prints it), none waits alone in the next collective."""
    import json

    from conftest import spawn_gloo

    spawn_gloo(_nan_statistics_worker, args=(str(tmp_path),))
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert said[0] is not None and said[0] == said[1], said
    assert said[0].startswith("1.running_var became non-finite on rank 1 (1 of 2 ranks) at epoch 0 batch 3/4")
    assert "\n" not in said[0]
