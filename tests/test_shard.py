"""modaseg-shard against independent references: pycocotools' COCO.annToMask on real ModaNet polygons
(or modaseg-synth's overlapping ones), the documented overlap rule, scipy.io.loadmat + a lookup table for
label-map sources, and plain tarfile / webdataset readers."""

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml
from conftest import on_a_small_disk
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from modaseg import shard as sh
from modaseg.classes import MODANET
from modaseg.manifest import ManifestError, read_manifest

SAMPLE = Path(__file__).parents[1] / ".." / "shared" / "data" / "modanet-sample"
TRAIN_SUBSET = SAMPLE / "modanet_train_subset_a.json"
VAL_FILE = SAMPLE / "modanet2018_instances_val.json"
CCP = Path(__file__).parents[1] / ".." / "shared" / "data" / "ccp-dev"
CCP_MAP = Path(__file__).parents[1] / "configs" / "labelmaps" / "ccp-to-modanet.yaml"
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


def read_samples(out: Path, key_type: Callable = int) -> dict:
    """Every sample of every shard in the manifest, with plain tarfile."""
    manifest = read_manifest(out)
    samples: dict = {}
    for split in manifest.splits:
        for path in manifest.shard_paths(out, split):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    data = tar.extractfile(member).read()
                    samples.setdefault(key_type(key), {"split": split})[ext] = data
    for s in samples.values():
        s["mask"] = np.array(Image.open(io.BytesIO(s["png"])))
        s["meta"] = json.loads(s["json"])
    return samples


def assert_invariants(manifest, out: Path) -> None:
    c = Counter(manifest.counts)  # label-map sources count no annotations
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


@pytest.fixture(scope="module", params=["modanet-polygons", "synthetic-polygons"])
def painted(request, tmp_path_factory) -> Path:
    """Real ModaNet polygons (400x600) with images painted by modaseg-synth's paint mode, when
    ../shared has them; and always modaseg-synth's own overlapping polygons (belt over top, outer over
    top), so the oracle runs on a clean clone too."""
    from modaseg import synth

    root = tmp_path_factory.mktemp("painted")
    if request.param == "synthetic-polygons":
        synth.generate(root, 40, seed=0, width=160, height=240, progress=False)
    else:
        needs_sample(TRAIN_SUBSET)
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


@pytest.mark.parametrize("source", ["real val file", "generated"])
def test_a_file_without_annotations_is_a_clear_error(tmp_path, capsys, source):
    """ModaNet's val file ships without annotations."""
    if source == "generated":
        coco, _ = small_dataset(tmp_path)
        val = tmp_path / "val.json"
        val.write_text(json.dumps({**coco, "annotations": []}))
    else:
        needs_sample(VAL_FILE)
        val = VAL_FILE
    (tmp_path / "images").mkdir(exist_ok=True)
    out = tmp_path / "out"
    code = sh.main(["--annotations", str(val), "--images", str(tmp_path / "images"), "--out", str(out)])
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


def test_decoder_messages_never_quote_file_bytes(monkeypatch):
    def broken(*args, **kwargs):
        raise SyntaxError("broken PNG file (chunk b'SE\\'CR')")  # as PIL words it

    monkeypatch.setattr(sh.Image, "open", broken)
    with pytest.raises(sh.Rejected) as e:
        sh.inspect_image(sh.PNG_MAGIC + bytes(64))
    assert e.value.reason == "corrupt_image"
    assert e.value.detail == "SyntaxError: broken PNG file (chunk <bytes>)"


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
@pytest.mark.slow
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


# ------------------------------------------------------------------------------------ label-map sources

PIXEL_NAMES = ["null", "skin", "shoes", "sandals", "coat", "jeans", "romper", "tie"]
PIXEL_MAP = {"null": "background", "skin": "background", "shoes": "footwear", "sandals": "footwear",
             "coat": "outer", "jeans": "pants", "romper": "ignore", "tie": "scarf/tie"}  # fmt: skip
SECRET = b"PRIVATE-KEY-MATERIAL outside the data folder"


def source_labels(seed: int, h: int = H, w: int = W, n: int = len(PIXEL_NAMES)) -> np.ndarray:
    """A label map of 8x8 blocks holding every source value."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, n, size=(-(-h // 8), -(-w // 8)))
    blocks.flat[:n] = np.arange(n)
    return np.kron(blocks, np.ones((8, 8), np.int64))[:h, :w].astype(np.uint8)


def label_file_bytes(array: np.ndarray, fmt: str, variable: str = "groundtruth") -> bytes:
    buf = io.BytesIO()
    if fmt == "mat":
        scipy.io.savemat(buf, {variable: array}, do_compression=True)
    else:
        Image.fromarray(array).save(buf, {"png": "PNG", "tif": "TIFF"}[fmt])
    return buf.getvalue()


def pixel_dataset(root: Path, n: int = 6, fmt: str = "mat") -> dict[str, Path]:
    """n photos 0000.jpg.. with label maps 0000.<fmt>, CCP-style label names (.mat cell array) and a
    mapping onto ModaNet."""
    photos, masks = root / "photos", root / "masks"
    photos.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        (photos / f"{i:04d}.jpg").write_bytes(jpeg_bytes(i))
        (masks / f"{i:04d}.{fmt}").write_bytes(label_file_bytes(source_labels(i), fmt))
    scipy.io.savemat(root / "label_list.mat", {"label_list": np.array([PIXEL_NAMES], dtype=object)})
    (root / "map.yaml").write_text(yaml.safe_dump({"target": "modanet", "labels": PIXEL_MAP}))
    return {
        "images": photos,
        "masks": masks,
        "label_names": root / "label_list.mat",
        "label_map": root / "map.yaml",
    }


def pixel_args(ds: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in ds.items()]
    return [*args, f"--out={out}", "--shard-size=2", "--workers=1", "--no-progress", *extra]


def run_pixels(ds: dict[str, Path], out: Path, **kw) -> tuple:
    opts = sh.ShardOptions(out=out, progress=False, **{"shard_size": 2, **ds, **kw})
    result = sh.shard(opts)
    assert result.manifest is not None
    return result.manifest, out, read_samples(out, str)


def expected_label(path: Path, names: list[str], mapping: dict[str, str]) -> np.ndarray:
    """The oracle: the source label map as scipy or PIL reads it, through a lookup table built here."""
    raw = scipy.io.loadmat(path)["groundtruth"] if path.suffix == ".mat" else np.array(Image.open(path))
    value = {name: label for label, name in enumerate(MODANET.names)} | {"ignore": 255}
    return np.array([value[mapping[n]] for n in names], np.uint8)[raw]


@pytest.mark.parametrize("source", ["mat", "png", "tif", "ccp"])
def test_label_maps_equal_the_mapping_applied_to_the_source(tmp_path, source):
    if source == "ccp":
        if not (CCP / "label_list.mat").is_file():
            pytest.skip(f"Clothing Co-Parsing not found at {CCP} (../shared/data/ccp-dev)")
        ds = {"images": CCP / "photos", "masks": CCP / "annotations" / "pixel-level",
              "label_names": CCP / "label_list.mat", "label_map": CCP_MAP}  # fmt: skip
        names = [str(c[0]) for c in scipy.io.loadmat(ds["label_names"])["label_list"][0]]
        mapping = yaml.safe_load(CCP_MAP.read_text())["labels"]
        extra = ["--max-images=24"]
    else:
        ds, names, mapping, extra = pixel_dataset(tmp_path / "data", fmt=source), PIXEL_NAMES, PIXEL_MAP, []
    out = tmp_path / "out"
    assert sh.main(pixel_args(ds, out, *extra)) == 0
    manifest, samples = read_manifest(out), read_samples(out, str)
    assert_invariants(manifest, out)
    photos = sorted(p for p in ds["images"].iterdir())[: 24 if extra else None]
    assert sorted(samples) == [p.stem for p in photos] and manifest.rejects == {}
    pixels = np.zeros(14, np.int64)
    for photo in photos:
        s = samples[photo.stem]
        (label_path,) = ds["masks"].glob(f"{photo.stem}.*")
        want = expected_label(label_path, names, mapping)
        np.testing.assert_array_equal(s["mask"], want, err_msg=photo.name)
        assert s["jpg"] == photo.read_bytes()
        counts = np.bincount(want.ravel(), minlength=256)
        assert s["meta"]["class_pixels"] == counts[:14].tolist()
        assert s["meta"]["ignore_pixels"] == counts[255]
        assert (s["meta"]["id"], s["meta"]["width"], s["meta"]["height"]) == (photo.stem, *want.shape[::-1])
        assert s["split"] == sh.split_of(photo.stem, 0, sh.DEFAULT_SPLIT)
        pixels += counts[:14]
    assert manifest.classes == list(MODANET.names), "the label space of ModaNet shards, exactly"
    assert manifest.category_to_label == {str(i): i for i in range(1, 14)}
    total = np.sum([manifest.splits[s].class_pixels for s in manifest.splits], axis=0)
    assert total.tolist() == pixels.tolist()
    assert manifest.source_labels == {n: expected_label_value(mapping[n]) for n in names}


def expected_label_value(target: str) -> int:
    return 255 if target == "ignore" else list(MODANET.names).index(target)


def _label(make: Callable[[np.ndarray], bytes], name: str = "0002.mat", replace: bool = True):
    """Sample 0002's label map written by `make` as `name`, instead of 0002.mat or beside it."""

    def mutate(ds):
        if replace:
            (ds["masks"] / "0002.mat").unlink()
        (ds["masks"] / name).write_bytes(make(source_labels(2)))

    return mutate


def _photo(data: bytes, name: str = "0002.jpg"):
    def mutate(ds):
        (ds["images"] / name).write_bytes(data)

    return mutate


def _remove(folder: str, name: str):
    def mutate(ds):
        (ds[folder] / name).unlink()

    return mutate


def _fifo(folder: str, name: str):
    def mutate(ds):
        (ds[folder] / name).unlink()
        os.mkfifo(ds[folder] / name)

    return mutate


def _symlink_out(folder: str, name: str):
    def mutate(ds):
        (ds["images"].parent / "outside").write_bytes(SECRET)
        (ds[folder] / name).unlink()
        (ds[folder] / name).symlink_to(Path("..") / "outside")

    return mutate


def _folder_named(folder: str, name: str):
    def mutate(ds):
        (ds[folder] / name).unlink()
        (ds[folder] / name).mkdir()

    return mutate


def _dotted_stem(ds):
    (ds["images"] / "00.02.jpg").write_bytes(jpeg_bytes(9))
    (ds["masks"] / "00.02.mat").write_bytes(label_file_bytes(source_labels(9), "mat"))


# (case, mutation, expected rejects {kind/reason: count}, sample 0002 kept?)
BAD_PIXEL_INPUTS = [
    ("label map of another size", _label(lambda a: label_file_bytes(a[:-1], "mat")),
     {"image/label_size_mismatch": 1}, False),
    ("png label map of another size", _label(lambda a: label_file_bytes(a[:, :-8], "png"), "0002.png"),
     {"image/label_size_mismatch": 1}, False),
    ("RGB png label map", _label(lambda a: label_file_bytes(np.stack([a] * 3, -1), "png"), "0002.png"),
     {"image/label_not_single_channel": 1}, False),
    ("a value with no name", _label(lambda a: label_file_bytes(a + 1, "mat")), {"image/label_unknown_values": 1}, False),
    ("truncated .mat", _label(lambda a: label_file_bytes(a, "mat")[:-40]), {"image/label_truncated": 1}, False),
    ("garbage .mat", _label(lambda a: b"MATLAB 5.0 MAT-file" + bytes(300)), {"image/label_corrupt": 1}, False),
    ("no variable groundtruth", _label(lambda a: label_file_bytes(a, "mat", "labels")),
     {"image/label_variable_missing": 1}, False),
    ("truncated photo", _photo(jpeg_bytes(2)[:-300]), {"image/truncated_image": 1}, False),
    ("GIF behind .jpg", _photo(jpeg_bytes(2, fmt="GIF")), {"image/unsupported_format": 1}, False),
    ("secret behind .jpg", _photo(SECRET), {"image/unsupported_format": 1}, False),
    ("photo without label map", _remove("masks", "0002.mat"), {"image/missing_label_map": 1}, False),
    ("label map without photo", _remove("images", "0002.jpg"), {"image/missing_photo": 1}, False),
    ("two photos, one stem", _photo(jpeg_bytes(2, fmt="PNG"), "0002.png"), {"image/duplicate_key": 1}, True),
    ("two label maps, one stem", _label(lambda a: label_file_bytes(a, "png"), "0002.png", replace=False),
     {"image/duplicate_label_map": 1}, False),
    ("a dot in the stem", _dotted_stem, {"image/unsafe_key": 1}, True),
    ("photo is a FIFO", _fifo("images", "0002.jpg"), {"image/not_a_regular_file": 1}, False),
    ("label map is a FIFO", _fifo("masks", "0002.mat"), {"image/label_not_a_regular_file": 1}, False),
    ("photo links outside", _symlink_out("images", "0002.jpg"), {"image/outside_folder": 1}, False),
    ("label map links outside", _symlink_out("masks", "0002.mat"), {"image/label_outside_folder": 1}, False),
    ("photo is a folder", _folder_named("images", "0002.jpg"), {"image/not_a_regular_file": 1}, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "expected", "kept"), [c[1:] for c in BAD_PIXEL_INPUTS], ids=[c[0] for c in BAD_PIXEL_INPUTS]
)
def test_bad_label_map_input_is_rejected_with_its_reason(tmp_path, mutate, expected, kept):
    ds = pixel_dataset(tmp_path / "data")
    mutate(ds)
    with deadline(60):
        manifest, out, samples = run_pixels(ds, tmp_path / "out")
    assert manifest.rejects == expected
    assert_invariants(manifest, out)
    assert ("0002" in samples) == kept
    assert {"0000", "0001", "0003", "0004", "0005"} <= set(samples), "only the bad sample may be lost"
    lines = (out / sh.REJECTS_NAME).read_bytes()
    assert SECRET not in lines and SECRET[:8].hex().encode() not in lines, "no file bytes in the rejects"
    assert all(json.loads(x)["key"] in ("0002", "00.02") for x in lines.splitlines())


def test_other_and_hidden_files_are_ignored_and_counted(tmp_path):
    ds = pixel_dataset(tmp_path / "data", n=3)
    (ds["images"] / "README.txt").write_text("photos")
    (ds["images"] / ".DS_Store").write_bytes(b"\0\0")
    (ds["masks"] / "notes.md").write_text("labels")
    manifest, _, samples = run_pixels(ds, tmp_path / "out")
    assert manifest.rejects == {} and sorted(samples) == ["0000", "0001", "0002"]
    assert manifest.counts["files_ignored"] == 2 and manifest.counts["images_in"] == 3


def _unmapped(ds, args):
    ds["label_map"].write_text(yaml.safe_dump({"target": "modanet", "labels": {**PIXEL_MAP, "romper": None}}))


def _names_garbage(ds, args):
    ds["label_names"].write_bytes(b"MATLAB 5.0" + bytes(100))


def _unknown_target(ds, args):
    ds["label_map"].write_text(
        yaml.safe_dump({"target": "modanet", "labels": {**PIXEL_MAP, "coat": "coats"}})
    )


def _empty_masks(ds, args):
    for p in ds["masks"].iterdir():
        p.unlink()


def _masks_is_a_file(ds, args):
    args[1] = f"--masks={ds['label_names']}"


def _option(*extra: str):
    def mutate(ds, args):
        args.extend(extra)

    return mutate


BAD_PIXEL_OPTIONS = [
    ("--masks is a file", _masks_is_a_file, "is not a folder"),
    ("--masks empty", _empty_masks, "holds no .png, .tif, .tiff, .mat files"),
    ("label names do not parse", _names_garbage, "not a readable MATLAB 5 file"),
    ("a label not mapped", _unmapped, "romper"),
    ("an unknown target", _unknown_target, "coat -> 'coats'"),
    ("--annotations too", _option("--annotations=a.json"), "not both"),
    ("--fix-size", _option("--fix-size"), "--fix-size: for COCO annotations only"),
    ("--mask-variable not a name", _option("--mask-variable=x; rm"), "is not a MATLAB variable name"),
    ("one folder twice", _option("--masks=" + "{images}"), "must be two folders"),
    ("a huge seed", _option(f"--seed={10**41}"), "--seed must be in"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [c[1:] for c in BAD_PIXEL_OPTIONS], ids=[c[0] for c in BAD_PIXEL_OPTIONS]
)
def test_unusable_label_map_inputs_are_one_line_and_write_nothing(tmp_path, capsys, mutate, message):
    ds = pixel_dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    args = pixel_args(ds, out)
    mutate(ds, args)
    args = [a.format(**ds) if "{" in a else a for a in args]
    assert sh.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("modaseg-shard: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_label_map_tasks_merge_resume_and_verify(tmp_path):
    """The COCO path's machinery serves label maps too: array tasks + merge equal one run; --resume redoes
    exactly the shard of a changed label map; --verify passes."""
    ds = pixel_dataset(tmp_path / "data", n=9)
    single, out1, _ = run_pixels(ds, tmp_path / "single")
    tasks = tmp_path / "tasks"
    for i in (1, 0, 2):
        assert sh.main([*pixel_args(ds, tasks), "--num-tasks=3", f"--task-index={i}"]) == 0
    assert sh.main([*pixel_args(ds, tasks), "--num-tasks=3", "--merge", "--verify"]) == 0
    assert read_manifest(tasks) == single
    assert shard_hashes(tasks) == shard_hashes(out1)
    assert (tasks / sh.REJECTS_NAME).read_bytes() == (out1 / sh.REJECTS_NAME).read_bytes()

    changed = source_labels(4)
    changed[changed == 2] = 3  # shoes become sandals: same label value, then coat
    changed[:8, :8] = 4
    (ds["masks"] / "0004.mat").write_bytes(label_file_bytes(changed, "mat"))
    shard_of = next(
        i.name for s in single.splits.values() for i in s.shards if "0004.jpg" in tar_names(out1 / i.name)
    )
    before = {p.name: p.stat().st_mtime_ns for p in out1.glob("*.tar")}
    assert sh.main([*pixel_args(ds, out1), "--resume", "--verify"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out1.glob("*.tar")}
    assert {n for n in before if before[n] != after[n]} == {shard_of}
    np.testing.assert_array_equal(
        read_samples(out1, str)["0004"]["mask"],
        expected_label(ds["masks"] / "0004.mat", PIXEL_NAMES, PIXEL_MAP),
    )


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# ------------------------------------------------------------------------------- prepare-stage faults


class Hung(BaseException):
    """Raised in the main thread by a deadline: not an Exception, so no handler swallows it."""


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def fire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def coco_args(tmp_path: Path, coco: dict, images_dir: Path, out: Path, *extra: str) -> list[str]:
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(coco))
    return ["--annotations", str(ann), "--images", str(images_dir), "--out", str(out), "--shard-size=3",
            "--workers=1", "--no-progress", *extra]  # fmt: skip


def test_two_images_with_one_file_name_are_not_both_sharded(tmp_path):
    """Both would store the same photo, one with the other's labels, likely in another split."""
    coco, images_dir = small_dataset(tmp_path, n=8)
    coco["images"][5]["file_name"] = coco["images"][1]["file_name"]  # 116 reads 104's photo
    out = tmp_path / "out"
    assert sh.main(coco_args(tmp_path, coco, images_dir, out)) == 0
    manifest, samples = read_manifest(out), read_samples(out)
    assert manifest.rejects == {"image/duplicate_file_name": 1}
    assert 104 in samples and 116 not in samples
    assert_invariants(manifest, out)
    (line,) = [json.loads(x) for x in (out / sh.REJECTS_NAME).read_text().splitlines()]
    assert line["image_id"] == 116 and "104" in line["detail"]


def test_fifo_and_links_out_of_the_images_folder_are_never_opened(tmp_path):
    coco, images_dir = small_dataset(tmp_path, n=6)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "elsewhere.jpg").write_bytes(jpeg_bytes(7))
    (images_dir / "0000104.jpg").unlink()
    os.mkfifo(images_dir / "0000104.jpg")  # would block the reader forever
    (images_dir / "0000107.jpg").unlink()
    (images_dir / "0000107.jpg").symlink_to(tmp_path / "secret.txt")
    (images_dir / "0000110.jpg").unlink()
    (images_dir / "0000110.jpg").symlink_to(Path("..") / "elsewhere.jpg")
    (images_dir / "0000113.jpg").write_bytes(SECRET)  # inside the folder, but still not echoed
    (images_dir / "linked.jpg").symlink_to("0000101.jpg")  # a link inside the folder is fine
    coco["images"][5]["file_name"] = "linked.jpg"  # image 116
    out = tmp_path / "out"
    with deadline(60):
        assert sh.main(coco_args(tmp_path, coco, images_dir, out)) == 0
    manifest, samples = read_manifest(out), read_samples(out)
    assert manifest.rejects == {
        "image/not_a_regular_file": 1,
        "image/outside_folder": 2,
        "image/unsupported_format": 1,
    }
    assert set(samples) == {101, 116}
    assert samples[116]["jpg"] == (images_dir / "0000101.jpg").read_bytes()
    lines = (out / sh.REJECTS_NAME).read_bytes()
    assert SECRET not in lines and SECRET[:8].hex().encode() not in lines
    assert_invariants(manifest, out)


def test_resume_redoes_the_shard_of_a_changed_photo(tmp_path):
    coco, images_dir = small_dataset(tmp_path, n=12)
    out = tmp_path / "out"
    args = coco_args(tmp_path, coco, images_dir, out)
    assert sh.main(args) == 0
    shard_of = {k: s["split"] for k, s in read_samples(out).items()}
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    new = jpeg_bytes(40)
    (images_dir / "0000107.jpg").write_bytes(new)
    os.utime(images_dir / "0000107.jpg", ns=(1, 1))  # whatever the clock's resolution
    assert sh.main([*args, "--resume", "--verify"]) == 0
    samples = read_samples(out)
    assert samples[107]["jpg"] == new
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    redone = {n for n in before if before[n] != after[n]}
    assert len(redone) == 1 and next(iter(redone)).startswith(shard_of[107])
    assert "107.jpg" in tar_names(out / next(iter(redone)))


def test_a_malformed_sidecar_means_redo_not_a_crash(tmp_path):
    coco, images_dir = small_dataset(tmp_path, n=6)
    out = tmp_path / "out"
    args = coco_args(tmp_path, coco, images_dir, out)
    assert sh.main(args) == 0
    reference = shard_hashes(out)
    sidecars = sorted((out / sh.PARTS_DIR).glob("*.json"))
    sidecars[0].write_text("[]")
    sidecars[1].write_text('{"plan_id": 3')
    assert sh.main([*args, "--resume"]) == 0
    assert shard_hashes(out) == reference


def test_huge_seed_is_one_line_not_a_traceback(tmp_path, capsys):
    coco, images_dir = small_dataset(tmp_path)
    out = tmp_path / "out"
    for seed in (10**41, -(2**127) - 1):
        assert sh.main(coco_args(tmp_path, coco, images_dir, out, f"--seed={seed}")) == 2
        err = capsys.readouterr().err
        assert err.startswith("modaseg-shard: error: --seed must be in") and err.count("\n") == 1
    assert not out.exists()
    assert sh.main(coco_args(tmp_path, coco, images_dir, out, f"--seed={2**127 - 1}")) == 0


def test_an_unknown_category_is_painted_as_ignore_and_counted(tmp_path):
    """A garment whose category_id is not in the file must not be taught as background (issue 21.13)."""
    coco, images_dir = small_dataset(tmp_path)
    unknown = next(a for a in coco["annotations"] if a["id"] == 100)  # image 101 keeps its other one
    unknown.update(category_id=99, segmentation=[rect(52, 82, 62, 94)])
    manifest, out, samples = run(tmp_path, coco, images_dir)
    assert manifest.rejects == {"annotation/unknown_category": 1}
    assert manifest.counts["unknown_category_painted_ignore"] == 1
    assert_invariants(manifest, out)
    expected = reference_polys([rect(5, 5, 50, 80)], 1)
    expected[reference_polys([rect(52, 82, 62, 94)], 1).astype(bool)] = 255
    np.testing.assert_array_equal(samples[101]["mask"], expected)
    assert samples[101]["meta"]["ignore_pixels"] == int((expected == 255).sum()) > 0


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("mask variable", "label_variable_missing (4 of 4)"),
        (
            "every category unknown",
            "all_annotations_rejected (4 of 4); their annotations mostly unknown_category",
        ),
        ("every photo missing", "missing_file (4 of 4)"),
    ],
)
def test_nothing_written_is_an_error_naming_the_main_reason(tmp_path, capsys, source, message):
    """'written 0 + rejected 8: OK', exit 0, left training to fail later (issue 21.6)."""
    out = tmp_path / "out"
    if source == "mask variable":
        args = pixel_args(pixel_dataset(tmp_path / "data", n=4), out, "--mask-variable=nope")
    else:
        coco, images_dir = small_dataset(tmp_path)
        for ann in coco["annotations"]:
            ann["category_id"] = 99 if source == "every category unknown" else ann["category_id"]
        if source == "every photo missing":
            for p in images_dir.iterdir():
                p.unlink()
        args = coco_args(tmp_path, coco, images_dir, out)
    assert sh.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("modaseg-shard: error: no sample written") and err.count("\n") == 1, err
    assert message in err and str(out / sh.REJECTS_NAME) in err
    assert not (out / sh.MANIFEST_NAME).exists() and (out / sh.REJECTS_NAME).read_text()


def _out_is_a_file(out: Path) -> None:
    out.write_text("a file")


def _foreign_shard(out: Path) -> None:
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"somebody's shard")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_out_is_a_file, "exists and is not a folder"),
        (_foreign_shard, "holds train-000000.tar that modaseg-shard did not write"),
    ],
    ids=["a file", "a foreign shard"],
)
def test_an_unusable_out_is_one_line_without_resume_advice(tmp_path, capsys, make, message):
    """--out <file> / read-only said 'rerun with --resume', exit 1 (issue 21.11); a foreign
    train-000000.tar in --out was overwritten (issue 21.12)."""
    coco, images_dir = small_dataset(tmp_path)
    out = tmp_path / "out"
    make(out)
    before = {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
    assert sh.main(coco_args(tmp_path, coco, images_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("modaseg-shard: error: --out") and err.count("\n") == 1, err
    assert message in err and "--resume" not in err
    assert {p: p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()} == before


def test_a_read_only_out_is_one_line_without_resume_advice(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "modaseg.shard", *coco_args(tmp_path, coco, images_dir, out)]
    result = on_a_small_disk(out, "ro", cmd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"modaseg-shard: error: --out {out}: cannot write there (Read-only")


@pytest.mark.parametrize("disk_kb", [8, 40])  # the first shard does not fit / some do
def test_a_full_disk_says_what_is_kept(tmp_path, disk_kb):
    """A real full disk (a small tmpfs as --out): one line, '--resume' advised only when finished
    shards are kept, and exactly that many are (issue 21.11)."""
    coco, images_dir = small_dataset(tmp_path, n=12)
    out = tmp_path / "out"
    out.mkdir()
    args = coco_args(tmp_path, coco, images_dir, out, "--shard-size=1")
    result = on_a_small_disk(out, f"size={disk_kb}k", [sys.executable, "-m", "modaseg.shard", *args])
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(err) == 1, result.stderr
    assert "No space left on device" in err[0] and "Traceback" not in result.stderr
    tars = int(result.stdout.split("tars=")[1])
    if tars:
        assert f"{tars} finished shard(s) are kept: fix it, then rerun with --resume" in err[0]
    else:
        assert "no shard was finished" in err[0] and "--resume" not in err[0]


# ------------------------------------------------------------------------------------ EXIF orientation

# PIL's own transposes for EXIF orientations 2..8 (ImageOps.exif_transpose): the oracle, independent of
# modaseg.images.orient; and the transpose that undoes each.
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
UNDO = {o: EXIF_TRANSPOSE[{6: 8, 8: 6}.get(o, o)] for o in EXIF_TRANSPOSE}
# (EXIF orientation, grid the labels were drawn on) per photo, in sample order; the counts expected
ORIENTED = [(6, "displayed"), (6, "stored"), (3, "stored"), (5, "displayed"), (8, "stored")]
ORIENTED_COUNTS = {
    "exif_oriented": 5,
    "labels_on_displayed_grid": 2,
    "labels_on_stored_grid": 2,
    "labels_grid_assumed_stored": 1,  # a 180-degree turn keeps the size: the stored grid is assumed
}


def turned(array: np.ndarray, transpose: Image.Transpose) -> np.ndarray:
    return np.asarray(Image.fromarray(array).transpose(transpose))


def resave_as_phone(path: Path, orientation: int, labels_on: str) -> np.ndarray:
    """Re-save the photo at `path` as a JPEG with EXIF `orientation`. Labels drawn on the displayed
    photo: the stored pixels become the photo turned back, so it displays as before. Labels drawn on the
    stored pixels (ModaNet 2018): the pixels stay, and now display turned. Returns the upright pixels."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    stored = turned(pixels, UNDO[orientation]) if labels_on == "displayed" else pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return pixels if labels_on == "displayed" else turned(pixels, EXIF_TRANSPOSE[orientation])


def assert_upright(jpg: bytes, upright: np.ndarray, name: object) -> None:
    """The photo as every loader decodes it from the shard is the upright one (JPEG re-encoding aside)."""
    from modaseg.images import decode_image

    got = decode_image(jpg)
    assert got.shape == upright.shape, name
    assert np.abs(got.astype(int) - upright).mean() < 3, name


def test_exif_oriented_photos_get_labels_in_their_displayed_orientation(tmp_path, capsys):
    """A phone photo with Orientation=6 was stored sideways and labelled sideways, silently (issue 21.7):
    the stored label map is pycocotools' rasterization on the grid the declared size names, turned like
    the photo when that is the stored grid, and the photo decoded from the shard is upright."""
    from modaseg import synth

    data = tmp_path / "data"
    synth.generate(data, 8, seed=3, width=W, height=H, progress=False)
    coco = json.loads((data / "annotations.json").read_text())
    upright = {}
    for image, (orientation, labels_on) in zip(coco["images"], ORIENTED, strict=False):
        upright[image["id"]] = resave_as_phone(data / "images" / image["file_name"], orientation, labels_on)
    out = tmp_path / "out"
    assert sh.main(coco_args(tmp_path, coco, data / "images", out)) == 0
    assert "warning: 1 photo(s) with an EXIF orientation" in capsys.readouterr().err
    manifest, samples = read_manifest(out), read_samples(out)
    assert manifest.rejects == {} and len(samples) == 8
    assert {k: manifest.counts[k] for k in ORIENTED_COUNTS} == ORIENTED_COUNTS
    assert_invariants(manifest, out)
    ref = COCO()
    ref.dataset = coco
    ref.createIndex()
    for i, image in enumerate(coco["images"]):
        s, expected = samples[image["id"]], reference_mask(image["id"], ref)
        if i < len(ORIENTED):
            orientation, labels_on = ORIENTED[i]
            if labels_on == "stored":
                expected = turned(expected, EXIF_TRANSPOSE[orientation])
            assert s["meta"]["exif_orientation"] == orientation
            assert_upright(s["jpg"], upright[image["id"]], image["id"])
        np.testing.assert_array_equal(s["mask"], expected, err_msg=f"image {image['id']}")
        assert (s["meta"]["height"], s["meta"]["width"]) == expected.shape
        assert s["jpg"] == (data / "images" / image["file_name"]).read_bytes(), "stored verbatim"


def test_exif_oriented_photos_of_a_label_map_dataset(tmp_path):
    """The same rule for pixel label maps: the label map's shape names its grid."""
    ds = pixel_dataset(tmp_path / "data", n=6)
    upright = {}
    for i, (orientation, labels_on) in enumerate(ORIENTED):
        upright[f"{i:04d}"] = resave_as_phone(ds["images"] / f"{i:04d}.jpg", orientation, labels_on)
    manifest, out, samples = run_pixels(ds, tmp_path / "out")
    assert manifest.rejects == {} and len(samples) == 6
    assert {k: manifest.counts[k] for k in ORIENTED_COUNTS} == ORIENTED_COUNTS
    assert_invariants(manifest, out)
    for i in range(6):
        key = f"{i:04d}"
        expected = expected_label(ds["masks"] / f"{key}.mat", PIXEL_NAMES, PIXEL_MAP)
        if i < len(ORIENTED):
            orientation, labels_on = ORIENTED[i]
            if labels_on == "stored":
                expected = turned(expected, EXIF_TRANSPOSE[orientation])
            assert_upright(samples[key]["jpg"], upright[key], key)
        np.testing.assert_array_equal(samples[key]["mask"], expected, err_msg=key)


def test_an_oriented_photo_of_neither_grid_names_both(tmp_path):
    coco, images_dir = small_dataset(tmp_path)
    coco["images"][1]["width"] = W + 6
    resave_as_phone(images_dir / "0000104.jpg", 6, "stored")
    manifest, out, _ = run(tmp_path, coco, images_dir)
    assert manifest.rejects == {"image/size_mismatch": 1}
    (line,) = [json.loads(x) for x in (out / sh.REJECTS_NAME).read_text().splitlines()]
    assert f"decoded {W}x{H} (displayed {H}x{W}, EXIF orientation 6)" in line["detail"]
