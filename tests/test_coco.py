"""modaseg.coco: the COCO reader and the polygon check, against pycocotools (what must not crash it and
what it would mis-read)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from modaseg.coco import check_polygon, clip_polygon, fit_polygon, load_coco
from modaseg.console import InputError, UserError

W, H = 64, 96
SQUARE = [5, 5, 50, 5, 50, 80, 5, 80]


def area(polygon: list, h: int = H, w: int = W) -> int:
    return int(mask_utils.area(mask_utils.frPyObjects([polygon], h, w))[0])


@pytest.mark.parametrize(
    ("polygon", "reason"),
    [
        (SQUARE, None),
        ((5, 5, 50, 5, 50, 80), None),
        ([0.5, 0.5, 10.25, 0.5, 10.25, 9.75], None),
        (np.array(SQUARE), "polygon_not_a_list"),
        ({"size": [H, W], "counts": [W * H]}, "polygon_not_a_list"),
        ([1, 2, 3, 4], "polygon_too_short"),
        ([], "polygon_too_short"),
        ([*SQUARE, 7], "polygon_odd_length"),
        (["1"] * 8, "polygon_bad_value"),
        ([None] * 8, "polygon_bad_value"),
        ([True] * 8, "polygon_bad_value"),
        ([math.nan, *SQUARE[1:]], "polygon_bad_value"),
        ([math.inf, *SQUARE[1:]], "polygon_bad_value"),
        ([1e16, *SQUARE[1:]], "polygon_bad_value"),
        ([10**400, *SQUARE[1:]], "polygon_bad_value"),
        ([[1, 2], 5, *SQUARE[2:]], "polygon_bad_value"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_check_polygon(polygon, reason):
    assert check_polygon(polygon) == reason
    if reason is None:
        assert area(list(polygon)) > 0, "an accepted polygon is one pycocotools rasterizes"


def test_fit_polygon_leaves_what_pycocotools_clips_and_cuts_what_overflows():
    assert fit_polygon(SQUARE, W, H) == (SQUARE, None)
    near = [-7.5, -3, 80, 10, 70, 120, -2, 60]
    assert fit_polygon(near, W, H) == (near, "clipped")
    far = [-1e9, -1e9, 1e9, -1e9, 0, 1e9]
    fitted, how = fit_polygon(far, W, H)
    assert how == "far_clipped"
    assert min(fitted) >= -max(W, H) and max(fitted) <= 2 * max(W, H)
    inside = mask_utils.decode(mask_utils.frPyObjects([fitted], H, W))
    assert inside.all(), "the huge triangle covers the whole image, before and after the cut"
    nothing, how = fit_polygon([1e9, 1e9, 2e9, 1e9, 2e9, 2e9], W, H)
    assert how == "far_clipped" and area(nothing) == 0


def test_clip_polygon_is_exact_geometry():
    clipped = clip_polygon([0, 0, 10, 0, 10, 10, 0, 10], 2, 3, 8, 7)
    assert sorted(zip(clipped[0::2], clipped[1::2], strict=True)) == [(2, 3), (2, 7), (8, 3), (8, 7)]
    assert clip_polygon([0, 0, 1, 0, 1, 1], 5, 5, 6, 6) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"images": [{"id": 1', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe not json", "not valid JSON"),
        (b"[1, 2]", "expected a COCO object"),
        (b'{"images": []}', "annotations, categories"),
        (b'{"images": [], "annotations": {}, "categories": []}', "annotations"),
    ],
    ids=["truncated", "empty", "binary", "not an object", "keys missing", "not a list"],
)
def test_load_coco_errors_are_one_clear_user_error(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        load_coco(path)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_load_coco(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_coco(tmp_path / "missing.json")
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "bag"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    loaded, sha = load_coco(tmp_path / "a.json")
    assert loaded == coco and len(sha) == 64
