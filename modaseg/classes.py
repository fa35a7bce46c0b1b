"""The label space, defined once: 0 = background, 1..K = the dataset's category ids, 255 = ignore.

ModaNet's category ids are kept as label values unchanged (no off-by-one remapping, under which label 0
would print as "bag" and background as a garment). Names come from the annotation file when there is
one, so other COCO-polygon fashion datasets work too.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

IGNORE_INDEX = 255
BACKGROUND = "background"

MODANET_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "bag"),
    (2, "belt"),
    (3, "boots"),
    (4, "footwear"),
    (5, "outer"),
    (6, "dress"),
    (7, "sunglasses"),
    (8, "pants"),
    (9, "top"),
    (10, "shorts"),
    (11, "skirt"),
    (12, "headwear"),
    (13, "scarf/tie"),
)

# Fixed colours for masks and overlays (index = label value); more classes get generated hues.
_MODANET_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # background
    (230, 25, 75),  # bag
    (255, 225, 25),  # belt
    (145, 30, 180),  # boots
    (245, 130, 48),  # footwear
    (0, 130, 200),  # outer
    (240, 50, 230),  # dress
    (210, 245, 60),  # sunglasses
    (0, 0, 128),  # pants
    (60, 180, 75),  # top
    (70, 240, 240),  # shorts
    (170, 110, 40),  # skirt
    (250, 190, 212),  # headwear
    (128, 128, 0),  # scarf/tie
)
IGNORE_COLOR = (255, 255, 255)


@dataclass(frozen=True)
class LabelSpace:
    """Class names indexed by label value; `category_to_label` maps annotation category ids."""

    names: tuple[str, ...]
    category_to_label: Mapping[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def name(self, label: int) -> str:
        return "ignore" if label == IGNORE_INDEX else self.names[label]

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping]) -> LabelSpace:
        """Build from COCO `categories` entries. Ids 1..K are kept as label values; any other id set
        (e.g. 0-based Fashionpedia) is mapped in sorted order to 1..K."""
        cats = sorted(((int(c["id"]), str(c["name"])) for c in categories), key=lambda c: c[0])
        if not cats:
            raise ValueError("the annotation file has no categories")
        ids = [i for i, _ in cats]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids in the annotation file: {ids}")
        if len(cats) + 1 > IGNORE_INDEX:
            raise ValueError(f"{len(cats)} categories do not fit below the ignore label {IGNORE_INDEX}")
        if ids == list(range(1, len(ids) + 1)):
            mapping = {i: i for i in ids}
        else:
            mapping = {cid: label for label, cid in enumerate(ids, start=1)}
        return cls(names=(BACKGROUND, *(n for _, n in cats)), category_to_label=mapping)

    def to_categories(self) -> list[dict]:
        inverse = {label: cid for cid, label in self.category_to_label.items()}
        return [{"id": inverse[label], "name": self.names[label]} for label in range(1, self.num_classes)]


MODANET = LabelSpace.from_categories({"id": i, "name": n} for i, n in MODANET_CATEGORIES)


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Colours for label values 0..num_classes-1: ModaNet's fixed ones first, then evenly spaced hues."""
    colours = list(_MODANET_PALETTE[:num_classes])
    extra = num_classes - len(colours)
    for i in range(extra):
        r, g, b = colorsys.hsv_to_rgb((i / max(extra, 1) + 0.05) % 1.0, 0.75, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours
