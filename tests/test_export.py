"""modaseg-export: the save_pretrained layout loads without modaseg, and model.onnx gives PyTorch's logits
for photos of any size (checked here by hand, independently of the exporter's own check)."""

from __future__ import annotations

import json
import re
import shutil

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

pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package (in the dev extra)")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs 'onnxscript' (in the dev extra)")

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


@pytest.mark.slow
def test_onnx_logits_match_torch_on_two_sizes(exported, model):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (in the dev extra)")
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


@pytest.mark.slow
def test_documented_usage_on_an_hwc_photo(exported, model):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (in the dev extra)")
    photo = np.random.default_rng(2).integers(0, 256, (50, 37, 3), dtype=np.uint8)  # what PIL gives
    session = ort.InferenceSession(str(exported / ONNX_NAME))
    logits = session.run(None, {"image": np.ascontiguousarray(photo.transpose(2, 0, 1)[None])})[0]
    labels = logits.argmax(1)[0]
    assert labels.shape == (50, 37)
    assert np.array_equal(labels, reference_logits(model, photo.transpose(2, 0, 1)[None]).argmax(1)[0])


@pytest.mark.slow
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


@pytest.mark.slow
def test_mismatch_is_caught_and_the_file_is_not_kept(tmp_path):
    torch.manual_seed(0)
    results, _ = export_onnx_checked(
        ExportsDifferently().eval(), tmp_path, list("abcd"), IMAGENET, 18, 40, 40
    )
    assert [r.ok for r in results] == [False, False]
    assert all(abs(r.max_abs_diff - 0.01) < 1e-4 for r in results)
    assert not (tmp_path / ONNX_NAME).exists()
    assert (tmp_path / "onnx-mismatch" / ONNX_NAME).is_file()


@pytest.mark.slow
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


@pytest.mark.slow
def test_reexport_keeps_weights_classes_and_metrics(model, tmp_path, capsys):
    """Into itself (RUN/best -> RUN/best) and elsewhere, from an export that keeps its metrics in
    modaseg.json and from an older one that has them only in SMP's README model card."""
    best, copy = tmp_path / "best", tmp_path / "copy"
    metrics = {"val_miou": 0.25, "epoch": 3}
    export_model(model, best, NAMES, IMAGENET, metrics=metrics)
    meta = json.loads((best / EXPORT_META).read_text())
    del meta["metrics"]  # as written before modaseg.json held them
    (best / EXPORT_META).write_text(json.dumps(meta))
    for source, out in [(best, best), (best, copy), (copy, copy)]:
        assert main(["--checkpoint", str(source), "--out", str(out)]) == 0
        assert "metrics kept: val_miou, epoch" in capsys.readouterr().out
        assert json.loads((out / EXPORT_META).read_text())["metrics"] == metrics
        assert json.loads((out / EXPORT_META).read_text())["classes"] == NAMES
        assert '"val_miou": 0.25' in (out / "README.md").read_text()
        plain = smp.from_pretrained(str(out)).eval()  # no modaseg involved
        x = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            assert torch.equal(plain(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "copy"]  # no temporary folder left


def _truncated(tmp_path, exported):
    copy = tmp_path / "truncated"
    shutil.copytree(exported, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    (copy / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes()[:1000])
    return copy


def _folder_with(name: str, content: str):
    def make(tmp_path, exported):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
        return tmp_path / name

    return make


# (case, (tmp_path, export) -> (checkpoint, out, extra options), what the one line says)
REFUSED = [
    (
        "missing checkpoint",
        lambda t, e: (t / "nowhere", t / "out", []),
        r"--checkpoint .*nowhere: no such folder",
    ),
    (
        "checkpoint a folder of something else",
        lambda t, e: (_folder_with("other/notes.txt", "")(t, e).parent, t / "out", []),
        r"other is neither a modaseg export .* nor a training checkpoint",
    ),
    ("truncated weights", lambda t, e: (_truncated(t, e), t / "out", []), "SafetensorError"),
    (
        "--out a folder that is not an export",
        lambda t, e: (e, _folder_with("run/config.yaml", "keep me")(t, e).parent, []),
        "not a modaseg export",
    ),
    ("--out a file", lambda t, e: (e, _folder_with("out.txt", "keep me")(t, e), []), "not a modaseg export"),
    ("--opset 17", lambda t, e: (e, t / "out", ["--onnx", "--opset", "17"]), "--opset 17"),
    ("--height 1", lambda t, e: (e, t / "out", ["--onnx", "--height", "1"]), "must be at least 2x2"),
]


@pytest.mark.slow  # its fixture runs the export CLI with --onnx once (~30 s)
@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_in_one_line_before_anything_is_written(exported, tmp_path, capsys, make, expected):
    checkpoint, out, extra = make(tmp_path, exported)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("modaseg-export: error: ")
    assert re.search(expected, err.splitlines()[-1]) and "Traceback" not in err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


@pytest.mark.slow
def test_onnx_with_a_working_resolution_resizes_inside_the_graph(tmp_path, model):
    """model.input_long_side: the graph brings the photo to the working resolution and the logits back,
    and the export check compares it with modaseg's own inference path on two sizes."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (in the dev extra)")
    results, _ = export_onnx_checked(model, tmp_path, NAMES, IMAGENET, 18, 70, 50, long_side=48)
    assert all(r.ok and r.argmax_agreement == 1.0 for r in results), [r.line() for r in results]
    assert (tmp_path / ONNX_NAME).is_file()


def test_reexport_onto_itself_without_onnx_keeps_model_onnx(exported, tmp_path, capsys):
    """RUN/best -> RUN/best without --onnx deleted model.onnx (issue 21.12); onto another export its
    model.onnx belongs to other weights: dropped, and said."""
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(exported, same)
    shutil.copytree(exported, other)
    graph = (same / ONNX_NAME).read_bytes()
    assert main(["--checkpoint", str(same), "--out", str(same)]) == 0
    assert (same / ONNX_NAME).read_bytes() == graph
    assert f"{ONNX_NAME} kept (same weights)" in capsys.readouterr().out
    assert main(["--checkpoint", str(same), "--out", str(other)]) == 0
    assert (
        not (other / ONNX_NAME).exists()
        and f"the {ONNX_NAME} of the export replaced" in capsys.readouterr().out
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "same"]  # nothing set aside is left
