"""The contract between `modaseg-shard` (writer) and the loaders (readers): `DIR/manifest.json`.

Layout of a shard folder:
    DIR/{train,val,test}-NNNNNN.tar   WebDataset shards; per sample:
        __key__  the image id (decimal)
        jpg      the ORIGINAL encoded image bytes (never re-encoded; may be PNG bytes for PNG sources)
        png      label map, single-channel 8-bit PNG, image size; 0 background, 1..K labels, 255 ignore
        json     {"id", "file_name", "width", "height", "source", "class_pixels": [K+1 ints],
                  "classes_present": [labels]}
    DIR/manifest.json                 written last; this module reads and writes it
    DIR/rejects.jsonl                 one line per image or annotation left out, with the reason
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modaseg.classes import LabelSpace
from modaseg.console import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = "modaseg-shards/1"
SPLITS = ("train", "val", "test")


class ManifestError(UserError, RuntimeError):
    """The shard folder is missing, incomplete or does not match its manifest."""


@dataclass
class ShardInfo:
    name: str  # file name relative to the shard folder
    num_samples: int
    sha256: str
    size_bytes: int = 0


@dataclass
class SplitInfo:
    num_samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    class_pixels: list[int] = field(default_factory=list)  # index = label value
    class_images: list[int] = field(default_factory=list)  # images containing the label


@dataclass
class Manifest:
    tool_version: str
    annotations_sha256: str
    classes: list[str]  # index = label value; classes[0] == "background"
    category_to_label: dict[str, int]  # annotation category id (as string, JSON keys) -> label value
    split_fractions: dict[str, float]
    seed: int
    splits: dict[str, SplitInfo]
    counts: dict[str, int] = field(default_factory=dict)  # images_in, samples_written, images_rejected, ...
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> count
    ignore_index: int = 255
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def label_space(self) -> LabelSpace:
        return LabelSpace(
            names=tuple(self.classes),
            category_to_label={int(k): v for k, v in self.category_to_label.items()},
        )

    def shard_paths(self, root: str | Path, split: str) -> list[Path]:
        if split not in self.splits:
            raise ManifestError(f"split {split!r} is not in the manifest (has: {sorted(self.splits)})")
        return [Path(root) / s.name for s in self.splits[split].shards]


def write_manifest(manifest: Manifest, root: str | Path) -> Path:
    """Write atomically (temporary file, then rename): a reader never sees half a manifest."""
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {root}: run modaseg-shard first (or finish it with --resume)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from e
    if raw.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
    for split in raw.get("splits", {}).values():
        for shard in split["shards"]:
            if Path(shard["name"]).name != shard["name"] or shard["name"] in ("", ".", ".."):
                raise ManifestError(
                    f"{path}: shard name {shard['name']!r} is not a plain file name in the folder"
                )
    splits = {
        name: SplitInfo(
            num_samples=s["num_samples"],
            shards=[ShardInfo(**x) for x in s["shards"]],
            class_pixels=s["class_pixels"],
            class_images=s["class_images"],
        )
        for name, s in raw.pop("splits").items()
    }
    return Manifest(splits=splits, **raw)


def check_shards(manifest: Manifest, root: str | Path, split: str) -> list[Path]:
    """Shard paths of `split`, after checking each exists with the recorded size: a missing or truncated
    shard is an error at start-up that names it, not a hang or a short epoch hours later."""
    paths = manifest.shard_paths(root, split)
    for info, path in zip(manifest.splits[split].shards, paths, strict=True):
        if not path.is_file():
            raise ManifestError(f"shard {path} is listed in the manifest but missing")
        if info.size_bytes and path.stat().st_size != info.size_bytes:
            raise ManifestError(
                f"shard {path} has {path.stat().st_size} bytes, the manifest says {info.size_bytes}: "
                "truncated or replaced (re-run modaseg-shard --resume, or --verify to check checksums)"
            )
    return paths
