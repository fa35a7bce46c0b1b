"""Evaluation: every sample of a split exactly once across all ranks, at the original resolution.

Each rank streams its own shards, pads images to the U-Net stride (labels padded with ignore, so the
padding never counts), accumulates a confusion matrix, and the matrices are summed once at the end.
No collective runs per batch, so ranks with more samples than others never stall anyone.

    modaseg-eval --checkpoint runs/demo/best --shards shards/demo --split test --out runs/demo/eval-test
    accelerate launch --multi_gpu --num_processes 2 -m modaseg.evaluate --checkpoint ... (several processes)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modaseg.config import DataConfig
from modaseg.console import UserError, run_cli
from modaseg.data import eval_loader
from modaseg.files import write_atomic
from modaseg.hardware import PRECISIONS, choose_device, resolve_precision
from modaseg.manifest import Manifest, check_shards, open_shards
from modaseg.metrics import ConfusionMatrix, Report, compute_report, load_report, render_table, save_report
from modaseg.model import IMAGENET, Normalization, infer_logits, load_for_inference

log = logging.getLogger("modaseg")


@dataclass
class EvalResult:
    report: Report
    matrix: np.ndarray  # int64 [C, C], rows = ground truth
    num_samples: int
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=list
    )  # image, truth, pred


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    data: DataConfig,
    manifest: Manifest,
    split: str,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    autocast=None,
    tta_flip: bool = False,
    channels_last: bool = False,
    keep_samples: int = 0,
    normalization: Normalization = IMAGENET,
    should_stop: Callable[[], bool] | None = None,
    long_side: int | None = None,
) -> EvalResult | None:
    """`model` must be the bare module (not DDP-wrapped): evaluation runs no per-batch collective.
    `manifest` comes from `manifest.open_shards` (absolute shard paths: one folder or several).
    `should_stop` (a preemption request) is polled per batch: a rank that sees it stops reading, and
    when any rank stopped every rank returns None (the trainer then exits for requeue). Photos go through
    `infer_logits` (the prediction path: working resolution `long_side`, logits back at the photo's size),
    so the metrics are at the original resolution whatever the model's."""
    check_shards(manifest, "", split)
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(manifest.num_classes, device=device, ignore_index=manifest.ignore_index)
    count, aborted = 0, False
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for batch in eval_loader(
        data, manifest, "", split, rank=rank, world_size=world_size, mask_dtype=torch.uint8
    ):
        images = batch["image"].to(device, non_blocking=True)
        target = batch["mask"].to(device, non_blocking=True).long()
        if should_stop is not None and should_stop():
            aborted = True
            break
        photos = [images[i, :, :h, :w] for i, (h, w) in enumerate(batch["size"])]
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = infer_logits(model, photos, normalization, long_side, tta_flip, channels_last)
        for i, (h, w) in enumerate(batch["size"]):
            pred = logits[i].argmax(dim=0)
            matrix.update(pred, target[i, :h, :w])
            if len(samples) < keep_samples:
                samples.append(
                    (
                        photos[i].permute(1, 2, 0).cpu().numpy(),
                        target[i, :h, :w].cpu().numpy().astype(np.uint8),
                        pred.cpu().numpy().astype(np.uint8),
                    )
                )
        count += len(batch["key"])
    model.train(was_training)
    totals = torch.tensor([count, int(aborted)], device=device)
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    total, stopped = (int(v) for v in totals.tolist())
    if stopped:
        return None
    matrix.reduce()
    expected = manifest.splits[split].num_samples
    if total != expected:
        raise RuntimeError(f"evaluated {total} samples of split {split!r}, the manifest lists {expected}")
    m = matrix.matrix.cpu().numpy()
    return EvalResult(compute_report(m, manifest.classes), m, total, samples)


def write_report_files(result: EvalResult, out_dir: Path, title: str) -> dict[str, Path]:
    """JSON/CSV/Markdown tables, the confusion heatmap and the IoU bar chart, each written whole
    (temporary name, then renamed) over the files of an earlier evaluation into the same folder."""
    import matplotlib.pyplot as plt

    from modaseg.visualize import confusion_figure, iou_bar_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = save_report(result.report, out_dir, stem="metrics", title=title)
    text = io.StringIO()
    np.savetxt(text, result.matrix, fmt="%d", delimiter=",")
    paths["confusion_csv"] = write_atomic(out_dir / "confusion.csv", text.getvalue())
    names = list(result.report.class_names)
    figures = {"confusion": confusion_figure(result.matrix, names)}
    figures["iou"] = iou_bar_figure(list(result.report.iou), names)
    for name, fig in figures.items():
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        paths[name] = write_atomic(out_dir / f"{name}.png", png.getvalue())
    plt.close("all")
    return paths


def compare_table(current: Report, other: Report, title: str = "comparison"):
    """Per-class IoU/F1 side by side with the difference (current - other)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("Class", "IoU (this)", "IoU (other)", "ΔIoU", "F1 (this)", "F1 (other)", "ΔF1"):
        table.add_column(col, justify="left" if col == "Class" else "right")

    def fmt(v: float) -> str:
        return "n/a" if np.isnan(v) else f"{v:.4f}"

    def diff(a: float, b: float) -> str:
        return "n/a" if np.isnan(a) or np.isnan(b) else f"{a - b:+.4f}"

    if list(current.class_names) != list(other.class_names):
        raise ValueError("the two reports have different classes; cannot compare them row by row")
    for i, name in enumerate(current.class_names):
        a, b, fa, fb = current.iou[i], other.iou[i], current.f1[i], other.f1[i]
        table.add_row(name, fmt(a), fmt(b), diff(a, b), fmt(fa), fmt(fb), diff(fa, fb))
    a, b = current.miou, other.miou
    table.add_row("mIoU", fmt(a), fmt(b), diff(a, b), "", "", "", style="bold")
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="modaseg-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", required=True, help="an export (RUN/best, RUN/final) or RUN/checkpoints/step-N"
    )
    p.add_argument("--shards", required=True, help="shard folder with manifest.json")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", help="folder for metrics.{json,csv,md}, confusion.png, iou.png")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1, help="data loader processes per rank (0: in-process)")
    p.add_argument("--tta-flip", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument(
        "--mixed-precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 where the device computes it natively, else fp16 on older GPUs, fp32 on CPU",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: a GPU when one is usable; cuda: a GPU or an error",
    )
    p.add_argument("--compare", help="another run's metrics.json: print per-class differences")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> Report | None:
    """The options and the --compare report, checked before anything runs: a mistake costs a second,
    not a whole evaluation. Returns the --compare report."""
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < least:
            raise UserError(f"{option} {value}: must be at least {least}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if args.compare is None:
        return None
    compare = Path(args.compare)
    if not compare.is_file():
        raise UserError(f"--compare {compare}: no such file (give the metrics.json of an earlier --out)")
    if out is not None and (out / "metrics.json").resolve() == compare.resolve():
        raise UserError(
            f"--compare {compare} is the metrics.json this run writes into --out; use another --out"
        )
    try:
        other = load_report(compare)
        compare_table(other, other)  # every field the comparison reads, read once now
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"--compare {compare}: not a metrics.json written by modaseg-eval ({e})") from e
    return other


def run(argv: list[str] | None) -> int:
    from accelerate import Accelerator
    from rich.console import Console

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    other = check_args(args)
    device = choose_device(args.device)  # a GPU asked for and not usable is an error, not a CPU run
    try:
        precision = resolve_precision(args.mixed_precision, torch.device(device.type))
    except ValueError as e:
        raise UserError(f"--mixed-precision {args.mixed_precision}: {e}") from e
    manifest = open_shards(args.shards)
    check_shards(manifest, "", args.split)
    if other is not None and list(other.class_names) != list(manifest.classes):
        raise UserError(f"--compare {args.compare}: its classes differ from the shards' {manifest.classes}")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision.mode)
    log.info("mixed precision %s (%s)", precision.label, precision.reason)
    model, names, normalization, long_side = load_for_inference(args.checkpoint, accelerator.device)
    if list(names) != list(manifest.classes):
        raise UserError(
            f"--checkpoint {args.checkpoint}: the model's classes {names} differ from the classes of "
            f"--shards {args.shards} {manifest.classes}; evaluate it on shards of its own classes"
        )
    data = DataConfig(shards=args.shards, eval_batch_size=args.batch_size, workers=args.workers)
    result = evaluate_split(
        model,
        data,
        manifest,
        args.split,
        device=accelerator.device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        autocast=accelerator.autocast,
        tta_flip=args.tta_flip,
        normalization=normalization,
        long_side=long_side,
    )
    if accelerator.is_main_process:
        console = Console()
        title = f"{args.split}: {result.num_samples} images, {Path(args.checkpoint)}"
        console.print(render_table(result.report, title=title))
        if args.out:
            paths = write_report_files(result, Path(args.out), title)
            console.print(
                f"reports written to {Path(args.out)}: " + ", ".join(p.name for p in paths.values())
            )
        if other is not None:
            console.print(compare_table(result.report, other, f"this vs {args.compare}"))
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("modaseg-eval", run, argv)


if __name__ == "__main__":
    sys.exit(main())
