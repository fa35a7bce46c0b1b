"""modaseg-predict: any image size, label maps cropped back to the image, unreadable files reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modaseg.classes import MODANET
from modaseg.config import ModelConfig
from modaseg.model import IMAGENET, build_model, export_model
from modaseg.predict import find_images, main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18"), MODANET.num_classes).eval()
    return export_model(model, tmp_path_factory.mktemp("model") / "export", list(MODANET.names), IMAGENET)


def test_predict_any_size_and_carry_on_after_bad_files(exported, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (96, 64), "b": (70, 50), "c": (33, 129)}  # (h, w), not multiples of 32
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(inputs / f"{name}.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(inputs / "gray.png")
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inputs / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(exported), str(inputs), "--out", str(out), "--batch-size", "2"]) == 0
    for name, (h, w) in {**sizes, "gray": (40, 40)}.items():
        labels = np.asarray(Image.open(out / f"{name}.png"))
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < MODANET.num_classes
        assert Image.open(out / f"{name}_color.png").size == (w, h)
        assert (out / f"{name}_overlay.jpg").is_file()
    assert not (out / "broken.png").exists()
    assert "cannot read" in caplog.text and "broken.jpg" in caplog.text


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        find_images([str(tmp_path / "nope.jpg")])


def test_inputs_that_would_overwrite_each_other_are_refused(exported, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / folder / "x.jpg")
    with pytest.raises(SystemExit, match="same outputs"):
        main(
            [
                "--checkpoint",
                str(exported),
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
