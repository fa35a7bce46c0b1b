"""modaseg-export: the save_pretrained layout loads without modaseg, and model.onnx gives PyTorch's logits
for photos of any size (checked here by hand, independently of the exporter's own check)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modaseg.config import load_config, save_config
from modaseg.export import ONNX_NAME, check_onnx, export_onnx_checked, main
from modaseg.model import EXPORT_META, IMAGENET, MEAN, STD, build_model, export_model

pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package (constraints.txt pins it)")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs 'onnxscript' (constraints.txt pins it)")

NAMES = [f"class{i}" for i in range(14)]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    cfg = load_config(None, ["model.encoder=resnet18", "model.decoder_attention=scse"])
    return build_model(cfg.model, len(NAMES)).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The CLI run once, from an export (what training writes as RUN/best), with --onnx."""
    root = tmp_path_factory.mktemp("export")
    export_model(model, root / "best", NAMES, IMAGENET)
    out = root / "out"
    assert main(["--checkpoint", str(root / "best"), "--out", str(out), "--onnx"]) == 0
    return out


def reference_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """What the ONNX graph must compute, written out by hand: uint8 NCHW -> ImageNet normalisation ->
    zero padding (bottom/right) to /32 -> U-Net -> crop back."""
    x = (images.astype(np.float32) / 255 - np.array(MEAN, np.float32)[:, None, None]) / np.array(
        STD, np.float32
    )[:, None, None]
    h, w = images.shape[-2:]
    x = F.pad(torch.from_numpy(x), (0, -w % 32, 0, -h % 32))
    with torch.no_grad():
        return model(x)[:, :, :h, :w].numpy()


def test_save_pretrained_round_trip(exported, model):
    plain = smp.from_pretrained(str(exported)).eval()  # no modaseg involved
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert json.loads((exported / EXPORT_META).read_text())["classes"] == NAMES


def test_onnx_logits_match_torch_on_two_sizes(exported, model):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (constraints.txt pins it)")
    session = ort.InferenceSession(str(exported / ONNX_NAME), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == NAMES
    rng = np.random.default_rng(1)
    for n, h, w in [(1, 96, 64), (2, 70, 45)]:  # the second is not a multiple of 32 either way
        images = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
        out = session.run(["logits"], {"image": images})[0]
        ref = reference_logits(model, images)
        assert out.shape == (n, len(NAMES), h, w)
        # 1e-3: float32, different conv algorithms; measured diffs are ~5e-5 for logits up to ~15
        assert np.abs(out - ref).max() < 1e-3
        assert np.abs(ref).max() > 1  # the comparison is not between two near-zero outputs


def test_documented_usage_on_an_hwc_photo(exported, model):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (constraints.txt pins it)")
    photo = np.random.default_rng(2).integers(0, 256, (50, 37, 3), dtype=np.uint8)  # what PIL gives
    session = ort.InferenceSession(str(exported / ONNX_NAME))
    logits = session.run(None, {"image": np.ascontiguousarray(photo.transpose(2, 0, 1)[None])})[0]
    labels = logits.argmax(1)[0]
    assert labels.shape == (50, 37)
    assert np.array_equal(labels, reference_logits(model, photo.transpose(2, 0, 1)[None]).argmax(1)[0])


def test_reference_evaluator_agrees_without_onnxruntime(exported, model):
    results, runtime = check_onnx(
        exported / ONNX_NAME, model, [(1, 3, 40, 33)], IMAGENET, runtime="reference"
    )
    assert runtime.startswith("onnx.reference")
    assert results[0].ok and results[0].max_abs_logit > 1


class ExportsDifferently(nn.Module):
    """A model whose traced graph differs from its eager forward: the check must catch it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y + 0.01 if torch.compiler.is_exporting() else y


def test_mismatch_is_caught_and_the_file_is_not_kept(tmp_path):
    torch.manual_seed(0)
    results, _ = export_onnx_checked(
        ExportsDifferently().eval(), tmp_path, list("abcd"), IMAGENET, 18, 40, 40
    )
    assert [r.ok for r in results] == [False, False]
    assert all(abs(r.max_abs_diff - 0.01) < 1e-4 for r in results)
    assert not (tmp_path / ONNX_NAME).exists()
    assert (tmp_path / "onnx-mismatch" / ONNX_NAME).is_file()


def test_training_checkpoint_is_exported(tmp_path, model):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-7"
    step.mkdir(parents=True)
    save_config(
        load_config(None, ["model.encoder=resnet18", "model.decoder_attention=scse"]), run / "config.yaml"
    )
    (run / EXPORT_META).write_text(json.dumps({"classes": NAMES}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    assert main(["--checkpoint", str(step), "--out", str(tmp_path / "out")]) == 0
    plain = smp.from_pretrained(str(tmp_path / "out")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert not (tmp_path / "out" / ONNX_NAME).exists()  # only with --onnx


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"--checkpoint .*nowhere: no such folder"):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty is neither a modaseg export .* nor a training checkpoint"):
        main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path, exported):
    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "config.yaml").write_text("keep me")
    with pytest.raises(SystemExit, match="not a modaseg export"):
        main(["--checkpoint", str(exported), "--out", str(precious)])
    assert (precious / "config.yaml").read_text() == "keep me"


def test_opset_below_the_exporters_minimum_is_refused(tmp_path, exported):
    with pytest.raises(SystemExit, match="--opset 17"):
        main(["--checkpoint", str(exported), "--out", str(tmp_path / "out"), "--onnx", "--opset", "17"])
    assert not (tmp_path / "out").exists()
