"""modaseg-shard against independent references: pycocotools' COCO.annToMask on real ModaNet polygons,
the documented overlap rule, and plain tarfile / webdataset readers."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from modaseg import shard as sh
from modaseg.manifest import ManifestError, read_manifest

SAMPLE = Path(__file__).parents[1] / ".." / "shared" / "data" / "modanet-sample"
TRAIN_SUBSET = SAMPLE / "modanet_train_subset_a.json"
VAL_FILE = SAMPLE / "modanet2018_instances_val.json"
W, H = 64, 96


def needs_sample(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"real ModaNet annotations not found at {path} (../shared/data/modanet-sample)")


# --------------------------------------------------------------------------------------------- helpers


def jpeg_bytes(seed: int = 0, w: int = W, h: int = H, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth photo-like image (gradients + a little noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([120 + 60 * np.sin(xx / (9 + c + seed) + yy / 17) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def small_dataset(root: Path, n: int = 4) -> tuple[dict, Path]:
    """n tiny images (ids 101, 104, ...), one annotation each (two on the first, overlapping)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        image_id = 101 + 3 * i
        name = f"{image_id:07d}.jpg"
        (images_dir / name).write_bytes(jpeg_bytes(i))
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
        anns.append(
            {
                "id": i + 1,
                "image_id": image_id,
                "category_id": 1 + i % 13,
                "segmentation": [rect(5, 5, 50, 80)],
            }
        )
    anns.append({"id": 100, "image_id": 101, "category_id": 2, "segmentation": [rect(10, 30, 40, 40)]})
    categories = [{"id": i + 1, "name": f"c{i + 1}"} for i in range(13)]
    return {"images": images, "annotations": anns, "categories": categories}, images_dir


def run(tmp: Path, coco: dict, images_dir: Path | None, plan_coco: bool = False, **kw) -> tuple:
    """Shard through the Python API; returns (manifest, out dir, samples by id)."""
    ann_path = tmp / "annotations.json"
    ann_path.write_text(json.dumps(coco, default=lambda o: o.tolist()))
    out = kw.pop("out", tmp / "out")
    opts = sh.ShardOptions(
        annotations=ann_path,
        out=out,
        images=images_dir,
        progress=False,
        **{"shard_size": 3, **kw},
    )
    plan = sh.make_plan(opts, coco, "api") if plan_coco else None
    result = sh.shard(opts, plan)
    assert result.manifest is not None
    return result.manifest, out, read_samples(out)


def read_samples(out: Path) -> dict[int, dict]:
    """Every sample of every shard in the manifest, with plain tarfile."""
    manifest = read_manifest(out)
    samples: dict[int, dict] = {}
    for split in manifest.splits:
        for path in manifest.shard_paths(out, split):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    data = tar.extractfile(member).read()
                    samples.setdefault(int(key), {"split": split})[ext] = data
    for s in samples.values():
        s["mask"] = np.array(Image.open(io.BytesIO(s["png"])))
        s["meta"] = json.loads(s["json"])
    return samples


def assert_invariants(manifest, out: Path) -> None:
    c = manifest.counts
    assert c["images_in"] == c["samples_written"] + c["images_rejected"]
    assert c["annotations_in"] == (
        c["annotations_used"]
        + c["annotations_rejected"]
        + c["annotations_dropped_by_map"]
        + c["annotations_of_rejected_images"]
    )
    assert c["samples_written"] == sum(s.num_samples for s in manifest.splits.values())
    lines = [json.loads(x) for x in (out / sh.REJECTS_NAME).read_text().splitlines()]
    assert Counter(f"{r['kind']}/{r['reason']}" for r in lines) == Counter(manifest.rejects)
    assert sum(1 for r in lines if r["kind"] == "image") == c["images_rejected"]


def reference_mask(image_id: int, coco: COCO) -> np.ndarray:
    """The documented rule, built independently: annToMask per annotation, largest area first."""
    img = coco.imgs[image_id]
    masks = [(coco.annToMask(a), a["category_id"]) for a in coco.imgToAnns[image_id]]
    masks.sort(key=lambda m: -int(m[0].sum()))  # stable: file order on ties
    label = np.zeros((img["height"], img["width"]), np.uint8)
    for m, lab in masks:
        label[m > 0] = lab
    return label


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: sha_of(p) for p in sorted(out.glob("*.tar"))}


# ------------------------------------------------------------------------------------ real annotations


@pytest.fixture(scope="module")
def painted(tmp_path_factory) -> Path:
    """Real ModaNet polygons (400x600) with images painted by modaseg-synth's paint mode."""
    needs_sample(TRAIN_SUBSET)
    from modaseg import synth

    root = tmp_path_factory.mktemp("painted")
    synth.paint(TRAIN_SUBSET, root, seed=0, limit=40, progress=False)
    return root


def test_masks_equal_pycocotools_reference(painted, tmp_path):
    coco_dict = json.loads((painted / "annotations.json").read_text())
    manifest, out, samples = run(tmp_path, coco_dict, painted / "images", shard_size=16)
    assert_invariants(manifest, out)
    assert len(samples) == len(coco_dict["images"]) == manifest.counts["samples_written"]
    ref = COCO()
    ref.dataset = coco_dict
    ref.createIndex()
    overlaps_decided = 0
    pixels = np.zeros(14, np.int64)
    for image_id, s in samples.items():
        anns = ref.imgToAnns[image_id]
        expected = reference_mask(image_id, ref)
        np.testing.assert_array_equal(s["mask"], expected, err_msg=f"image {image_id}")
        file_order = np.zeros_like(expected)
        for a in anns:
            file_order[ref.annToMask(a) > 0] = a["category_id"]
        overlaps_decided += int((file_order != expected).any())
        assert s["jpg"] == (painted / "images" / f"{image_id:07d}.jpg").read_bytes()
        assert s["meta"]["class_pixels"] == np.bincount(expected.ravel(), minlength=14).tolist()
        pixels += np.bincount(expected.ravel(), minlength=14)
    assert overlaps_decided > 0, "no image where the overlap rule matters: the test would prove nothing"
    total = np.sum([manifest.splits[s].class_pixels for s in manifest.splits], axis=0)
    assert total.tolist() == pixels.tolist()
    assert manifest.classes[1:] == [c["name"] for c in coco_dict["categories"]]


def test_real_val_file_is_a_clear_error(tmp_path, capsys):
    needs_sample(VAL_FILE)
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    code = sh.main(["--annotations", str(VAL_FILE), "--images", str(tmp_path / "images"), "--out", str(out)])
    assert code == 2
    assert "no annotations" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------- bad input


def _set_seg(seg):
    def mutate(coco, d):
        coco["annotations"][1]["segmentation"] = seg

    return mutate


def _set_ann(key, value):
    def mutate(coco, d):
        coco["annotations"][1][key] = value

    return mutate


def _set_image(key, value):
    def mutate(coco, d):
        coco["images"][1][key] = value

    return mutate


def _write_image(data: bytes):
    def mutate(coco, d):
        (d / "0000104.jpg").write_bytes(data)

    return mutate


def _unsafe(name: str):
    def mutate(coco, d):
        (d.parent / "outside.jpg").write_bytes(jpeg_bytes(9))
        (d / "sub").mkdir()
        (d / "sub" / "0000104.jpg").write_bytes(jpeg_bytes(9))
        coco["images"][1]["file_name"] = name

    return mutate


def _duplicate(coco, d):
    coco["images"].append(dict(coco["images"][1]))


def _drop_key(coco, d):
    del coco["annotations"][1]["segmentation"]


def _missing(coco, d):
    (d / "0000104.jpg").unlink()


GOOD = rect(5, 5, 50, 80)
REJ = "image/all_annotations_rejected"
# (case, mutation, expected rejects {kind/reason: count}, image 104 kept?)
BAD_INPUTS = [
    ("4 numbers (a box)", _set_seg([[1, 2, 3, 4], GOOD]), {"polygon/polygon_too_short": 1}, True),
    (
        "2 numbers",
        _set_seg([[1, 2]]),
        {"polygon/polygon_too_short": 1, "annotation/no_valid_polygons": 1, REJ: 1},
        False,
    ),
    (
        "[[]]",
        _set_seg([[]]),
        {"polygon/polygon_too_short": 1, "annotation/no_valid_polygons": 1, REJ: 1},
        False,
    ),
    ("[]", _set_seg([]), {"annotation/no_polygons": 1, REJ: 1}, False),
    (
        "odd length",
        _set_seg([[*GOOD, 7]]),
        {"polygon/polygon_odd_length": 1, "annotation/no_valid_polygons": 1, REJ: 1},
        False,
    ),
    (
        "strings",
        _set_seg([["1"] * 8]),
        {"polygon/polygon_bad_value": 1, "annotation/no_valid_polygons": 1, REJ: 1},
        False,
    ),
    (
        "NaN",
        _set_seg([[math.nan, *GOOD[1:]]]),
        {"polygon/polygon_bad_value": 1, "annotation/no_valid_polygons": 1, REJ: 1},
        False,
    ),
    ("booleans", _set_seg([[True] * 8, GOOD]), {"polygon/polygon_bad_value": 1}, True),
    ("null", _set_seg([[None] * 8, GOOD]), {"polygon/polygon_bad_value": 1}, True),
    ("collinear", _set_seg([[0, 0, 10, 10, 20, 20], GOOD]), {"polygon/polygon_no_pixels": 1}, True),
    (
        "only outside the image",
        _set_seg([rect(W + 5, 0, W + 30, 20)]),
        {"polygon/polygon_no_pixels": 1, "annotation/no_valid_polygons": 1, REJ: 1},
        False,
    ),
    ("not a list", _set_seg("abc"), {"annotation/bad_segmentation": 1, REJ: 1}, False),
    (
        "RLE size mismatch",
        _set_seg({"size": [10, 10], "counts": [100]}),
        {"annotation/rle_size_mismatch": 1, REJ: 1},
        False,
    ),
    (
        "RLE size not a list",
        _set_seg({"size": 5, "counts": [W * H]}),
        {"annotation/rle_size_mismatch": 1, REJ: 1},
        False,
    ),
    (
        "RLE bad counts",
        _set_seg({"size": [H, W], "counts": [5, 7]}),
        {"annotation/bad_rle": 1, REJ: 1},
        False,
    ),
    ("unknown category", _set_ann("category_id", 99), {"annotation/unknown_category": 1, REJ: 1}, False),
    ("v1.0 category 0", _set_ann("category_id", 0), {"annotation/unknown_category": 1, REJ: 1}, False),
    ("unknown image id", _set_ann("image_id", 999), {"annotation/unknown_image_id": 1}, True),
    ("no segmentation key", _drop_key, {"annotation/bad_annotation_entry": 1}, True),
    ("duplicate image id", _duplicate, {"image/duplicate_image_id": 1}, True),
    ("bad width", _set_image("width", "64"), {"image/bad_image_entry": 1}, False),
    ("../ in file_name", _unsafe("../outside.jpg"), {"image/unsafe_file_name": 1}, False),
    ("path separator", _unsafe("sub/0000104.jpg"), {"image/unsafe_file_name": 1}, False),
    ("absolute path", _unsafe("/etc/hostname"), {"image/unsafe_file_name": 1}, False),
    ("backslash", _unsafe("..\\outside.jpg"), {"image/unsafe_file_name": 1}, False),
    ("missing file", _missing, {"image/missing_file": 1}, False),
    ("zero bytes", _write_image(b""), {"image/empty_file": 1}, False),
    ("truncated JPEG", _write_image(jpeg_bytes(1)[:-300]), {"image/truncated_image": 1}, False),
    ("truncated PNG", _write_image(jpeg_bytes(1, fmt="PNG")[:-300]), {"image/truncated_image": 1}, False),
    ("GIF bytes", _write_image(jpeg_bytes(1, fmt="GIF")), {"image/unsupported_format": 1}, False),
    (
        "JPEG magic, garbage",
        _write_image(b"\xff\xd8\xff" + bytes(range(256)) * 2),
        {"image/corrupt_image": 1},
        False,
    ),
    ("declared size differs", _set_image("width", W + 6), {"image/size_mismatch": 1}, False),
]


@pytest.mark.parametrize(
    ("mutate", "expected", "kept"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_rejected_with_its_reason(tmp_path, mutate, expected, kept):
    coco, images_dir = small_dataset(tmp_path)
    mutate(coco, images_dir)
    manifest, out, samples = run(tmp_path, coco, images_dir)
    assert manifest.rejects == expected
    assert_invariants(manifest, out)
    assert (104 in samples) == kept
    assert {101, 107, 110} <= set(samples), "only the bad image may be lost"
    lines = [json.loads(x) for x in (out / sh.REJECTS_NAME).read_text().splitlines()]
    assert all(r.get("image_id") in (104, 999, None) for r in lines)


def test_numpy_polygon_is_rejected_not_read_as_boxes(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    coco["annotations"][1]["segmentation"] = [np.array(GOOD), GOOD]
    manifest, _, samples = run(tmp_path, coco, images_dir, plan_coco=True)
    assert manifest.rejects == {"polygon/polygon_not_a_list": 1}
    np.testing.assert_array_equal(samples[104]["mask"], reference_polys([GOOD], 2))


def reference_polys(polys, label, h=H, w=W):
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
    return (m * label).astype(np.uint8)


def test_coordinates_outside_the_image_are_clipped_and_counted(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    near = [-7.5, -3, 80, 10, 70, 120, -2, 60]  # pycocotools clips these itself: bit-exact
    coco["annotations"][1]["segmentation"] = [near]
    coco["annotations"][2]["segmentation"] = [[-1e9, -1e9, 1e9, -1e9, 0, 1e9]]  # would crash pycocotools
    manifest, _, samples = run(tmp_path, coco, images_dir)
    assert manifest.counts["polygons_clipped"] == 2
    assert manifest.counts["polygons_far_clipped"] == 1
    assert manifest.rejects == {}
    np.testing.assert_array_equal(samples[104]["mask"], reference_polys([near], 2))
    assert (samples[107]["mask"] == 3).all(), "a huge triangle around the image covers every pixel"


def test_image_formats_are_stored_verbatim(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    variants = {
        101: jpeg_bytes(1, fmt="PNG"),  # PNG bytes behind a .jpg name
        104: jpeg_bytes(2, mode="CMYK"),
        107: jpeg_bytes(3, mode="L"),
    }
    for image_id, data in variants.items():
        (images_dir / f"{image_id:07d}.jpg").write_bytes(data)
    manifest, _, samples = run(tmp_path, coco, images_dir)
    assert manifest.rejects == {}
    assert [samples[i]["meta"]["format"] for i in (101, 104, 107, 110)] == ["PNG", "JPEG", "JPEG", "JPEG"]
    assert [samples[i]["meta"]["mode"] for i in (101, 104, 107, 110)] == ["RGB", "CMYK", "L", "RGB"]
    for image_id, data in variants.items():
        assert samples[image_id]["jpg"] == data
        rgb = Image.open(io.BytesIO(samples[image_id]["jpg"])).convert("RGB")
        assert rgb.size == (W, H) and rgb.mode == "RGB"


def test_fix_size_uses_the_decoded_size(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    coco["images"][1]["height"] = H - 10
    manifest, _, samples = run(tmp_path, coco, images_dir, fix_size=True)
    assert manifest.rejects == {}
    assert manifest.counts["size_fixed"] == 1
    assert samples[104]["mask"].shape == (H, W) and samples[104]["meta"]["height"] == H
    np.testing.assert_array_equal(samples[104]["mask"], reference_polys([GOOD], 2))


def test_empty_images_kept_or_dropped(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 104]
    manifest, out, samples = run(tmp_path, coco, images_dir)
    assert manifest.counts["empty_kept"] == 1 and manifest.rejects == {}
    assert not samples[104]["mask"].any() and samples[104]["meta"]["classes_present"] == []
    manifest, out, samples = run(tmp_path, coco, images_dir, drop_empty=True, out=tmp_path / "o2")
    assert manifest.rejects == {"image/empty_dropped": 1} and 104 not in samples
    assert_invariants(manifest, out)


def test_rle_segmentations(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    m = np.zeros((H, W), np.uint8, order="F")
    m[10:30, 5:60] = 1
    runs, value = [0], 0  # COCO uncompressed RLE: column-major run lengths, starting with 0s
    for v in m.ravel(order="F").tolist():
        if v != value:
            runs.append(0)
            value = v
        runs[-1] += 1
    coco["annotations"][1]["segmentation"] = {"size": [H, W], "counts": runs}
    compressed = mask_utils.encode(m)["counts"].decode()  # pycocotools decodes these unchecked: refused
    coco["annotations"][2]["segmentation"] = {"size": [H, W], "counts": compressed}
    manifest, _, samples = run(tmp_path, coco, images_dir)
    assert manifest.rejects == {"annotation/rle_compressed_unsupported": 1, REJ: 1}
    np.testing.assert_array_equal(samples[104]["mask"], m * 2)


def test_category_map_merges_drops_and_ignores(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"3": 4, "2": None, "1": "ignore"}))
    manifest, out, samples = run(tmp_path, coco, images_dir, category_map=cmap)
    assert manifest.classes == ["background", *(f"c{i}" for i in range(4, 14))]
    assert manifest.counts["annotations_dropped_by_map"] == 2  # image 104 (cat 2) and annotation 100
    assert samples[107]["mask"].max() == 1  # category 3 -> category 4 -> label 1
    assert set(np.unique(samples[101]["mask"])) == {0, 255}
    assert samples[101]["meta"]["ignore_pixels"] == int(reference_polys([GOOD], 1).sum())
    assert not samples[104]["mask"].any()
    assert_invariants(manifest, out)


@pytest.mark.parametrize(
    "variant",
    [{}, {"progressive": True}, {"mode": "CMYK"}, {"mode": "L"}, {"subsampling": 0}],
    ids=["baseline", "progressive", "cmyk", "gray", "444"],
)
def test_integrity_check_catches_every_truncation(variant):
    """The 1/8-scale draft decode still reads every byte: any cut is caught."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:80]
    img = np.stack([128 + 60 * np.sin(xx / 7 + c) + 40 * np.cos(yy / 11) for c in range(3)], -1)
    buf = io.BytesIO()
    mode = variant.pop("mode", "RGB")
    Image.fromarray(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)).convert(mode).save(
        buf, "JPEG", quality=90, **variant
    )
    data = buf.getvalue()
    assert sh.inspect_image(data) == sh.ImageInfo("JPEG", mode, 80, 120)
    for cut in rng.integers(len(data) // 10, len(data) - 2, 40):
        with pytest.raises(sh.Rejected) as e:
            sh.inspect_image(data[:cut])
        assert e.value.reason in ("truncated_image", "corrupt_image")


def test_unexpected_error_rejects_one_image_and_the_job_goes_on(tmp_path, monkeypatch):
    coco, images_dir = small_dataset(tmp_path)
    real = sh.inspect_image

    def flaky(data):
        if data == (images_dir / "0000107.jpg").read_bytes():
            raise MemoryError("simulated")
        return real(data)

    monkeypatch.setattr(sh, "inspect_image", flaky)
    manifest, out, samples = run(tmp_path, coco, images_dir)
    assert manifest.rejects == {"image/unexpected_error": 1}
    assert set(samples) == {101, 104, 110}
    assert_invariants(manifest, out)
    assert "MemoryError: simulated" in (out / sh.REJECTS_NAME).read_text()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "content",
    [b'{"images": [{"id": 1', b"", b"\xff\xfe not json", b"[1, 2]", b'{"images": [], "annotations": []}'],
    ids=["truncated", "empty", "binary", "not an object", "no categories"],
)
def test_unreadable_annotations_exit_nonzero_and_write_nothing(tmp_path, content, capsys):
    ann = tmp_path / "a.json"
    ann.write_bytes(content)
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    code = sh.main(["--annotations", str(ann), "--images", str(tmp_path / "images"), "--out", str(out)])
    assert code == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()


def test_bad_options_are_clear_errors(tmp_path, capsys):
    coco, images_dir = small_dataset(tmp_path)
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(coco))
    base = ["--annotations", str(ann), "--images", str(images_dir), "--out", str(tmp_path / "out")]
    assert sh.main([*base, "--split", "0.5,0.5,0.5"]) == 2
    assert sh.main([*base, "--num-tasks", "2", "--task-index", "2"]) == 2
    assert sh.main(["--annotations", str(ann), "--images", str(tmp_path / "nope"), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "sum to 1" in err and "--task-index" in err and "not a folder" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- determinism and faults


def test_split_is_stable_and_follows_the_fractions():
    fractions = (0.6, 0.25, 0.15)
    splits = [sh.split_of(i, 7, fractions) for i in range(20000)]
    counts = Counter(splits)
    assert abs(counts["train"] / 20000 - 0.6) < 0.02 and abs(counts["test"] / 20000 - 0.15) < 0.02
    assert splits == [sh.split_of(i, 7, fractions) for i in range(20000)]
    assert splits != [sh.split_of(i, 8, fractions) for i in range(20000)]
    assert {sh.split_of(i, 0, (1.0, 0.0, 0.0)) for i in range(1000)} == {"train"}


def test_adding_images_moves_none(tmp_path):
    coco, images_dir = small_dataset(tmp_path, n=12)
    _, _, before = run(tmp_path, {**coco, "images": coco["images"][:8]}, images_dir, out=tmp_path / "a")
    _, _, after = run(tmp_path, coco, images_dir, out=tmp_path / "b")
    assert all(after[i]["split"] == s["split"] for i, s in before.items())


def test_read_back_with_webdataset_and_tarfile(tmp_path):
    import webdataset as wds

    coco, images_dir = small_dataset(tmp_path, n=7)
    manifest, out, samples = run(tmp_path, coco, images_dir)
    seen = {}
    for split in manifest.splits:
        urls = [str(p) for p in manifest.shard_paths(out, split)]
        if not urls:
            continue
        for s in wds.WebDataset(urls, shardshuffle=False):
            assert set(s) >= {"__key__", "jpg", "png", "json"}
            seen[int(s["__key__"])] = split
            assert s["jpg"] == (images_dir / f"{int(s['__key__']):07d}.jpg").read_bytes()
            mask = Image.open(io.BytesIO(s["png"]))
            assert mask.mode == "L" and mask.size == (W, H)
            assert json.loads(s["json"])["id"] == int(s["__key__"])
    assert seen == {i: s["split"] for i, s in samples.items()} and len(seen) == 7
    path = manifest.shard_paths(out, "train")[0]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name.split(".")[1] for m in members[:3]] == ["jpg", "png", "json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o444)}
    assert all(info.sha256 == sha_of(out / info.name) for s in manifest.splits.values() for info in s.shards)


@pytest.mark.multiprocess
def test_tasks_and_merge_equal_one_run(tmp_path):
    coco, images_dir = small_dataset(tmp_path, n=20)
    coco["annotations"][3]["category_id"] = 0  # a reject, to be merged too
    single, out1, _ = run(tmp_path, coco, images_dir, out=tmp_path / "single", workers=2)
    ann = tmp_path / "annotations.json"
    opts = dict(annotations=ann, out=tmp_path / "tasks", images=images_dir, shard_size=3, progress=False)
    for i in (2, 0):
        res = sh.shard(sh.ShardOptions(**opts, num_tasks=3, task_index=i))
        assert res.manifest is None
    with pytest.raises(ManifestError, match=r"task index\(es\) \[1\]"):
        sh.merge(sh.ShardOptions(**opts, num_tasks=3))
    sh.shard(sh.ShardOptions(**opts, num_tasks=3, task_index=1))
    merged = sh.merge(sh.ShardOptions(**opts, num_tasks=3))
    assert merged == single
    assert shard_hashes(tmp_path / "tasks") == shard_hashes(out1)
    assert (out1 / sh.REJECTS_NAME).read_bytes() == (tmp_path / "tasks" / sh.REJECTS_NAME).read_bytes()


def test_resume_redoes_only_incomplete_shards(tmp_path):
    coco, images_dir = small_dataset(tmp_path, n=12)
    manifest, out, _ = run(tmp_path, coco, images_dir)
    reference = shard_hashes(out)
    names = sorted(reference)
    (out / sh.PARTS_DIR / f"{names[0]}.json").unlink()  # killed between rename and sidecar
    with (out / names[1]).open("r+b") as f:  # a shard cut short
        f.truncate(1000)
    (out / names[2]).unlink()
    before = {n: (out / n).stat().st_mtime_ns for n in names[3:]}
    opts = sh.ShardOptions(
        annotations=tmp_path / "annotations.json",
        out=out,
        images=images_dir,
        shard_size=3,
        resume=True,
        progress=False,
    )
    result = sh.shard(opts)
    assert result.shards_written == 3 and result.shards_skipped == len(names) - 3
    assert shard_hashes(out) == reference
    assert {n: (out / n).stat().st_mtime_ns for n in names[3:]} == before
    assert result.manifest == manifest


@pytest.mark.multiprocess
@pytest.mark.parametrize("workers", ["1", "2"])
def test_kill_9_then_resume_gives_identical_shards(tmp_path, workers):
    coco, images_dir = small_dataset(tmp_path, n=3)
    data = jpeg_bytes(5)
    for i in range(3, 1500):  # many tiny images: long enough to be killed midway
        image_id = 101 + 3 * i
        (images_dir / f"{image_id:07d}.jpg").write_bytes(data)
        coco["images"].append({"id": image_id, "file_name": f"{image_id:07d}.jpg", "width": W, "height": H})
        coco["annotations"].append(
            {"id": 1000 + i, "image_id": image_id, "category_id": 4, "segmentation": [GOOD]}
        )
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(coco))
    cmd = [sys.executable, "-m", "modaseg.shard", "--annotations", str(ann), "--images", str(images_dir)]
    cmd += ["--shard-size", "25", "--workers", workers, "--no-progress"]
    subprocess.run([*cmd, "--out", str(tmp_path / "ref")], check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.tar"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "the run finished before the kill: nothing was tested"
    partial = len(list(out.glob("*.tar")))
    assert 3 <= partial < len(list((tmp_path / "ref").glob("*.tar")))
    done = subprocess.run([*cmd, "--out", str(out), "--resume", "--verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert shard_hashes(out) == shard_hashes(tmp_path / "ref")
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (tmp_path / "ref" / "manifest.json").read_text()
    )
    assert not list(out.glob(".*.tmp")), "no temporary shard left behind"


def test_verify_detects_a_changed_shard(tmp_path, capsys):
    coco, images_dir = small_dataset(tmp_path)
    manifest, out, _ = run(tmp_path, coco, images_dir)
    assert sh.verify(out) == []
    assert sh.main(["--out", str(out), "--verify"]) == 0
    path = (
        manifest.shard_paths(out, "train")[0] if manifest.splits["train"].shards else next(out.glob("*.tar"))
    )
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    assert sh.verify(out) and path.name in sh.verify(out)[0]
    assert sh.main(["--out", str(out), "--verify"]) == 1


# ---------------------------------------------------------------------------------------------- LMDB


def test_lmdb_source(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    coco, images_dir = small_dataset(tmp_path, n=5)
    coco["images"][2]["file_name"] = "../../whatever.jpg"  # not used with LMDB: the key is the id
    path = tmp_path / "photos.lmdb"
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for im in coco["images"]:
            if im["id"] == 104:
                continue  # a photo missing from the LMDB
            data = (images_dir / f"{im['id']:07d}.jpg").read_bytes()
            txn.put(str(im["id"]).encode(), jpeg_bytes(8, fmt="PNG") if im["id"] == 110 else data)
    env.close()
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert sh.main(["--annotations", str(ann), "--lmdb", str(path), "--out", str(out), "--no-progress"]) == 0
    manifest = read_manifest(out)
    samples = read_samples(out)
    assert manifest.rejects == {"image/missing_lmdb_key": 1}
    assert_invariants(manifest, out)
    assert set(samples) == {101, 107, 110, 113}
    assert samples[101]["jpg"] == (images_dir / "0000101.jpg").read_bytes()
    assert samples[110]["meta"]["format"] == "PNG" and samples[113]["meta"]["source"] == "lmdb:113"
    _, _, folder_samples = run(tmp_path, copy.deepcopy(coco), images_dir, out=tmp_path / "f")
    np.testing.assert_array_equal(samples[101]["mask"], folder_samples[101]["mask"])


# ------------------------------------------------------------------------------------------ encoders


@pytest.mark.parametrize("shape", [(H, W), (7, 5), (1, 1), (600, 400)])
def test_png_and_histogram_match_pil_and_numpy(shape):
    rng = np.random.default_rng(shape[0])
    label = rng.choice(np.array([0, 1, 2, 13, 255], np.uint8), size=shape, p=[0.6, 0.2, 0.1, 0.05, 0.05])
    png = sh.encode_png(label)
    decoded = Image.open(io.BytesIO(png))
    assert decoded.mode == "L"
    np.testing.assert_array_equal(np.array(decoded), label)
    assert png == sh.encode_png(label.copy()), "deterministic bytes"
    np.testing.assert_array_equal(sh.label_histogram(label), np.bincount(label.ravel(), minlength=256))
