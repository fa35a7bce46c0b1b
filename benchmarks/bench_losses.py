"""Loss and metric cost next to the model's own training step (issue 4's benchmark).

    .venv/bin/python benchmarks/bench_losses.py [--repeats 5] [--batch 4 --height 384 --width 576]

Times forward+backward of each loss component and of the composite on [B, 14, H, W] float32 logits, the
vectorised Lovasz-softmax against a per-class loop of the same algorithm (Berman's reference, as in SMP),
SMP's LovaszLoss / FocalLoss / DiceLoss, and an SMP U-Net-resnet34 step under the trainer's precision rule
(auto: bf16 autocast only where the CPU computes bf16 natively, else fp32; the table says which) (zero_grad + forward
+ CE + backward + AdamW) with and without the composite loss and a confusion-matrix update. Prints the
median and the minimum of `--repeats` rounds after one warm-up; the cases run round-robin, so load from other
processes falls on all of them alike (CPU timings on a shared machine are still noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from modaseg.config import LossConfig
from modaseg.hardware import resolve_precision
from modaseg.losses import (
    CompositeLoss,
    class_weights,
    cross_entropy,
    focal_loss,
    lovasz_softmax,
    soft_dice_loss,
)
from modaseg.metrics import ConfusionMatrix

IGNORE = 255


def make_target(batch: int, height: int, width: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Blocky masks: background, a few garment-sized rectangles of random classes, an ignored border."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(batch, height, width, dtype=torch.long)
    for b in range(batch):
        for _ in range(4):
            c = int(torch.randint(1, num_classes, (1,), generator=g))
            h = int(torch.randint(height // 10, height // 2, (1,), generator=g))
            w = int(torch.randint(width // 10, width // 2, (1,), generator=g))
            y = int(torch.randint(0, height - h, (1,), generator=g))
            x = int(torch.randint(0, width - w, (1,), generator=g))
            target[b, y : y + h, x : x + w] = c
    target[:, :4], target[:, -4:], target[:, :, :4], target[:, :, -4:] = IGNORE, IGNORE, IGNORE, IGNORE
    return target


def lovasz_per_class_loop(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Berman et al.'s lovasz_softmax_flat (classes="present"): one sort per class, float32."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1).movedim(1, -1).reshape(-1, num_classes)
    labels = target.reshape(-1)
    valid = labels != IGNORE
    probs, labels = probs[valid], labels[valid]
    losses = []
    for c in range(num_classes):
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        fg_sorted = fg[perm]
        gts = fg_sorted.sum()
        intersection = gts - fg_sorted.cumsum(0)
        union = gts + (1 - fg_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        losses.append(torch.dot(errors_sorted, jaccard))
    return torch.stack(losses).mean()


def timed_round_robin(
    fns: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per run: one warm-up each, then `repeats` rounds that run every case once, so
    that load from other processes on a shared machine falls on all cases alike. CPU time (this process,
    all threads) is what the work costs; wall time is what it costs on a machine with other tenants."""
    for fn in fns.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def loss_case(
    loss_fn: Callable, base: torch.Tensor, target: torch.Tensor
) -> tuple[Callable[[], object], list]:
    """A closure timing forward+backward on fresh leaf logits; the last loss value lands in `value`."""
    value: list = []

    def run() -> None:
        x = base.clone().requires_grad_()
        out = loss_fn(x, target)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        value[:] = [float(loss.detach())]

    return run, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-model", action="store_true", help="only the losses")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args()
    b, c, h, w = args.batch, args.classes, args.height, args.width
    torch.manual_seed(0)
    target = make_target(b, h, w, c)
    logits = torch.randn(b, c, h, w)
    counts = torch.bincount(target[target != IGNORE], minlength=c).tolist()
    weights = class_weights(counts, "power", power=0.5, max_ratio=10.0)
    cfg = LossConfig()  # focal 1 + dice 1 + lovasz 1, alpha = power-0.5 class weights
    composite = CompositeLoss(cfg, c, weights)
    present = int((torch.tensor(counts) > 0).sum())

    def composite_and_update(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        total, _ = composite(x, t)
        cm = ConfusionMatrix(c)
        cm.update(x.detach(), t)
        return total

    cases: dict[str, Callable] = {
        "cross_entropy": cross_entropy,
        "focal (softmax, alpha)": lambda x, t: focal_loss(x, t, 2.0, weights),
        "soft_dice (weighted)": lambda x, t: soft_dice_loss(x, t, weights),
        "lovasz_softmax (vectorised)": lovasz_softmax,
        "lovasz per-class loop (Berman)": lovasz_per_class_loop,
        "SMP LovaszLoss": smp.losses.LovaszLoss("multiclass", ignore_index=IGNORE),
        "SMP FocalLoss (sigmoid 1-vs-all)": smp.losses.FocalLoss("multiclass", ignore_index=IGNORE),
        "SMP DiceLoss": smp.losses.DiceLoss(
            "multiclass", ignore_index=IGNORE, class_weights=weights.tolist()
        ),
        "composite (focal+dice+lovasz)": composite,
        "composite + ConfusionMatrix.update": composite_and_update,
    }
    runs = {name: loss_case(fn, logits, target) for name, fn in cases.items()}
    times = timed_round_robin({name: run for name, (run, _) in runs.items()}, args.repeats)
    values = {name: value[0] for name, (_, value) in runs.items()}
    rows: list[tuple[str, list[tuple[float, float]], str]] = [
        (name, times[name], f"{values[name]:.6f}") for name in cases
    ]

    precision = resolve_precision("auto", torch.device("cpu"))
    step_name = f"U-Net r34 {precision.label} step"
    if not args.skip_model:
        model = smp.Unet("resnet34", encoder_weights=None, classes=c)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(b, 3, h, w)

        def step(with_composite: bool) -> Callable[[], None]:
            def run() -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.mode == "bf16"):
                    out = model(images)
                    if with_composite:
                        loss, _ = composite(out, target)
                    else:
                        loss = F.cross_entropy(out.float(), target, ignore_index=IGNORE)
                loss.backward()
                opt.step()
                if with_composite:
                    cm = ConfusionMatrix(c)
                    cm.update(out.detach(), target)

            return run

        steps = {
            f"{step_name}, CE (bare)": step(False),
            f"{step_name}, composite + update": step(True),
        }
        rows += [(name, t, "") for name, t in timed_round_robin(steps, args.repeats).items()]

    wall = {name: statistics.median(t[0] for t in ts) for name, ts, _ in rows}
    wall_min = {name: min(t[0] for t in ts) for name, ts, _ in rows}
    cpu = {name: statistics.median(t[1] for t in ts) for name, ts, _ in rows}
    bare_name = f"{step_name}, CE (bare)"
    bare = cpu.get(bare_name)
    title = (
        f"losses at {b}x{c}x{h}x{w} (fwd+bwd; {present} classes present), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} round-robin rounds after 1 warm-up; "
        f"model step in {precision.label} ({precision.reason})"
    )
    header = ("case", "wall median s", "wall min s", "CPU median s", "CPU x bare step", "loss value")
    table_rows = [
        (
            name,
            f"{wall[name]:.3f}",
            f"{wall_min[name]:.3f}",
            f"{cpu[name]:.3f}",
            f"{cpu[name] / bare:.2f}" if bare else "",
            value,
        )
        for name, _, value in rows
    ]
    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="left" if col == "case" else "right")
    for row in table_rows:
        table.add_row(*row)
    console = Console(width=160)
    console.print(table)

    vec, loop = "lovasz_softmax (vectorised)", "lovasz per-class loop (Berman)"
    diff = abs(values[vec] - values[loop]) / abs(values[loop])
    summary = [
        f"Lovasz vectorised vs per-class loop: {wall[loop] / wall[vec]:.2f}x faster (wall median), "
        f"{cpu[loop] / cpu[vec]:.2f}x (CPU median); values differ by {diff:.1e} relative (goal >= 2x, same value)",
    ]
    if bare:
        added, full = "composite + ConfusionMatrix.update", f"{step_name}, composite + update"
        summary.append(
            f"CPU time: (composite + ConfusionMatrix.update) / bare step = {cpu[added]:.3f} / {bare:.3f} = "
            f"{cpu[added] / bare:.2f} added; full step with them / bare step = {cpu[full] / bare:.2f}x (goal <= 1.5x). "
            f"Wall: {wall[full] / wall[bare_name]:.2f}x"
        )
    for line in summary:
        console.print(line)
    if args.markdown:
        print(f"\n{title}\n")
        print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
        for row in table_rows:
            print("| " + " | ".join(row) + " |")
        print()
        for line in summary:
            print(f"- {line}")


if __name__ == "__main__":
    main()
