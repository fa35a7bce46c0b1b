"""Stand-in ModaNet data: the photos cannot be bundled, so write images + annotations in ModaNet's exact format.

Two modes, one renderer:
- `generate`: synthetic people (head, torso, arms, legs) wearing polygon garments of all 13 ModaNet
  categories with ModaNet-like imbalance, overlaps (belt over top/pants, outer over top) and
  multi-polygon instances (a pair of shoes, open jacket panels, a bag with its strap).
- `paint`: one image per image of a real annotation file, so geometry and imbalance are real.

Instances are painted largest area first (area of the rasterised polygons), the same rule the sharder
uses for labels, so image and label map agree where instances overlap. Appearance is learnable but not a
colour lookup: every class draws from a shared palette and shared textures (with a class-specific
preference), under a lighting gradient, with background clutter in clothing colours and textures.

Polygons are judged by modaseg/coco.py, the check the sharder applies: a polygon is painted exactly when
the sharder labels it (far coordinates cut the same way, none without a pixel).

Everything random comes from `numpy.random.default_rng([seed, ...])`, per image: same seed, same bytes.
The annotation file says it was made here (a top-level `modaseg_synth` entry, which COCO readers
ignore), and a claimed folder holds a `.modaseg-synth` marker from before its first image; any other
non-empty output folder (an annotations.json without the entry, photos in images/, a real ModaNet
folder with its own annotation file) holds data this tool did not write and is refused, not overwritten.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from modaseg.classes import MODANET_CATEGORIES
from modaseg.coco import check_polygon, fit_polygon, is_int, load_coco
from modaseg.console import InputError, progress_bar, run_cli
from modaseg.files import write_atomic

log = logging.getLogger(__name__)

FIRST_IMAGE_ID = 100001  # not 1: the zero-padded file names ("0100001.jpg") must matter
IMAGE_ID_STEP = 3  # gaps between ids, as in ModaNet: nothing may assume contiguous ids
ANNOTATIONS_NAME = "annotations.json"
IMAGES_DIR = "images"
PROVENANCE = "modaseg_synth"  # top-level key of every annotation file written here
MARKER_NAME = ".modaseg-synth"  # written when a folder is claimed, before the first image
MAX_SIDE = 4096  # the noise bank is 2x the image in each direction: 4096x4096 needs ~800 MB

Point = tuple[float, float]
Outline = list[
    Point
]  # body frame: (u, v) in head heights; u across (0 = body axis), v down from the head top

# ---------------------------------------------------------------------------------------------- appearance

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "charcoal": (62, 62, 68),
    "grey": (128, 128, 132),
    "light_grey": (188, 188, 192),
    "white": (234, 234, 230),
    "cream": (236, 224, 198),
    "beige": (200, 180, 150),
    "tan": (210, 176, 136),
    "camel": (180, 138, 88),
    "brown": (112, 72, 42),
    "dark_brown": (70, 45, 30),
    "navy": (32, 42, 82),
    "denim": (70, 98, 150),
    "light_denim": (132, 160, 198),
    "sky": (150, 190, 228),
    "red": (188, 32, 42),
    "burgundy": (110, 22, 40),
    "pink": (230, 152, 172),
    "hot_pink": (218, 62, 140),
    "orange": (228, 122, 44),
    "mustard": (208, 168, 52),
    "olive": (102, 110, 52),
    "green": (42, 118, 72),
    "teal": (32, 118, 128),
    "purple": (100, 62, 130),
}
_COLOUR_NAMES = tuple(PALETTE)
_COLOURS = np.array([PALETTE[n] for n in _COLOUR_NAMES], dtype=np.float32)
TEXTURES = ("solid", "stripes", "check", "dots", "denim", "mottled")

SKIN = np.array(
    [(241, 194, 167), (226, 174, 138), (198, 136, 102), (162, 108, 76), (122, 82, 56), (88, 60, 44)]
)
HAIR = np.array([(22, 16, 12), (58, 40, 26), (108, 74, 42), (186, 148, 92), (150, 148, 146), (118, 42, 22)])
WALLS = np.array([(222, 218, 210), (200, 200, 196), (236, 230, 214), (170, 176, 182), (206, 190, 170)])
GROUNDS = np.array([(110, 110, 112), (150, 146, 140), (120, 92, 66), (176, 168, 150), (84, 88, 92)])


@dataclass(frozen=True)
class ClassStyle:
    """A class's preferred colours and textures; everything else stays possible (shared palette)."""

    colours: tuple[str, ...]
    textures: dict[str, float]


# Preferred subsets overlap on purpose (black/grey/denim/beige recur): colour alone does not identify a class.
CLASS_STYLES: dict[str, ClassStyle] = {
    "bag": ClassStyle(
        ("black", "brown", "camel", "tan", "red", "white", "beige", "burgundy"),
        {"solid": 5, "mottled": 3, "check": 1, "stripes": 0.5, "dots": 0.5, "denim": 0.3},
    ),
    "belt": ClassStyle(
        ("black", "brown", "dark_brown", "camel", "tan"), {"solid": 6, "mottled": 2, "denim": 0.3}
    ),
    "boots": ClassStyle(("black", "brown", "dark_brown", "camel", "grey"), {"solid": 4, "mottled": 3}),
    "footwear": ClassStyle(
        ("black", "white", "brown", "grey", "red", "beige", "navy"),
        {"solid": 5, "mottled": 2, "stripes": 0.5},
    ),
    "outer": ClassStyle(
        ("black", "camel", "grey", "charcoal", "navy", "olive", "beige", "denim", "burgundy"),
        {"solid": 4, "mottled": 2, "check": 2, "denim": 1, "stripes": 0.5},
    ),
    "dress": ClassStyle(
        ("red", "black", "pink", "navy", "white", "green", "mustard", "hot_pink", "purple", "sky"),
        {"solid": 3, "dots": 3, "stripes": 1.5, "check": 0.5, "mottled": 1},
    ),
    "sunglasses": ClassStyle(("black", "dark_brown", "charcoal", "burgundy"), {"solid": 6, "mottled": 1}),
    "pants": ClassStyle(
        ("denim", "light_denim", "black", "navy", "grey", "beige", "olive", "charcoal"),
        {"denim": 4, "solid": 3, "check": 0.5, "stripes": 0.5, "mottled": 1},
    ),
    "top": ClassStyle(
        ("white", "black", "grey", "pink", "sky", "red", "cream", "navy", "mustard", "green"),
        {"solid": 3, "stripes": 3, "dots": 1, "check": 1, "mottled": 1},
    ),
    "shorts": ClassStyle(
        ("denim", "light_denim", "white", "black", "beige", "olive"),
        {"denim": 3, "solid": 3, "stripes": 0.5, "dots": 0.5},
    ),
    "skirt": ClassStyle(
        ("black", "red", "pink", "navy", "beige", "denim", "burgundy", "mustard"),
        {"solid": 3, "check": 2, "dots": 1.5, "denim": 1, "stripes": 1},
    ),
    "headwear": ClassStyle(
        ("black", "beige", "camel", "grey", "navy", "white", "burgundy"),
        {"solid": 3, "mottled": 3, "stripes": 1},
    ),
    "scarf/tie": ClassStyle(
        ("red", "burgundy", "navy", "grey", "camel", "pink", "mustard", "cream"),
        {"check": 3, "stripes": 3, "solid": 2, "dots": 1},
    ),
}
_CLUTTER_STYLE = ClassStyle((), {t: 1.0 for t in TEXTURES})
_PREFERRED_WEIGHT = 5.0  # a preferred colour is 5x as likely as any other palette colour


@dataclass
class _Style:
    kind: str
    c1: np.ndarray
    c2: np.ndarray
    period: float = 12.0
    angle: float = 0.0
    duty: float = 0.5
    shade: float = 0.2
    vgrad: float = 0.0
    noise: float = 4.0
    offset: tuple[int, int] = (0, 0)


def _jitter_colour(rng: np.random.Generator, rgb: np.ndarray, spread: float = 10.0) -> np.ndarray:
    return np.clip(rgb * rng.uniform(0.82, 1.12) + rng.normal(0.0, spread, 3), 0, 255).astype(np.float32)


def _pick_style(rng: np.random.Generator, style: ClassStyle, width: int, height: int) -> _Style:
    weights = np.ones(len(_COLOUR_NAMES))
    for name in style.colours:
        weights[_COLOUR_NAMES.index(name)] = _PREFERRED_WEIGHT
    c1 = _jitter_colour(rng, _COLOURS[rng.choice(len(_COLOURS), p=weights / weights.sum())])
    if rng.random() < 0.5:
        c2 = _jitter_colour(rng, _COLOURS[rng.integers(len(_COLOURS))])
    else:  # a lighter or darker shade of the main colour
        c2 = np.clip(c1 * rng.choice([0.55, 0.7, 1.35, 1.6]) + 10, 0, 255).astype(np.float32)
    kinds = list(style.textures)
    tw = np.array([style.textures[k] for k in kinds], dtype=float) + 0.15  # every texture stays possible
    return _Style(
        kind=kinds[rng.choice(len(kinds), p=tw / tw.sum())],
        c1=c1,
        c2=c2,
        period=float(rng.uniform(5.0, 24.0)),
        angle=float(rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4, rng.uniform(0, math.pi)])),
        duty=float(rng.uniform(0.25, 0.6)),
        shade=float(rng.uniform(0.05, 0.35)),
        vgrad=float(rng.uniform(-0.15, 0.15)),
        noise=float(rng.uniform(2.0, 9.0)),
        offset=(int(rng.integers(0, width)), int(rng.integers(0, height))),
    )


@dataclass
class _NoiseBank:
    """Noise fields made once per run and image size, twice the image size: each fill reads a window."""

    fine: np.ndarray
    mid: np.ndarray
    low: np.ndarray


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    small = rng.standard_normal((max(2, height // cell), max(2, width // cell))).astype(np.float32)
    big = np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    return ((big - big.mean()) / (big.std() + 1e-6)).astype(np.float32)


def _make_bank(seed: int, width: int, height: int) -> _NoiseBank:
    rng = np.random.default_rng([seed, width, height, 0xB4A7])
    w2, h2 = 2 * width, 2 * height
    return _NoiseBank(
        fine=rng.standard_normal((h2, w2)).astype(np.float32),
        mid=_smooth_noise(rng, w2, h2, 5),
        low=_smooth_noise(rng, w2, h2, 28),
    )


def _texture(style: _Style, bank: _NoiseBank, x0: int, y0: int, bw: int, bh: int) -> np.ndarray:
    """RGB uint8 pixels for the window (x0, y0, bw, bh); coordinates are absolute so patterns line up."""
    xs = np.arange(x0, x0 + bw, dtype=np.float32)[None, :]
    ys = np.arange(y0, y0 + bh, dtype=np.float32)[:, None]
    ox, oy = style.offset
    win = np.s_[oy + y0 : oy + y0 + bh, ox + x0 : ox + x0 + bw]
    fine = bank.fine[win]
    out = np.empty((bh, bw, 3), dtype=np.float32)
    out[:] = style.c1
    if style.kind == "stripes":
        t = xs * math.cos(style.angle) + ys * math.sin(style.angle)
        out[(t % style.period) < style.period * style.duty] = style.c2
    elif style.kind == "check":
        m = 0.5 * ((xs % style.period) < style.period * style.duty) + 0.5 * (
            (ys % style.period) < style.period * style.duty
        )
        out += (style.c2 - style.c1) * m[..., None]
    elif style.kind == "dots":
        out[bank.mid[win] > 1.1] = style.c2
    elif style.kind == "denim":
        out *= (1.0 + 0.1 * fine + 0.07 * np.sin((xs + ys) * 1.7))[..., None]
    elif style.kind == "mottled":
        out *= (1.0 + 0.16 * bank.low[win])[..., None]
    half = bw / 2.0 + 1.0
    light = (1.0 - style.shade * ((xs - (x0 + bw / 2.0)) / half) ** 2) * (
        1.0 + style.vgrad * (ys - (y0 + bh / 2.0)) / (bh + 1.0)
    )
    out *= light[..., None]
    out += style.noise * fine[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _fill(canvas: Image.Image, polygons: Sequence[Sequence[float]], style: _Style, bank: _NoiseBank) -> None:
    """Paint the union of flat polygons [x1, y1, ...] with the style's texture."""
    pts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons if len(p) >= 6]
    if not pts:
        return
    allp = np.concatenate(pts)
    width, height = canvas.size
    x0, y0 = max(0, math.floor(allp[:, 0].min())), max(0, math.floor(allp[:, 1].min()))
    x1, y1 = min(width, math.ceil(allp[:, 0].max()) + 1), min(height, math.ceil(allp[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(mask)
    for p in pts:
        draw.polygon((p - (x0, y0)).ravel().tolist(), fill=255)
    tex = _texture(style, bank, x0, y0, x1 - x0, y1 - y0)
    canvas.paste(Image.fromarray(tex, mode="RGB"), (x0, y0), mask)


def _solid(rng: np.random.Generator, rgb: np.ndarray, width: int, height: int, shade: float = 0.25) -> _Style:
    c = _jitter_colour(rng, rgb.astype(np.float32), 6.0)
    return _Style(
        kind="solid" if rng.random() < 0.8 else "mottled",
        c1=c,
        c2=c,
        shade=shade,
        noise=float(rng.uniform(1.5, 4.0)),
        offset=(int(rng.integers(0, width)), int(rng.integers(0, height))),
    )


def _background(rng: np.random.Generator, bank: _NoiseBank, width: int, height: int) -> Image.Image:
    """A wall (and often a floor) plus clutter shapes in clothing colours and textures."""
    canvas = Image.new("RGB", (width, height))
    wall = _solid(rng, WALLS[rng.integers(len(WALLS))], width, height, shade=0.0)
    wall.vgrad = float(rng.uniform(-0.25, 0.25))
    wall.noise = float(rng.uniform(2.0, 6.0))
    _fill(canvas, [[0, 0, width, 0, width, height, 0, height]], wall, bank)
    if rng.random() < 0.65:
        horizon = rng.uniform(0.55, 0.88) * height
        tilt = rng.uniform(-0.06, 0.06) * height
        ground = _solid(rng, GROUNDS[rng.integers(len(GROUNDS))], width, height, shade=0.0)
        ground.kind = str(rng.choice(["solid", "mottled", "denim"]))
        _fill(canvas, [[0, horizon - tilt, width, horizon + tilt, width, height, 0, height]], ground, bank)
    for _ in range(int(rng.integers(2, 10))):
        style = _pick_style(rng, _CLUTTER_STYLE, width, height)
        cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
        sx, sy = rng.uniform(0.04, 0.35) * width, rng.uniform(0.04, 0.35) * height
        kind = rng.integers(3)
        if kind == 0:  # box: window, sign, shelf
            poly = [cx - sx, cy - sy, cx + sx, cy - sy, cx + sx, cy + sy, cx - sx, cy + sy]
        elif kind == 1:  # ellipse: plant, lamp, round sign
            a = np.linspace(0, 2 * math.pi, 24, endpoint=False)
            poly = np.column_stack([cx + sx * np.cos(a), cy + sy * np.sin(a)]).ravel().tolist()
        else:  # irregular blob: a garment-like shape that is not a labelled garment
            a = np.sort(rng.uniform(0, 2 * math.pi, 9))
            r = rng.uniform(0.5, 1.0, 9)
            poly = np.column_stack([cx + sx * r * np.cos(a), cy + sy * r * np.sin(a)]).ravel().tolist()
        _fill(canvas, [poly], style, bank)
    return canvas


def _finish(rng: np.random.Generator, canvas: Image.Image, bank: _NoiseBank) -> Image.Image:
    """Lighting gradient, vignette, white balance and sensor noise over the whole image."""
    width, height = canvas.size
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    gain = (1.0 + rng.uniform(-0.35, 0.35) * xs + rng.uniform(-0.3, 0.3) * ys) * (
        1.0 - rng.uniform(0.0, 0.5) * (xs * xs + ys * ys)
    )
    balance = (rng.uniform(0.85, 1.15) * (1.0 + rng.normal(0.0, 0.05, 3))).astype(np.float32)
    oy, ox = int(rng.integers(0, height)), int(rng.integers(0, width))
    noise = bank.fine[oy : oy + height, ox : ox + width]
    out = np.asarray(canvas, dtype=np.float32) * (gain[..., None] * balance)
    out += rng.uniform(1.0, 5.0) * noise[..., None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")


@dataclass
class _Instance:
    category_id: int
    polygons: list[list[int]]
    area: int = 0


def _render(
    rng: np.random.Generator,
    bank: _NoiseBank,
    width: int,
    height: int,
    body: list[tuple[list[list[int]], _Style]],
    instances: list[_Instance],
    names: dict[int, str],
) -> Image.Image:
    """Background, unlabelled body, then instances largest area first (ties: input order)."""
    canvas = _background(rng, bank, width, height)
    for polygons, style in body:
        _fill(canvas, polygons, style, bank)
    styles: dict[int, _Style] = {}  # one look per category and image: a pair of shoes matches
    for cid in sorted({inst.category_id for inst in instances}):
        styles[cid] = _pick_style(rng, CLASS_STYLES.get(names.get(cid, ""), _CLUTTER_STYLE), width, height)
    order = sorted(range(len(instances)), key=lambda i: -instances[i].area)
    for i in order:
        _fill(canvas, instances[i].polygons, styles[instances[i].category_id], bank)
    return _finish(rng, canvas, bank)


# ------------------------------------------------------------------------------------------------ geometry


def _densify(outline: Outline, step: float) -> Outline:
    """Extra points along each closed-outline edge, so jitter and occlusion clamps act along the edge."""
    out: Outline = []
    n = len(outline)
    for i in range(n):
        (u0, v0), (u1, v1) = outline[i], outline[(i + 1) % n]
        k = max(1, math.ceil(math.hypot(u1 - u0, v1 - v0) / step))
        out.extend((u0 + (u1 - u0) * j / k, v0 + (v1 - v0) * j / k) for j in range(k))
    return out


def _polyline_cut(
    points: list[Point], widths: list[float], fraction: float
) -> tuple[list[Point], list[float]]:
    """The first `fraction` of a polyline (by length), widths interpolated."""
    seg = [math.hypot(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(points)]
    target = max(1e-6, fraction) * sum(seg)
    pts, ws = [points[0]], [widths[0]]
    for i, s in enumerate(seg):
        if target <= s:
            t = target / s if s > 0 else 0.0
            a, b = points[i], points[i + 1]
            pts.append((a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t))
            ws.append(widths[i] + (widths[i + 1] - widths[i]) * t)
            return pts, ws
        target -= s
        pts.append(points[i + 1])
        ws.append(widths[i + 1])
    return pts, ws


def _thick_sides(points: list[Point], widths: list[float]) -> tuple[list[Point], list[Point]]:
    """Both edges of a thick polyline: (side towards -u for a downward line, the other side)."""
    left, right = [], []
    n = len(points)
    for i in range(n):
        a = points[max(0, i - 1)]
        b = points[min(n - 1, i + 1)]
        du, dv = b[0] - a[0], b[1] - a[1]
        norm = math.hypot(du, dv) or 1.0
        nu, nv = -dv / norm, du / norm
        h = widths[i] / 2.0
        left.append((points[i][0] + nu * h, points[i][1] + nv * h))
        right.append((points[i][0] - nu * h, points[i][1] - nv * h))
    return left, right


def _thick(points: list[Point], widths: list[float]) -> Outline:
    left, right = _thick_sides(points, widths)
    return left + right[::-1]


def _ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 16) -> Outline:
    return [
        (cu + ru * math.cos(a), cv + rv * math.sin(a)) for a in np.linspace(0, 2 * math.pi, n, endpoint=False)
    ]


def _clamp_u(outline: Outline, below: float, half: float) -> Outline:
    """Visible part of a garment under an open jacket: above the jacket hem only the gap shows."""
    return [(max(-half, min(half, u)), v) if v < below else (u, v) for u, v in outline]


def _push_v(outline: Outline, limit: float, half: float) -> Outline:
    """Visible part of a lower garment under a jacket: outside the gap, nothing above its hem shows."""
    return [(u, max(v, limit)) if abs(u) > half else (u, v) for u, v in outline]


@dataclass
class _Body:
    """A person in the image: frame origin at the head top on the body axis, unit = one head height."""

    cx: float
    top: float
    unit: float
    widen: float
    lean: float
    arms: dict[int, list[Point]]  # side (-1 image left, +1 right) -> shoulder, elbow, wrist
    legs: dict[int, list[Point]]  # side -> hip joint, knee, ankle
    toes: dict[int, int]  # side -> toe direction (-1, 0, +1)

    def to_image(self, outline: Outline, rng: np.random.Generator | None, jitter: float = 0.03) -> np.ndarray:
        pts = np.array(outline, dtype=np.float64)
        if rng is not None and jitter > 0:
            pts = pts + rng.normal(0.0, jitter, pts.shape)
        x = self.cx + (pts[:, 0] * self.widen + self.lean * pts[:, 1]) * self.unit
        y = self.top + pts[:, 1] * self.unit
        return np.column_stack([x, y])


def _sample_body(rng: np.random.Generator, width: int, height: int) -> _Body:
    if rng.random() < 0.12:  # close-up: the feet (and their footwear) leave the frame
        person = height * rng.uniform(1.0, 1.3)
        top = height * rng.uniform(0.0, 0.05)
    else:
        person = height * rng.uniform(0.75, 0.93)
        top = rng.uniform(0.02, 0.9) * (height - person)
    unit = person / 7.5
    cx = float(np.clip(width / 2 + rng.normal(0.0, 0.07 * width), 0.3 * width, 0.7 * width))
    arms, legs, toes = {}, {}, {}
    for s in (-1, 1):
        pose = rng.choice(4, p=[0.55, 0.2, 0.15, 0.1])
        elbow, wrist = [((1.15, 2.85), (1.25, 4.05)), ((1.3, 2.9), (0.95, 3.75)), ((1.75, 2.6), (0.95, 3.25)),
                        ((1.45, 2.7), (1.75, 3.8))][pose]  # fmt: skip
        e = (s * (elbow[0] + rng.normal(0, 0.07)), elbow[1] + rng.normal(0, 0.07))
        w = (s * (wrist[0] + rng.normal(0, 0.08)), wrist[1] + rng.normal(0, 0.08))
        arms[s] = [(s * 0.88, 1.45), e, w]
        spread = rng.uniform(0.0, 0.4)
        legs[s] = [(s * 0.42, 3.9), (s * (0.42 + 0.5 * spread), 5.6), (s * (0.4 + spread), 7.05)]
        toes[s] = int(s if rng.random() < 0.5 else rng.choice([-1, 0, 1]))
    return _Body(
        cx=cx,
        top=float(top),
        unit=float(unit),
        widen=float(rng.uniform(0.75, 1.0)),  # street photos: slimmer than a frontal figure
        lean=float(rng.uniform(-0.04, 0.04)),
        arms=arms,
        legs=legs,
        toes=toes,
    )


def _default_body(cx: float, top: float, unit: float) -> _Body:
    """Arms down, legs straight: the body drawn under a real annotation's garments."""
    arms = {s: [(s * 0.88, 1.45), (s * 1.15, 2.85), (s * 1.25, 4.05)] for s in (-1, 1)}
    legs = {s: [(s * 0.42, 3.9), (s * 0.47, 5.6), (s * 0.5, 7.05)] for s in (-1, 1)}
    return _Body(cx=cx, top=top, unit=unit, widen=1.0, lean=0.0, arms=arms, legs=legs, toes={-1: -1, 1: 1})


_ARM_W = [0.46, 0.38, 0.3]
_LEG_W = [0.78, 0.52, 0.36]


def _foot(side: int, toe: int, shaft: float = 0.0) -> Outline:
    """A shoe (shaft 0) or boot (shaft > 0, in head heights above the ankle) around an ankle at (0, 0)."""
    d = toe if toe != 0 else side
    front = 0.18 if toe == 0 else 0.42  # seen from the front: short and wide; side view: long toe
    pts = [(-0.27, -0.1 - shaft), (0.27, -0.1 - shaft), (0.3, 0.08), (0.27 + front, 0.16), (0.3 + front, 0.36),
           (-0.3, 0.38), (-0.33, 0.12)]  # fmt: skip
    return [(u * d, v) for u, v in pts]


def _body_shapes(
    rng: np.random.Generator, body: _Body, width: int, height: int
) -> list[tuple[list[list[int]], _Style]]:
    """Skin and hair, not labelled (background): context a model can use, and colours that overlap garments."""
    skin = SKIN[rng.integers(len(SKIN))]
    hair = HAIR[rng.integers(len(HAIR))]
    hair_len = rng.choice([0.9, 1.6, 2.6])
    shapes: list[tuple[Outline, np.ndarray]] = [
        (_ellipse(0.0, 0.5 + hair_len / 3, 0.5, 0.45 + hair_len / 3), hair),
        ([(-0.95, 1.35), (0.95, 1.35), (0.7, 3.0), (0.85, 3.9), (0.0, 4.1), (-0.85, 3.9), (-0.7, 3.0)], skin),
        ([(-0.19, 0.8), (0.19, 0.8), (0.21, 1.4), (-0.21, 1.4)], skin),
        (_ellipse(0.0, 0.52, 0.37, 0.5), skin),
        (_ellipse(0.0, 0.22, 0.4, 0.24, 12), hair),
    ]
    for s in (-1, 1):
        shapes.append((_thick(body.legs[s], _LEG_W), skin))
        ankle = body.legs[s][-1]
        shapes.append(([(ankle[0] + u, ankle[1] + v) for u, v in _foot(s, body.toes[s])], skin))
        shapes.append((_thick(body.arms[s], _ARM_W), skin))
        wrist = body.arms[s][-1]
        shapes.append((_ellipse(wrist[0], wrist[1] + 0.22, 0.16, 0.26, 10), skin))
    out = []
    for outline, rgb in shapes:
        poly = _to_flat(body.to_image(outline, None), width, height)
        if poly is not None:
            out.append(([poly], _solid(rng, rgb, width, height)))
    return out


def _to_flat(xy: np.ndarray, width: int, height: int) -> list[int] | None:
    """Round and clip to the image; None unless the polygon still encloses pixels for pycocotools."""
    xy = np.rint(xy)
    xy[:, 0] = np.clip(xy[:, 0], 0, width - 1)
    xy[:, 1] = np.clip(xy[:, 1], 0, height - 1)
    keep = np.ones(len(xy), dtype=bool)
    keep[1:] = np.any(xy[1:] != xy[:-1], axis=1)
    xy = xy[keep]
    if len(xy) > 1 and np.all(xy[0] == xy[-1]):
        xy = xy[:-1]
    if len(xy) < 3:
        return None
    flat = xy.astype(np.int64).ravel().tolist()
    if mask_utils.area(mask_utils.frPyObjects([flat], height, width))[0] <= 0:
        return None
    return flat


@dataclass
class _Garment:
    name: str
    outlines: list[Outline] = field(default_factory=list)


def _outfit(rng: np.random.Generator, body: _Body) -> list[_Garment]:
    """Garments as outlines in the body frame; clamps keep only what a photo would show of covered garments."""
    items: list[_Garment] = []
    arms, legs = body.arms, body.legs
    dress = rng.random() < 0.28
    has_outer = rng.random() < 0.36
    open_outer = rng.random() < 0.7
    gap = rng.uniform(0.1, 0.35)
    strip = gap + 0.08
    outer_hem = rng.uniform(5.0, 6.2) if rng.random() < 0.2 else rng.uniform(3.5, 4.6)
    sleeve = rng.choice([0.0, 0.22, 0.4, 0.75, 1.0], p=[0.15, 0.15, 0.35, 0.1, 0.25])

    def sleeves(scale: float, fraction: float) -> list[Outline]:
        out = []
        for s in (-1, 1):
            pts, ws = _polyline_cut(arms[s], [w * scale for w in _ARM_W], fraction)
            out.append(_densify(_thick(pts, ws), 0.3))
        return out

    def under_outer_upper(outline: Outline) -> Outline | None:
        if not has_outer:
            return outline
        if open_outer:
            return _clamp_u(outline, outer_hem, strip)
        if max(v for _, v in outline) > outer_hem + 0.3:  # shows below a closed jacket
            return [(u, max(v, outer_hem - 0.1)) for u, v in outline]
        return None

    def under_outer_lower(outline: Outline) -> Outline | None:
        if not has_outer or outer_hem < 3.3:
            return outline
        if open_outer:
            return _push_v(outline, outer_hem - 0.15, strip)
        if max(v for _, v in outline) < outer_hem + 0.25:
            return None
        return [(u, max(v, outer_hem - 0.15)) for u, v in outline]

    neck_depth = rng.uniform(0.05, 0.6)
    if dress:
        hem = rng.uniform(4.4, 6.4)
        flare = rng.uniform(0.05, 0.6)
        torso = [(-0.32, 1.12), (0.0, 1.12 + neck_depth), (0.32, 1.12), (0.98, 1.38), (0.86, 1.95), (0.66, 3.0),
                 (0.86, 3.8), (0.86 + flare, hem), (0.0, hem + 0.08), (-0.86 - flare, hem), (-0.86, 3.8),
                 (-0.66, 3.0), (-0.86, 1.95), (-0.98, 1.38)]  # fmt: skip
        parts = [_densify(torso, 0.3)]
        if sleeve > 0 and rng.random() < 0.5 and not has_outer:
            parts += sleeves(1.25, sleeve)
        visible = [o for o in (under_outer_upper(p) for p in parts) if o is not None]
        if visible:
            items.append(_Garment("dress", visible))
    else:
        hem = rng.uniform(2.7, 3.95)
        hw = 0.86 - 0.2 * (hem - 1.95) / 1.05 if hem < 3.0 else 0.66 + 0.2 * (hem - 3.0) / 0.8
        hw += rng.uniform(0.0, 0.12)
        torso = [(-0.32, 1.12), (0.0, 1.12 + neck_depth), (0.32, 1.12), (0.98, 1.38), (0.86, 1.95)]
        if hem > 3.0:
            torso.append((0.66, 3.0))
        torso += [(hw, hem), (0.0, hem + 0.05), (-hw, hem)]
        if hem > 3.0:
            torso.append((-0.66, 3.0))
        torso += [(-0.86, 1.95), (-0.98, 1.38)]
        top_parts = [_densify(torso, 0.3)]
        if not has_outer and sleeve > 0:
            top_parts += sleeves(1.25, sleeve)
        if has_outer and not open_outer:
            top_parts = (
                [[(max(-0.2, min(0.2, u)), min(v, 1.85)) for u, v in top_parts[0]]]
                if rng.random() < 0.4
                else []
            )
        else:
            top_parts = [o for o in (under_outer_upper(p) for p in top_parts) if o is not None]
        if top_parts:
            items.append(_Garment("top", top_parts))
        lower = rng.choice(["pants", "skirt", "shorts"], p=[0.56, 0.25, 0.19])
        if lower == "skirt":
            skirt_hem = rng.uniform(4.3, 6.3)
            flare = rng.uniform(0.05, 0.7)
            outline = [(-0.68, 2.95), (0.0, 3.02), (0.68, 2.95), (0.86, 3.8), (0.86 + flare, skirt_hem),
                       (0.0, skirt_hem + 0.1), (-0.86 - flare, skirt_hem), (-0.86, 3.8)]  # fmt: skip
        else:
            fraction = rng.uniform(0.17, 0.38) if lower == "shorts" else rng.choice([1.0, 1.0, 0.88])
            loose = rng.uniform(1.0, 1.4) if lower == "pants" else rng.uniform(1.15, 1.4)
            sides = {}
            for s in (-1, 1):
                pts, ws = _polyline_cut(legs[s], [w * loose for w in _LEG_W], fraction)
                a, b = _thick_sides(pts, ws)
                sides[s] = (a, b) if s < 0 else (b, a)  # (outer, inner)
            outline = [(-0.68, 2.95), *sides[-1][0], *sides[-1][1][:0:-1], (0.0, 4.12), *sides[1][1][1:],
                       *sides[1][0][::-1], (0.68, 2.95), (0.0, 3.0)]  # fmt: skip
        visible = under_outer_lower(_densify(outline, 0.3))
        if visible is not None:
            items.append(_Garment(str(lower), [visible]))
        if rng.random() < 0.3:
            y = rng.uniform(2.85, 3.1)
            t = rng.uniform(0.14, 0.24)
            items.append(
                _Garment(
                    "belt", [_densify([(-0.72, y), (0.72, y - 0.04), (0.72, y + t), (-0.72, y + t)], 0.3)]
                )
            )
    if dress and rng.random() < 0.15:
        y = rng.uniform(2.85, 3.1)
        items.append(
            _Garment("belt", [_densify([(-0.7, y), (0.7, y), (0.7, y + 0.16), (-0.7, y + 0.16)], 0.3)])
        )

    if has_outer:
        flare = 0.05 + (0.15 if outer_hem > 5 else 0.0)
        hw = 0.98 + flare
        arm_parts = sleeves(1.3, rng.choice([1.0, 0.9, 0.75], p=[0.6, 0.3, 0.1]))
        if open_outer:
            panel = [(-0.36, 1.06), (-1.08, 1.34), (-0.98, 1.95), (-0.82, 3.0), (-hw, outer_hem), (-gap, outer_hem),
                     (-gap, 2.2), (-0.3, 1.5)]  # fmt: skip
            parts = [_densify(panel, 0.3), _densify([(-u, v) for u, v in panel], 0.3)]
        else:
            body_part = [(-0.36, 1.06), (0.0, 1.9), (0.36, 1.06), (1.08, 1.34), (0.98, 1.95), (0.82, 3.0),
                         (hw, outer_hem), (-hw, outer_hem), (-0.82, 3.0), (-0.98, 1.95), (-1.08, 1.34)]  # fmt: skip
            parts = [_densify(body_part, 0.3)]
        items.append(_Garment("outer", parts + arm_parts))

    items += _shoes(rng, body)
    if rng.random() < 0.4:
        items.append(_Garment("bag", _bag(rng, body)))
    items += _accessories(rng)
    return items


def _shoes(rng: np.random.Generator, body: _Body) -> list[_Garment]:
    """A pair: two annotations, or one annotation with two polygons (both occur in ModaNet)."""
    items: list[_Garment] = []
    feet_boots = rng.random() < 0.2
    if feet_boots or rng.random() < 0.85:
        name = "boots" if feet_boots else "footwear"
        shaft = rng.uniform(0.5, 1.5) if feet_boots else 0.0
        shoes = []
        for s in (-1, 1):
            ankle = body.legs[s][-1]
            shoes.append(
                _densify([(ankle[0] + u, ankle[1] + v) for u, v in _foot(s, body.toes[s], shaft)], 0.25)
            )
        if rng.random() < 0.55:
            items += [_Garment(name, [shoes[0]]), _Garment(name, [shoes[1]])]
        else:
            items.append(_Garment(name, shoes))

    return items


def _accessories(rng: np.random.Generator) -> list[_Garment]:
    """The rare, small classes: sunglasses, headwear, scarf/tie."""
    items: list[_Garment] = []
    if rng.random() < 0.16:
        glasses = [(-0.42, 0.38), (-0.06, 0.38), (0.0, 0.41), (0.06, 0.38), (0.42, 0.38), (0.4, 0.52), (0.28, 0.57),
                   (0.1, 0.53), (0.04, 0.45), (-0.04, 0.45), (-0.1, 0.53), (-0.28, 0.57), (-0.4, 0.52)]  # fmt: skip
        items.append(_Garment("sunglasses", [glasses]))
    if rng.random() < 0.11:
        if rng.random() < 0.5:  # brimmed hat
            hat = [(-0.72, 0.24), (-0.4, 0.2), (-0.36, -0.22), (0.0, -0.3), (0.36, -0.22), (0.4, 0.2), (0.72, 0.24),
                   (0.7, 0.34), (0.0, 0.38), (-0.7, 0.34)]  # fmt: skip
        else:  # beanie / cap
            hat = [*_ellipse(0.0, 0.24, 0.44, 0.34, 16)[8:], (0.44, 0.3), (-0.44, 0.3)]
        items.append(_Garment("headwear", [_densify(hat, 0.25)]))
    if rng.random() < 0.11:
        if rng.random() < 0.25:  # tie
            w = rng.uniform(0.08, 0.14)
            tie = [
                (-w, 1.12),
                (w, 1.12),
                (w * 0.6, 1.3),
                (w * 1.8, 2.7),
                (0.0, 2.95),
                (-w * 1.8, 2.7),
                (-w * 0.6, 1.3),
            ]
            items.append(_Garment("scarf/tie", [_densify(tie, 0.3)]))
        else:
            tail = rng.uniform(2.2, 3.4)
            u0 = rng.uniform(-0.3, 0.3)
            band = [(-0.5, 1.0), (0.5, 1.0), (0.55, 1.45), (0.0, 1.6), (-0.55, 1.45)]
            hang = [(u0 - 0.2, 1.3), (u0 + 0.2, 1.3), (u0 + 0.24, tail), (u0 - 0.24, tail)]
            if rng.random() < 0.5:
                parts = [_densify(band, 0.25), _densify(hang, 0.3)]
            else:
                parts = [_densify([*band[:3], (u0 + 0.2, 1.5), (u0 + 0.24, tail), (u0 - 0.24, tail),
                                   (u0 - 0.2, 1.55), band[4]], 0.3)]  # fmt: skip
            items.append(_Garment("scarf/tie", parts))
    return items


def _rect(cu: float, cv: float, w: float, h: float, angle: float, taper: float = 0.0) -> Outline:
    c, s = math.cos(angle), math.sin(angle)
    corners = [(-w / 2 * (1 - taper), -h / 2), (w / 2 * (1 - taper), -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [(cu + u * c - v * s, cv + u * s + v * c) for u, v in corners]


def _bag(rng: np.random.Generator, body: _Body) -> list[Outline]:
    side = int(rng.choice([-1, 1]))
    kind = rng.choice(3, p=[0.45, 0.35, 0.2])
    if kind == 0:  # shoulder bag at the hip, strap over the shoulder as a second polygon
        w, h = rng.uniform(0.8, 1.4), rng.uniform(0.7, 1.2)
        cu, cv = side * rng.uniform(1.2, 1.6), rng.uniform(3.4, 4.3)
        parts = [_densify(_rect(cu, cv, w, h, rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.2)), 0.3)]
        if rng.random() < 0.7:
            top = (cu - side * w * 0.3, cv - h / 2 + 0.05)
            parts.append(_densify(_thick([(side * 0.55, 1.28), top], [0.1, 0.1]), 0.4))
        return parts
    wrist = body.arms[side][-1]
    if kind == 1:  # tote in the hand, handle as a second polygon
        w, h = rng.uniform(0.9, 1.5), rng.uniform(0.9, 1.4)
        cu, cv = wrist[0], wrist[1] + 0.35 + h / 2
        handle = _thick([(cu - w * 0.3, cv - h / 2 + 0.05), (wrist[0], wrist[1] + 0.1), (cu + w * 0.3, cv - h / 2 + 0.05)],
                        [0.1, 0.1, 0.1])  # fmt: skip
        return [
            _densify(_rect(cu, cv, w, h, rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.25)), 0.3),
            _densify(handle, 0.4),
        ]
    w, h = rng.uniform(0.6, 0.9), rng.uniform(0.35, 0.5)  # clutch in the hand
    return [_densify(_rect(wrist[0], wrist[1] + 0.15, w, h, rng.uniform(-0.4, 0.4)), 0.25)]


# --------------------------------------------------------------------------------------------- annotations


def _instance_area(polygons: list[list[int]], width: int, height: int) -> int:
    rles = mask_utils.frPyObjects(polygons, height, width)
    return int(mask_utils.area(mask_utils.merge(rles)))


def _bbox(polygons: list[list[int]]) -> list[int]:
    xs = [x for p in polygons for x in p[0::2]]
    ys = [y for p in polygons for y in p[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _categories() -> list[dict]:
    return [{"supercategory": "fashion", "id": cid, "name": name} for cid, name in MODANET_CATEGORIES]


def _synthetic_image(
    rng: np.random.Generator, bank: _NoiseBank, width: int, height: int
) -> tuple[Image.Image, list[_Instance]]:
    ids = {name: cid for cid, name in MODANET_CATEGORIES}
    if rng.random() < 0.01:  # ModaNet has images without annotations; so does this
        return _render(rng, bank, width, height, [], [], {}), []
    body = _sample_body(rng, width, height)
    instances = []
    for garment in _outfit(rng, body):
        polys = [_to_flat(body.to_image(o, rng, 0.025), width, height) for o in garment.outlines]
        polys = [p for p in polys if p is not None]
        if polys:
            cid = ids[garment.name]
            instances.append(_Instance(cid, polys, _instance_area(polys, width, height)))
    names = dict(MODANET_CATEGORIES)
    image = _render(rng, bank, width, height, _body_shapes(rng, body, width, height), instances, names)
    return image, instances


def _write_jpeg(image: Image.Image, path: Path, quality: int) -> None:
    image.save(path, format="JPEG", quality=quality, optimize=False, progressive=False)


def _warn_stale(folder: Path, written: set[str]) -> None:
    """Files from an earlier run are left alone (never delete a user's files) but reported."""
    stale = [p.name for p in folder.glob("*.jpg") if p.name not in written]
    if stale:
        log.warning(
            "%d image(s) in %s are not in the new annotations.json (e.g. %s)", len(stale), folder, stale[0]
        )


def _write_annotations(coco: dict, out: Path) -> Path:
    """Written last and atomically: a complete annotations.json means every image before it is there.
    Annotations are kept as given, a NaN coordinate too: the sharder then reports what paint skipped."""
    return write_atomic(out / ANNOTATIONS_NAME, json.dumps(coco, separators=(",", ":")))


def _progress(enabled: bool):
    return progress_bar(enabled, "[cyan]{task.fields[rate]:>6.1f} img/s", "{task.fields[anns]} annotations")


def _check_options(seed: int, quality: int) -> None:
    if seed < 0:
        raise InputError(f"seed must be non-negative (a numpy SeedSequence entropy), got {seed}")
    if not 1 <= quality <= 100:
        raise InputError(f"JPEG quality must be in 1..100, got {quality}")


def _claim(out: Path, source: Path | None = None) -> None:
    """Create `out`, refusing a folder this tool did not make (a real ModaNet folder given as --out by
    mistake would lose its annotations and photos) or whose annotations.json is the file being painted.
    Ours: an annotations.json that says so, or the marker written when an empty folder is claimed (so an
    interrupted run, images written and no annotations.json yet, may be run again). Anything else in a
    non-empty folder (photos in images/, another annotation file) is somebody's data."""
    ann = out / ANNOTATIONS_NAME
    if ann.exists():
        if source is not None and os.path.samefile(ann, source):
            raise InputError(
                f"--out {out}: the new {ANNOTATIONS_NAME} would overwrite the file being painted"
            )
        try:
            existing = json.loads(ann.read_bytes())
            info = existing.get("info") if isinstance(existing, dict) else None
            older = isinstance(info, dict) and info.get("contributor") == "modaseg.synth"  # before PROVENANCE
            ours = isinstance(existing, dict) and (PROVENANCE in existing or older)
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise InputError(
                f"--out {out} holds an {ANNOTATIONS_NAME} modaseg-synth did not write: give a new folder"
            )
    elif out.is_dir() and not (out / MARKER_NAME).is_file():
        foreign = sorted(p.name for p in out.iterdir() if p.name != IMAGES_DIR)
        images = out / IMAGES_DIR
        foreign += [f"{IMAGES_DIR}/{p.name}" for p in sorted(images.iterdir())] if images.is_dir() else []
        if foreign:
            raise InputError(
                f"--out {out} is not empty and modaseg-synth did not make it ({len(foreign)} entries, e.g. "
                f"{foreign[0]}): give a new folder"
            )
    elif out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    if not (out / MARKER_NAME).is_file():
        write_atomic(out / MARKER_NAME, "written by modaseg-synth: this folder may be written again\n")


def generate(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    width: int = 400,
    height: int = 600,
    *,
    quality: int = 90,
    progress: bool = True,
) -> Path:
    """Write `num_images` synthetic ModaNet-format images + annotations.json; return the annotations path."""
    if num_images < 1:
        raise InputError(f"num_images must be at least 1, got {num_images}")
    if not (64 <= width <= MAX_SIDE and 64 <= height <= MAX_SIDE):
        raise InputError(f"image size must be 64..{MAX_SIDE} a side, got {width}x{height}")
    _check_options(seed, quality)
    out = Path(out_dir)
    _claim(out)
    bank = _make_bank(seed, width, height)
    images, annotations = [], []
    start = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("synthesising", total=num_images, rate=0.0, anns=0)
        for index in range(num_images):
            rng = np.random.default_rng([seed, index])
            image_id = FIRST_IMAGE_ID + IMAGE_ID_STEP * index
            image, instances = _synthetic_image(rng, bank, width, height)
            file_name = f"{image_id:07d}.jpg"
            _write_jpeg(image, out / IMAGES_DIR / file_name, quality)
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1}
            )
            for inst in instances:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": inst.category_id,
                        "bbox": _bbox(inst.polygons),
                        "area": inst.area,
                        "iscrowd": 0,
                        "segmentation": inst.polygons,
                    }
                )
            bar.update(
                task, advance=1, rate=(index + 1) / (time.perf_counter() - start), anns=len(annotations)
            )
    coco = {
        "year": 2018,
        "type": "instances",
        "info": {
            "description": "modaseg synthetic stand-in for ModaNet (same format, synthetic images)",
            "version": "1.0",
            "contributor": "modaseg.synth",
            "date_created": "2018/07/03",
            "seed": seed,
        },
        "licenses": [
            {
                "id": 1,
                "name": "Apache-2.0 (synthetic data)",
                "url": "https://www.apache.org/licenses/LICENSE-2.0",
            }
        ],
        "images": images,
        "annotations": annotations,
        "categories": _categories(),
        PROVENANCE: {"mode": "generate", "seed": seed},
    }
    _warn_stale(out / IMAGES_DIR, {im["file_name"] for im in images})
    return _write_annotations(coco, out)


@dataclass
class PaintReport:
    """What paint mode left out of the images (the annotation file itself is kept as given)."""

    skipped: Counter = field(default_factory=Counter)


def _paint_polygons(segmentation: object, width: int, height: int) -> tuple[list, str | None]:
    """The polygons the sharder labels (modaseg.coco's check, far coordinates cut as it cuts them, none
    that covers no pixel), or the reason there are none."""
    if not isinstance(segmentation, list):
        return [], "non-polygon segmentation (RLE)"
    good = [fit_polygon(p, width, height)[0] for p in segmentation if check_polygon(p) is None]
    if good:
        areas = mask_utils.area(mask_utils.frPyObjects(good, height, width))
        good = [p for p, area in zip(good, areas, strict=True) if area > 0]
    return good, (None if good else "no valid polygon (needs >= 3 points, even length)")


def _body_for(instances: list[_Instance], names: dict[int, str]) -> _Body | None:
    """A plausible person behind real garments: axis at their median x, head at a hat or sunglasses if
    annotated, else one head height above the highest garment."""
    polygons = [p for inst in instances for p in inst.polygons]
    if not polygons:
        return None
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons])
    ymin, ymax = float(pts[:, 1].min()), float(pts[:, 1].max())

    def ys(name: str) -> np.ndarray | None:
        found = [np.asarray(p[1::2], dtype=np.float64) for i in instances if names.get(i.category_id) == name
                 for p in i.polygons]  # fmt: skip
        return np.concatenate(found) if found else None

    hat, glasses = ys("headwear"), ys("sunglasses")
    if hat is not None or glasses is not None:
        top = float(hat.min()) + 0.1 * (ymax - ymin) / 7.3 if hat is not None else float(glasses.mean())
        unit = max(8.0, (ymax - top) / 7.3)
        top = top if hat is not None else top - 0.45 * unit
    else:
        unit = max(8.0, (ymax - ymin) / 6.2)
        top = ymin - 1.15 * unit
    return _default_body(float(np.median(pts[:, 0])), top, unit)


def paint(
    annotations_file: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    limit: int | None = None,
    *,
    quality: int = 90,
    progress: bool = True,
    report: PaintReport | None = None,
) -> Path:
    """Render one image per image of a real annotation file; write it (first `limit` images) next to them."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    _check_options(seed, quality)
    coco, source_sha256 = load_coco(annotations_file)
    report = report if report is not None else PaintReport()
    images = coco["images"][:limit] if limit is not None else list(coco["images"])
    for im in images:
        if not isinstance(im, dict):
            raise InputError(f"image entry {str(im)[:100]}: not a JSON object")
        for key in ("id", "width", "height"):
            if not is_int(im.get(key)) or (key != "id" and not 1 <= im[key] <= MAX_SIDE):
                raise InputError(
                    f"image entry {im.get('id', im)!r}: missing or invalid {key!r} (sizes: 1..{MAX_SIDE})"
                )
    keep = {im["id"] for im in images}
    if len(keep) != len(images):
        raise InputError(f"{annotations_file}: duplicate image ids among the first {len(images)} images")
    by_image: dict[int, list[dict]] = {i: [] for i in keep}
    anns = [a for a in coco["annotations"] if isinstance(a, dict) and a.get("image_id") in keep]
    for ann in anns:
        by_image[ann["image_id"]].append(ann)
    try:
        names = {c["id"]: c["name"] for c in coco["categories"]}
    except (TypeError, KeyError):
        raise InputError(f"{annotations_file}: every category needs an id and a name") from None
    out = Path(out_dir)
    _claim(out, Path(annotations_file))
    banks: dict[tuple[int, int], _NoiseBank] = {}
    written_images = []
    start = time.perf_counter()
    n_anns = 0
    with _progress(progress) as bar:
        task = bar.add_task("painting", total=len(images), rate=0.0, anns=0)
        for index, im in enumerate(images):
            width, height = im["width"], im["height"]
            if (width, height) not in banks:
                banks[(width, height)] = _make_bank(seed, width, height)
            bank = banks[(width, height)]
            rng = np.random.default_rng([seed, index, 0x9A1])
            instances = []
            for ann in by_image[im["id"]]:
                polys, reason = _paint_polygons(ann.get("segmentation"), width, height)
                if reason is None and ann.get("category_id") not in names:
                    reason = "unknown category id"
                if reason is not None:
                    report.skipped[reason] += 1
                    log.warning("image %s annotation %s not painted: %s", im["id"], ann.get("id"), reason)
                    continue
                area = _instance_area(polys, width, height)
                instances.append(_Instance(ann["category_id"], polys, area))
            body = _body_for(instances, names)
            shapes = _body_shapes(rng, body, width, height) if body is not None else []
            image = _render(rng, bank, width, height, shapes, instances, names)
            file_name = f"{im['id']:07d}.jpg"  # always the id: never a path taken from the input
            _write_jpeg(image, out / IMAGES_DIR / file_name, quality)
            written_images.append({**im, "file_name": file_name})
            n_anns += len(by_image[im["id"]])
            bar.update(task, advance=1, rate=(index + 1) / (time.perf_counter() - start), anns=n_anns)
    result = dict(coco)
    result["images"] = written_images
    result["annotations"] = anns
    result[PROVENANCE] = {"mode": "paint", "seed": seed, "source_sha256": source_sha256}
    _warn_stale(out / IMAGES_DIR, {im["file_name"] for im in written_images})
    return _write_annotations(result, out)


def summarise(annotations_path: str | Path) -> dict:
    """Counts per category (instances, pixels from the polygons' `area`), for the end-of-run table."""
    coco, _ = load_coco(annotations_path)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    inst, pix = Counter(), Counter()
    for a in coco["annotations"]:
        inst[a["category_id"]] += 1
        if a.get("image_id") in sizes:  # ModaNet's own `area` is the bbox's: measure the polygons
            polys, _ = _paint_polygons(a.get("segmentation"), *sizes[a["image_id"]])
            pix[a["category_id"]] += _instance_area(polys, *sizes[a["image_id"]]) if polys else 0
    return {
        "images": len(coco["images"]),
        "annotations": len(coco["annotations"]),
        "per_category": {
            names.get(c, str(c)): {"instances": inst[c], "pixels": pix[c]} for c in sorted(names)
        },
    }


def _print_summary(summary: dict, path: Path, seconds: float, skipped: Counter | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    total_pix = sum(v["pixels"] for v in summary["per_category"].values()) or 1
    table = Table(title=f"{path}", caption=f"{summary['images']} images, {summary['annotations']} annotations "
                  f"in {seconds:.1f} s ({summary['images'] / max(seconds, 1e-9):.1f} images/s)")  # fmt: skip
    table.add_column("category")
    table.add_column("instances", justify="right")
    table.add_column("pixel share", justify="right")
    for name, v in summary["per_category"].items():
        table.add_row(name, str(v["instances"]), f"{100 * v['pixels'] / total_pix:.1f}%")
    console = Console()
    console.print(table)
    if skipped:
        console.print(
            "[yellow]annotations not painted: " + ", ".join(f"{k}: {n}" for k, n in skipped.items())
        )


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="modaseg-synth",
        description="Write a ModaNet-format dataset (annotations.json + images/%%07d.jpg): synthetic people, "
        "or images painted from a real annotation file (--from-annotations).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--num-images", type=int, default=200, help="synthetic mode: images to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=400, help="synthetic mode: image width")
    parser.add_argument("--height", type=int, default=600, help="synthetic mode: image height")
    parser.add_argument("--from-annotations", type=Path, help="paint images for this COCO annotation file")
    parser.add_argument("--limit", type=int, help="with --from-annotations: only the first N images")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1..100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.limit is not None and args.from_annotations is None:
        parser.error("--limit needs --from-annotations")
    start = time.perf_counter()
    skipped = None
    if args.from_annotations is not None:
        report = PaintReport()
        path = paint(args.from_annotations, args.out, seed=args.seed, limit=args.limit, quality=args.quality,
                     progress=not args.no_progress, report=report)  # fmt: skip
        skipped = report.skipped
    else:
        path = generate(args.out, args.num_images, seed=args.seed, width=args.width, height=args.height,
                        quality=args.quality, progress=not args.no_progress)  # fmt: skip
    _print_summary(summarise(path), path, time.perf_counter() - start, skipped)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("modaseg-synth", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
