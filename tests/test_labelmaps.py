"""modaseg.labelmaps: label names in every accepted format, the mapping file's checks, the shipped CCP
mapping, and label-map decoding against files written by scipy and PIL."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image

from modaseg.classes import MODANET
from modaseg.console import InputError
from modaseg.labelmaps import (
    Rejected,
    key_problem,
    load_label_mapping,
    load_label_names,
    pair_files,
    read_label_map,
)

ROOT = Path(__file__).resolve().parents[1]
CCP_MAP = ROOT / "configs" / "labelmaps" / "ccp-to-modanet.yaml"
CCP = ROOT / ".." / "shared" / "data" / "ccp-dev"
# the 59 labels of Clothing Co-Parsing's label_list.mat, in order (value k = name k)
CCP_NAMES = [
    "null",
    "accessories",
    "bag",
    "belt",
    "blazer",
    "blouse",
    "bodysuit",
    "boots",
    "bra",
    "bracelet",
    "cape",
    "cardigan",
    "clogs",
    "coat",
    "dress",
    "earrings",
    "flats",
    "glasses",
    "gloves",
    "hair",
    "hat",
    "heels",
    "hoodie",
    "intimate",
    "jacket",
    "jeans",
    "jumper",
    "leggings",
    "loafers",
    "necklace",
    "panties",
    "pants",
    "pumps",
    "purse",
    "ring",
    "romper",
    "sandals",
    "scarf",
    "shirt",
    "shoes",
    "shorts",
    "skin",
    "skirt",
    "sneakers",
    "socks",
    "stockings",
    "suit",
    "sunglasses",
    "sweater",
    "sweatshirt",
    "swimwear",
    "t-shirt",
    "tie",
    "tights",
    "top",
    "vest",
    "wallet",
    "watch",
    "wedges",
]
NAMES = ["null", "skin", "shoes", "coat", "romper"]
LABELS = {
    "null": "background",
    "skin": "background",
    "shoes": "footwear",
    "coat": "outer",
    "romper": "ignore",
}


def write_names(path: Path, names: list[str]) -> Path:
    """The names in the format the suffix says, written by the format's own library."""
    if path.suffix == ".mat":
        scipy.io.savemat(path, {"label_list": np.array([names], dtype=object)})
    elif path.suffix == ".txt":
        path.write_text("\n".join(names) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps(names))
    else:
        path.write_text(yaml.safe_dump(names))
    return path


def write_mapping(path: Path, labels: dict, target: object = "modanet") -> Path:
    path.write_text(yaml.safe_dump({"target": target, "labels": labels}))
    return path


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("suffix", [".mat", ".txt", ".json", ".yaml"])
def test_label_names_in_every_format(tmp_path, suffix):
    assert load_label_names(write_names(tmp_path / f"names{suffix}", NAMES)) == NAMES


def test_ccp_label_list_mat():
    if not (CCP / "label_list.mat").is_file():
        pytest.skip(f"Clothing Co-Parsing not found at {CCP} (../shared/data/ccp-dev)")
    assert load_label_names(CCP / "label_list.mat") == CCP_NAMES


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("n.txt", b"null\n\nskin\n", "entry 1"),
        ("n.txt", b"\xff\xfe\x00", "do not parse"),
        ("n.json", b"[", "do not parse"),
        ("n.json", b'{"a": 1}', "non-empty list"),
        ("n.json", b"[]", "non-empty list"),
        ("n.json", b'["a", 3]', "entry 1"),
        ("n.json", b'["a", "b", "a"]', "given twice: a"),
        ("n.yaml", b"- a\n- [b\n", "do not parse"),
        ("n.yaml", b"!!python/object:os.system ls", "do not parse"),  # safe_load refuses to build objects
        ("n.mat", b"MATLAB 5.0 MAT-file" + bytes(200), "not a readable MATLAB 5 file"),
        ("n.csv", b"a,b", "expected a .mat, .txt, .json or .yaml file"),
    ],
)
def test_bad_label_names_are_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_label_names(tmp_path / name)


def test_mat_names_need_a_cell_array(tmp_path):
    scipy.io.savemat(tmp_path / "n.mat", {"label_list": np.arange(4), "other": np.arange(2)})
    with pytest.raises(InputError, match="cell array"):
        load_label_names(tmp_path / "n.mat")
    scipy.io.savemat(tmp_path / "m.mat", {"a": np.array([NAMES], dtype=object), "b": np.arange(2)})
    with pytest.raises(InputError, match="expected a variable `label_list`"):
        load_label_names(tmp_path / "m.mat")
    scipy.io.savemat(tmp_path / "one.mat", {"names": np.array([NAMES], dtype=object)})
    assert load_label_names(tmp_path / "one.mat") == NAMES  # a single variable is taken whatever its name


# -------------------------------------------------------------------------------------------- mapping


def test_mapping_gives_modanet_label_values(tmp_path):
    mapping = load_label_mapping(write_mapping(tmp_path / "m.yaml", LABELS), NAMES)
    assert mapping.space == MODANET
    assert mapping.by_name == {"null": 0, "skin": 0, "shoes": 4, "coat": 5, "romper": 255}
    assert mapping.lut.tolist() == [0, 0, 4, 5, 255] and mapping.lut.dtype == np.uint8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, r"source label\(s\) not mapped: romper"),
        ("target: modanet\nlabels:\n  null: background\n", "is not a string"),
        ("labels: {}\n", "expected the keys `target` and `labels`"),
        ("target: fashionpedia\nlabels: {}\n", "unknown target 'fashionpedia'"),
        ("target: modanet\nlabels: [a]\n", "must map source names"),
        ("target: modanet\nlabels: {a: [", "does not parse"),
    ],
    ids=["unmapped", "unquoted null", "no target", "unknown target", "labels not a mapping", "bad yaml"],
)
def test_bad_mapping_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "m.yaml"
    if text is None:
        write_mapping(path, {k: v for k, v in LABELS.items() if k != "romper"})
    else:
        path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_label_mapping(path, NAMES)


def test_unknown_names_and_targets_are_named(tmp_path):
    with pytest.raises(InputError, match=r"coat -> 'jacket': unknown target"):
        load_label_mapping(write_mapping(tmp_path / "a.yaml", {**LABELS, "coat": "jacket"}), NAMES)
    with pytest.raises(InputError, match="hat: not among the source label names"):
        load_label_mapping(write_mapping(tmp_path / "b.yaml", {**LABELS, "hat": "headwear"}), NAMES)


def test_the_shipped_ccp_mapping_covers_every_ccp_label():
    mapping = load_label_mapping(CCP_MAP, CCP_NAMES)
    value = mapping.by_name
    assert len(CCP_NAMES) == 59 and set(value) == set(CCP_NAMES)
    assert set(value.values()) == set(range(14)) | {255}, "every ModaNet class gets CCP pixels"
    footwear = ["shoes", "sandals", "heels", "pumps", "sneakers", "flats", "loafers", "clogs", "wedges"]
    assert {value[n] for n in footwear} == {4} and value["boots"] == 3
    assert {value[n] for n in ["coat", "jacket", "blazer", "cardigan", "cape"]} == {5}
    assert {value[n] for n in ["top", "blouse", "shirt", "t-shirt", "sweater", "sweatshirt"]} == {9}
    assert {value[n] for n in ["null", "skin", "hair", "necklace", "earrings", "ring", "bracelet"]} == {0}
    assert {value[n] for n in ["suit", "romper", "jumper", "vest", "swimwear", "stockings", "tights"]} == {
        255
    }
    assert (value["hat"], value["sunglasses"], value["scarf"], value["tie"]) == (12, 7, 13, 13)
    comments = [line for line in CCP_MAP.read_text().splitlines() if line.strip().endswith(": ignore")]
    assert not comments, f"every ignore says why: {comments}"


# ----------------------------------------------------------------------------------------- label maps

LUT = np.array([0, 0, 4, 5, 255], np.uint8)


def mat_bytes(variables: dict) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=True)
    return buf.getvalue()


def image_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def source() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 5, size=(12, 9)).astype(np.uint8)


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("a.mat", lambda a: mat_bytes({"groundtruth": a})),
        ("a.mat", lambda a: mat_bytes({"groundtruth": a.astype(np.float64), "other": np.zeros(3)})),
        ("a.png", lambda a: image_bytes(a)),
        ("a.png", lambda a: image_bytes(a.astype(np.uint16))),
        ("a.tif", lambda a: image_bytes(a, "TIFF")),
    ],
    ids=["mat", "mat double", "png", "png 16 bit", "tiff"],
)
def test_label_maps_decode_and_map(source, name, encode):
    got = read_label_map(encode(source), name, "groundtruth", source.shape, LUT)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, LUT[source])


def test_palette_png_keeps_its_indices(source):
    im = Image.fromarray(source, "L").convert("P")
    im.putpalette([v for i in range(256) for v in (255 - i, i, 7)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    np.testing.assert_array_equal(
        read_label_map(buf.getvalue(), "p.png", "x", source.shape, LUT), LUT[source]
    )


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("a.mat", lambda a: mat_bytes({"groundtruth": a[:, :-1]}), "label_size_mismatch"),
        ("a.mat", lambda a: mat_bytes({"other": a}), "label_variable_missing"),
        ("a.mat", lambda a: mat_bytes({"groundtruth": a + 3}), "label_unknown_values"),
        ("a.mat", lambda a: mat_bytes({"groundtruth": a - 1.5}), "label_bad_values"),
        ("a.mat", lambda a: mat_bytes({"groundtruth": a})[:-40], "label_truncated"),
        ("a.mat", lambda a: b"MATLAB 5.0" + bytes(300), "label_corrupt"),
        ("a.mat", lambda a: b"\x89HDF\r\n\x1a\n" + bytes(600), "label_corrupt"),
        ("a.png", lambda a: image_bytes(a.T.copy()), "label_size_mismatch"),
        ("a.png", lambda a: image_bytes(np.stack([a] * 3, -1)), "label_not_single_channel"),
        ("a.png", lambda a: image_bytes(a)[:60], "label_truncated"),
        ("a.png", lambda a: b"GIF89a" + bytes(100), "label_corrupt"),
    ],
    ids=[
        "size",
        "no variable",
        "value without name",
        "fractions",
        "truncated mat",
        "garbage mat",
        "hdf5 bytes",
        "png size",
        "rgb png",
        "truncated png",
        "not an image",
    ],
)
def test_bad_label_maps_are_rejected_with_their_reason(source, name, data, reason):
    with pytest.raises(Rejected) as e:
        read_label_map(data(source), name, "groundtruth", source.shape, LUT)
    assert e.value.reason == reason
    assert "\\x" not in e.value.detail and "MATLAB 5.0" not in e.value.detail, "no file bytes in the detail"


# ---------------------------------------------------------------------------------------------- pairing


@pytest.mark.parametrize(
    ("key", "ok"),
    [("0001", True), ("photo_12-b", True), ("été", True), ("a.b", False), ("", False), ("x" * 91, False),
     ("tab\there", False), ("bad\udcff", False)],
)  # fmt: skip
def test_key_problem(key, ok):
    assert (key_problem(key) is None) == ok


def test_pairing_by_stem_with_every_leftover_named(tmp_path):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for name in ["a.jpg", "b.JPEG", "b.png", "c.jpg", "d.jpg", "e.jpg", "notes.txt", ".hidden.jpg"]:
        (photos / name).write_bytes(b"")
    for name in ["a.mat", "b.png", "c.png", "c.mat", "f.tif", "e.mat", "readme.md"]:
        (masks / name).write_bytes(b"")
    pairing = pair_files(photos, masks)
    assert pairing.pairs == [("a", "a.jpg", "a.mat"), ("b", "b.JPEG", "b.png"), ("e", "e.jpg", "e.mat")]
    reasons = {(r["key"], r["reason"]) for r in pairing.rejects}
    assert reasons == {("b", "duplicate_key"), ("c", "duplicate_label_map"), ("d", "missing_label_map"),
                       ("f", "missing_photo")}  # fmt: skip
    assert pairing.counts == Counter(images_in=7, images_rejected=4, files_ignored=2)
    limited = pair_files(photos, masks, max_images=2)
    assert limited.pairs == [("a", "a.jpg", "a.mat"), ("b", "b.JPEG", "b.png")]
    assert limited.counts["label_maps_outside_max_images"] == 3  # c.png, c.mat, e.mat: photos past the limit


def test_a_source_name_mapped_twice_is_refused_not_last_wins(tmp_path):
    """`shoes: footwear` then `shoes: bag` would shard all shoes as bags if the last key won."""
    path = tmp_path / "m.yaml"
    labels = "".join(f"  {k}: {v}\n" for k, v in LABELS.items())
    path.write_text(f"target: modanet\nlabels:\n{labels}  shoes: bag\n")
    with pytest.raises(
        InputError, match=r"label map .* does not parse: key 'shoes' given twice \(line 5 and"
    ):
        load_label_mapping(path, NAMES)
