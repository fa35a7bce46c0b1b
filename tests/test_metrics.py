"""Confusion matrix and report: hand-computed cases, files, and the 2-process reduction."""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from fractions import Fraction as Fr
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from rich.console import Console

from modaseg.metrics import (
    ConfusionMatrix,
    Report,
    compute_report,
    load_report,
    render_table,
    save_report,
)

NAMES = ["background", "bag", "belt", "boots", "footwear"]
IGNORE = 255
# (ground truth, prediction) per pixel; boots is predicted but never true, footwear appears nowhere.
TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE, 0]]])
PREDS = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 3]]])
EXPECTED_MATRIX = [
    [1, 1, 0, 1, 0],
    [0, 2, 0, 0, 0],
    [1, 0, 1, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
]


def hand_report() -> Report:
    cm = ConfusionMatrix(len(NAMES))
    cm.update(PREDS, TARGET)
    return compute_report(cm.matrix, NAMES)


def assert_list_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert math.isnan(g)
        else:
            assert math.isclose(g, float(e), rel_tol=1e-12), (got, expected)


def test_confusion_matrix_counts_and_ignore():
    cm = ConfusionMatrix(len(NAMES))
    cm.update(PREDS, TARGET)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == EXPECTED_MATRIX
    cm.update(PREDS, TARGET)
    assert cm.matrix.sum() == 14  # 2 x 7 non-ignored pixels


def test_confusion_matrix_accepts_logits():
    logits = torch.nn.functional.one_hot(PREDS, len(NAMES)).permute(0, 3, 1, 2).float()
    cm = ConfusionMatrix(len(NAMES))
    cm.update(logits, TARGET)
    assert cm.matrix.tolist() == EXPECTED_MATRIX


def test_report_hand_computed():
    r = hand_report()
    # tp [1,2,1,0,0]  gt [3,2,2,0,0]  pred [2,3,1,1,0]
    assert r.support == [3, 2, 2, 0, 0]
    assert r.predicted == [2, 3, 1, 1, 0]
    assert_list_close(r.precision, [Fr(1, 2), Fr(2, 3), 1, 0, None])
    assert_list_close(r.recall, [Fr(1, 3), 1, Fr(1, 2), 0, None])
    assert_list_close(r.f1, [Fr(2, 5), Fr(4, 5), Fr(2, 3), 0, None])
    assert_list_close(r.iou, [Fr(1, 4), Fr(2, 3), Fr(1, 2), 0, None])
    assert r.absent == ["footwear"]
    assert math.isclose(r.miou, float((Fr(1, 4) + Fr(2, 3) + Fr(1, 2) + 0) / 4))
    assert math.isclose(r.macro_no_background["iou"], float((Fr(2, 3) + Fr(1, 2) + 0) / 3))
    assert math.isclose(r.macro["recall"], float((Fr(1, 3) + 1 + Fr(1, 2) + 0) / 4))
    assert math.isclose(r.pixel_accuracy, 4 / 7)
    assert math.isclose(r.fw_iou, float(Fr(3, 7) * Fr(1, 4) + Fr(2, 7) * Fr(2, 3) + Fr(2, 7) * Fr(1, 2)))
    assert r.total_pixels == 7


def test_report_of_empty_matrix_is_all_nan_not_an_error():
    r = compute_report(torch.zeros(3, 3, dtype=torch.int64), NAMES[:3])
    assert r.absent == NAMES[:3]
    assert math.isnan(r.miou) and math.isnan(r.pixel_accuracy) and math.isnan(r.fw_iou)


@pytest.mark.parametrize(
    ("matrix", "names", "message"),
    [
        ([[1, 2, 3]], NAMES[:3], "square"),
        ([[1, 0], [0, 1]], NAMES[:3], "class names"),
        ([[1, -1], [0, 1]], NAMES[:2], "negative"),
    ],
)
def test_compute_report_bad_input(matrix, names, message):
    with pytest.raises(ValueError, match=message):
        compute_report(matrix, names)


def test_update_rejects_bad_labels_and_shapes():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target labels outside"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="predicted labels outside"):
        cm.update(torch.tensor([[0, 3]]), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        cm.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert cm.matrix.sum() == 0


def test_reduce_without_distributed_is_a_no_op_and_locks_updates():
    cm = ConfusionMatrix(len(NAMES))
    cm.update(PREDS, TARGET)
    cm.reduce()
    cm.reduce()
    assert cm.matrix.tolist() == EXPECTED_MATRIX
    with pytest.raises(RuntimeError, match="after reduce"):
        cm.update(PREDS, TARGET)
    cm.reset()
    assert cm.matrix.sum() == 0
    cm.update(PREDS, TARGET)


def test_render_table_layout():
    console = Console(record=True, width=140)
    console.print(render_table(hand_report(), title="val"))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "Class" in line)
    positions = [header.index(col) for col in ("Class", "Precision", "Recall", "F1-Score", "IoU", "Support")]
    assert positions == sorted(positions)
    footwear = next(line for line in text.splitlines() if "footwear" in line)
    assert footwear.count("absent") == 4
    assert "mean (no background)" in text
    assert "left out of the means" in " ".join(text.split())  # the caption wraps
    assert "0.3542" in text  # mIoU over the 4 classes that are not absent


def test_save_and_load_round_trip():
    report = hand_report()
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_report(report, Path(tmp) / "eval", stem="val")
        assert {p.name for p in paths.values()} == {"val.json", "val.csv", "val.md"}
        loaded = load_report(paths["json"])
        assert loaded.to_dict() == report.to_dict()
        assert math.isnan(loaded.iou[4])
        assert compute_report(loaded.confusion, loaded.class_names).to_dict() == report.to_dict()
        rows = list(csv.reader(io.StringIO(paths["csv"].read_text())))
        assert rows[0] == ["Class", "Precision", "Recall", "F1-Score", "IoU", "Support"]
        assert rows[2][0] == "bag" and float(rows[2][4]) == pytest.approx(2 / 3) and rows[2][5] == "2"
        assert rows[5][1:5] == ["", "", "", ""]  # footwear: absent
        md = paths["md"].read_text()
        assert "| Class | Precision | Recall | F1-Score | IoU | Support |" in md
        assert "| footwear | absent | absent | absent | absent | 0 |" in md
        assert "NaN" not in paths["json"].read_text()


def test_save_and_load_reject_bad_input():
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(ValueError, match="plain file name"):
            save_report(hand_report(), tmp, stem="../escape")
        bad = Path(tmp) / "bad.json"
        bad.write_text("{not json")
        with pytest.raises(ValueError, match="not valid JSON"):
            load_report(bad)
        bad.write_text('{"class_names": []}')
        with pytest.raises(ValueError, match="missing"):
            load_report(bad)
        with pytest.raises(ValueError, match="cannot read"):
            load_report(Path(tmp) / "missing.json")


# --------------------------------------------------------------------------- 2 processes (gloo)

SAMPLES_PER_RANK = (3, 1)  # uneven on purpose
C = 6


def all_samples():
    g = torch.Generator().manual_seed(0)
    n = sum(SAMPLES_PER_RANK)
    target = torch.randint(0, C, (n, 17, 23), generator=g)
    target[torch.rand(n, 17, 23, generator=g) < 0.2] = IGNORE
    preds = torch.where(
        torch.rand(n, 17, 23, generator=g) < 0.6, target, torch.randint(0, C, (n, 17, 23), generator=g)
    )
    return preds.clamp(max=C - 1), target


def _matrix_worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = dist.get_rank()
    preds, target = all_samples()
    start = sum(SAMPLES_PER_RANK[:rank])
    cm = ConfusionMatrix(C)
    for i in range(start, start + SAMPLES_PER_RANK[rank]):  # one sample per batch
        cm.update(preds[i : i + 1], target[i : i + 1])
    local = cm.matrix.clone()
    cm.reduce()
    cm.reduce()  # a second call must not add again
    torch.save({"local": local, "reduced": cm.matrix}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.multiprocess
def test_two_process_matrix_equals_one_process():
    preds, target = all_samples()
    single = ConfusionMatrix(C)
    single.update(preds, target)
    with tempfile.TemporaryDirectory() as tmp:
        debug_launcher(_matrix_worker, args=(tmp,), num_processes=2)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for r in ranks:
        assert torch.equal(r["reduced"], single.matrix)
    assert not torch.equal(ranks[0]["local"], single.matrix)
    assert torch.equal(ranks[0]["local"] + ranks[1]["local"], single.matrix)
    assert single.matrix.sum() == int((target != IGNORE).sum())
