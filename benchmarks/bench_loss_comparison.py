"""Reproduce the original's finding: cross-entropy alone leaves minority classes at 0, Focal + weighted Dice +
Lovasz lifts them (issue 7). Then a small focal gamma x alpha sweep, which the original never tuned.

    .venv/bin/python benchmarks/bench_loss_comparison.py            # full run, ~22 min on 2 idle CPU cores
    .venv/bin/python benchmarks/bench_loss_comparison.py --quick    # smoke run, ~4 min, not written to the .md

Data with real geometry and imbalance: the real ModaNet polygons of ../shared/data/modanet-sample/
modanet_train_subset_a.json, scaled by --scale (paint mode has no --width/--height, and evaluation runs at
the stored resolution, so the polygons themselves are scaled), painted by `modaseg-synth --from-annotations`
and sharded 60/25/15 by `modaseg-shard`, all under --work (default data/loss-comparison, gitignored).
Every run trains the same model for the same number of updates on the same stream (configs/compare-*.yaml,
one process, `python modaseg/train.py`, or `accelerate launch` with --processes 2) and is read back from
RUN/eval-test/metrics.json. Results go between the GENERATED markers of --out
(benchmarks/loss_comparison.md); text outside the markers is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modaseg.metrics import Report, load_report  # noqa: E402

ANNOTATIONS = ROOT / ".." / "shared" / "data" / "modanet-sample" / "modanet_train_subset_a.json"
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
GAMMAS = (1.0, 2.0, 3.0)
ALPHAS = (True, False)
NOMINAL_S_PER_RUN = 130  # one full-budget run on an idle 2-core machine (measured), for the up-front estimate


# --------------------------------------------------------------------------- data


def scale_annotations(src: Path, dst: Path, scale: float, limit: int | None) -> dict:
    """Copy a COCO file with every image, polygon, bbox and area scaled (per axis, so the new integer size
    maps exactly onto the old one). Polygons stay real ModaNet geometry, only smaller."""
    coco = json.loads(src.read_text(encoding="utf-8"))
    images = coco["images"][:limit] if limit else coco["images"]
    factors = {}
    for im in images:
        w, h = max(1, round(im["width"] * scale)), max(1, round(im["height"] * scale))
        factors[im["id"]] = (w / im["width"], h / im["height"])
        im["width"], im["height"] = w, h
    anns = []
    for a in coco["annotations"]:
        if a.get("image_id") not in factors:
            continue
        sx, sy = factors[a["image_id"]]
        seg = a.get("segmentation")
        if isinstance(seg, list):
            a["segmentation"] = [
                [round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)] for poly in seg
            ]
        if isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4:
            x, y, bw, bh = a["bbox"]
            a["bbox"] = [x * sx, y * sy, bw * sx, bh * sy]
        if isinstance(a.get("area"), int | float):
            a["area"] = a["area"] * sx * sy
        anns.append(a)
    coco["images"], coco["annotations"] = images, anns
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(coco), encoding="utf-8")
    return {
        "images": len(images),
        "annotations": len(anns),
        "size": sorted({(i["width"], i["height"]) for i in images}),
    }


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> float:
    """Run a command with its output in `log`; raise with the log's tail when it fails or times out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout
            ).returncode
            why = f"exit {code}"
        except subprocess.TimeoutExpired:  # run() has killed the process
            code, why = -1, f"killed after {timeout:.0f} s"
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"command failed ({why}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return time.perf_counter() - t0


def prepare(work: Path, scale: float, limit: int | None) -> tuple[Path, dict]:
    """Scaled annotations -> painted images -> shards; reused when the same inputs were prepared before."""
    shards = work / "shards"
    stamp = {"scale": scale, "limit": limit, "source": str(ANNOTATIONS.resolve())}
    stamp_file = work / "prepared.json"
    if (shards / "manifest.json").is_file() and stamp_file.is_file():
        prepared = json.loads(stamp_file.read_text())
        if prepared.get("inputs") == stamp:
            print(f"reusing prepared data in {work}")
            return shards, {**prepared, "reused": True}
    if not ANNOTATIONS.is_file():
        raise SystemExit(f"ModaNet annotations not found at {ANNOTATIONS} (see the module docstring)")
    for sub in ("painted", "shards"):
        shutil.rmtree(work / sub, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    info = scale_annotations(ANNOTATIONS, work / "scaled.json", scale, limit)
    t_paint = run(
        [str(bin_dir / "modaseg-synth"), "--from-annotations", str(work / "scaled.json"), "--out",
         str(work / "painted"), "--no-progress"],
        work / "logs" / "synth.log",
    )  # fmt: skip
    t_shard = run(
        [str(bin_dir / "modaseg-shard"), "--annotations", str(work / "painted" / "annotations.json"), "--images",
         str(work / "painted" / "images"), "--out", str(shards), "--workers", "2", "--shard-size", "64",
         "--no-progress"],
        work / "logs" / "shard.log",
    )  # fmt: skip
    rejects = shards / "rejects.jsonl"
    info.update(
        inputs=stamp,
        paint_s=t_paint,
        shard_s=t_shard,
        rejects=sum(1 for _ in rejects.open()) if rejects.is_file() else 0,
    )
    stamp_file.write_text(json.dumps(info, indent=1))
    return shards, info


# --------------------------------------------------------------------------- training


def train(
    config: str, shards: Path, run_dir: Path, overrides: list[str], processes: int, timeout: float
) -> dict:
    """One fresh training run (the run folder is removed first: resume=auto would pick up an old one)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [
        "--config",
        str(ROOT / "configs" / config),
        f"data.shards={shards}",
        f"train.output_dir={run_dir}",
    ]
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "modaseg" / "train.py"), *args, *overrides]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu-2proc.yaml"),
               "--num_processes", str(processes), str(ROOT / "modaseg" / "train.py"), *args, *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()[0]
    wall = run(cmd, run_dir.with_name(run_dir.name + ".log"), env, timeout)
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~330 MB a run, only needed to resume
    return {
        "report": load_report(run_dir / "eval-test" / "metrics.json"),
        "wall_s": wall,
        "load": (load_before, os.getloadavg()[0]),
        "summary": summary,
    }


# --------------------------------------------------------------------------- markdown


def f4(x: float) -> str:
    return "absent" if math.isnan(x) else f"{x:.4f}"


def signed(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) else f"{a - b:+.4f}"


def zero_iou(r: Report) -> list[str]:
    """Foreground classes present in the ground truth with IoU exactly 0."""
    return [n for i, n in enumerate(r.class_names) if i > 0 and r.support[i] > 0 and r.iou[i] == 0.0]


def per_class_table(r: Report) -> list[str]:
    lines = ["| Class | Precision | Recall | F1 | IoU | Support |", "|---|---:|---:|---:|---:|---:|"]
    for i, n in enumerate(r.class_names):
        lines.append(
            f"| {n} | {f4(r.precision[i])} | {f4(r.recall[i])} | {f4(r.f1[i])} | {f4(r.iou[i])} | {r.support[i]} |"
        )
    m, mb = r.macro, r.macro_no_background
    lines.append(
        f"| **mean** | {f4(m['precision'])} | {f4(m['recall'])} | {f4(m['f1'])} | {f4(m['iou'])} | {r.total_pixels} |"
    )
    lines.append(f"| **mean (no background)** | {f4(mb['precision'])} | {f4(mb['recall'])} | {f4(mb['f1'])} | {f4(mb['iou'])} | {sum(r.support[1:])} |")  # fmt: skip
    lines += ["", f"pixel accuracy {f4(r.pixel_accuracy)}, frequency-weighted IoU {f4(r.fw_iou)}; "
              f"foreground classes at IoU 0: {len(zero_iou(r))} ({', '.join(zero_iou(r)) or 'none'})"]  # fmt: skip
    return lines


def comparison_table(ce: Report, comp: Report) -> list[str]:
    if list(ce.class_names) != list(comp.class_names):
        raise ValueError("the two reports have different classes")
    cols = [c for m in ("IoU", "F1", "Prec", "Rec") for c in (f"{m} CE", f"{m} comp", f"Δ{m}")]
    lines = ["| Class | Support | " + " | ".join(cols) + " |", "|---|" + "---:|" * 13]
    for i, n in enumerate(ce.class_names):
        cells = [n, str(ce.support[i])]
        for k in ("iou", "f1", "precision", "recall"):
            a, b = getattr(ce, k)[i], getattr(comp, k)[i]
            cells += [f4(a), f4(b), signed(b, a)]
        lines.append("| " + " | ".join(cells) + " |")
    for label, key in (("**mean**", "macro"), ("**mean (no background)**", "macro_no_background")):
        a, b = getattr(ce, key), getattr(comp, key)
        cells = [label, ""]
        for k in ("iou", "f1", "precision", "recall"):
            cells += [f4(a[k]), f4(b[k]), signed(b[k], a[k])]
        lines.append("| " + " | ".join(cells) + " |")
    fg = [i for i in range(1, len(ce.class_names)) if ce.support[i] > 0]
    up = [ce.class_names[i] for i in fg if ce.iou[i] == 0.0 and comp.iou[i] > 0.0]
    down = [ce.class_names[i] for i in fg if ce.iou[i] > 0.0 and comp.iou[i] == 0.0]
    prec_drop = [ce.class_names[i] for i in fg if comp.precision[i] < ce.precision[i]]
    lines += [
        "",
        f"- foreground classes at IoU 0: **CE {len(zero_iou(ce))}** ({', '.join(zero_iou(ce)) or 'none'}), "
        f"**composite {len(zero_iou(comp))}** ({', '.join(zero_iou(comp)) or 'none'})",
        f"- lifted from 0 by the composite: {', '.join(up) or 'none'}; dropped to 0: {', '.join(down) or 'none'}",
        f"- classes whose precision is lower with the composite: {len(prec_drop)} of {len(fg)} "
        f"({', '.join(prec_drop) or 'none'})",
        f"- Δ = composite - CE. mIoU {f4(ce.miou)} -> {f4(comp.miou)}, without background "
        f"{f4(ce.macro_no_background['iou'])} -> {f4(comp.macro_no_background['iou'])}; pixel accuracy "
        f"{f4(ce.pixel_accuracy)} -> {f4(comp.pixel_accuracy)}",
    ]
    return lines


def sweep_table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "| run | loss | mIoU | mIoU no bg | mean F1 no bg | mean prec no bg | mean rec no bg | classes at IoU 0 | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for name, res in rows:
        r: Report = res["report"]
        mb = r.macro_no_background
        zeros = zero_iou(r)
        lines.append(
            f"| {name} | {res['loss']} | {f4(r.miou)} | {f4(mb['iou'])} | {f4(mb['f1'])} | {f4(mb['precision'])} | "
            f"{f4(mb['recall'])} | {len(zeros)} ({', '.join(zeros) or '-'}) | {res['wall_s']:.0f} |"
        )
    return lines


def per_class_iou_grid(rows: list[tuple[str, dict]]) -> list[str]:
    names = rows[0][1]["report"].class_names
    lines = ["| Class | " + " | ".join(n for n, _ in rows) + " |", "|---|" + "---:|" * len(rows)]
    for i, c in enumerate(names):
        lines.append(f"| {c} | " + " | ".join(f4(res["report"].iou[i]) for _, res in rows) + " |")
    return lines


def write_markdown(out: Path, body: str) -> None:
    """Replace the generated block of `out`, keeping the hand-written text around it."""
    block = f"{BEGIN}\n{body.rstrip()}\n{END}\n"
    if out.is_file() and BEGIN in (text := out.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = "# Loss comparison: cross-entropy vs Focal + weighted Dice + Lovasz (issue 7)\n\n" + block
    out.write_text(text)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "data" / "loss-comparison", help="data and runs")
    p.add_argument("--out", type=Path, help="markdown file (default benchmarks/loss_comparison.md; "
                   "--quick: WORK/loss_comparison-quick.md)")  # fmt: skip
    p.add_argument("--scale", type=float, default=1 / 3, help="scale of the 400x600 ModaNet geometry")
    p.add_argument("--limit", type=int, help="only the first N images of the annotation file (default all)")
    p.add_argument(
        "--processes", type=int, default=1, choices=(1, 2), help="1: python train.py; 2: accelerate"
    )
    p.add_argument("--run-timeout", type=float, default=1200, help="seconds before a training run is killed")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the CE and composite runs (the spread)")
    p.add_argument("--no-sweep", action="store_true", help="only the CE vs composite comparison")
    p.add_argument("--quick", action="store_true", help="smoke run: 150 images, 2x10 updates, 2 sweep points")
    args = p.parse_args(argv)
    # SIGTERM -> SystemExit inside subprocess.run, which then kills the running trainer instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    work = args.work.resolve()
    out = args.out or (
        work / "loss_comparison-quick.md" if args.quick else ROOT / "benchmarks" / "loss_comparison.md"
    )
    limit = 150 if args.quick and args.limit is None else args.limit
    budget = ["train.epochs=2", "train.steps_per_epoch=10", "train.val_every=2"] if args.quick else []
    if args.processes == 2:  # the same global batch: the config's batch is per process
        budget.append("data.batch_size=4")
    grid = [(1.0, True), (3.0, False)] if args.quick else [(g, a) for g in GAMMAS for a in ALPHAS]
    seeds = max(1, args.seeds)
    runs = 2 * seeds + (0 if args.no_sweep else len(grid))
    print(
        f"{runs} training runs; estimate ~{runs * NOMINAL_S_PER_RUN / 60:.0f} min plus ~1 min of data "
        f"preparation on an idle 2-core machine{' (quick: much less)' if args.quick else ''}; "
        f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    t_start = time.perf_counter()
    shards, data_info = prepare(work, args.scale, limit)
    manifest = json.loads((shards / "manifest.json").read_text())
    split_sizes = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    print(f"data: {data_info['images']} images {data_info['size']}, splits {split_sizes}")

    results: dict[str, dict] = {}
    done = 0

    def one(name: str, config: str, overrides: list[str], loss: str) -> None:
        nonlocal done
        res = train(
            config, shards, work / "runs" / name, budget + overrides, args.processes, args.run_timeout
        )
        res["loss"] = loss
        res["overrides"] = overrides
        results[name] = res
        done += 1
        left = (time.perf_counter() - t_start) / done * (runs - done)
        print(
            f"[{done}/{runs}] {name}: test mIoU {res['report'].miou:.4f}, "
            f"{len(zero_iou(res['report']))} classes at IoU 0, {res['wall_s']:.0f} s "
            f"(load {res['load'][0]:.1f} -> {res['load'][1]:.1f}); ~{left / 60:.0f} min left",
            flush=True,
        )

    for seed in range(seeds):
        suffix, extra = ("", []) if seed == 0 else (f"-s{seed}", [f"train.seed={seed}"])
        one("ce" + suffix, "compare-ce.yaml", extra, "CE")
        one("composite" + suffix, "compare-composite.yaml", extra, "focal(g2, alpha) + dice(w) + lovasz")
    if not args.no_sweep:
        for gamma, alpha in grid:
            name = f"focal-g{gamma:g}-{'alpha' if alpha else 'noalpha'}"
            loss = f"focal g{gamma:g}, alpha {'on' if alpha else 'off'}"
            one(name, "compare-focal-sweep.yaml", [f"loss.focal_gamma={gamma}", f"loss.focal_alpha={str(alpha).lower()}"], loss)  # fmt: skip
    total = time.perf_counter() - t_start

    ce, comp = results["ce"]["report"], results["composite"]["report"]
    s = results["ce"]["summary"]
    cfg = s["config"]
    cmd = "python benchmarks/bench_loss_comparison.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    loads = [v for r in results.values() for v in r["load"]]
    body = [
        "## Measured",
        "",
        f"Command (repository root): `.venv/bin/{cmd}` — {total / 60:.1f} min in all "
        f"(painting + sharding: {data_info['paint_s'] + data_info['shard_s']:.0f} s, "
        f"{'reused from an earlier run' if data_info.get('reused') else 'in this run'}), "
        f"{os.cpu_count()} CPU cores **shared with other jobs** (1-min load average {min(loads):.1f}-{max(loads):.1f} "
        "at run starts/ends), so wall times are inflated and noisy; the metrics do not depend on them.",
        "",
        f"- data: {data_info['images']} images of `modanet_train_subset_a.json` "
        f"({data_info['annotations']} annotations), polygons scaled x{args.scale:.3g} to {data_info['size']} "
        f"(w, h), painted by `modaseg-synth --from-annotations`, sharded 60/25/15 by `modaseg-shard`: "
        f"{split_sizes}; {data_info['rejects']} rejects",
        f"- model and budget (both runs, every sweep point): U-Net {cfg['model']['encoder']} from scratch, "
        f"{s['processes']} process(es), batch {cfg['data']['batch_size']} x {s['processes']}, crops "
        f"{cfg['data']['crop_height']}x{cfg['data']['crop_width']}, {s['updates']} updates "
        f"({s['updates'] * cfg['data']['batch_size'] * s['processes']} training images seen), AdamW lr "
        f"{cfg['optim']['lr']} poly, {s['precision']['mode']} ({s['precision']['reason']}), seed {cfg['train']['seed']}, no "
        f"rare-class oversampling; test = the best validation checkpoint "
        f"(validation every {cfg['train']['val_every']} epochs)",
        "- only the `loss` section differs: CE = `ce: 1`, focal/dice/lovasz 0 (unweighted, as the original); "
        "composite = focal (gamma 2, alpha = class weights) + class-weighted Dice + Lovasz, weights 1:1:1; "
        "class weights `power` 0.5 (inverse square root of pixel frequency, max/min clipped to 10)",
        "",
        "### Cross-entropy alone (configs/compare-ce.yaml), test split",
        "",
        *per_class_table(ce),
        "",
        "### Focal + weighted Dice + Lovasz (configs/compare-composite.yaml), test split",
        "",
        *per_class_table(comp),
        "",
        "### Side by side (Δ = composite - CE)",
        "",
        *comparison_table(ce, comp),
        "",
    ]
    if seeds > 1:
        rows = [(n, r) for n, r in results.items() if not n.startswith("focal-")]
        body += [
            f"### Seed spread (same configs, `train.seed` 0..{seeds - 1}: initial weights and data order)",
            "",
            "The per-class tables above are seed 0. How much of the CE/composite gap is the loss and how much",
            "the run: every CE and composite run, then the per-class test IoU of each.",
            "",
            *sweep_table(rows),
            "",
            *per_class_iou_grid(rows),
            "",
        ]
    if not args.no_sweep:
        rows = [("ce", results["ce"]), ("composite", results["composite"])]
        rows += [(n, r) for n, r in results.items() if n.startswith("focal-")]
        body += [
            "### Focal gamma x alpha sweep (configs/compare-focal-sweep.yaml: focal only), test split",
            "",
            "CE is the gamma 0, alpha off point of the same family (focal with gamma 0 and no alpha *is* CE).",
            "",
            *sweep_table(rows),
            "",
            "Per-class test IoU:",
            "",
            *per_class_iou_grid(rows),
            "",
        ]
    write_markdown(out, "\n".join(body))
    print(f"wrote {out} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
