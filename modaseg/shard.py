"""`modaseg-shard`: photos and their labels -> verified WebDataset shards + manifest.

Two label sources, one sharder (plan -> shards written by worker processes -> per-shard sidecars ->
merge into manifest.json and rejects.jsonl):
- COCO polygon annotations (ModaNet): `--annotations FILE` with `--images DIR` or `--lmdb PATH`;
- pixel label maps (Clothing Co-Parsing and the like): `--images PHOTOS --masks LABELS --label-names
  NAMES --label-map MAP`, mapped onto ModaNet's classes (modaseg/labelmaps.py). Sample keys are the
  photos' file stems.

Output layout and manifest fields: modaseg/manifest.py. The rules this tool applies:

Split: a sample's split comes from a keyed hash, blake2b(key, key=seed) with key = str(image id) for
COCO and the file stem for label maps, mapped to [0, 1) and cut at the split fractions. It depends on
nothing but (seed, key), so adding images never moves existing ones. Within a split, samples are sorted
by id (or key) and cut into shards of `--shard-size`: shard membership is a pure function of the inputs,
so `--num-tasks K --task-index I` (shards j with j % K == I over all splits) and `--resume` produce
exactly the shards of one uninterrupted run. `--resume` keeps a shard only when its sidecar comes from
the same plan and every file it read still has the size and mtime it had then.

Rasterization (COCO): each annotation is one instance, all its polygons merged, exactly as pycocotools
does it (frPyObjects -> merge -> decode). Instances are painted largest pixel area first, so smaller ones
stay on top (a belt over a top); equal areas keep file order (the later one ends on top). Polygons are
checked before pycocotools sees them (modaseg/coco.py: the same check modaseg-synth paints by), and a
polygon that covers no pixel (collinear or repeated points, sub-pixel, or wholly outside the image) is
reported as `polygon_no_pixels` instead of vanishing silently. Coordinates outside the image are counted
(`polygons_clipped`) and left to pycocotools, which clips them itself; coordinates more than one image
size outside are first cut to that wider box (`polygons_far_clipped`). Uncompressed RLE segmentations
(COCO crowd style) are used when their size matches the image and their runs sum to it; compressed RLE
strings are refused, because pycocotools decodes them without bounds checks.

Annotations are rejected (with a reason, in rejects.jsonl) for an unknown image id, an unknown category
id (e.g. ModaNet v1.0's 0), or no usable polygon. An annotation rejected for its category still marks a
garment: its region is painted as ignore (255, `unknown_category_painted_ignore`), never as background. An image whose every annotation was rejected is
rejected too (an all-background label would be wrong); an image with no annotations at all is kept as
all background (`empty_kept`), or dropped with `--drop-empty`. Two images with one file_name: the later
ones are rejected (`duplicate_file_name`), as with duplicate ids: both would store the same photo, one
with the other's labels, likely in another split.

Label maps: paired with the photo of the same file stem. A photo without label map, a label map without
photo, a second photo or label map for one stem, a stem that cannot be a sample key, a label map of
another size than its photo, a value with no label name, an unreadable or truncated file: each is
rejected with its reason. Values are mapped through the label map file into ModaNet's label space.

Images: files are read only inside `--images` (and `--masks`): a COCO file_name must be a plain name
(no path separator, no `..`: else `unsafe_file_name`), and a name that resolves outside the folder (a
symlink out of it: `outside_folder`) or is not a regular file (a FIFO would hang the run:
`not_a_regular_file`) is rejected without reading it. `--lmdb` reads key str(id). The encoded bytes
are stored verbatim under `jpg` (never re-encoded). The format is sniffed from the magic bytes: JPEG,
or PNG stored as-is (the per-sample json says `"format": "PNG"`); anything else is rejected. Each image
is decoded once to prove it is complete: for JPEG a 1/8-scale draft decode, which reads the whole
entropy-coded stream and so still fails on truncation (benchmarks/shard.md) at ~60% of a full decode.
Grayscale and CMYK images are kept verbatim (json `"mode"`); loaders decode to RGB. A decoded size
different from the declared width/height (as stored or as displayed, below) is rejected
(`size_mismatch`), or with `--fix-size` the decoded size is used and counted (`size_fixed`). No reject
line ever holds a file's bytes.

Orientation: a photo's EXIF Orientation (a phone's 6 = stored sideways) is kept in the stored bytes and
applied by every loader (modaseg.images.decode_image: training, evaluation, prediction), so the stored
label map is always in the displayed orientation (json `"exif_orientation"` when it is not 1). The labels'
grid is told by their size: COCO's declared width/height, or the label map's shape. Equal to the
displayed grid only: drawn on the displayed photo, stored as is (`labels_on_displayed_grid`). Equal to
the stored grid only: drawn on the stored pixels, rasterized there and turned like the photo
(`labels_on_stored_grid`). When the size cannot tell (flips and 180 degrees keep the size, a square photo
turned keeps it too, or --fix-size replaced it) the stored grid is assumed, because ModaNet was labelled
in 2018 in browsers that ignored EXIF; these are counted (`labels_grid_assumed_stored`) and warned about.

Invariants, checked and printed: inputs (images in the file; or photos plus label maps without a photo)
= samples written + rejected; annotations in the file = used + rejected + dropped by the category map +
belonging to rejected images. An unexpected error on one image rejects that image (`unexpected_error`,
with the exception) instead of ending the job.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import struct
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from modaseg import __version__
from modaseg.classes import IGNORE_INDEX, LabelSpace
from modaseg.coco import check_polygon, fit_polygon, is_int, load_coco
from modaseg.console import InputError, UserError, progress_bar, run_cli
from modaseg.files import UnsafeFileError, file_fingerprint, read_inside, write_atomic, write_json_atomic
from modaseg.images import displayed_size, exif_orientation, orient
from modaseg.labelmaps import (
    DEFAULT_MASK_VARIABLE,
    LabelMapping,
    Rejected,
    is_matlab_name,
    load_label_mapping,
    load_label_names,
    pair_files,
    read_label_map,
)
from modaseg.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    probe_sha256,
    read_manifest,
    write_manifest,
)

REJECTS_NAME = "rejects.jsonl"
PARTS_DIR = ".parts"  # per-shard sidecars: the shard's checksum, statistics and rejects
DEFAULT_SPLIT = (0.6, 0.25, 0.15)
SEED_LIMIT = 2**127  # the split hash's key is the seed as 16 signed bytes
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_COMPRESS_LEVEL = 1  # with zlib's RLE strategy the level hardly matters: take the fastest
# rules that changed what a shard holds for the same inputs: part of the plan id, so --resume redoes
# shards written under older rules
LABEL_RULES = ("unknown_category_as_ignore", "labels_in_exif_displayed_orientation")
_TAR_RECORD = 10240
_COUNT_KEYS = (
    "images_in",
    "samples_written",
    "images_rejected",
    "empty_kept",
    "annotations_in",
    "annotations_used",
    "annotations_rejected",
    "annotations_dropped_by_map",
    "annotations_of_rejected_images",
    "unknown_category_painted_ignore",
    "polygons_in",
    "polygons_rejected",
    "polygons_clipped",
    "polygons_far_clipped",
)
_PIXEL_COUNT_KEYS = ("images_in", "samples_written", "images_rejected", "files_ignored")
# printed when a photo carries an EXIF orientation (see "Orientation" in the module docstring)
_ORIENTATION_KEYS = (
    "exif_oriented",
    "labels_on_displayed_grid",
    "labels_on_stored_grid",
    "labels_grid_assumed_stored",
)
_BYTES_REPR = re.compile(r"b'(?:[^'\\]|\\.)*'" + "|" + r'b"(?:[^"\\]|\\.)*"')  # a bytes literal
# formats named in a rejection instead of echoing the file's first bytes
_OTHER_FORMATS = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\0", "TIFF"),
    (b"MM\0*", "TIFF"),
    (b"RIFF", "RIFF/WebP"),
)


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class ShardOptions:
    out: Path
    annotations: Path | None = None  # COCO polygons; or masks + label_names + label_map
    images: Path | None = None  # folder of photos ("%07d.jpg" names from the annotation file)
    lmdb: Path | None = None  # PaperDoll photos.lmdb (key = decimal image id)
    masks: Path | None = None  # folder of label maps, one per photo (same file stem)
    label_names: Path | None = None  # source label names, index = label value
    label_map: Path | None = None  # YAML: source name -> target class, background or ignore
    mask_variable: str = DEFAULT_MASK_VARIABLE  # the variable holding a .mat file's label map
    split: tuple[float, float, float] = DEFAULT_SPLIT
    seed: int = 0
    shard_size: int = 1000
    workers: int = 1
    resume: bool = False
    drop_empty: bool = False
    fix_size: bool = False
    num_tasks: int = 1
    task_index: int = 0
    category_map: Path | None = None
    max_images: int | None = None
    progress: bool = True

    @property
    def pixel(self) -> bool:
        """Labels from label-map files (else from COCO annotations)."""
        return self.masks is not None

    def __post_init__(self) -> None:
        self._check_source()
        if len(self.split) != 3 or any(not math.isfinite(f) or f < 0 for f in self.split):
            raise InputError(f"--split needs three non-negative fractions (train,val,test), got {self.split}")
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise InputError(f"--split fractions must sum to 1, got {self.split} (sum {sum(self.split)})")
        if not -SEED_LIMIT <= self.seed < SEED_LIMIT:
            raise InputError(
                f"--seed must be in -2**127..2**127-1, got a number of {len(str(self.seed))} digits"
            )
        if self.shard_size < 1:
            raise InputError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.workers < 1:
            raise InputError(f"--workers must be at least 1, got {self.workers}")
        if self.num_tasks < 1 or not 0 <= self.task_index < self.num_tasks:
            raise InputError(
                f"--task-index must be in 0..{self.num_tasks - 1} (--num-tasks {self.num_tasks}), "
                f"got {self.task_index}"
            )
        if self.max_images is not None and self.max_images < 1:
            raise InputError(f"--max-images must be at least 1, got {self.max_images}")

    def _check_source(self) -> None:
        if not self.pixel:
            if self.annotations is None:
                raise InputError("give --annotations FILE (COCO polygons) or --masks DIR (label maps)")
            if self.label_names is not None or self.label_map is not None:
                raise InputError("--label-names and --label-map go with --masks")
            if (self.images is None) == (self.lmdb is None):
                raise InputError("give exactly one image source: --images DIR or --lmdb PATH")
            return
        if self.annotations is not None:
            raise InputError("give --annotations (COCO polygons) or --masks (label maps), not both")
        if self.images is None or self.label_names is None or self.label_map is None:
            raise InputError("--masks needs --images (the photos), --label-names and --label-map")
        coco_only = {"--lmdb": self.lmdb, "--category-map": self.category_map}
        coco_only.update({"--drop-empty": self.drop_empty, "--fix-size": self.fix_size})
        used = [flag for flag, value in coco_only.items() if value]
        if used:
            raise InputError(f"{', '.join(used)}: for COCO annotations only, not with --masks")
        if not is_matlab_name(self.mask_variable):
            raise InputError(f"--mask-variable {self.mask_variable!r} is not a MATLAB variable name")
        if os.path.realpath(self.images) == os.path.realpath(self.masks):
            raise InputError("--images and --masks must be two folders (photos and label maps apart)")


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(
            f"--split must be three comma-separated numbers like 0.6,0.25,0.15, got {text!r}"
        ) from None
    if len(parts) != 3:
        raise InputError(f"--split needs three fractions (train,val,test), got {text!r}")
    return parts  # type: ignore[return-value]


def split_of(key: int | str, seed: int, fractions: tuple[float, float, float]) -> str:
    """The split of one sample: a pure function of (seed, key), so adding images moves none. A COCO
    image's key is its id (hashed as str(id)), a label-map sample's its file stem."""
    digest = hashlib.blake2b(str(key).encode(), digest_size=8, key=seed.to_bytes(16, "little", signed=True))
    u = int.from_bytes(digest.digest(), "little") / 2.0**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        edge += fraction
        if u < edge:
            return name
    return next(name for name, f in zip(reversed(SPLITS), reversed(fractions), strict=True) if f > 0)


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class ImageTask:
    """One COCO image to convert; everything a worker needs, nothing shared."""

    image_id: int
    file_name: str
    width: int
    height: int
    annotations: list[tuple[Any, int, Any]]  # (annotation id, label value, segmentation), file order
    plan_rejected: int = 0  # annotations of this image already rejected while planning
    # segmentations of annotations rejected for an unknown category: a garment of no known class is
    # painted as ignore (255), never as background
    unknown: list[Any] = field(default_factory=list)

    @property
    def key(self) -> str:
        return str(self.image_id)

    def ref(self) -> dict:
        """How reject lines name this sample."""
        return {"image_id": self.image_id}


@dataclass
class PixelTask:
    """One photo and its label map (file names inside --images and --masks)."""

    key: str
    photo: str
    label: str

    def ref(self) -> dict:
        return {"key": self.key}


Task = ImageTask | PixelTask


@dataclass
class ShardPlan:
    name: str
    split: str
    index: int  # position over all splits: task I owns shards with index % num_tasks == I
    images: list[Task]


@dataclass
class Plan:
    label_space: LabelSpace
    annotations_sha256: str
    plan_id: str  # fingerprint of everything that decides shard content
    shards: list[ShardPlan]
    rejects: list[dict]  # left out while planning, in input order
    counts: Counter
    mapping: LabelMapping | None = None  # label-map sources: source names -> label values


def load_annotations(path: str | Path) -> tuple[dict, str]:
    """The parsed COCO file and its sha256; InputError (nothing written yet) when unusable."""
    coco, sha256 = load_coco(path)
    if not coco["annotations"]:
        raise InputError(
            f"{path} has {len(coco['images'])} images and no annotations at all: nothing to rasterize. "
            "(The official ModaNet val file ships without annotations; take train/val/test from the "
            "train file with --split.)"
        )
    return coco, sha256


def load_category_map(path: str | Path) -> dict[int, int | str | None]:
    """JSON {"old category id": new category id | null (drop: background) | "ignore" (label 255)}."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read category map {path}: {e}") from e
    if not isinstance(raw, dict):
        raise InputError(f"category map {path}: expected a JSON object, got {type(raw).__name__}")
    out: dict[int, int | str | None] = {}
    for k, v in raw.items():
        try:
            key = int(k)
        except ValueError:
            raise InputError(f"category map {path}: key {k!r} is not a category id") from None
        if not (v is None or v == "ignore" or is_int(v)):
            raise InputError(f"category map {path}: value for {k} must be a category id, null or 'ignore'")
        out[key] = v
    return out


def build_labels(
    categories: list, category_map: dict[int, int | str | None] | None = None
) -> tuple[LabelSpace, dict[int, int]]:
    """The label space of the kept categories and the label value of every category id in the file."""
    try:
        cats = {int(c["id"]): c for c in categories}
    except (TypeError, KeyError, ValueError) as e:
        raise InputError(f"bad 'categories' entry in the annotation file: {e!r}") from e
    cmap = category_map or {}
    for old, new in cmap.items():
        if old not in cats:
            raise InputError(f"category map: id {old} is not a category of the annotation file")
        if isinstance(new, int) and (new not in cats or new in cmap):
            raise InputError(f"category map: {old} -> {new}: target must be a kept category of the file")
    kept = [c for cid, c in cats.items() if cid not in cmap]
    try:
        space = LabelSpace.from_categories(kept)
    except (ValueError, KeyError) as e:
        raise InputError(f"categories: {e}") from e
    labels = dict(space.category_to_label)
    for old, new in cmap.items():
        labels[old] = 0 if new is None else IGNORE_INDEX if new == "ignore" else labels[new]
    return space, labels


def _safe_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
        and ".." not in name
    )


def _cut(tasks: list[Task], opts: ShardOptions) -> list[ShardPlan]:
    """Sorted tasks -> splits (keyed hash) -> shards of --shard-size, named and indexed over all splits."""
    by_split: dict[str, list[Task]] = {s: [] for s in SPLITS}
    for task in tasks:
        by_split[split_of(task.key, opts.seed, opts.split)].append(task)
    shards: list[ShardPlan] = []
    for split in SPLITS:
        items = by_split[split]
        for j in range(0, len(items), opts.shard_size):
            name = f"{split}-{j // opts.shard_size:06d}.tar"
            shards.append(ShardPlan(name, split, len(shards), items[j : j + opts.shard_size]))
    return shards


def _plan_id(opts: ShardOptions, source_fingerprint: dict) -> str:
    fingerprint = {
        **source_fingerprint,
        "tool_version": __version__,
        "split": list(opts.split),
        "seed": opts.seed,
        "shard_size": opts.shard_size,
        "max_images": opts.max_images,
        "png_compress_level": PNG_COMPRESS_LEVEL,
        "label_rules": list(LABEL_RULES),
    }
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def make_plan(opts: ShardOptions, coco: dict | None = None, sha256: str | None = None) -> Plan:
    """Validate the inputs and cut them into shards. Deterministic: every task computes the same plan."""
    if opts.pixel:
        return _pixel_plan(opts)
    if coco is None:
        coco, sha256 = load_annotations(opts.annotations)
    cmap = load_category_map(opts.category_map) if opts.category_map else None
    space, labels = build_labels(coco["categories"], cmap)
    counts: Counter = Counter({k: 0 for k in _COUNT_KEYS})
    rejects: list[dict] = []

    def reject_image(reason: str, image_id: object, detail: str) -> None:
        counts["images_rejected"] += 1
        rejects.append({"kind": "image", "reason": reason, "image_id": image_id, "detail": detail})

    entries = coco["images"]
    all_ids = {e.get("id") for e in entries if isinstance(e, dict) and is_int(e.get("id"))}
    if opts.max_images is not None:
        entries = entries[: opts.max_images]
    scope_ids = {e.get("id") for e in entries if isinstance(e, dict) and is_int(e.get("id"))}
    tasks: dict[int, ImageTask] = {}
    rejected_ids: set[int] = set()
    owner_of_name: dict[str, int] = {}
    for e in entries:
        counts["images_in"] += 1
        image_id = e.get("id") if isinstance(e, dict) else None
        if not is_int(image_id):
            reject_image("bad_image_entry", image_id, f"missing or non-integer id in {str(e)[:200]}")
            continue
        if image_id in tasks or image_id in rejected_ids:
            reject_image("duplicate_image_id", image_id, "an id seen before in 'images'; the first is kept")
            continue
        w, h = e.get("width"), e.get("height")
        name = e.get("file_name", f"{image_id:07d}.jpg")
        reason, detail = None, ""
        if not (is_int(w) and is_int(h) and w > 0 and h > 0):
            reason, detail = "bad_image_entry", f"width/height must be positive integers: {w!r}x{h!r}"
        elif opts.images is not None and not _safe_name(name):
            reason, detail = "unsafe_file_name", f"file_name {name!r} is not a plain file name"
        elif opts.images is not None and name in owner_of_name:
            reason = "duplicate_file_name"
            detail = f"file_name {name!r} is image {owner_of_name[name]}'s too: the first is kept"
        if reason is not None:
            rejected_ids.add(image_id)
            reject_image(reason, image_id, detail)
            continue
        owner_of_name[str(name)] = image_id
        tasks[image_id] = ImageTask(image_id, str(name), w, h, [])

    def reject_annotation(reason: str, ann: object, image_id: object, detail: str) -> None:
        counts["annotations_rejected"] += 1
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        rejects.append(
            {
                "kind": "annotation",
                "reason": reason,
                "annotation_id": ann_id,
                "image_id": image_id,
                "detail": detail,
            }
        )

    for a in coco["annotations"]:
        ok = isinstance(a, dict) and all(k in a for k in ("image_id", "category_id", "segmentation"))
        image_id = a.get("image_id") if ok else None
        if ok and image_id in all_ids and image_id not in scope_ids:
            counts["annotations_outside_max_images"] += 1  # its image is past --max-images: not an input
            continue
        counts["annotations_in"] += 1
        if not ok:
            reject_annotation("bad_annotation_entry", a, None, "needs image_id, category_id, segmentation")
        elif image_id in rejected_ids:
            counts["annotations_of_rejected_images"] += 1
        elif image_id not in tasks:
            reject_annotation("unknown_image_id", a, image_id, f"image_id {image_id!r} is not in 'images'")
        elif not is_int(a["category_id"]) or a["category_id"] not in labels:
            tasks[image_id].plan_rejected += 1
            tasks[image_id].unknown.append(a["segmentation"])
            reject_annotation(
                "unknown_category", a, image_id, f"category_id {a['category_id']!r} is not in 'categories'"
            )
        elif labels[a["category_id"]] == 0:
            counts["annotations_dropped_by_map"] += 1
        else:
            tasks[image_id].annotations.append((a.get("id"), labels[a["category_id"]], a["segmentation"]))

    plan_id = _plan_id(
        opts,
        {
            "annotations_sha256": sha256,
            "source": "images" if opts.images is not None else "lmdb",
            "drop_empty": opts.drop_empty,
            "fix_size": opts.fix_size,
            "category_map": {str(k): v for k, v in sorted((cmap or {}).items())},
        },
    )
    shards = _cut([tasks[i] for i in sorted(tasks)], opts)
    return Plan(space, str(sha256), plan_id, shards, rejects, counts)


def _pixel_plan(opts: ShardOptions) -> Plan:
    """Photos paired with label maps by file stem; the label names and their mapping checked first."""
    names = load_label_names(opts.label_names)
    mapping = load_label_mapping(opts.label_map, names)
    pairing = pair_files(opts.images, opts.masks, opts.max_images)
    counts: Counter = Counter({k: 0 for k in _PIXEL_COUNT_KEYS})
    counts.update(pairing.counts)
    tasks = [PixelTask(*pair) for pair in pairing.pairs]
    schema = {"label_names": names, "label_map": mapping.by_name}
    plan_id = _plan_id(
        opts,
        {
            "source": "label_maps",
            **schema,
            "mask_variable": opts.mask_variable,
            "pairs_sha256": hashlib.sha256(json.dumps(pairing.pairs).encode()).hexdigest(),
        },
    )
    schema_sha256 = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
    return Plan(mapping.space, schema_sha256, plan_id, _cut(tasks, opts), pairing.rejects, counts, mapping)


# ------------------------------------------------------------------------------------------ per image


def _valid_polygons(segmentation: object, counts: Counter, rejects: list[dict], ids: dict) -> object:
    """Size-independent checks, done before the image is read: the usable polygons (or an RLE dict)."""
    if isinstance(segmentation, dict):
        return segmentation  # RLE: checked against the image size in _instance_rle
    if not isinstance(segmentation, list):
        raise Rejected("bad_segmentation", f"segmentation of type {type(segmentation).__name__}")
    if not segmentation:
        raise Rejected("no_polygons", "segmentation is []")
    good = []
    for index, polygon in enumerate(segmentation):
        counts["polygons_in"] += 1
        reason = check_polygon(polygon)
        if reason is None:
            good.append((index, polygon))
        else:
            counts["polygons_rejected"] += 1
            rejects.append({"kind": "polygon", "reason": reason, **ids, "index": index})
    if not good:
        raise Rejected("no_valid_polygons", f"none of {len(segmentation)} polygon(s) is usable")
    return good


def _instance_rle(
    segmentation: object, height: int, width: int, counts: Counter, rejects: list[dict], ids: dict
) -> dict:
    """One merged RLE per annotation, at the final image size; Rejected when no polygon has a pixel."""
    if isinstance(segmentation, dict):
        size, rle_counts = segmentation.get("size"), segmentation.get("counts")
        if not isinstance(size, list | tuple) or list(size) != [height, width]:
            raise Rejected("rle_size_mismatch", f"RLE size {size!r}, image is {height}x{width}")
        if isinstance(rle_counts, list):
            if not all(is_int(c) and c >= 0 for c in rle_counts) or sum(rle_counts) != height * width:
                raise Rejected("bad_rle", "uncompressed RLE counts must be non-negative and sum to h*w")
            return mask_utils.frPyObjects({"size": [height, width], "counts": rle_counts}, height, width)
        if isinstance(rle_counts, str | bytes):
            # pycocotools' string decoder has no bounds checks: a bad string corrupts memory
            raise Rejected("rle_compressed_unsupported", "compressed RLE strings are not accepted")
        raise Rejected("bad_rle", f"RLE counts of type {type(rle_counts).__name__}")
    polygons, indices = [], []
    for index, polygon in segmentation:
        fitted, clipped = fit_polygon(polygon, width, height)
        if clipped is not None:
            counts["polygons_clipped"] += 1  # pycocotools clips to the image itself
        if clipped == "far_clipped":
            counts["polygons_far_clipped"] += 1  # it would overflow on these: cut first
        polygons.append(fitted)
        indices.append(index)
    rles = mask_utils.frPyObjects(polygons, height, width)
    areas = mask_utils.area(rles)
    for index, area in zip(indices, areas, strict=True):
        if not area:
            counts["polygons_rejected"] += 1
            rejects.append({"kind": "polygon", "reason": "polygon_no_pixels", **ids, "index": index})
    if not areas.any():
        raise Rejected("no_valid_polygons", "no polygon covers a pixel of the image")
    return mask_utils.merge([r for r, area in zip(rles, areas, strict=True) if area])


def rasterize(instances: list[tuple[int, dict]], height: int, width: int) -> np.ndarray:
    """Label map (height, width) uint8 from (label, RLE) pairs: largest area first, smaller on top."""
    # pycocotools decodes column-major; painting the transposed, C-ordered view is ~1.5x faster
    label_t = np.zeros((width, height), np.uint8)
    if instances:
        areas = mask_utils.area([rle for _, rle in instances])
        for i in sorted(range(len(instances)), key=lambda i: -int(areas[i])):  # stable: file order on ties
            value, rle = instances[i]
            np.copyto(label_t, value, where=mask_utils.decode(rle).T.view(bool))
    return np.ascontiguousarray(label_t.T)


def label_histogram(label: np.ndarray) -> np.ndarray:
    """Pixels per value (256 bins). Counting byte pairs halves np.bincount's cost on uint8 maps."""
    flat = label.reshape(-1)
    odd = flat[-1:] if flat.size % 2 else flat[:0]
    pairs = np.bincount(flat[: flat.size - odd.size].view(np.uint16), minlength=65536).reshape(256, 256)
    return pairs.sum(0) + pairs.sum(1) + np.bincount(odd, minlength=256)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(label: np.ndarray) -> bytes:
    """8-bit grayscale PNG. Label maps are long runs: no row filter + zlib's RLE strategy is ~2x faster
    than PIL's adaptive filters at about the same size."""
    height, width = label.shape
    rows = np.zeros((height, width + 1), np.uint8)  # a filter-type byte (0: none) before every row
    rows[:, 1:] = label
    z = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = z.compress(rows.data) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    return PNG_MAGIC + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "JPEG" | "PNG"
    mode: str
    width: int  # of the stored pixel grid
    height: int
    orientation: int = 1  # EXIF: how the stored grid is displayed (modaseg.images.orient)

    @property
    def stored(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def displayed(self) -> tuple[int, int]:
        return displayed_size(self.height, self.width, self.orientation)


def inspect_image(data: bytes) -> ImageInfo:
    """Sniff and fully check one encoded image; Rejected with the reason when it is unusable."""
    if not data:
        raise Rejected("empty_file", "0 bytes")
    if data.startswith(JPEG_MAGIC):
        fmt = "JPEG"
    elif data.startswith(PNG_MAGIC):
        fmt = "PNG"
    else:
        other = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), "an unknown format")
        raise Rejected("unsupported_format", f"not JPEG or PNG: {other}")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            width, height, mode = im.width, im.height, im.mode
            if fmt == "JPEG":  # reduced-scale decode still reads (and checks) every byte
                im.draft(mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
    except Image.DecompressionBombError as e:
        raise Rejected("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        reason = "truncated_image" if "truncated" in str(e) else "corrupt_image"
        message = _BYTES_REPR.sub("<bytes>", str(e))  # PIL quotes e.g. a broken PNG chunk's name
        raise Rejected(reason, f"{type(e).__name__}: {message}") from None
    return ImageInfo(fmt, mode, width, height, exif_orientation(data))


@dataclass(frozen=True)
class _Source:
    """Where the workers read, and what they need to convert: pickled once per worker process."""

    images: Path | None
    lmdb: Path | None
    fix_size: bool
    drop_empty: bool
    num_classes: int
    masks: Path | None = None
    mask_variable: str = DEFAULT_MASK_VARIABLE
    lut: np.ndarray | None = None  # label maps: source label value -> label value

    @classmethod
    def of(cls, opts: ShardOptions, plan: Plan) -> _Source:
        lut = plan.mapping.lut if plan.mapping is not None else None
        return cls(
            opts.images,
            opts.lmdb,
            opts.fix_size,
            opts.drop_empty,
            plan.label_space.num_classes,
            opts.masks,
            opts.mask_variable,
            lut,
        )


_SOURCE: _Source | None = None
_PROGRESS: Any = None  # shared array [images done, images rejected], read by the parent's progress bar
_LMDB: dict[int, Any] = {}  # pid -> environment: an LMDB handle must not cross a fork


def _init_worker(source: _Source, progress: Any) -> None:
    global _SOURCE, _PROGRESS
    _SOURCE, _PROGRESS = source, progress


def _read_file(folder: Path, name: str, prefix: str = "") -> bytes:
    """The bytes of the regular file folder/name, never a file outside `folder` (modaseg.files)."""
    try:
        return read_inside(folder, name)
    except UnsafeFileError as e:
        raise Rejected(prefix + e.reason, str(e)) from None
    except FileNotFoundError:
        raise Rejected(prefix + "missing_file", str(folder / name)) from None
    except OSError as e:
        raise Rejected(
            prefix + "unreadable_file", f"{folder / name}: {e.strerror or type(e).__name__}"
        ) from None


def _read_bytes(task: ImageTask, source: _Source) -> tuple[bytes, str]:
    if source.images is not None:
        return _read_file(source.images, task.file_name), f"images/{task.file_name}"
    import lmdb

    env = _LMDB.get(os.getpid())
    if env is None:
        env = _LMDB[os.getpid()] = lmdb.open(
            str(source.lmdb), readonly=True, lock=False, readahead=False, subdir=source.lmdb.is_dir()
        )
    key = str(task.image_id)
    with env.begin(buffers=False) as txn:
        value = txn.get(key.encode("ascii"))
    if value is None:
        raise Rejected("missing_lmdb_key", f"no key {key!r} in {source.lmdb}")
    return bytes(value), f"lmdb:{key}"


@dataclass
class ImageResult:
    key: str
    sample: tuple[bytes, bytes, bytes] | None  # (jpg, png, json) or None when rejected
    class_pixels: list[int] | None
    rejects: list[dict]
    counts: Counter


def process_image(task: Task, source: _Source | None = None) -> ImageResult:
    """Check, read and rasterize one image. Never raises: the result says what happened and why."""
    source = source or _SOURCE
    counts: Counter = Counter()
    rejects: list[dict] = []
    try:
        if isinstance(task, PixelTask):
            sample, class_pixels = _convert_pixels(task, source, counts)
        else:
            sample, class_pixels = _convert(task, source, counts, rejects)
    except Exception as e:  # one bad image must not end a 50k-image job: report it, go on
        r = e if isinstance(e, Rejected) else Rejected("unexpected_error", f"{type(e).__name__}: {e}")
        counts["images_rejected"] += 1
        if isinstance(task, ImageTask):
            counts["annotations_of_rejected_images"] += len(task.annotations) - counts["annotations_rejected"]
            counts["annotations_used"] = 0
            counts["empty_kept"] = 0
        counts["samples_written"] = 0
        rejects.append({"kind": "image", "reason": r.reason, **task.ref(), "detail": r.detail})
        return ImageResult(task.key, None, None, rejects, counts)
    return ImageResult(task.key, sample, class_pixels, rejects, counts)


def _sample(
    data: bytes, info: ImageInfo, label: np.ndarray, meta: dict, num_classes: int, counts: Counter
) -> tuple[tuple[bytes, bytes, bytes], list[int]]:
    """(jpg, png, json) of one sample and its pixels per class; the json fields the loaders check."""
    hist = label_histogram(label)
    class_pixels = [int(v) for v in hist[:num_classes]]
    meta = {
        **meta,
        "width": label.shape[1],
        "height": label.shape[0],
        **({"exif_orientation": info.orientation} if info.orientation != 1 else {}),
        "format": info.format,
        "mode": info.mode,
        "class_pixels": class_pixels,
        "classes_present": [c for c in range(1, num_classes) if class_pixels[c]],
        "ignore_pixels": int(hist[IGNORE_INDEX]),
    }
    sample = (data, encode_png(label), json.dumps(meta, sort_keys=True).encode())
    counts["samples_written"] += 1
    counts[f"images_{info.format.lower()}_{info.mode.lower()}"] += 1
    return sample, class_pixels


def _convert_pixels(
    task: PixelTask, source: _Source, counts: Counter
) -> tuple[tuple[bytes, bytes, bytes], list[int]]:
    data = _read_file(source.images, task.photo)
    info = inspect_image(data)
    raw = _read_file(source.masks, task.label, "label_")
    label = read_label_map(raw, task.label, source.mask_variable, info.stored, source.lut, info.displayed)
    label = _to_displayed(label, label.shape == info.stored, info, counts)
    meta = {
        "id": task.key,
        "file_name": task.photo,
        "label_file": task.label,
        "source": f"images/{task.photo}",
    }
    return _sample(data, info, label, meta, source.num_classes, counts)


def _convert(
    task: ImageTask, source: _Source, counts: Counter, rejects: list[dict]
) -> tuple[tuple[bytes, bytes, bytes], list[int]]:
    def reject_annotation(r: Rejected, ids: dict) -> None:
        counts["annotations_rejected"] += 1
        rejects.append({"kind": "annotation", "reason": r.reason, **ids, "detail": r.detail})

    checked = []  # (label, ids, polygons or RLE dict), file order
    for ann_id, label, segmentation in task.annotations:
        ids = {"annotation_id": ann_id, "image_id": task.image_id}
        try:
            checked.append((label, ids, _valid_polygons(segmentation, counts, rejects, ids)))
        except Rejected as r:
            reject_annotation(r, ids)
    if not checked and (task.plan_rejected or counts["annotations_rejected"]):
        raise Rejected("all_annotations_rejected", "an all-background label would be wrong")
    if not checked and source.drop_empty:
        raise Rejected("empty_dropped", "no annotations (--drop-empty)")
    data, where = _read_bytes(task, source)
    info = inspect_image(data)
    width, height = task.width, task.height
    sized = (height, width) in (info.stored, info.displayed)
    if not sized:
        if not source.fix_size:
            shown = (
                f" (displayed {info.displayed[1]}x{info.displayed[0]}, EXIF orientation {info.orientation})"
                if info.displayed != info.stored
                else ""
            )
            raise Rejected(
                "size_mismatch",
                f"declared {width}x{height}, decoded {info.width}x{info.height}{shown} "
                "(--fix-size uses decoded)",
            )
        counts["size_fixed"] += 1
        width, height = info.width, info.height
    instances = []
    for label, ids, segmentation in checked:
        try:
            instances.append((label, _instance_rle(segmentation, height, width, counts, rejects, ids)))
        except Rejected as r:
            reject_annotation(r, ids)
    counts["annotations_used"] += len(instances)
    if not instances and (task.plan_rejected or counts["annotations_rejected"]):
        raise Rejected("all_annotations_rejected", "an all-background label would be wrong")

    label = rasterize(instances + _unknown_regions(task, height, width, counts), height, width)
    label = _to_displayed(label, (height, width) == info.stored, info, counts, sized)
    meta = {
        "id": task.image_id,
        "file_name": task.file_name,
        "source": where,
        "num_instances": len(instances),
    }
    counts["empty_kept"] += not task.annotations
    return _sample(data, info, label, meta, source.num_classes, counts)


def _to_displayed(
    label: np.ndarray, on_stored: bool, info: ImageInfo, counts: Counter, sized: bool = True
) -> np.ndarray:
    """The label map in the photo's displayed orientation (the rule under "Orientation" above):
    turned like the photo when it was drawn on the stored grid, counted by which grid that was. `sized`:
    the declared size was one of the photo's grids (not replaced by --fix-size), so it can tell."""
    if info.orientation == 1:
        return label
    counts["exif_oriented"] += 1
    if not on_stored:
        counts["labels_on_displayed_grid"] += 1
        return label
    told = sized and info.displayed != info.stored
    counts["labels_on_stored_grid" if told else "labels_grid_assumed_stored"] += 1
    return orient(label, info.orientation)


def _unknown_regions(task: ImageTask, height: int, width: int, counts: Counter) -> list[tuple[int, dict]]:
    """(IGNORE_INDEX, RLE) for each annotation rejected for its category whose polygons still cover a
    pixel: its garment is unlearnable, not background. Its polygons' own faults are not reported again
    (the annotation already is, as unknown_category); they only decide whether anything is painted."""
    regions = []
    for segmentation in task.unknown:
        scratch: Counter = Counter()
        try:
            good = _valid_polygons(segmentation, scratch, [], {})
            regions.append((IGNORE_INDEX, _instance_rle(good, height, width, scratch, [], {})))
            counts["unknown_category_painted_ignore"] += 1
        except Rejected:
            counts["unknown_category_not_paintable"] += 1
    return regions


# -------------------------------------------------------------------------------------------- writing


def _tar_member(name: str, data: bytes) -> bytes:
    """One tar member with fixed metadata (mtime 0, uid/gid 0, no names): byte-identical on every run."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    return header + data + b"\0" * (-len(data) % 512)


class _ShardFile:
    """A tar written under a temporary name, hashed as it goes, renamed only when complete."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # an orphaned worker may still write
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, blob: bytes) -> None:
        self.file.write(blob)
        self.sha.update(blob)
        self.size += len(blob)

    def add(self, key: str, sample: tuple[bytes, bytes, bytes]) -> None:
        for ext, data in zip(("jpg", "png", "json"), sample, strict=True):
            self.write(_tar_member(f"{key}.{ext}", data))

    def finish(self) -> tuple[str, int]:
        self.write(b"\0" * 1024)  # end-of-archive, then pad to a whole record as tarfile does
        self.write(b"\0" * (-self.size % _TAR_RECORD))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest(), self.size

    def abandon(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _sidecar_path(out: Path, shard_name: str) -> Path:
    return out / PARTS_DIR / f"{shard_name}.json"


def _input_files(task: Task, source: _Source) -> list[Path]:
    if isinstance(task, PixelTask):
        return [source.images / task.photo, source.masks / task.label]
    return [source.images / task.file_name] if source.images is not None else []


def _inputs_fingerprint(shard: ShardPlan, source: _Source) -> str:
    """Size and mtime of every file the shard is made from (an LMDB counts as one file): what `--resume`
    compares, so a photo or label map changed since the shard was written makes it be written again."""
    paths = [p for task in shard.images for p in _input_files(task, source)]
    if source.lmdb is not None:
        paths.append(source.lmdb / "data.mdb" if source.lmdb.is_dir() else source.lmdb)
    digest = hashlib.sha256()
    for path in paths:
        try:
            size, mtime = file_fingerprint(path)
        except OSError:
            size, mtime = -1, -1
        digest.update(f"{path.name}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _done(out: Path, shard: ShardPlan, plan_id: str, source: _Source) -> dict | None:
    """The shard's sidecar if the shard is complete for this plan and unchanged inputs (resume skips it),
    else None; a sidecar that does not parse or is not ours also means: write the shard again."""
    try:
        side = json.loads(_sidecar_path(out, shard.name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(side, dict) or side.get("plan_id") != plan_id or side.get("name") != shard.name:
        return None
    if side.get("inputs") != _inputs_fingerprint(shard, source):
        return None
    if side.get("num_samples"):
        path = out / shard.name
        if not path.is_file() or path.stat().st_size != side.get("size_bytes"):
            return None
    return side


@dataclass
class RunResult:
    manifest: Manifest | None  # None for one task of an array job (the merge writes it)
    counts: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0


def _write_shard(job: tuple[ShardPlan, Path, str, int]) -> dict:
    """Convert one shard from start to finish in this process; returns (and writes) its sidecar.
    Workers write their own shards: the image bytes never travel between processes."""
    shard, out, plan_id, num_classes = job
    inputs = _inputs_fingerprint(shard, _SOURCE)  # before reading: a file changed meanwhile is redone
    writer = None
    counts: Counter = Counter()
    rejects: list[dict] = []
    class_pixels = [0] * num_classes
    class_images = [0] * num_classes
    num = 0
    try:
        for task in shard.images:
            r = process_image(task)
            counts.update(r.counts)
            rejects.extend(r.rejects)
            if r.sample is not None:
                if writer is None:
                    writer = _ShardFile(out / shard.name)
                writer.add(r.key, r.sample)
                num += 1
                for c, n in enumerate(r.class_pixels):
                    class_pixels[c] += n
                    class_images[c] += n > 0
            with _PROGRESS.get_lock():
                _PROGRESS[0] += 1
                _PROGRESS[1] += r.sample is None
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    sha, size = writer.finish() if writer is not None else ("", 0)
    side = {
        "plan_id": plan_id,
        "inputs": inputs,
        "name": shard.name,
        "split": shard.split,
        "num_samples": num,
        "sha256": sha,
        "size_bytes": size,
        "probe_sha256": probe_sha256(out / shard.name) if num else "",
        "class_pixels": class_pixels,
        "class_images": class_images,
        "counts": dict(sorted(counts.items())),
        "rejects": rejects,
    }
    write_json_atomic(_sidecar_path(out, shard.name), side, indent=None, sort_keys=True)
    return side


def _run_jobs(jobs: list, source: _Source, progress: Any, workers: int) -> Iterator[dict]:
    """Sidecars of the finished shards, in completion order."""
    if workers == 1:
        _init_worker(source, progress)
        yield from map(_write_shard, jobs)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(source, progress)) as pool:
        yield from pool.imap_unordered(_write_shard, jobs)


def _watch(bar: Any, task_id: Any, progress: Any, offset: int, stop: threading.Event) -> None:
    """Progress bar updates from the shared counters, in a thread: workers never wait on the display."""
    t0 = time.perf_counter()
    while True:
        stopped = stop.wait(0.2)
        done, rejected = progress[0], progress[1]
        rate = done / max(time.perf_counter() - t0, 1e-9)
        bar.update(task_id, completed=done, rate=rate, rejected=offset + rejected)
        if stopped:
            return


def _check_lmdb(path: Path) -> None:
    """Fail before anything is written: a missing package or a path that is not an LMDB."""
    try:
        import lmdb
    except ImportError:
        raise InputError("--lmdb needs the lmdb package (pip install lmdb)") from None
    if not path.exists():
        raise InputError(f"--lmdb {path} does not exist")
    try:
        lmdb.open(str(path), readonly=True, lock=False, subdir=path.is_dir()).close()
    except lmdb.Error as e:
        raise InputError(f"--lmdb {path} is not a readable LMDB: {e}") from None


class ShardWriteError(OSError):
    """Writing shards failed part-way; `finished` shards (written or kept) are complete and kept."""

    def __init__(self, cause: OSError, finished: int, out: Path):
        super().__init__(cause.errno, cause.strerror or str(cause), cause.filename or str(out))
        self.finished = finished


def _claim_out(out: Path, plan: Plan) -> None:
    """Make `out` the sharder's, before anything is written: one line when it is a file, cannot be
    created or written (read-only, full), or holds shard, manifest or rejects files the sharder did not
    write (no .parts folder beside them): those are never overwritten."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not (out / PARTS_DIR).is_dir():
        ours = {s.name for s in plan.shards} | {MANIFEST_NAME, REJECTS_NAME}
        foreign = sorted(
            p.name for p in out.iterdir() if p.name in ours or re.fullmatch(r".+-\d{6}\.tar", p.name)
        )
        if foreign:
            raise InputError(
                f"--out {out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} that "
                "modaseg-shard did not write (no .parts folder): give a new or empty folder"
            )
    probe = out / PARTS_DIR / f".probe.{os.getpid()}"
    try:
        (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        write_atomic(probe, b"modaseg-shard")
        probe.unlink()
    except OSError as e:
        probe.unlink(missing_ok=True)
        raise InputError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def shard(opts: ShardOptions, plan: Plan | None = None) -> RunResult:
    """Convert this task's shards (all of them for a single task), then merge when single."""
    start = time.perf_counter()
    for flag, folder in (("--images", opts.images), ("--masks", opts.masks)):
        if folder is not None and not folder.is_dir():
            raise InputError(f"{flag} {folder} is not a folder")
    if opts.lmdb is not None:
        _check_lmdb(opts.lmdb)
    plan = plan or make_plan(opts)
    source = _Source.of(opts, plan)
    out = opts.out
    _claim_out(out, plan)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # about to change shards: a stale manifest would lie
    mine = [s for s in plan.shards if s.index % opts.num_tasks == opts.task_index]
    result = RunResult(manifest=None)
    todo = []
    for s in mine:
        side = _done(out, s, plan.plan_id, source) if opts.resume else None
        if side is None:
            todo.append(s)
        else:
            result.shards_skipped += 1
            result.counts.update(side["counts"])
    for s in todo:  # temporary files of a killed run (a still-running orphan then fails to rename)
        for stale in out.glob(f".{s.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    todo.sort(key=lambda s: -len(s.images))  # biggest first: workers finish together
    workers = max(1, min(opts.workers, len(todo)))
    if 1 < len(todo) < opts.workers:
        print(
            f"modaseg-shard: only {len(todo)} shards to write: {workers} of {opts.workers} workers busy "
            "(a smaller --shard-size gives more)",
            file=sys.stderr,
        )
    progress = multiprocessing.Array("q", 2)
    jobs = [(s, out, plan.plan_id, plan.label_space.num_classes) for s in todo]
    offset = plan.counts["images_rejected"] if opts.num_tasks == 1 else 0
    with progress_bar(
        opts.progress, "{task.fields[rate]:.0f} img/s", "rejected {task.fields[rejected]}"
    ) as bar:
        task_id = bar.add_task("sharding", total=sum(len(s.images) for s in todo), rate=0.0, rejected=offset)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(bar, task_id, progress, offset, stop), daemon=True)
        watcher.start()
        try:
            for side in _run_jobs(jobs, source, progress, workers):
                result.shards_written += 1
                result.counts.update(side["counts"])
        except OSError as e:  # disk full, a folder made read-only meanwhile: what is finished is kept
            raise ShardWriteError(e, result.shards_written + result.shards_skipped, out) from e
        finally:
            stop.set()
            watcher.join()
    if opts.num_tasks == 1:
        result.manifest = merge(opts, plan)
        result.counts = Counter(result.manifest.counts)
        result.rejects = Counter(result.manifest.rejects)
    else:
        for s in mine:
            side = _done(out, s, plan.plan_id, source)
            for rj in side["rejects"] if side else []:
                result.rejects[f"{rj['kind']}/{rj['reason']}"] += 1
    result.seconds = time.perf_counter() - start
    return result


def merge(opts: ShardOptions, plan: Plan | None = None) -> Manifest:
    """Combine every shard's sidecar into rejects.jsonl and manifest.json (written last)."""
    plan = plan or make_plan(opts)
    source = _Source.of(opts, plan)
    out = opts.out
    sides, missing = [], []
    for s in plan.shards:
        side = _done(out, s, plan.plan_id, source)
        (missing if side is None else sides).append(s if side is None else side)
    if missing:
        owners = sorted({s.index % opts.num_tasks for s in missing}) if opts.num_tasks > 1 else []
        raise ManifestError(
            f"{len(missing)} of {len(plan.shards)} shards are missing, incomplete or made from inputs "
            f"changed since in {out} (first: {', '.join(s.name for s in missing[:5])})"
            + (f"; run task index(es) {owners} of {opts.num_tasks} (with --resume)" if owners else "")
            + ": finish them with --resume before merging"
        )
    k = plan.label_space.num_classes
    splits = {name: SplitInfo(0, [], [0] * k, [0] * k) for name in SPLITS}
    counts = Counter(plan.counts)
    reject_lines = list(plan.rejects)
    for side in sides:
        info = splits[side["split"]]
        if side["num_samples"]:
            info.shards.append(
                ShardInfo(
                    side["name"],
                    side["num_samples"],
                    side["sha256"],
                    side["size_bytes"],
                    side["probe_sha256"],
                )
            )
        info.num_samples += side["num_samples"]
        info.class_pixels = [a + b for a, b in zip(info.class_pixels, side["class_pixels"], strict=True)]
        info.class_images = [a + b for a, b in zip(info.class_images, side["class_images"], strict=True)]
        counts.update(side["counts"])
        reject_lines.extend(side["rejects"])
    rejects = Counter(f"{r['kind']}/{r['reason']}" for r in reject_lines)
    check_invariants(counts)
    lines = "".join(json.dumps(line, sort_keys=True, default=str) + "\n" for line in reject_lines)
    write_atomic(out / REJECTS_NAME, lines)
    if not counts["samples_written"]:  # no manifest: training must not start from an empty dataset
        raise InputError(_nothing_written(counts["images_in"], reject_lines, out / REJECTS_NAME))
    manifest = Manifest(
        tool_version=__version__,
        annotations_sha256=plan.annotations_sha256,
        classes=list(plan.label_space.names),
        category_to_label={str(c): v for c, v in sorted(plan.label_space.category_to_label.items())},
        split_fractions=dict(zip(SPLITS, opts.split, strict=True)),
        seed=opts.seed,
        splits=splits,
        counts=dict(sorted(counts.items())),
        rejects=dict(sorted(rejects.items())),
        source_labels=dict(plan.mapping.by_name) if plan.mapping is not None else {},
    )
    write_manifest(manifest, out)
    return manifest


def _nothing_written(images_in: int, reject_lines: list[dict], rejects_path: Path) -> str:
    """The one line for a run that wrote no sample: the most frequent reason an input was rejected, an
    example of it, and (for images whose annotations were all rejected) the annotations' reason."""
    if not images_in:
        return "no inputs to shard (no images listed, no photo found)"
    images = Counter(r["reason"] for r in reject_lines if r["kind"] == "image")
    reason, n = images.most_common(1)[0]
    example = next(r for r in reject_lines if r["kind"] == "image" and r["reason"] == reason)
    why = f"{reason} ({n} of {images_in})"
    if reason == "all_annotations_rejected":
        anns = Counter(r["reason"] for r in reject_lines if r["kind"] == "annotation")
        if anns:
            ann_reason, k = anns.most_common(1)[0]
            example = next(r for r in reject_lines if r["kind"] == "annotation" and r["reason"] == ann_reason)
            why += f"; their annotations mostly {ann_reason} ({k})"
    detail = str(example.get("detail", ""))[:160]
    return (
        f"no sample written: all {images_in} inputs were rejected, most for {why}"
        + (f", e.g. {detail}" if detail else "")
        + f"; every reason is in {rejects_path}"
    )


def check_invariants(counts: Counter) -> None:
    """Nothing lost: every image and every annotation of the input is accounted for exactly once."""
    images = counts["samples_written"] + counts["images_rejected"]
    anns = (
        counts["annotations_used"]
        + counts["annotations_rejected"]
        + counts["annotations_dropped_by_map"]
        + counts["annotations_of_rejected_images"]
    )
    if images != counts["images_in"] or anns != counts["annotations_in"]:
        raise RuntimeError(
            f"bookkeeping bug: images in {counts['images_in']} != written {counts['samples_written']} + "
            f"rejected {counts['images_rejected']}, or annotations in {counts['annotations_in']} != {anns}"
        )


def verify(out: str | Path) -> list[str]:
    """Re-hash every shard of the manifest; the list of problems (empty when all match)."""
    out = Path(out)
    manifest = read_manifest(out)
    problems = []
    for split, info in manifest.splits.items():
        for s in info.shards:
            path = out / s.name
            if not path.is_file():
                problems.append(f"{split}: {s.name} is missing")
                continue
            sha = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
            if sha.hexdigest() != s.sha256:
                problems.append(
                    f"{split}: {s.name} sha256 {sha.hexdigest()[:12]}..., manifest {s.sha256[:12]}..."
                )
    return problems


# ------------------------------------------------------------------------------------------------- CLI


def _print_summary(result: RunResult, opts: ShardOptions) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    c = result.counts
    table = Table(title="left out, by reason")
    table.add_column("kind/reason")
    table.add_column("count", justify="right")
    for reason, n in sorted(result.rejects.items()):
        table.add_row(reason, str(n))
    if not result.rejects:
        table.add_row("(nothing)", "0")
    console.print(table)
    rate = (c["samples_written"] + c["images_rejected"]) / max(result.seconds, 1e-9)
    console.print(
        f"shards written {result.shards_written}, skipped (resume) {result.shards_skipped}; "
        f"{result.seconds:.1f} s, {rate:.0f} images/s"
    )
    for key in (_PIXEL_COUNT_KEYS if opts.pixel else _COUNT_KEYS)[3:]:
        console.print(f"  {key}: {c[key]}")
    if c["exif_oriented"]:
        for key in _ORIENTATION_KEYS:
            console.print(f"  {key}: {c[key]}")
    if c["labels_grid_assumed_stored"]:
        console.print(
            f"warning: {c['labels_grid_assumed_stored']} photo(s) with an EXIF orientation whose size cannot "
            "tell which grid the labels were drawn on (a flip, 180 degrees, or a square photo): the stored "
            "grid was assumed and the labels turned like the photo; check them",
            markup=False,
        )
    if result.manifest is not None:
        inputs = "photos + label maps without photo" if opts.pixel else "images in the file"
        console.print(
            f"{inputs} {c['images_in']} = samples written {c['samples_written']} "
            f"+ rejected {c['images_rejected']}: OK"
        )
        per_split = ", ".join(f"{k} {v.num_samples}" for k, v in result.manifest.splits.items())
        console.print(f"samples per split: {per_split}")
        console.print(f"manifest: {opts.out / MANIFEST_NAME}, rejects: {opts.out / REJECTS_NAME}")
    else:
        console.print(
            f"task {opts.task_index}/{opts.num_tasks}: written {c['samples_written']}, rejected in shards "
            f"{c['images_rejected']}; run --merge once every task has finished"
        )


def _cpu_count() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modaseg-shard",
        description="Photos + COCO polygon annotations or label maps -> WebDataset shards, manifest.json, "
        "rejects.jsonl",
    )
    p.add_argument(
        "--annotations", type=Path, help="COCO instances JSON (e.g. modanet2018_instances_train.json)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, help="folder of the photos (COCO: named by file_name)")
    src.add_argument("--lmdb", type=Path, help="PaperDoll photos.lmdb (key = decimal image id)")
    p.add_argument("--masks", type=Path, help="instead of --annotations: folder of label maps (.png, .tif, "
                   ".mat), one per photo with the photo's file stem")  # fmt: skip
    p.add_argument("--label-names", type=Path, help="with --masks: the label names, value k = name k (.mat "
                   "cell array, .txt one per line, .json or .yaml list)")  # fmt: skip
    p.add_argument("--label-map", type=Path, help="with --masks: YAML mapping every label name to a "
                   "ModaNet class, background or ignore (configs/labelmaps/)")  # fmt: skip
    p.add_argument("--mask-variable", default=DEFAULT_MASK_VARIABLE, help="the variable of a .mat label map "
                   f"(default {DEFAULT_MASK_VARIABLE})")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--split", default="0.6,0.25,0.15", help="train,val,test fractions (default 0.6,0.25,0.15)"
    )
    p.add_argument("--seed", type=int, default=0, help="key of the split hash")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--workers", type=int, default=_cpu_count(), help="processes (default: usable cores)")
    p.add_argument("--resume", action="store_true", help="keep shards already completed for the same inputs")
    p.add_argument("--drop-empty", action="store_true", help="leave out images with no annotations")
    p.add_argument("--fix-size", action="store_true", help="use the decoded size when it differs")
    p.add_argument("--category-map", type=Path, help='JSON {"old id": new id | null | "ignore"}')
    p.add_argument("--max-images", type=int, help="only the first N images (a quick try)")
    p.add_argument("--num-tasks", type=int, default=1, help="array job size (each task: shards j %% K == I)")
    p.add_argument("--task-index", type=int, default=0, help="this task's index (e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--merge", action="store_true", help="only write the manifest from all tasks' shards")
    p.add_argument(
        "--verify", action="store_true", help="re-hash shards against the manifest (alone: only that)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    err = sys.stderr
    try:
        if args.annotations is None and args.masks is None:
            if not args.verify:
                raise InputError(
                    "give --annotations FILE (COCO polygons) or --masks DIR (label maps), "
                    "or --verify alone to check a shard folder"
                )
        else:
            given = {f.name: getattr(args, f.name) for f in fields(ShardOptions) if hasattr(args, f.name)}
            opts = ShardOptions(
                **given | {"split": parse_split(args.split), "progress": not args.no_progress}
            )
            if args.merge:
                manifest = merge(opts)
                result = RunResult(manifest, Counter(manifest.counts), Counter(manifest.rejects))
            else:
                result = shard(opts)
            _print_summary(result, opts)
        if args.verify:
            problems = verify(args.out)
            for line in problems:
                print(f"verify: {line}", file=err)
            if problems:
                return 1
            print(f"verify: every shard in {args.out / MANIFEST_NAME} matches its sha256", file=err)
    except ManifestError as e:  # shards missing or not matching: exit 1, as a failed --verify
        print(f"modaseg-shard: {e}", file=err)
        return 1
    except UserError:
        raise  # run_cli: one line, exit 2
    except ShardWriteError as e:  # disk full, permissions, ... part-way: finished shards are kept
        where = f" writing {e.filename}"
        if e.finished:
            advice = f"{e.finished} finished shard(s) are kept: fix it, then rerun with --resume"
        else:
            advice = "no shard was finished: fix it, then run again"
        print(f"modaseg-shard: error: {e.strerror}{where}; {advice}", file=err)
        return 1
    except OSError as e:  # writing the manifest or rejects, reading for --verify
        where = f" ({e.filename})" if e.filename else ""
        print(f"modaseg-shard: error: {e.strerror or e}{where}", file=err)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("modaseg-shard", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
