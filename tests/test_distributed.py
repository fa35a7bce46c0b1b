"""Decisions shared by the ranks, over a real gloo process group of 2 spawned processes."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from conftest import spawn_gloo

from modaseg.distributed import any_rank

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _any_rank_worker(out: str) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    seen = {
        "only_rank_1": any_rank(rank == 1, torch.device("cpu")),
        "only_rank_0": any_rank(rank == 0, torch.device("cpu")),
        "none": any_rank(False, torch.device("cpu")),
        "all": any_rank(True, torch.device("cpu")),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_a_stop_seen_by_one_rank_is_seen_by_every_rank():
    """A signal that reached one rank only (or reached it a moment earlier) stops every rank alike:
    the epoch-end stop decision reads this, not the local flag."""
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo(_any_rank_worker, args=(tmp,))
        seen = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(2)]  # noqa: SIM115
    expected = {"only_rank_1": True, "only_rank_0": True, "none": False, "all": True}
    assert seen == [expected, expected]


def test_any_rank_without_a_process_group_is_the_local_flag():
    assert any_rank(True, torch.device("cpu")) is True
    assert any_rank(False, torch.device("cpu")) is False
