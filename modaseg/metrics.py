"""Exact segmentation metrics: a confusion matrix summed over exactly the evaluated pixels, all-reduced
once across processes, and the per-class table derived from it.

Averaging per-batch or per-rank IoUs is not the dataset IoU; summing integer counts is exact, so a
2-process evaluation equals a 1-process one to the last pixel (see tests/test_metrics.py).

Conventions (also printed under the table):
- rows of the matrix = ground truth, columns = prediction; the ignore label is left out;
- a class absent from both ground truth and prediction is NaN ("absent") and left out of the means;
- otherwise 0/0 precision (never predicted) or recall (not in the ground truth) counts as 0, as
  scikit-learn's `zero_division=0` does;
- "support" = ground-truth pixels; means are unweighted over the classes that are not absent.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch import Tensor

from modaseg.classes import IGNORE_INDEX
from modaseg.files import json_safe, write_atomic, write_json_atomic

METRICS = ("precision", "recall", "f1", "iou")
FOOTNOTE = (
    "absent = class in neither ground truth nor prediction: NaN, left out of the means. "
    "Precision/recall with a zero denominator count as 0. Support = ground-truth pixels."
)


class ConfusionMatrix:
    """int64 [C, C] counts on `device`; rows = ground truth, columns = prediction."""

    def __init__(
        self, num_classes: int, device: torch.device | str | None = None, ignore_index: int = IGNORE_INDEX
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.reduced = False

    def reset(self) -> None:
        self.matrix.zero_()
        self.reduced = False

    @torch.no_grad()
    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch. `preds`: labels shaped like `target`, or logits [B, C, ...] (argmax over C)."""
        if self.reduced:
            raise RuntimeError(
                "ConfusionMatrix.update after reduce(): call reset() to start a new evaluation"
            )
        if preds.dim() == target.dim() + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {preds.shape[1]} channels, the matrix has {self.num_classes} classes"
                )
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError(
                "preds and target must hold integer labels (or pass logits [B, C, ...] as preds)"
            )
        c = self.num_classes
        target = target.to(self.matrix.device, torch.int64).reshape(-1)
        preds = preds.to(self.matrix.device, torch.int64).reshape(-1)
        valid = target != self.ignore_index
        t, p = target[valid], preds[valid]
        if t.numel() and (t.min() < 0 or t.max() >= c):
            raise ValueError(
                f"target labels outside 0..{c - 1} (ignore {self.ignore_index}): {t.unique().tolist()[:10]}"
            )
        if p.numel() and (p.min() < 0 or p.max() >= c):
            raise ValueError(f"predicted labels outside 0..{c - 1}: {p.unique().tolist()[:10]}")
        self.matrix += torch.bincount(t * c + p, minlength=c * c).view(c, c)

    def reduce(self) -> None:
        """Sum the matrix over all processes, once; a no-op without torch.distributed or when repeated."""
        if self.reduced:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix, op=torch.distributed.ReduceOp.SUM)
        self.reduced = True


@dataclass
class Report:
    class_names: list[str]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    iou: list[float]
    support: list[int]  # ground-truth pixels per class
    predicted: list[int]  # predicted pixels per class
    macro: dict[str, float]  # precision/recall/f1/iou averaged over the classes that are not absent
    macro_no_background: dict[str, float]  # the same without label 0
    pixel_accuracy: float
    fw_iou: float  # IoU weighted by ground-truth frequency
    total_pixels: int
    confusion: list[list[int]] = field(default_factory=list)

    @property
    def miou(self) -> float:
        return self.macro["iou"]

    @property
    def absent(self) -> list[str]:
        return [
            n for n, s, p in zip(self.class_names, self.support, self.predicted, strict=True) if s + p == 0
        ]

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes null."""
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        names = {f for f in cls.__dataclass_fields__}
        missing = names - set(data) - {"confusion"}
        if missing:
            raise ValueError(f"metrics report is missing {sorted(missing)}")
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"metrics report has unknown keys {sorted(unknown)}")
        return cls(**_none_to_nan(data))


def _none_to_nan(x):
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _none_to_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return x


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def compute_report(
    matrix: Tensor | np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str]
) -> Report:
    """Per-class and summary metrics from a (reduced) confusion matrix; label 0 is the background."""
    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    if len(class_names) != m.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {m.shape[0]}-class confusion matrix")
    if (m < 0).any():
        raise ValueError("confusion matrix has negative counts")
    m = m.astype(np.int64)
    tp = np.diag(m).astype(np.float64)
    gt = m.sum(1).astype(np.float64)
    pred = m.sum(0).astype(np.float64)
    absent = (gt + pred) == 0
    precision = _ratio(tp, pred)
    recall = _ratio(tp, gt)
    f1 = _ratio(2 * tp, gt + pred)
    iou = _ratio(tp, gt + pred - tp)
    per_class = {"precision": precision, "recall": recall, "f1": f1, "iou": iou}
    for values in per_class.values():
        values[absent] = math.nan
    total = int(m.sum())
    fw = float(np.nansum(gt / total * iou)) if total else math.nan
    return Report(
        class_names=list(class_names),
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        iou=iou.tolist(),
        support=[int(v) for v in gt],
        predicted=[int(v) for v in pred],
        macro={k: _nanmean(v) for k, v in per_class.items()},
        macro_no_background={k: _nanmean(v[1:]) for k, v in per_class.items()},
        pixel_accuracy=float(tp.sum() / total) if total else math.nan,
        fw_iou=fw,
        total_pixels=total,
        confusion=m.tolist(),
    )


# --------------------------------------------------------------------------- rendering and files

HEADER = ("Class", "Precision", "Recall", "F1-Score", "IoU", "Support")


def _fmt(x: float) -> str:
    return "absent" if math.isnan(x) else f"{x:.4f}"


def _rows(report: Report) -> list[list[str]]:
    """Per-class rows, then the macro rows, as strings (shared by the table, CSV and Markdown)."""
    rows = []
    for i, name in enumerate(report.class_names):
        rows.append([name, *(_fmt(getattr(report, k)[i]) for k in METRICS), str(report.support[i])])
    fg_support = sum(report.support[1:])
    rows.append(["mean", *(_fmt(report.macro[k]) for k in METRICS), str(report.total_pixels)])
    rows.append(
        ["mean (no background)", *(_fmt(report.macro_no_background[k]) for k in METRICS), str(fg_support)]
    )
    return rows


def _summary(report: Report) -> str:
    return f"pixel accuracy {_fmt(report.pixel_accuracy)} · frequency-weighted IoU {_fmt(report.fw_iou)}"


def render_table(report: Report, title: str = "Segmentation metrics") -> Table:
    """A rich table in the original's layout; print it with `rich.console.Console().print(table)`."""
    table = Table(title=title, caption=f"{_summary(report)}\n{FOOTNOTE}", caption_justify="left")
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="left" if i == 0 else "right")
    rows = _rows(report)
    n = len(report.class_names)
    for i, row in enumerate(rows):
        style = "dim" if i < n and row[1] == "absent" else ("bold" if i >= n else None)
        table.add_row(*row, style=style, end_section=i == n - 1)
    return table


def to_markdown(report: Report, title: str = "Segmentation metrics") -> str:
    lines = [f"## {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in _rows(report):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += ["", _summary(report), "", FOOTNOTE, ""]
    return "\n".join(lines)


def to_csv(report: Report) -> str:
    """Numbers at full precision; absent cells empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)

    def num(x: float) -> str:
        return "" if math.isnan(x) else repr(float(x))

    for i, name in enumerate(report.class_names):
        writer.writerow([name, *(num(getattr(report, k)[i]) for k in METRICS), report.support[i]])
    writer.writerow(["mean", *(num(report.macro[k]) for k in METRICS), report.total_pixels])
    writer.writerow(
        [
            "mean (no background)",
            *(num(report.macro_no_background[k]) for k in METRICS),
            sum(report.support[1:]),
        ]
    )
    writer.writerow(["pixel accuracy", num(report.pixel_accuracy), "", "", "", report.total_pixels])
    writer.writerow(["frequency-weighted IoU", "", "", "", num(report.fw_iou), report.total_pixels])
    return buf.getvalue()


def save_report(
    report: Report, out_dir: str | Path, stem: str = "metrics", title: str = "Segmentation metrics"
) -> dict[str, Path]:
    """Write `stem`.json (everything, reloadable), `stem`.csv and `stem`.md into `out_dir`."""
    if not stem or Path(stem).name != stem or stem in (".", ".."):
        raise ValueError(f"report stem {stem!r} must be a plain file name without folders")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    write_json_atomic(paths["json"], report.to_dict(), indent=2)
    write_atomic(paths["csv"], to_csv(report))
    write_atomic(paths["md"], to_markdown(report, title))
    return paths


def load_report(path: str | Path) -> Report:
    """Read a report written by `save_report` (the .json file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read metrics report {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"metrics report {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"metrics report {path} must hold a JSON object")
    return Report.from_dict(data)
