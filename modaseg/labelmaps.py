"""Pixel-label datasets: photos with one label map each, their label names, and a mapping onto ModaNet's.

Photos (`.jpg`, `.jpeg`, `.png`) and label maps are paired by file stem, which becomes the sample key.
A label map is a single-channel PNG or TIFF, or a MATLAB 5 `.mat` file holding it in a named variable
(Clothing Co-Parsing: `annotations/pixel-level/NNNN.mat`, variable `groundtruth`). Value k means the
k-th source label name. The names come from a `.mat` cell array (CCP's `label_list.mat`), a text file
(one name per line), or a JSON or YAML list. The mapping file (YAML) sends every source name to a class
of the target label space, `background`, or `ignore` (label 255):

    target: modanet
    labels:
      "null": background   # quote names YAML would read as null, booleans or numbers
      shoes: footwear
      romper: ignore

The target is ModaNet's label space (`modaseg.classes.MODANET`), so these shards carry exactly the
classes of ModaNet shards and train, evaluate and export like them, or together with them.

`.mat` files are read with `scipy.io.loadmat`, which builds numeric and char arrays and never unpickles.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from modaseg.classes import IGNORE_INDEX, MODANET, LabelSpace
from modaseg.console import InputError
from modaseg.files import strict_yaml

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".mat")
DEFAULT_MASK_VARIABLE = "groundtruth"
MAX_SOURCE_LABELS = 65536  # 16-bit label maps at most
MAX_KEY_BYTES = 90  # a tar member name (key + ".json") must fit the 100-byte ustar field
TARGETS = {"modanet": MODANET}  # the label spaces a mapping may name as its `target`
_MATLAB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_SINGLE_CHANNEL_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")


class Rejected(Exception):
    """One input left out, with the reason and a detail for rejects.jsonl (never the file's bytes)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def is_matlab_name(name: str) -> bool:
    return _MATLAB_NAME.fullmatch(name) is not None


# ---------------------------------------------------------------------------------------------- pairing


def list_folder(folder: Path, flag: str, suffixes: tuple[str, ...]) -> tuple[list[str], int]:
    """The sorted names in `folder` ending in one of `suffixes` (any case; hidden files skipped), and how
    many other visible names there were. Nothing is opened here: the sharder reads each file only if it
    is a regular file inside `folder`."""
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except NotADirectoryError:
        raise InputError(f"{flag} {folder} is not a folder") from None
    except OSError as e:
        raise InputError(f"cannot list {flag} {folder}: {e.strerror or e}") from None
    wanted = [n for n in names if n.lower().endswith(suffixes)]
    if not wanted:
        raise InputError(f"{flag} {folder} holds no {', '.join(suffixes)} files")
    return wanted, len(names) - len(wanted)


def _stem(name: str) -> str:
    return name[: name.rindex(".")]


def key_problem(key: str) -> str | None:
    """Why a file stem cannot be a sample key, or None."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "the name is not valid UTF-8"
    if not key or "." in key:
        return "a sample key must be non-empty and without '.' (WebDataset splits names at the first dot)"
    if size > MAX_KEY_BYTES or not key.isprintable():
        return f"a sample key must be printable and at most {MAX_KEY_BYTES} bytes"
    return None


@dataclass
class Pairing:
    pairs: list[tuple[str, str, str]]  # (key, photo, label map), sorted by key
    rejects: list[dict] = field(default_factory=list)  # lines for rejects.jsonl
    counts: Counter = field(default_factory=Counter)  # images_in, images_rejected, files_ignored, ...


def pair_files(images: Path, masks: Path, max_images: int | None = None) -> Pairing:
    """Photos and label maps paired by file stem, the stem being the sample key. Inputs are the photos
    (the first `max_images`) and the label maps without a photo; each is paired or rejected: a second
    photo with one stem, a stem that cannot be a key, no label map, two label maps, no photo."""
    photos, ignored_photos = list_folder(images, "--images", PHOTO_SUFFIXES)
    labels, ignored_labels = list_folder(masks, "--masks", LABEL_SUFFIXES)
    out = Pairing([], counts=Counter(files_ignored=ignored_photos + ignored_labels))

    def reject(reason: str, key: str, detail: str) -> None:
        out.counts["images_rejected"] += 1
        out.rejects.append({"kind": "image", "reason": reason, "key": key, "detail": detail})

    maps_of: dict[str, list[str]] = {}
    for name in labels:
        maps_of.setdefault(_stem(name), []).append(name)
    seen: set[str] = set()
    for photo in photos[:max_images]:
        out.counts["images_in"] += 1
        key = _stem(photo)
        maps = maps_of.get(key, [])
        if key in seen:
            reject("duplicate_key", key, f"{photo}: another photo with the stem {key!r} came first")
        elif problem := key_problem(key):
            reject("unsafe_key", key, f"{photo}: {problem}")
        elif not maps:
            reject("missing_label_map", key, f"{photo}: no label map {key}.* in {masks}")
        elif len(maps) > 1:
            reject("duplicate_label_map", key, f"{photo}: {len(maps)} label maps: {', '.join(maps)}")
        else:
            out.pairs.append((key, photo, maps[0]))
        seen.add(key)
    all_stems = {_stem(p) for p in photos}
    for stem, maps in maps_of.items():
        if stem in seen:
            continue
        if stem in all_stems:  # its photo is past --max-images: not an input
            out.counts["label_maps_outside_max_images"] += len(maps)
            continue
        for name in maps:
            out.counts["images_in"] += 1
            reject("missing_photo", stem, f"label map {name}: no photo {stem}.* in {images}")
    out.pairs.sort()
    return out


# ------------------------------------------------------------------------------------------- label names


def _mat_strings(cell: np.ndarray, path: Path) -> list[str]:
    """A MATLAB cell array of char arrays (as loadmat builds it) -> the strings, in column order."""
    if cell.dtype != object:
        raise InputError(f"label names {path}: expected a cell array of names, got a {cell.dtype} array")
    names = []
    for item in cell.ravel(order="F"):
        if isinstance(item, np.ndarray) and item.dtype.kind == "U" and item.size <= 1:
            names.append(str(item.item()) if item.size else "")
        else:
            raise InputError(f"label names {path}: cell {len(names)} is not a name")
    return names


def _read_mat_names(path: Path, raw: bytes) -> list[str]:
    from scipy.io import loadmat

    try:
        variables = {k: v for k, v in loadmat(io.BytesIO(raw)).items() if not k.startswith("__")}
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, ... on a bad file
        raise InputError(f"label names {path} is not a readable MATLAB 5 file ({type(e).__name__})") from None
    if "label_list" in variables:
        return _mat_strings(variables["label_list"], path)
    if len(variables) == 1:
        return _mat_strings(next(iter(variables.values())), path)
    raise InputError(f"label names {path}: expected a variable `label_list` (has {sorted(variables)})")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_label_names(path: str | Path) -> list[str]:
    """Source label names, index = label value: from `.mat` (cell array), `.txt`, `.json` or `.yaml`."""
    path = Path(path)
    raw = _read(path, "label names")
    suffix = path.suffix.lower()
    try:
        if suffix == ".mat":
            names: object = _read_mat_names(path, raw)
        elif suffix == ".txt":
            names = raw.decode("utf-8").rstrip("\n").split("\n")
            names = [n.rstrip("\r").strip() for n in names]
        elif suffix == ".json":
            names = json.loads(raw)
        elif suffix in (".yaml", ".yml"):
            names = strict_yaml(raw)
        else:
            raise InputError(f"label names {path}: expected a .mat, .txt, .json or .yaml file")
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise InputError(f"label names {path} do not parse: {e}") from None
    if not isinstance(names, list) or not names:
        raise InputError(f"label names {path}: expected a non-empty list of names")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise InputError(f"label names {path}: entry {i} ({name!r}) is not a name")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"label names {path}: names given twice: {', '.join(twice)}")
    if len(names) > MAX_SOURCE_LABELS:
        raise InputError(f"label names {path}: {len(names)} names, at most {MAX_SOURCE_LABELS}")
    return names


# ---------------------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class LabelMapping:
    """Source label names mapped onto a target label space."""

    space: LabelSpace
    by_name: dict[str, int]  # source name -> target label value (0 background, 255 ignore)
    lut: np.ndarray  # uint8, index = source label value

    @classmethod
    def from_names(cls, space: LabelSpace, names: list[str], targets: dict[str, str]) -> LabelMapping:
        values = {**{n: i for i, n in enumerate(space.names)}, "ignore": IGNORE_INDEX}
        by_name = {n: values[targets[n]] for n in names}
        return cls(space, by_name, np.array([by_name[n] for n in names], np.uint8))


def load_label_mapping(path: str | Path, names: list[str]) -> LabelMapping:
    """The YAML mapping file checked against the source names: every name mapped, every target known."""
    path = Path(path)
    try:
        raw = strict_yaml(_read(path, "label map"))
    except yaml.YAMLError as e:
        raise InputError(f"label map {path} does not parse: {e}") from None
    if not isinstance(raw, dict) or set(raw) != {"target", "labels"}:
        raise InputError(f"label map {path}: expected the keys `target` and `labels` and nothing else")
    space = TARGETS.get(raw["target"]) if isinstance(raw["target"], str) else None
    if space is None:
        raise InputError(f"label map {path}: unknown target {raw['target']!r} (known: {', '.join(TARGETS)})")
    labels = raw["labels"]
    if not isinstance(labels, dict):
        raise InputError(f"label map {path}: `labels` must map source names to target names")
    for k, v in labels.items():
        if not isinstance(k, str):
            raise InputError(
                f"label map {path}: source name {k!r} is not a string (YAML reads null, yes/no, on/off and "
                "numbers as such: quote it)"
            )
        if not isinstance(v, str) or (v not in space.names and v != "ignore"):
            raise InputError(
                f"label map {path}: {k} -> {v!r}: unknown target (use one of {', '.join(space.names)}, ignore)"
            )
    unmapped = [n for n in names if n not in labels]
    if unmapped:
        raise InputError(f"label map {path}: source label(s) not mapped: {', '.join(unmapped)}")
    unknown = [k for k in labels if k not in set(names)]
    if unknown:
        raise InputError(f"label map {path}: {', '.join(unknown)}: not among the source label names")
    return LabelMapping.from_names(space, names, labels)


# ------------------------------------------------------------------------------------------- label maps


def _size_mismatch(found: tuple[int, int], sizes: tuple[tuple[int, int], ...]) -> Rejected:
    photo = " or ".join(str(s) for s in sizes)
    turned = " (as stored or as displayed: EXIF orientation)" if len(sizes) > 1 else ""
    return Rejected("label_size_mismatch", f"label map {found}, photo {photo}{turned} (h, w)")


def _read_mat(data: bytes, variable: str, sizes: tuple[tuple[int, int], ...]) -> np.ndarray:
    from scipy.io import loadmat, whosmat

    try:  # the shapes first: a wrong-size map is rejected before its data is inflated
        shapes = {
            n: shape for n, shape, _ in whosmat(io.BytesIO(data), verify_compressed_data_integrity=False)
        }
        if variable not in shapes:
            raise Rejected("label_variable_missing", f"no variable {variable!r} (has {len(shapes)} other)")
        if tuple(shapes[variable]) not in sizes:
            raise _size_mismatch(tuple(shapes[variable]), sizes)
        return loadmat(io.BytesIO(data), variable_names=[variable])[variable]
    except Rejected:
        raise
    except NotImplementedError:  # MATLAB 7.3 files are HDF5
        raise Rejected("label_unsupported_format", "MATLAB 7.3 (HDF5) file: save it with -v7") from None
    except Exception as e:  # scipy raises ValueError, IndexError, OSError, ... on a damaged file
        truncated = "truncated" in str(e) or "could not read bytes" in str(e)
        reason = "label_truncated" if truncated else "label_corrupt"
        raise Rejected(reason, f"not a readable MATLAB 5 file ({type(e).__name__})") from None


def _read_image(data: bytes, sizes: tuple[tuple[int, int], ...]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "TIFF"]) as im:
            if im.mode not in _SINGLE_CHANNEL_MODES:
                raise Rejected("label_not_single_channel", f"{im.format} in mode {im.mode}")
            if (im.height, im.width) not in sizes:
                raise _size_mismatch((im.height, im.width), sizes)
            im.load()
            return np.asarray(im)  # palette images: the palette indices, as the label values
    except Rejected:
        raise
    except Image.DecompressionBombError as e:
        raise Rejected("label_too_large", str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        reason = "label_truncated" if "truncated" in str(e) else "label_corrupt"
        raise Rejected(reason, f"not a readable PNG or TIFF ({type(e).__name__})") from None


def read_label_map(
    data: bytes,
    name: str,
    variable: str,
    size: tuple[int, int],
    lut: np.ndarray,
    displayed: tuple[int, int] | None = None,
) -> np.ndarray:
    """The label map in `data` (file `name`), checked against the photo's stored (height, width), or its
    `displayed` one when EXIF orientation turns it, and the source names (values 0..len(lut)-1), mapped
    through `lut`: uint8 target labels. The caller tells by the shape which grid it was drawn on."""
    sizes = (size,) if displayed in (None, size) else (size, displayed)
    raw = _read_mat(data, variable, sizes) if name.lower().endswith(".mat") else _read_image(data, sizes)
    if raw.ndim != 2:
        raise Rejected("label_not_single_channel", f"an array of shape {raw.shape}")
    if raw.dtype.kind == "b":
        raw = raw.view(np.uint8)
    elif raw.dtype.kind == "f" and np.isfinite(raw).all() and (raw == np.round(raw)).all():
        raw = raw.astype(np.int64)  # MATLAB doubles that hold whole numbers
    if raw.dtype.kind not in "iu":
        raise Rejected("label_bad_values", f"label values of type {raw.dtype}, not whole numbers")
    if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
        bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])
        shown = ", ".join(str(v) for v in bad[:8].tolist()) + (", ..." if len(bad) > 8 else "")
        raise Rejected("label_unknown_values", f"values {shown} have no name (there are {len(lut)} names)")
    return _lookup(raw, lut)


def _lookup(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """lut[raw], C-ordered. 8-bit maps go through OpenCV's table lookup: numpy's gather widens every
    index to intp and costs ~2 ms on a 550x830 map, this ~0.8 ms (loadmat's column-major order included)."""
    if raw.dtype != np.uint8:
        return np.ascontiguousarray(lut[raw])
    table = np.zeros(256, np.uint8)
    table[: len(lut)] = lut[:256]
    if raw.flags.f_contiguous and not raw.flags.c_contiguous:
        return np.ascontiguousarray(cv2.LUT(raw.T, table).T)
    return cv2.LUT(np.ascontiguousarray(raw), table)
