"""The training plan saved in the run folder and reused by a resumed run only where it still holds."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import ROOT

from modaseg.config import load_config
from modaseg.plan import PLAN_NAME, _saved_plan

L4 = "NVIDIA L4, 22.0 GiB"


@pytest.mark.parametrize(
    ("saved_on", "reused"),
    [
        (L4, True),
        ("NVIDIA A100-SXM4-80GB, 79.1 GiB", False),  # another GPU model
        ("NVIDIA L4, 11.0 GiB", False),  # the same model with less memory (a MIG slice)
        (None, False),  # a plan.json that does not say (written before the device was recorded)
    ],
)
def test_a_saved_plan_is_reused_only_on_the_device_it_was_made_for(tmp_path, caplog, saved_on, reused):
    """A micro-batch found to fit one GPU may not fit another: on any other device (model or memory) the
    resumed run plans again, and says so."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"train.output_dir={tmp_path}", "train.resume=auto"])
    plan = {"batch_size": cfg.data.batch_size, "micro_batch": 1, "workers": 3, "workers_reason": "x"}
    if saved_on is not None:
        plan["hardware"] = saved_on
    (tmp_path / PLAN_NAME).write_text(json.dumps(plan))
    with caplog.at_level(logging.INFO, logger="modaseg"):
        found = _saved_plan(tmp_path, cfg, L4)
    assert (found == plan) if reused else found is None
    said = [r.getMessage() for r in caplog.records]
    said = [m for m in said if "planning the micro-batch and workers again" in m]
    assert bool(said) != reused
    if not reused:
        assert f"this run is on {L4}" in said[0] and (saved_on or "an unrecorded device") in said[0]
