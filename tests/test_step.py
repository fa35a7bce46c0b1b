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
