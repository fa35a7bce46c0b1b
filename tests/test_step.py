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


def test_loss_sums_leave_non_finite_batches_out_and_count_them():
    import torch

    from modaseg.step import LossSums

    sums = LossSums(["focal", "dice"], torch.device("cpu"))
    sums.add(torch.tensor(3.0), {"focal": torch.tensor(1.0), "dice": torch.tensor(2.0)})
    sums.add(torch.tensor(float("nan")), {"focal": torch.tensor(1.0), "dice": torch.tensor(2.0)})
    sums.add(torch.tensor(5.0), {"focal": torch.tensor(float("inf")), "dice": torch.tensor(2.0)})
    sums.add(torch.tensor(1.0), {"focal": torch.tensor(0.5), "dice": torch.tensor(0.5)})
    assert sums.sums.tolist() == [4.0, 1.5, 2.5]
    assert int(sums.finite) == 2 and int(sums.nonfinite) == 2


@pytest.mark.parametrize(("stop", "skipped"), [(False, 0), (True, 3)])
def test_pack_then_unpack_of_one_rank_is_what_went_in(stop, skipped):
    import torch

    from modaseg.step import LossSums, StepSync

    sums = LossSums(["dice"], torch.device("cpu"))
    sums.add(torch.tensor(2.0), {"dice": torch.tensor(0.25)})
    sums.add(torch.tensor(float("nan")), {"dice": torch.tensor(0.25)})
    got = StepSync.unpack(StepSync.pack(sums, stop, skipped))
    assert got == StepSync(
        nonfinite_ranks=1, stop=stop, skipped_samples=skipped, finite_batches=1, loss_sums=[2.0, 0.25]
    )


def test_summed_packs_of_two_ranks_unpack_to_the_agreement():
    """What the one all-reduce (a sum) of two ranks' packs means: ranks with a NaN, any stop, totals."""
    import torch

    from modaseg.step import LossSums, StepSync

    a, b = LossSums([], torch.device("cpu")), LossSums([], torch.device("cpu"))
    a.add(torch.tensor(1.0), {})
    a.add(torch.tensor(float("nan")), {})
    b.add(torch.tensor(3.0), {})
    got = StepSync.unpack(StepSync.pack(a, False, 1) + StepSync.pack(b, True, 2))
    assert (got.nonfinite_ranks, got.stop, got.skipped_samples, got.finite_batches) == (1, True, 3, 2)
    assert got.loss_sums == [4.0]


def test_inject_nan_poisons_exactly_the_listed_batches_across_micro_steps():
    import math

    import torch

    from modaseg.step import InjectNaN

    def loss_fn(logits, target):
        return logits.sum(), {}

    injected = InjectNaN(loss_fn, batches={1, 3}, micro_steps=2, first_batch=1)
    x = torch.ones(1)
    poisoned = [math.isnan(float(injected(x, x)[0])) for _ in range(6)]  # batches 1, 1, 2, 2, 3, 3
    assert poisoned == [True, True, False, False, True, True]
