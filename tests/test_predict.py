"""modaseg-predict: every label map equals the model's own prediction computed here by hand, for any image
size; no input or output is overwritten; unreadable and oversized images are reported and skipped."""

from __future__ import annotations

import logging
import shutil
import struct
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import on_a_small_disk
from PIL import Image, ImageOps

from modaseg.classes import MODANET
from modaseg.config import ModelConfig
from modaseg.hardware import resolve_precision
from modaseg.images import MAX_PIXELS_CEILING
from modaseg.model import INCEPTION, build_model, export_model
from modaseg.predict import main, plan_batches
from modaseg.visualize import colorize, legend, overlay, side_by_side

NAMES = list(MODANET.names)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="resnet18"), len(NAMES)).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """Exported with INCEPTION statistics: a predictor that used ImageNet's would not match by hand."""
    return export_model(model, tmp_path_factory.mktemp("model") / "export", NAMES, INCEPTION)


def reference_labels(model: torch.nn.Module, photo: np.ndarray, tta: bool = False) -> np.ndarray:
    """What a label PNG must hold, by hand: (rgb / 255 - 0.5) / 0.5, zeros appended bottom/right up to
    multiples of 32, the U-Net (averaged with its mirrored prediction for TTA), argmax, the top-left h x w."""
    h, w = photo.shape[:2]
    x = torch.from_numpy((photo.astype(np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
    x = F.pad(x, (0, -w % 32, 0, -h % 32))
    with torch.no_grad():
        logits = model(x)
        if tta:
            logits = (logits + model(x.flip(-1)).flip(-1)) / 2
    return logits.argmax(1)[0, :h, :w].numpy().astype(np.uint8)


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus a little noise: labels that vary, and JPEG outputs close to their source."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(
        rng.uniform(0, 255, (4, 4, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC
    )
    return np.clip(coarse + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def run(exported, inputs, out, *extra: str) -> int:
    """modaseg-predict in fp32 unless a test asks for a precision: the references are computed in fp32, and
    `auto` is bf16 on a CPU with AVX512_BF16."""
    precision = [] if "--mixed-precision" in extra else ["--mixed-precision", "no"]
    return main(["--checkpoint", str(exported), *map(str, inputs), "--out", str(out), *precision, *extra])


@pytest.mark.slow
def test_outputs_are_the_models_own_prediction_at_any_size(exported, model, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {"a": (96, 64), "b": (70, 50), "c": (33, 129), "d": (45, 77)}  # b shares a's padded size
    photos = {name: photo(h, w, seed) for seed, (name, (h, w)) in enumerate(sizes.items())}
    photos["gray"] = photo(40, 40, 9)[..., 0]
    for name, image in photos.items():
        Image.fromarray(image).save(inputs / f"{name}.png")
        photos[name] = np.stack([image] * 3, -1) if image.ndim == 2 else image
    Image.fromarray(photo(45, 77, 10)).save(inputs / "e.jpg", quality=95)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inputs / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, "modaseg"):
        assert run(exported, [inputs], out, "--batch-size", "2") == 0
    for name, image in photos.items():
        labels = reference_labels(model, image)
        assert np.array_equal(read(out / f"{name}.png"), labels), name
        assert np.array_equal(read(out / f"{name}_color.png"), colorize(labels, len(NAMES))), name
        present = [int(c) for c in np.unique(labels)]
        panel = side_by_side(overlay(image, labels, len(NAMES)), legend(NAMES, present))
        written = read(out / f"{name}_overlay.jpg")
        assert written.shape == panel.shape and np.abs(written.astype(int) - panel).mean() < 3, name
    jpeg = np.asarray(Image.open(inputs / "e.jpg").convert("RGB"))  # PIL's decoder, not the one under test
    assert (read(out / "e.png") == reference_labels(model, jpeg)).mean() > 0.98
    assert not (out / "broken.png").exists() and not (out / "notes.png").exists()
    assert "cannot read" in caplog.text and "broken.jpg" in caplog.text
    assert "6 of 7 images predicted" in caplog.text


@pytest.mark.slow
def test_tta_flip_averages_the_mirrored_prediction(exported, model, tmp_path):
    image = photo(64, 96, 3)  # not symmetric: the mirrored prediction changes some labels
    Image.fromarray(image).save(tmp_path / "p.png")
    assert run(exported, [tmp_path / "p.png"], tmp_path / "tta", "--tta-flip") == 0
    assert run(exported, [tmp_path / "p.png"], tmp_path / "plain") == 0
    tta, plain = read(tmp_path / "tta" / "p.png"), read(tmp_path / "plain" / "p.png")
    assert np.array_equal(tta, reference_labels(model, image, tta=True))
    assert np.array_equal(plain, reference_labels(model, image))
    assert (tta != plain).any()


@pytest.mark.slow
def test_16_bit_pngs_predict_like_their_8_bit_versions(exported, model, tmp_path):
    image = photo(48, 40, 4)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, pixels in {"grey": image[..., 0], "rgb": image[..., ::-1]}.items():  # cv2 writes BGR
        cv2.imwrite(str(inputs / f"{name}8.png"), pixels)
        cv2.imwrite(str(inputs / f"{name}16.png"), pixels.astype(np.uint16) * 257)
    assert run(exported, [inputs], tmp_path / "out") == 0
    grey = np.stack([image[..., 0]] * 3, -1)
    for name, rgb in {"grey": grey, "rgb": image}.items():
        expected = reference_labels(model, rgb)
        assert np.array_equal(read(tmp_path / "out" / f"{name}8.png"), expected)
        assert np.array_equal(read(tmp_path / "out" / f"{name}16.png"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_an_exif_oriented_photo_is_segmented_upright(exported, tmp_path, orientation):
    """A phone photo with Orientation=6 is stored sideways: predict segments it as displayed, and its
    label map and overlay are those of the upright photo (issue 21.7). Displayed pixels: PIL's own
    exif_transpose, not the decoder under test."""
    upright = photo(72, 40, 5)  # portrait, not symmetric
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = Image.fromarray(upright).transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(upright).save(inputs / "upright.png")
    stored.save(inputs / "lossless.png", exif=exif.tobytes())
    stored.save(inputs / "phone.jpg", quality=95, exif=exif.tobytes())
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(inputs / "lossless.png"))), upright)
    ImageOps.exif_transpose(Image.open(inputs / "phone.jpg")).save(inputs / "phone_displayed.png")
    out = tmp_path / "out"
    assert run(exported, [inputs], out) == 0
    for suffix in (".png", "_color.png", "_overlay.jpg"):
        assert (out / f"lossless{suffix}").read_bytes() == (out / f"upright{suffix}").read_bytes(), suffix
    phone, reference = read(out / "phone.png"), read(out / "phone_displayed.png")
    assert phone.shape == reference.shape == (72, 40) and (phone == reference).mean() > 0.98
    assert read(out / "phone_overlay.jpg").shape == read(out / "phone_displayed_overlay.jpg").shape


@pytest.mark.slow
def test_images_over_the_pixel_limit_are_reported_and_skipped(exported, model, tmp_path, caplog):
    """A photo whose header claims 20000x20000 (400 MP; PIL's decompression-bomb error used to abort the
    run) is skipped under the default limit; a lower --max-pixels skips the 100x100 one too."""
    small, big = photo(40, 40, 5), photo(100, 100, 6)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(small).save(inputs / "small.png")
    Image.fromarray(big).save(inputs / "big.png")
    Image.fromarray(photo(8, 8, 7)).save(inputs / "huge.jpg")
    data = (inputs / "huge.jpg").read_bytes()
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    (inputs / "huge.jpg").write_bytes(data[: sof + 5] + struct.pack(">HH", 20000, 20000) + data[sof + 9 :])
    for out, extra, done in [("default", [], ["small", "big"]), ("low", ["--max-pixels", "5000"], ["small"])]:
        caplog.clear()
        with caplog.at_level(logging.INFO, "modaseg"):
            assert run(exported, [inputs], tmp_path / out, *extra) == 0
        assert sorted(p.stem for p in (tmp_path / out).glob("*.png") if "_" not in p.stem) == sorted(done)
        assert f"more than {MAX_PIXELS_CEILING} pixels" in caplog.text
        assert f"{len(done)} of 3 images predicted" in caplog.text
    assert "10000 pixels, over the limit of 5000" in caplog.text
    assert np.array_equal(read(tmp_path / "low" / "small.png"), reference_labels(model, small))
    assert np.array_equal(read(tmp_path / "default" / "big.png"), reference_labels(model, big))


def test_batches_hold_one_padded_size_within_the_pixel_budget():
    sizes = {0: (40, 40), 1: (1000, 900), 2: (33, 50), 3: (64, 64), 4: (500, 500), 5: (64, 60)}
    assert plan_batches(sizes, 2, 10**6) == [[0, 2], [3, 5], [4], [1]]
    assert plan_batches(sizes, 4, 64 * 64 * 2) == [[0, 2], [3, 5], [4], [1]]
    assert plan_batches({0: (10, 10)}, 4, 1) == [[0]]  # an image is never left out by the budget


@pytest.mark.slow
def test_bf16_autocast_agrees_with_fp32(exported, model, tmp_path, caplog):
    image = photo(32, 64, 8)
    Image.fromarray(image).save(tmp_path / "p.png")
    with caplog.at_level(logging.INFO, "modaseg"):
        assert run(exported, [tmp_path / "p.png"], tmp_path / "out", "--mixed-precision", "bf16") == 0
    assert "in bf16" in caplog.text
    assert (read(tmp_path / "out" / "p.png") == reference_labels(model, image)).mean() > 0.9
    caplog.clear()
    with caplog.at_level(logging.INFO, "modaseg"):
        assert run(exported, [tmp_path / "p.png"], tmp_path / "auto", "--mixed-precision", "auto") == 0
    assert f"in {resolve_precision('auto', torch.device('cpu')).label}" in caplog.text


def _inputs(tmp_path, *names: str):
    """A folder `in` holding small PNGs with these names (any suffix: the bytes are PNG)."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.fromarray(photo(32, 32, 0)).save(folder / name, format="PNG")
    return folder


def _truncated(exported, tmp_path):
    copy = tmp_path / "truncated"
    shutil.copytree(exported, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    (copy / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes()[:1000])
    return copy


# (case, what to run: (tmp_path, export) -> (inputs, out, checkpoint, extra options), the error names)
REFUSED = [
    ("output over an input", lambda t, e: ([_inputs(t, "p.png")], t / "in", e, []), "overwrite that input"),
    (
        "x.jpg beside x_color.jpg",
        lambda t, e: ([_inputs(t, "x.jpg", "x_color.jpg")], t / "out", e, []),
        "in/x_color.jpg would both write",
    ),
    (
        "x.jpg beside x_overlay.jpg, --out their folder",
        lambda t, e: ([_inputs(t, "x.jpg", "x_overlay.jpg")], t / "in", e, []),
        "would overwrite the input",
    ),
    (
        "one stem in two folders",
        lambda t, e: ([_inputs(t, "x.jpg") / "x.jpg", _inputs(t / "in", "x.png")], t / "out", e, []),
        "would both write",
    ),
    ("missing input", lambda t, e: ([t / "nope.jpg"], t / "out", e, []), "nope.jpg: no such file or folder"),
    ("no images", lambda t, e: ([_inputs(t)], t / "out", e, []), "no images (.bmp"),
    (
        "--batch-size 0",
        lambda t, e: ([_inputs(t, "p.png")], t / "out", e, ["--batch-size", "0"]),
        "at least 1",
    ),
    (
        "--max-pixels 0",
        lambda t, e: ([_inputs(t, "p.png")], t / "out", e, ["--max-pixels", "0"]),
        "between 1",
    ),
    ("--device nonsense", lambda t, e: ([_inputs(t, "p.png")], t / "out", e, ["--device", "gpu7"]), "gpu7"),
    (  # the suite hides every GPU: this option is named, not the training config's (issue 21.11)
        "--device cuda without a GPU",
        lambda t, e: ([_inputs(t, "p.png")], t / "out", e, ["--device", "cuda"]),
        "--device cuda: ",
    ),
    (
        "--device cuda:1 without a GPU",
        lambda t, e: ([_inputs(t, "p.png")], t / "out", e, ["--device", "cuda:1"]),
        "use --device cpu",
    ),
    (
        "missing checkpoint",
        lambda t, e: ([_inputs(t, "p.png")], t / "out", t / "none", []),
        "neither a modaseg",
    ),
    (
        "truncated weights",
        lambda t, e: ([_inputs(t, "p.png")], t / "out", _truncated(e, t), []),
        "SafetensorError",
    ),
    ("--out is a file", lambda t, e: ([_inputs(t, "p.png")], t / "in" / "p.png", e, []), "not a folder"),
    (
        "fp16 on CPU",
        lambda t, e: ([_inputs(t, "p.png")], t / "out", e, ["--mixed-precision", "fp16", "--device", "cpu"]),
        "needs a CUDA device",
    ),
]


def files_under(folder) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_in_one_line_before_anything_is_written(exported, tmp_path, capsys, make, expected):
    inputs, out, checkpoint, extra = make(tmp_path, exported)
    before = files_under(tmp_path)
    assert run(checkpoint, inputs, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("modaseg-predict: error: ") and expected in err.splitlines()[-1]
    assert "Traceback" not in err and "train.device" not in err
    assert files_under(tmp_path) == before


def test_a_full_disk_is_one_line_not_a_traceback(exported, tmp_path):
    """ENOSPC while writing outputs was a raw traceback (issue 21.10)."""
    inputs, out = _inputs(tmp_path, "p.png", "q.png"), tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "modaseg.predict", "--checkpoint", str(exported), str(inputs), "--out",
           str(out), "--device", "cpu"]  # fmt: skip
    result = on_a_small_disk(out, "size=8k", cmd)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"modaseg-predict: error: --out {out}: cannot write ") and "No space left" in last
    assert "images were written before" in last
