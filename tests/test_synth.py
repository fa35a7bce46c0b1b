"""modaseg.synth writes ModaNet's exact format: checked with pycocotools (the reference reader) and PIL."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from modaseg import synth
from modaseg.classes import MODANET_CATEGORIES
from modaseg.console import InputError
from modaseg.manifest import read_manifest
from modaseg.shard import main as shard_main

SAMPLE = (
    Path(__file__).parents[1] / ".." / "shared" / "data" / "modanet-sample" / "modanet_train_subset_a.json"
)
NUM_IMAGES = 240
# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
ANN_KEYS = {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
IMAGE_KEYS = {"id", "file_name", "width", "height", "license"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    path = synth.generate(out, NUM_IMAGES, seed=0, progress=False)
    return path, json.loads(path.read_text())


def _mask(segmentation: list, height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))).astype(
        bool
    )


def _files(folder: Path) -> dict[str, bytes]:
    """The dataset's files: annotations.json and the images (not the folder's synth.MARKER_NAME)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != synth.MARKER_NAME)
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_format_is_modanet_and_loads_with_coco_api(dataset):
    path, coco = dataset
    api = COCO(str(path))
    assert len(api.getImgIds()) == NUM_IMAGES
    assert [(c["id"], c["name"], c["supercategory"]) for c in coco["categories"]] == [
        (i, n, "fashion") for i, n in MODANET_CATEGORIES
    ]
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(coco)
    ids = [im["id"] for im in coco["images"]]
    assert len(set(ids)) == len(ids) and min(ids) >= 100001  # not 1..N: the zero padding matters
    for im in coco["images"]:
        assert set(im) == IMAGE_KEYS
        assert im["file_name"] == f"{im['id']:07d}.jpg" and (im["width"], im["height"]) == (400, 600)
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    for a in coco["annotations"]:
        assert set(a) == ANN_KEYS and a["iscrowd"] == 0 and a["image_id"] in api.imgs
    # ModaNet has images without annotations; the sharder must cope, so the stand-in has a few
    assert 0 < sum(1 for i in ids if not api.getAnnIds(imgIds=[i])) < NUM_IMAGES // 20


def test_every_polygon_rasterizes_and_bbox_area_come_from_it(dataset):
    _, coco = dataset
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        width, height = sizes[a["image_id"]]
        assert a["segmentation"] and isinstance(a["segmentation"], list)
        for poly in a["segmentation"]:
            assert len(poly) >= 6 and len(poly) % 2 == 0 and all(isinstance(v, int) for v in poly)
            xs, ys = poly[0::2], poly[1::2]
            assert min(xs) >= 0 and max(xs) < width and min(ys) >= 0 and max(ys) < height
            assert _mask([poly], height, width).any(), f"annotation {a['id']}: empty polygon {poly}"
        assert a["area"] == int(_mask(a["segmentation"], height, width).sum())
        xs = [x for p in a["segmentation"] for x in p[0::2]]
        ys = [y for p in a["segmentation"] for y in p[1::2]]
        assert a["bbox"] == [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def test_all_categories_with_modanet_like_imbalance(dataset):
    _, coco = dataset
    names = dict(MODANET_CATEGORIES)
    instances, pixels = Counter(), Counter()
    for a in coco["annotations"]:
        instances[names[a["category_id"]]] += 1
        pixels[names[a["category_id"]]] += int(_mask(a["segmentation"], 600, 400).sum())
    assert set(instances) == set(names.values())
    for big in ("top", "pants", "outer", "dress"):
        for small in ("belt", "sunglasses", "headwear", "scarf/tie"):
            assert pixels[big] > 5 * pixels[small], (big, small, pixels)
    assert pixels["bag"] > pixels["sunglasses"] and pixels["bag"] < pixels["top"]
    for rare in ("belt", "sunglasses", "headwear", "scarf/tie"):
        assert instances["footwear"] > 3 * instances[rare] and instances["top"] > 2 * instances[rare]


def test_multi_polygon_and_overlapping_instances(dataset):
    _, coco = dataset
    names = dict(MODANET_CATEGORIES)
    multi = Counter(names[a["category_id"]] for a in coco["annotations"] if len(a["segmentation"]) > 1)
    assert multi["footwear"] > 0 and multi["outer"] > 0 and multi["bag"] > 0  # a pair, open panels, a strap
    by_image: dict[int, list[tuple[str, np.ndarray]]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(
            (names[a["category_id"]], _mask(a["segmentation"], 600, 400))
        )
    overlaps = Counter()
    for anns in by_image.values():
        for i, (n1, m1) in enumerate(anns):
            for n2, m2 in anns[i + 1 :]:
                if (m1 & m2).any():
                    overlaps[frozenset((n1, n2))] += 1
    assert overlaps[frozenset(("belt", "top"))] + overlaps[frozenset(("belt", "pants"))] > 0
    assert overlaps[frozenset(("outer", "top"))] > 0


def test_images_decode_to_declared_size(dataset):
    path, coco = dataset
    folder = path.parent / "images"
    assert sorted(p.name for p in folder.iterdir()) == sorted(im["file_name"] for im in coco["images"])
    for im in coco["images"]:
        with Image.open(folder / im["file_name"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (im["width"], im["height"])
            pixels = np.asarray(img)
        assert pixels.std() > 10  # not blank


def test_deterministic_per_seed(tmp_path):
    a = synth.generate(tmp_path / "a", 4, seed=3, width=256, height=320, progress=False).parent
    b = synth.generate(tmp_path / "b", 4, seed=3, width=256, height=320, progress=False).parent
    c = synth.generate(tmp_path / "c", 4, seed=4, width=256, height=320, progress=False).parent
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert len(files_a) == 5 and files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a)
    for name in files_a:
        if name.endswith(".jpg"):
            with Image.open(a / name) as img:
                assert img.size == (256, 320)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        synth.generate(tmp_path, 0, progress=False)
    with pytest.raises(ValueError, match="quality"):
        synth.generate(tmp_path, 1, quality=0, progress=False)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        synth.paint(tmp_path / "missing.json", tmp_path / "out", progress=False)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations, categories"):
        synth.paint(tmp_path / "bad.json", tmp_path / "out", progress=False)


@pytest.mark.parametrize("kind", ["real sample", "generated"])
def test_paint_mode_keeps_the_annotations_it_paints(tmp_path, kind):
    if kind == "generated":
        annotations = synth.generate(tmp_path / "source", 10, seed=2, width=96, height=128, progress=False)
    elif not SAMPLE.is_file():
        pytest.skip(f"real ModaNet sample not present at {SAMPLE}")
    else:
        annotations = SAMPLE
    source = json.loads(annotations.read_text())
    limit = 7
    out_dir = tmp_path / "painted"
    path = synth.paint(annotations, out_dir, seed=1, limit=limit, progress=False)
    out = json.loads(path.read_text())
    want_ids = [im["id"] for im in source["images"][:limit]]
    assert [im["id"] for im in out["images"]] == want_ids
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == sorted(f"{i:07d}.jpg" for i in want_ids)
    keep = set(want_ids)
    assert out["annotations"] == [a for a in source["annotations"] if a["image_id"] in keep]
    assert out["annotations"] and out["categories"] == source["categories"]
    assert out["info"] == source["info"]
    for im in out["images"]:
        with Image.open(out_dir / "images" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])
    assert len(COCO(str(path)).getImgIds()) == limit


def test_paint_skips_unpaintable_annotations_but_keeps_them(tmp_path):
    src = tmp_path / "in.json"
    coco = {
        "images": [{"id": 7, "file_name": "../escape.jpg", "width": 120, "height": 160, "license": 1}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "segmentation": [[10, 10, 100, 10, 100, 80, 10, 80]]},
            {"id": 2, "image_id": 7, "category_id": 2, "segmentation": [[10, 10, 50, 50]]},  # read as a bbox
            {"id": 3, "image_id": 7, "category_id": 99, "segmentation": [[10, 10, 30, 10, 30, 30]]},
            {"id": 4, "image_id": 8, "category_id": 9, "segmentation": [[1, 1, 5, 1, 5, 5]]},  # no such image
        ],
        "categories": [{"id": i, "name": n, "supercategory": "fashion"} for i, n in MODANET_CATEGORIES],
    }
    src.write_text(json.dumps(coco))
    report = synth.PaintReport()
    path = synth.paint(src, tmp_path / "out", report=report, progress=False)
    out = json.loads(path.read_text())
    assert [a["id"] for a in out["annotations"]] == [1, 2, 3]
    assert out["images"][0]["file_name"] == "0000007.jpg"  # never a path taken from the input
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["0000007.jpg"]
    assert not (tmp_path / "escape.jpg").exists()
    assert report.skipped == Counter(
        {"no valid polygon (needs >= 3 points, even length)": 1, "unknown category id": 1}
    )


def test_cli_smoke(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path), "--num-images", "3", "--seed", "5", "--no-progress"]) == 0
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and len(list((tmp_path / "images").glob("*.jpg"))) == 3
    printed = capsys.readouterr().out
    assert "3 images" in printed and "footwear" in printed
    with pytest.raises(SystemExit) as exc:
        synth.main(["--out", str(tmp_path), "--limit", "3"])
    assert exc.value.code == 2
    assert "--limit needs --from-annotations" in capsys.readouterr().err


def test_paint_draws_exactly_what_the_sharder_labels(tmp_path):
    """One polygon check (modaseg.coco) for both: booleans and NaN are neither painted nor labelled,
    coordinates far outside the image are cut the same way, a polygon without a pixel is neither."""
    coco = {
        "images": [{"id": 7, "file_name": "x.jpg", "width": 120, "height": 160}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "segmentation": [[10, 10, 100, 10, 100, 80, 10, 80]]},
            {"id": 2, "image_id": 7, "category_id": 2, "segmentation": [[True] * 8]},
            {"id": 3, "image_id": 7, "category_id": 6, "segmentation": [[math.nan, 5, 50, 5, 50, 50]]},
            {
                "id": 4,
                "image_id": 7,
                "category_id": 13,
                "segmentation": [[0, 0, 30, 0, 30, 30, 0, 30], [1e9, 1e9, 2e9, 1e9, 2e9, 2e9]],
            },
            {"id": 5, "image_id": 7, "category_id": 5, "segmentation": [[-1e9, -1e9, 1e9, -1e9, 0, 1e9]]},
        ],
        "categories": [{"id": i, "name": n} for i, n in MODANET_CATEGORIES],
    }
    src = tmp_path / "in.json"
    src.write_text(json.dumps(coco))
    report = synth.PaintReport()
    painted = synth.paint(src, tmp_path / "painted", report=report, progress=False)
    assert report.skipped == Counter({"no valid polygon (needs >= 3 points, even length)": 2})
    out = tmp_path / "shards"
    args = ["--annotations", str(painted), "--images", str(painted.parent / "images"), "--out", str(out)]
    assert shard_main([*args, "--workers", "1", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest.rejects == {
        "annotation/no_valid_polygons": 2,  # exactly the two paint left out
        "polygon/polygon_bad_value": 2,
        "polygon/polygon_no_pixels": 1,
    }
    assert manifest.counts["samples_written"] == 1 and manifest.counts["polygons_far_clipped"] == 2
    present = [c for s in manifest.splits.values() for c, n in enumerate(s.class_pixels) if n]
    assert sorted(present) == [5, 9, 13], "labelled: what was painted (outer, top, scarf/tie)"


def test_paint_never_overwrites_the_file_it_paints(tmp_path):
    source = synth.generate(tmp_path, 4, width=64, height=96, progress=False)
    before = source.read_bytes()
    with pytest.raises(InputError, match="would overwrite the file being painted"):
        synth.paint(source, tmp_path, limit=2, progress=False)
    assert source.read_bytes() == before


def test_a_dataset_synth_did_not_write_is_never_overwritten(tmp_path, capsys):
    real = tmp_path / "modanet"
    (real / "images").mkdir(parents=True)
    (real / "annotations.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    before = (real / "annotations.json").read_bytes()
    assert synth.main(["--out", str(real), "--num-images", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modaseg-synth: error: --out") and err.count("\n") == 1
    assert (real / "annotations.json").read_bytes() == before and not any((real / "images").iterdir())
    mine = tmp_path / "mine"
    for seed in (0, 1):  # its own output may be written again
        synth.generate(mine, 2, seed=seed, width=64, height=96, progress=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "1000000", "--height", "1000000"], "image size must be 64..4096 a side"),
        (["--seed", "-1"], "seed must be non-negative"),
        (["--quality", "0"], "JPEG quality must be in 1..100"),
        (["--from-annotations", "missing.json"], "annotation file not found"),
        (["--from-annotations", "{huge}"], "missing or invalid 'width'"),
        (["--from-annotations", "{nameless}"], "every category needs an id and a name"),
    ],
    ids=["huge size", "negative seed", "quality", "missing file", "huge declared size", "nameless category"],
)
def test_bad_arguments_are_one_line_not_a_traceback(tmp_path, capsys, args, message):
    files = {
        "huge": {"images": [{"id": 1, "width": 10**6, "height": 10}], "annotations": [], "categories": []},
        "nameless": {"images": [], "annotations": [], "categories": [{"id": 1}]},
    }
    for name, coco in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(coco))
    args = [a.format(**{name: tmp_path / f"{name}.json" for name in files}) for a in args]
    assert synth.main(["--out", str(tmp_path / "out"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modaseg-synth: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "layout",
    ["photos only", "modanet layout", "a stray file"],
)
def test_a_folder_of_real_photos_is_never_painted_over(tmp_path, capsys, layout):
    """Without an annotations.json in --out the old guard let synth replace real photos (issue 21.1)."""
    real = tmp_path / "m"
    (real / "images").mkdir(parents=True)
    photo = real / "images" / "0100001.jpg"
    photo.write_bytes(b"a real photo")
    source = synth.generate(tmp_path / "src", 2, width=64, height=96, progress=False)
    args = ["--out", str(real), "--num-images", "2", "--no-progress"]
    if layout == "modanet layout":  # the annotation file beside images/, painted into its own folder
        (real / "modanet2018_instances_train.json").write_bytes(source.read_bytes())
        args = ["--out", str(real), "--from-annotations", str(real / "modanet2018_instances_train.json")]
    elif layout == "a stray file":
        photo.unlink()
        (real / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    assert synth.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modaseg-synth: error: --out") and err.count("\n") == 1 and "not empty" in err
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before


def test_an_interrupted_synth_run_may_be_run_again(tmp_path):
    out = tmp_path / "out"
    synth.generate(out, 2, width=64, height=96, progress=False)
    (out / "annotations.json").unlink()  # killed before the annotations, written last
    synth.generate(out, 3, width=64, height=96, progress=False)
    assert len(list((out / "images").iterdir())) == 3
