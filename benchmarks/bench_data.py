"""Data pipeline throughput, side by side, in samples/s per worker (one process, one core):

  (a) the shard pipeline with training augmentation (modaseg.data.train_loader, in-process; and through
      one DataLoader worker process, which adds the transfer of each batch to the main process)
  (b) the decode floor: JPEG + PNG decode of the same samples, from memory, nothing else
  (c) a naive loader: per-image JPEG files + the COCO JSON (pycocotools), polygons rasterised on the fly,
      the same augmentation, a map-style DataLoader

Goals: (a) >= 0.75 x (b) and (a) >= 1.5 x (c). The data are 400x600 (w x h) photo-like JPEGs from
modaseg.synth with their ModaNet-format polygons. Each measurement is repeated (interleaved) and the
best and median rates are printed: the machine's cores may be shared, best is the least disturbed.

    .venv/bin/python benchmarks/bench_data.py [--images 240] [--repeats 3] [--window 576x384]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modaseg import data as D
from modaseg.augment import seed_transform, train_transform
from modaseg.classes import MODANET
from modaseg.config import AugmentConfig, DataConfig
from modaseg.manifest import Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest
from modaseg.synth import generate

CPU_STEP_S = 0.8  # a U-Net resnet34 bf16 step of 4x3x256x256 measured on the 2-core AVX512_BF16 machines
CPU_STEP_BATCH = 4


def rasterize(anns: list[dict], height: int, width: int) -> np.ndarray:
    """Label map from COCO polygons, larger instances first so small ones (a belt) stay on top."""
    layers = []
    for ann in anns:
        polygons = [p for p in ann["segmentation"] if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            continue
        m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
        layers.append((int(m.sum()), MODANET.category_to_label[ann["category_id"]], m))
    label = np.zeros((height, width), np.uint8)
    for _, value, m in sorted(layers, key=lambda x: -x[0]):
        label[m > 0] = value
    return label


def build_shards(synth: Path, out: Path, per_shard: int = 64) -> Manifest:
    """A minimal writer for the shard contract (modaseg/manifest.py), so the benchmark does not depend
    on modaseg-shard."""
    coco = COCO(str(synth / "annotations.json"))
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(coco.getImgIds())
    k = MODANET.num_classes
    pixels, images, shards = np.zeros(k, np.int64), np.zeros(k, np.int64), []
    for s in range(0, len(ids), per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as writer:
            for image_id in ids[s : s + per_shard]:
                info = coco.imgs[image_id]
                label = rasterize(
                    coco.loadAnns(coco.getAnnIds(imgIds=image_id)), info["height"], info["width"]
                )
                counts = np.bincount(label.ravel(), minlength=k)[:k]
                present = np.flatnonzero(counts).tolist()
                pixels += counts
                images[present] += 1
                _, png = cv2.imencode(".png", label)
                meta = {
                    "id": image_id,
                    "file_name": info["file_name"],
                    "width": info["width"],
                    "height": info["height"],
                    "source": "synth",
                    "class_pixels": counts.tolist(),
                    "classes_present": present,
                }
                writer.write(
                    {
                        "__key__": str(image_id),
                        "jpg": (synth / "images" / info["file_name"]).read_bytes(),
                        "png": png.tobytes(),
                        "json": json.dumps(meta).encode(),
                    }
                )
        raw = (out / name).read_bytes()
        shards.append(ShardInfo(name, len(ids[s : s + per_shard]), hashlib.sha256(raw).hexdigest(), len(raw)))
    manifest = Manifest(
        tool_version="bench",
        annotations_sha256="",
        classes=list(MODANET.names),
        category_to_label={str(c): v for c, v in MODANET.category_to_label.items()},
        split_fractions={"train": 1.0},
        seed=0,
        splits={"train": SplitInfo(len(ids), shards, pixels.tolist(), images.tolist())},
    )
    write_manifest(manifest, out)
    return read_manifest(out)


class NaiveDataset(Dataset):
    """What a first version typically does: COCO JSON in memory, one file per image, polygons rasterised
    in __getitem__, PIL decode."""

    def __init__(self, synth: Path, transform):
        self.coco = COCO(str(synth / "annotations.json"))
        self.ids = sorted(self.coco.getImgIds())
        self.images = synth / "images"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.coco.imgs[self.ids[i]]
        image = np.asarray(Image.open(self.images / info["file_name"]).convert("RGB"))
        label = rasterize(
            self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"])), info["height"], info["width"]
        )
        out = self.transform(image=image, mask=label)
        return torch.from_numpy(out["image"]).permute(2, 0, 1), torch.from_numpy(out["mask"]).long()


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (a DataLoader worker, once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure(run: Callable[[], int]) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second). On a shared machine the wall clock counts
    other people's work too; CPU seconds count only ours."""
    gc.collect()
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = run()
    gc.collect()  # joins finished DataLoader workers, so their CPU time is counted
    return n / (time.perf_counter() - t0), n / (cpu_seconds() - c0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", default="576x384", help="training window HxW (configs/modanet.yaml: 576x384)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, default=None, help="folder for the data (default: a temporary one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    height, width = (int(v) for v in args.window.lower().split("x"))

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_data_"))
    synth = work / "synth"
    if not (synth / "annotations.json").is_file():
        generate(synth, num_images=args.images, seed=0, width=400, height=600, progress=False)
    manifest = build_shards(synth, work / "shards")
    n = manifest.splits["train"].num_samples
    encoded = []
    for path in manifest.shard_paths(work / "shards", "train"):
        encoded += list(D.read_shards([{"url": str(path)}], {str(path): 10**9}, lambda *a, **k: None))
    aug = AugmentConfig()  # the defaults: scale 0.75-1.25, flip 0.5, colour jitter 0.5, no blur/noise
    num_batches = max(1, 3 * n // args.batch_size)  # 3 passes: the shuffle buffer's fill is amortised

    def decode_floor() -> int:
        for _ in range(3):
            for s in encoded:
                D.decode_image(s["jpg"])
                D.decode_mask(s["png"])
        return 3 * len(encoded)

    def pipeline(workers: int, h: int, w: int, mask_dtype: torch.dtype = torch.int64) -> Callable[[], int]:
        data = DataConfig(
            batch_size=args.batch_size, workers=workers, crop_height=h, crop_width=w, pin_memory=False
        )

        def run() -> int:
            loader = D.train_loader(
                data,
                aug,
                manifest,
                work / "shards",
                rank=0,
                world_size=1,
                seed=0,
                epoch=0,
                num_batches=num_batches,
                mask_dtype=mask_dtype,
            )
            n = sum(len(b["key"]) for b in loader)
            D._train_loaders.clear()  # shut the worker down: start-up and shutdown are part of the cost
            return n

        return run

    naive_transform = train_transform(aug, height, width)
    seed_transform(naive_transform, 0)
    t0 = time.perf_counter()
    naive = NaiveDataset(synth, naive_transform)
    coco_load_s = time.perf_counter() - t0

    def naive_loader() -> int:
        loader = DataLoader(naive, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True)
        return sum(len(images) for images, _ in loader)

    hw = f"{height}x{width}"
    rows: dict[str, tuple[str, Callable[[], int]]] = {
        "b": ("(b) decode floor: JPEG + PNG decode from memory", decode_floor),
        "a": (f"(a) pipeline {hw}, in-process", pipeline(0, height, width)),
        "a1": (f"(a) pipeline {hw}, 1 DataLoader worker", pipeline(1, height, width)),
        "a8": (f"(a) pipeline {hw}, in-process, uint8 masks", pipeline(0, height, width, torch.uint8)),
        "a18": (
            f"(a) pipeline {hw}, 1 DataLoader worker, uint8 masks",
            pipeline(1, height, width, torch.uint8),
        ),
        "a256": ("(a) pipeline 256x256, in-process", pipeline(0, 256, 256)),
        "c": (f"(c) naive: files + COCO JSON + pycocotools, {hw}", naive_loader),
    }
    walls: dict[str, list[float]] = {k: [] for k in rows}
    cpus: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for key, (_, run) in rows.items():
            wall, cpu = measure(run)
            walls[key].append(wall)
            cpus[key].append(cpu)
    r = {k: statistics.median(v) for k, v in cpus.items()}

    print(
        f"\n{n} images 400x600 (w x h), mean JPEG {np.mean([len(s['jpg']) for s in encoded]) / 1e3:.0f} kB; "
        f"batch {args.batch_size}, {num_batches} batches per pipeline run, {args.repeats} repeats; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; OpenCV and torch threads 1\n"
    )
    print(
        "| loader | samples per CPU-s (median) | ms CPU / sample | x (b) | x (c) | samples per wall-s (best, median) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for key, (name, _) in rows.items():
        w = walls[key]
        print(
            f"| {name} | {r[key]:.0f} | {1e3 / r[key]:.2f} | {r[key] / r['b']:.2f} | {r[key] / r['c']:.2f} "
            f"| {max(w):.0f}, {statistics.median(w):.0f} |"
        )
    print(
        f"\ngoals: (a) >= 0.75 x (b), (a) >= 1.5 x (c). (c) also spent {coco_load_s:.2f} s loading the COCO JSON once."
    )
    need = CPU_STEP_BATCH / CPU_STEP_S
    print(
        f"CPU training (stack.md: resnet34 bf16 ~{CPU_STEP_S} s/step at batch {CPU_STEP_BATCH}x256x256) needs "
        f"{need:.1f} samples/s: {math.ceil(need / r['a256'])} worker ({need / r['a256']:.1%} of one)"
    )
    print(
        f"at {hw}, batch {args.batch_size}: one worker keeps up with a step of >= "
        f"{1e3 * args.batch_size / r['a1']:.0f} ms (int64 masks) / {1e3 * args.batch_size / r['a18']:.0f} ms "
        f"(uint8 masks); workers = ceil(batch / (step_s x {r['a1']:.0f} or {r['a18']:.0f}))"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
