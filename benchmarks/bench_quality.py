"""Learning quality on real street-fashion photos: CCP dev shards, configs/ccp.yaml and variants of it.

    .venv/bin/python benchmarks/bench_quality.py --runs pretrained random --epochs 8
    .venv/bin/python benchmarks/bench_quality.py --runs pretrained ce focal-alpha --seeds 0 1 --epochs 8
    .venv/bin/python benchmarks/bench_quality.py --report-only          (tables from finished runs)

Each run is a real `modaseg-train --config configs/ccp.yaml OVERRIDES` in its own process (one process,
the machine's cores), then `modaseg-eval` of its best export on the val split (per-class table). Runs
are budgeted in epochs of the same size (the same number of training crops), and their wall time is
recorded next to it. The shards are made from ../shared/data/ccp-dev with modaseg-shard when missing.
Prints Markdown tables: per-class val IoU side by side, mIoU, garment classes at IoU 0 / under 0.05, the
learning curve (val mIoU per validation with the elapsed time), and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CCP = ROOT / ".." / "shared" / "data" / "ccp-dev"
VARIANTS = {  # name -> overrides of configs/ccp.yaml; only the named thing differs
    "pretrained": [],
    "random": ["model.encoder_weights=null"],
    "imagenet-stats": ["model.normalization=imagenet"],
    "ce": ["loss.ce=1", "loss.focal=0", "loss.dice=0", "loss.lovasz=0"],
    "focal-alpha": ["loss.focal=1", "loss.dice=0", "loss.lovasz=0", "loss.focal_alpha=true"],
    "default-decoder": ["model.decoder_channels=null"],
}


def run(cmd: list[str], log: Path, env: dict) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def ensure_shards(shards: Path, env: dict) -> None:
    if (shards / "manifest.json").is_file():
        return
    if not CCP.is_dir():
        sys.exit(f"no CCP data at {CCP} and no shards at {shards}: see ../shared/data/ccp-dev/SOURCE.md")
    cmd = [
        str(Path(sys.executable).with_name("modaseg-shard")),
        "--images", str(CCP / "photos"),
        "--masks", str(CCP / "annotations" / "pixel-level"),
        "--label-names", str(CCP / "label_list.mat"),
        "--label-map", str(ROOT / "configs" / "labelmaps" / "ccp-to-modanet.yaml"),
        "--out", str(shards),
        "--workers", "2",
        "--no-progress",
    ]  # fmt: skip
    shards.mkdir(parents=True, exist_ok=True)
    run(cmd, shards.parent / f"{shards.name}.log", env)


def train_and_evaluate(name: str, seed: int, args, env: dict) -> Path:
    out = args.out / f"{name}-seed{seed}"
    if (out / "eval-val" / "metrics.json").is_file() and not args.rerun:
        return out
    overrides = [
        *VARIANTS[name],
        f"data.shards={args.shards}",
        f"train.output_dir={out}",
        f"train.seed={seed}",
        f"train.epochs={args.epochs}",
        f"train.val_every={args.val_every}",
        "train.resume=none",
        *args.override,
    ]
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    python = sys.executable
    seconds = run(
        [python, "-m", "modaseg.train", "--config", str(ROOT / "configs" / "ccp.yaml"), *overrides],
        out / "bench-train.log",
        env,
    )
    eval_cmd = [python, "-m", "modaseg.evaluate", "--checkpoint", str(out / "best"), "--shards", str(args.shards),
                "--split", "val", "--out", str(out / "eval-val"), "--workers", "1"]  # fmt: skip
    run(eval_cmd, out / "bench-eval.log", env)
    (out / "bench.json").write_text(json.dumps({"train_wall_seconds": seconds, "overrides": overrides}))
    return out


def wall_minutes(bench: dict) -> str:
    """A run resumed after an interruption has no single wall time: n/a."""
    seconds = bench.get("train_wall_seconds")
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"


def report(runs: list[tuple[str, int, Path]]) -> str:
    """Markdown: per-class val IoU, summary rows, learning curves."""
    data = {}
    for name, seed, out in runs:
        metrics = json.loads((out / "eval-val" / "metrics.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        bench = json.loads((out / "bench.json").read_text())
        data[f"{name} s{seed}"] = (metrics, summary, bench)
    cols = list(data)
    names = next(iter(data.values()))[0]["class_names"]
    lines = ["| class | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for i, cls in enumerate(names):
        cells = []
        for col in cols:
            v = data[col][0]["iou"][i]
            cells.append("absent" if v is None else f"{v:.3f}")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")

    def row(label: str, fn) -> str:
        return f"| **{label}** | " + " | ".join(fn(*data[c]) for c in cols) + " |"

    def garment_ious(m):  # the garment classes that occur in the split
        return [v for v, n in zip(m["iou"][1:], m["support"][1:], strict=True) if n > 0]

    lines += [
        row("mIoU (val, 14 classes)", lambda m, s, b: f"**{m['macro']['iou']:.3f}**"),
        row("garment classes at IoU 0", lambda m, s, b: str(sum(v == 0 for v in garment_ious(m)))),
        row("garment classes under 0.05", lambda m, s, b: str(sum(v < 0.05 for v in garment_ious(m)))),
        row("best epoch", lambda m, s, b: str(s["best_epoch"])),
        row(
            "test mIoU (best)", lambda m, s, b: f"{s['test']['macro']['iou']:.3f}" if s.get("test") else "n/a"
        ),
        row("training images/s", lambda m, s, b: f"{s['train_images_per_s']:.2f}"),
        row("wall minutes (train + tests)", lambda m, s, b: wall_minutes(b)),
    ]
    epochs = sorted({h["epoch"] for _, s, _ in data.values() for h in s["history"]})
    curves = ["", "Learning curves (val mIoU after epoch N):", ""]
    curves += ["| run | " + " | ".join(f"ep {e}" for e in epochs) + " |", "|---|" + "---:|" * len(epochs)]
    for col in cols:
        seen = {h["epoch"]: h["val_miou"] for h in data[col][1]["history"]}
        curves.append(
            f"| {col} | " + " | ".join(f"{seen[e]:.3f}" if e in seen else "" for e in epochs) + " |"
        )
    return "\n".join(lines + curves)


def pictures(run_dir: Path, shards: Path, out: Path, count: int = 3) -> Path:
    """photo | truth | prediction (overlays) for the first `count` val photos, predicted by modaseg's own
    inference path from the run's best export, scaled to 300 px high: benchmarks/quality/NAME.jpg."""
    import io
    import tarfile

    import cv2
    import numpy as np
    import torch
    from PIL import Image

    from modaseg.images import decode_image, encode_image
    from modaseg.manifest import open_shards
    from modaseg.model import infer_logits, load_for_inference
    from modaseg.visualize import overlay, side_by_side

    model, names, normalization, long_side = load_for_inference(run_dir / "best")
    manifest = open_shards(str(shards))
    rows = []
    with tarfile.open(manifest.splits["val"].shards[0].name) as tar:
        members = {m.name: m for m in tar.getmembers()}
        keys = sorted({name.rsplit(".", 1)[0] for name in members})[:count]
        for key in keys:
            photo = decode_image(tar.extractfile(members[f"{key}.jpg"]).read())
            truth = np.asarray(Image.open(io.BytesIO(tar.extractfile(members[f"{key}.png"]).read())))
            x = torch.from_numpy(photo).permute(2, 0, 1)
            pred = infer_logits(model, [x], normalization, long_side)[0].argmax(0).numpy().astype(np.uint8)
            shown = truth.copy()
            shown[shown == 255] = 0  # ignored pixels drawn as background
            panel = side_by_side(photo, overlay(photo, shown, len(names)), overlay(photo, pred, len(names)))
            scale = 300 / panel.shape[0]
            rows.append(cv2.resize(panel, (round(panel.shape[1] * scale), 300), interpolation=cv2.INTER_AREA))
    width = max(r.shape[1] for r in rows)
    grid = np.full((sum(r.shape[0] for r in rows) + 4 * (len(rows) - 1), width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        grid[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + 4
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_image(grid, ".jpg", quality=85))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["pretrained", "random"], choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--val-every", type=int, default=2)
    p.add_argument("--shards", type=Path, default=ROOT / "data" / "ccp-dev-shards")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run")
    p.add_argument("--rerun", action="store_true", help="train again even if a finished run is there")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--pictures", help="a finished run name (e.g. pretrained-seed0): write its val overlays")
    args = p.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"avx512_bf16: {'avx512_bf16' in Path('/proc/cpuinfo').read_text()}", flush=True)  # fmt: skip
    if not args.report_only:
        ensure_shards(args.shards, env)
    if args.pictures:
        path = pictures(
            args.out / args.pictures, args.shards, ROOT / "benchmarks" / "quality" / f"{args.pictures}.jpg"
        )
        print(f"pictures: {path}")
        return 0
    runs = []
    for seed in args.seeds:
        for name in args.runs:
            out = (
                args.out / f"{name}-seed{seed}"
                if args.report_only
                else train_and_evaluate(name, seed, args, env)
            )
            runs.append((name, seed, out))
            print(f"done: {name} seed {seed} -> {out}", flush=True)
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
