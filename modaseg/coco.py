"""COCO annotation files: the one reader and the one polygon check.

`modaseg-shard` rasterizes polygons into label maps and `modaseg-synth --from-annotations` paints photos
for them; both read the file and judge polygons here, so a garment is painted exactly when it is
labelled. pycocotools crashes on or mis-reads fewer than 6 numbers, odd lengths, non-numbers, arrays,
`[]`/`[[]]`, and overflows on coordinates far outside the image: `check_polygon` keeps those away from
it and `fit_polygon` cuts far coordinates to a box one image size around the image (the shape inside
the image is unchanged; pycocotools clips the rest itself).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from modaseg.console import InputError


class MissingInputError(InputError, FileNotFoundError):
    """A named input file does not exist."""


def is_int(v: object) -> bool:
    """An integer that is not a bool (JSON `true` must not pass as the id 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def load_coco(path: str | Path) -> tuple[dict, str]:
    """The parsed COCO file (a dict with `images`, `annotations` and `categories` lists) and its sha256."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"annotation file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read annotation file {path}: {e}") from e
    try:
        coco = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"annotation file {path} is not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(coco, dict):
        raise InputError(f"{path}: expected a COCO object at the top level, got {type(coco).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
    if missing:
        raise InputError(f"{path}: missing or non-list COCO key(s): {', '.join(missing)}")
    return coco, hashlib.sha256(raw).hexdigest()


MAX_COORD = 1e15  # far beyond any image; keeps the clipping arithmetic exact enough
_NUMBER_TYPES = frozenset((int, float))  # exact types: bool is an int subclass and is refused


def check_polygon(polygon: object) -> str | None:
    """Why pycocotools must not see this polygon (the reason recorded in rejects.jsonl), or None."""
    if not isinstance(polygon, list | tuple):
        return "polygon_not_a_list"  # numpy arrays are read as boxes, dicts as RLE
    if len(polygon) < 6:
        return "polygon_too_short"  # [] / 2 numbers raise, 4 numbers are read as a box
    if len(polygon) % 2:
        return "polygon_odd_length"
    if not set(map(type, polygon)) <= _NUMBER_TYPES:
        return "polygon_bad_value"  # strings, null, booleans, nested lists
    try:
        if not all(map(math.isfinite, polygon)) or max(map(abs, polygon)) >= MAX_COORD:
            return "polygon_bad_value"  # NaN, inf, absurd magnitudes
    except OverflowError:
        return "polygon_bad_value"  # an integer too large for a float
    return None


def _clip_halfplane(pts: list[tuple[float, float]], axis: int, bound: float, keep_below: bool) -> list:
    out = []
    for i, cur in enumerate(pts):
        prev = pts[i - 1]
        cin = cur[axis] <= bound if keep_below else cur[axis] >= bound
        pin = prev[axis] <= bound if keep_below else prev[axis] >= bound
        if cin != pin:
            t = (bound - prev[axis]) / (cur[axis] - prev[axis])
            x = prev[0] + t * (cur[0] - prev[0])
            y = prev[1] + t * (cur[1] - prev[1])
            out.append((bound, y) if axis == 0 else (x, bound))
        if cin:
            out.append(cur)
    return out


def clip_polygon(polygon: list[float], x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Sutherland-Hodgman: the polygon cut to a rectangle (exact geometry), flat; [] when nothing is left."""
    pts = list(zip(polygon[0::2], polygon[1::2], strict=True))
    for axis, bound, below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
        pts = _clip_halfplane(pts, axis, bound, below)
        if not pts:
            return []
    return [float(v) for p in pts for v in p] if len(pts) >= 3 else []


def fit_polygon(polygon: list | tuple, width: int, height: int) -> tuple[list | tuple, str | None]:
    """A checked polygon as pycocotools may rasterize it at this size, and how it leaves the image: None
    (it does not), "clipped" (pycocotools clips it itself, bit-exact) or "far_clipped" (cut here first to
    the box one image size around the image; a polygon with nothing left there covers no pixel)."""
    xs, ys = polygon[0::2], polygon[1::2]
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    if lo_x >= 0 and lo_y >= 0 and hi_x <= width and hi_y <= height:
        return polygon, None
    if lo_x >= -width and lo_y >= -height and hi_x <= 2 * width and hi_y <= 2 * height:
        return polygon, "clipped"
    return clip_polygon(list(polygon), -width, -height, 2 * width, 2 * height) or [0.0] * 6, "far_clipped"
