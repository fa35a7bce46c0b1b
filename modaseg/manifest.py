"""The contract between `modaseg-shard` (writer) and the loaders (readers): `DIR/manifest.json`.

Layout of a shard folder:
    DIR/{train,val,test}-NNNNNN.tar   WebDataset shards; per sample:
        __key__  the image id (decimal) for COCO sources, the photo's file stem for label-map sources
        jpg      the ORIGINAL encoded image bytes (never re-encoded; may be PNG bytes for PNG sources)
        png      label map, single-channel 8-bit PNG, image size; 0 background, 1..K labels, 255 ignore
        json     {"id", "file_name", "width", "height", "source", "class_pixels": [K+1 ints],
                  "classes_present": [labels], ...}
    DIR/manifest.json                 written last; this module reads and writes it
    DIR/rejects.jsonl                 one line per image or annotation left out, with the reason

Each shard's entry holds its size, its sha256 (checked by `modaseg-shard --verify`, which reads every
byte) and a probe hash of three 64 KiB windows (start, middle, end), which `check_shards` compares at
start-up for the price of three small reads: a shard swapped for another of the same size (tar records
pad sizes to 10 KiB, so equal sizes are common) starts with other sample names and fails it. Manifests
written before the probe existed have none and skip that comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modaseg.classes import LabelSpace
from modaseg.console import UserError
from modaseg.files import write_json_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "modaseg-shards/1"
SPLITS = ("train", "val", "test")
PROBE_WINDOW = 64 * 1024


class ManifestError(UserError, RuntimeError):
    """The shard folder is missing, incomplete or does not match its manifest."""


@dataclass
class ShardInfo:
    name: str  # file name relative to the shard folder
    num_samples: int
    sha256: str
    size_bytes: int = 0
    probe_sha256: str = ""  # probe_sha256() of the file; "" in manifests older than the probe


@dataclass
class SplitInfo:
    num_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    class_pixels: list[int] = field(default_factory=list)  # index = label value
    class_images: list[int] = field(default_factory=list)  # images containing the label


@dataclass
class Manifest:
    tool_version: str
    annotations_sha256: str  # label-map sources: of their label names and mapping
    classes: list[str]  # index = label value; classes[0] == "background"
    category_to_label: dict[str, int]  # annotation category id (as string, JSON keys) -> label value
    split_fractions: dict[str, float]
    seed: int
    splits: dict[str, SplitInfo]
    counts: dict[str, int] = field(default_factory=dict)  # images_in, samples_written, images_rejected, ...
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> count
    ignore_index: int = 255
    format: str = FORMAT
    source_labels: dict[str, int] = field(default_factory=dict)  # label-map sources: name -> label value

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def label_space(self) -> LabelSpace:
        return LabelSpace(
            names=tuple(self.classes),
            category_to_label={int(k): v for k, v in self.category_to_label.items()},
        )

    def shard_paths(self, root: str | Path = "", split: str = "train") -> list[Path]:
        """Paths of `split`'s shards; names of a manifest from `open_shards` are absolute already."""
        if split not in self.splits:
            raise ManifestError(f"split {split!r} is not in the manifest (has: {sorted(self.splits)})")
        return [Path(root) / s.name for s in self.splits[split].shards]


def probe_sha256(path: str | Path) -> str:
    """sha256 of the file's first, middle and last 64 KiB (overlapping in a small file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in (0, max(0, (size - PROBE_WINDOW) // 2), max(0, size - PROBE_WINDOW)):
            digest.update(os.pread(f.fileno(), PROBE_WINDOW, start))
    return digest.hexdigest()


def write_manifest(manifest: Manifest, root: str | Path) -> Path:
    """Written atomically (modaseg.files): a reader never sees half a manifest."""
    return write_json_atomic(Path(root) / MANIFEST_NAME, asdict(manifest), indent=2)


def _build(cls: type, raw: Any, where: str, path: Path, **parsed: Any) -> Any:
    """`cls(**raw)` for one JSON object of the manifest, with ManifestError naming an unknown or missing key
    (a manifest from another version of this tool, or edited by hand) instead of a TypeError."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: {where} must be a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ManifestError(
            f"{path}: unknown key {unknown[0]!r} in {where} (written by another modaseg version?)"
        )
    missing_value = dataclasses.MISSING
    required = (
        f.name for f in fields.values() if f.default is missing_value and f.default_factory is missing_value
    )
    missing = [k for k in required if k not in raw and k not in parsed]
    if missing:
        raise ManifestError(f"{path}: {where} lacks the key {missing[0]!r}")
    return cls(**{**raw, **parsed})


def _shard_info(raw: Any, where: str, path: Path) -> ShardInfo:
    info = _build(ShardInfo, raw, where, path)
    name = info.name
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ManifestError(f"{path}: shard name {name!r} is not a plain file name in the folder")
    return info


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {root}: run modaseg-shard first (or finish it with --resume)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ManifestError(f"{path}: format {found!r}, expected {FORMAT!r}")
    splits_raw = raw.get("splits")
    if not isinstance(splits_raw, dict):
        raise ManifestError(f"{path}: 'splits' must be a JSON object")
    splits = {}
    for name, s in splits_raw.items():
        shards = s.get("shards") if isinstance(s, dict) else None
        if not isinstance(shards, list):
            raise ManifestError(f"{path}: split {name!r} needs a list of shards")
        infos = [_shard_info(x, f"a shard of split {name!r}", path) for x in shards]
        splits[name] = _build(SplitInfo, s, f"split {name!r}", path, shards=infos)
    return _build(Manifest, raw, "the manifest", path, splits=splits)


def open_shards(shards: str | Path | list[str], mix: list[float] | None = None) -> Manifest:
    """The manifest of one shard folder, or of several folders trained together (`data.shards` as a list:
    e.g. ModaNet and CCP, which share one label space), with every shard name made absolute so the result
    needs no folder to resolve it. Several folders must have the same classes. With `mix` (relative weights
    of the folders in the training stream), the train split's class statistics are those of the mixture."""
    folders = [shards] if isinstance(shards, str | Path) else list(shards)
    if not folders:
        raise ManifestError("data.shards: no shard folder given")
    if mix is not None and (len(mix) != len(folders) or min(mix) < 0 or not sum(mix) > 0):
        raise ManifestError(f"data.mix {mix}: one weight >= 0 per folder of data.shards {folders}, not all 0")
    manifests = [read_manifest(f) for f in folders]
    for folder, m in zip(folders[1:], manifests[1:], strict=True):
        if m.classes != manifests[0].classes or m.ignore_index != manifests[0].ignore_index:
            raise ManifestError(
                f"data.shards: {folder} has classes {m.classes}, {folders[0]} has {manifests[0].classes}: "
                "folders trained together need one label space (shard them to the same target)"
            )
    train_sizes = [m.splits["train"].num_samples for m in manifests]
    total = sum(train_sizes)
    scale = [
        1.0 if mix is None or not n else (mix[i] / sum(mix)) * total / n for i, n in enumerate(train_sizes)
    ]
    combined = dataclasses.replace(manifests[0], splits={})
    for split in SPLITS:
        info = SplitInfo(0, [], [0] * combined.num_classes, [0] * combined.num_classes)
        for folder, m, s in zip(folders, manifests, scale, strict=True):
            part = m.splits.get(split)
            if part is None:
                continue
            root = Path(folder).resolve()
            info.shards += [dataclasses.replace(x, name=str(root / x.name)) for x in part.shards]
            info.num_samples += part.num_samples
            k = s if split == "train" else 1.0
            info.class_pixels = [a + k * b for a, b in zip(info.class_pixels, part.class_pixels, strict=True)]
            info.class_images = [a + k * b for a, b in zip(info.class_images, part.class_images, strict=True)]
        combined.splits[split] = info
    return combined


def check_shards(manifest: Manifest, root: str | Path, split: str) -> list[Path]:
    """Shard paths of `split`, after checking each exists with the recorded size and probe hash: a
    missing, truncated or swapped shard is an error at start-up that names it, not a hang, a short epoch
    or another split's images hours later."""
    paths = manifest.shard_paths(root, split)
    for info, path in zip(manifest.splits[split].shards, paths, strict=True):
        if not path.is_file():
            raise ManifestError(f"shard {path} is listed in the manifest but missing")
        if info.size_bytes and path.stat().st_size != info.size_bytes:
            raise ManifestError(
                f"shard {path} has {path.stat().st_size} bytes, the manifest says {info.size_bytes}: "
                "truncated or replaced (re-run modaseg-shard --resume, or --verify to check checksums)"
            )
        if info.probe_sha256 and probe_sha256(path) != info.probe_sha256:
            raise ManifestError(
                f"shard {path} is not the shard the manifest lists (its first, middle or last 64 KiB "
                "differ): replaced or rewritten (re-run modaseg-shard --resume, or --verify)"
            )
    return paths
