"""The model stage: an SMP U-Net, its input normalisation, and padding to the U-Net's stride.

Images travel from the loader as uint8 (4x smaller host->device copies) and are normalised on the
device by `preprocess`; the same function serves training, evaluation, prediction and export users.
"""

from __future__ import annotations

import os
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from modaseg.config import ModelConfig

STRIDE = 32  # a 5-stage encoder halves the resolution 5 times
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, the convention of every SMP encoder
STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained encoder weights were asked for but cannot be had."""


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """SMP U-Net with `num_classes` outputs. `cfg.encoder_weights`: null (random init), "imagenet"
    (SMP's hub download; fails clearly offline) or a local file with the encoder's state dict."""
    weights = cfg.encoder_weights
    if weights in (None, "", "null", "none"):
        model = _unet(cfg, num_classes, None)
    elif weights == "imagenet":
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise WeightsError(
                "model.encoder_weights=imagenet needs a download, but HF_HUB_OFFLINE=1 (modaseg's offline "
                "default). Set model.encoder_weights=null for random init, give a local file "
                "(model.encoder_weights=/path/encoder.pth), or export HF_HUB_OFFLINE=0 on a machine with network."
            )
        try:
            model = _unet(cfg, num_classes, "imagenet")
        except OSError as e:  # includes connection errors raised by the hub client
            raise WeightsError(
                f"model.encoder_weights=imagenet: could not fetch weights for {cfg.encoder} ({e}). "
                "Use model.encoder_weights=null or a local file path."
            ) from e
    else:
        model = _unet(cfg, num_classes, None)
        load_encoder_weights(model, weights)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _unet(cfg: ModelConfig, num_classes: int, weights: str | None) -> nn.Module:
    return smp.Unet(
        encoder_name=cfg.encoder,
        encoder_weights=weights,
        decoder_attention_type=cfg.decoder_attention,
        classes=num_classes,
    )


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local encoder state dict (.safetensors, or a torch file read with weights_only=True).
    Keys may carry an `encoder.` prefix (a whole-U-Net checkpoint) or none (a bare backbone)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"model.encoder_weights={path}: no such file (use null, 'imagenet' or a file path)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # classifier head, unused
    missing = sorted(set(model.encoder.state_dict()) - set(state))
    if missing:
        raise WeightsError(
            f"model.encoder_weights={path}: {len(missing)} encoder weights missing (first: {missing[:3]}); "
            "is it a state dict of the configured model.encoder?"
        )
    model.encoder.load_state_dict(state)


def preprocess(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,3,H,W] on any device -> float32 normalised with ImageNet statistics."""
    x = images.float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def pad_to_stride(x: torch.Tensor, value: float, stride: int = STRIDE) -> torch.Tensor:
    """Pad the last two dims (bottom/right) up to a multiple of `stride`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph == 0 and pw == 0:
        return x
    if x.dim() == 3:
        return F.pad(x.unsqueeze(1), (0, pw, 0, ph), value=value).squeeze(1)
    return F.pad(x, (0, pw, 0, ph), value=value)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """Logits for a normalised batch whose sides are multiples of the stride; optional flip TTA
    averages the softmax-free logits of the image and its horizontal mirror."""
    logits = model(x)
    if tta_flip:
        logits = (logits + model(x.flip(-1)).flip(-1)) / 2
    return logits


EXPORT_META = "modaseg.json"


def is_export(path: str | Path) -> bool:
    """A folder written by `export_model`: SMP's config.json plus modaseg.json."""
    return (Path(path) / "config.json").is_file() and (Path(path) / EXPORT_META).is_file()


def export_model(
    model: nn.Module, out_dir: str | Path, class_names: list[str], metrics: dict | None = None
) -> Path:
    """Save in SMP's `save_pretrained` layout (config.json + model.safetensors), loadable without
    modaseg by `segmentation_models_pytorch.from_pretrained(out_dir)`, plus `modaseg.json` (class names
    and the input normalisation). Written to a temporary folder and renamed: never half an export."""
    import json
    import shutil

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not is_export(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a modaseg export: refusing to replace it")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), metrics=metrics)
    meta = {
        "classes": list(class_names),
        "mean": MEAN,
        "std": STD,
        "stride": STRIDE,
        "input": "RGB uint8 / 255",
    }
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, list[str]]:
    """Load an export (`RUN/best`, `RUN/final`) or a training checkpoint (`RUN/checkpoints/step-N`,
    whose run folder holds config.yaml and modaseg.json). Returns the model in eval mode and the class names."""
    import json

    from safetensors.torch import load_file

    from modaseg.config import load_config

    path = Path(path).resolve()
    if is_export(path):
        model = smp.from_pretrained(str(path))
        names = json.loads((path / EXPORT_META).read_text())["classes"]
    elif (path / "model.safetensors").is_file() and (path.parents[1] / "config.yaml").is_file():
        run = path.parents[1]
        names = json.loads((run / EXPORT_META).read_text())["classes"]
        cfg = load_config(run / "config.yaml")
        cfg.model.encoder_weights = None
        model = build_model(cfg.model, len(names))
        state = load_file(str(path / "model.safetensors"))  # keys of a compiled run start with _orig_mod.
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    else:
        raise FileNotFoundError(
            f"{path} is neither a modaseg export (config.json + {EXPORT_META}) nor a training checkpoint "
            "(model.safetensors inside RUN/checkpoints/ with RUN/config.yaml)"
        )
    return model.to(device).eval(), names
