"""Training augmentation (albumentations 2.x) that never invents a label.

Geometry touches the label map only through nearest-neighbour sampling, and what falls outside the
photo becomes the ignore label (255) while the image gets 0, so the loss never learns "padding is
background". Photometric transforms are image-only. Everything random is drawn from the state set with
`seed_transform`: the data stream derives it from (seed, epoch, rank, worker).
"""

from __future__ import annotations

import os
import random
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # otherwise the import tries the network

import albumentations as A
import cv2
import numpy as np

from modaseg.classes import IGNORE_INDEX
from modaseg.config import AugmentConfig


class ScaleCropPad(A.DualTransform):
    """Random scale, then a random (height, width) window of the scaled photo, padded where the scaled
    photo is smaller than the window.

    Only the source region that lands in the window is resized (one cv2.resize per target) instead of
    resizing the whole photo and cropping it (RandomScale + PadIfNeeded + RandomCrop): about 3x cheaper
    when the window is smaller than the photo. Scales are relative to the original resolution (or to the
    model's working resolution, `long_side`), as evaluation sees it. Images: bilinear (area averaging when
    shrinking 2x or more), padded with `fill`; masks:
    INTER_NEAREST_EXACT (the same half-pixel-centre mapping as the bilinear image resize, so both stay
    aligned), padded with `fill_mask`.
    """

    def __init__(
        self,
        height: int,
        width: int,
        scale_range: tuple[float, float] = (0.75, 1.25),
        fill: int = 0,
        fill_mask: int = IGNORE_INDEX,
        long_side: int | None = None,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        if height <= 0 or width <= 0:
            raise ValueError(f"ScaleCropPad: output size {height}x{width} must be positive")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"ScaleCropPad: scale_range {scale_range} needs 0 < min <= max")
        self.height = height
        self.width = width
        self.scale_range = tuple(scale_range)
        self.fill = fill
        self.fill_mask = fill_mask
        self.long_side = long_side

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        s = self.py_random.uniform(*self.scale_range)
        if self.long_side is not None:  # scales are relative to the model's working resolution
            s *= self.long_side / max(h, w)
        src_y, src_h, dst_y, dst_h = self._axis(h, self.height, s)
        src_x, src_w, dst_x, dst_w = self._axis(w, self.width, s)
        return {"region": (src_y, src_x, src_h, src_w), "placement": (dst_y, dst_x, dst_h, dst_w)}

    def _axis(self, size: int, window: int, s: float) -> tuple[int, int, int, int]:
        """(source start, source length, window start, window length) along one axis: a random part of
        the photo fills the window when the scaled photo is larger, otherwise the whole photo lands at
        a random position inside the window."""
        if size * s >= window:
            src_len = max(1, min(size, round(window / s)))
            return self.py_random.randint(0, size - src_len), src_len, 0, window
        dst_len = max(1, round(size * s))
        return 0, size, self.py_random.randint(0, window - dst_len), dst_len

    def _warp(self, x: np.ndarray, region, placement, interpolation: int, fill: int) -> np.ndarray:
        sy, sx, sh, sw = region
        dy, dx, dh, dw = placement
        out = cv2.resize(x[sy : sy + sh, sx : sx + sw], (dw, dh), interpolation=interpolation)
        if (dh, dw) == (self.height, self.width):
            return out
        canvas = np.full((self.height, self.width, *x.shape[2:]), fill, dtype=x.dtype)
        canvas[dy : dy + dh, dx : dx + dw] = out.reshape(dh, dw, *x.shape[2:])
        return canvas

    def apply(self, img: np.ndarray, region, placement, **params: Any) -> np.ndarray:
        # Shrinking by 2x or more (a photo brought to the model's working resolution) averages areas, as
        # evaluation's antialiased resize does; otherwise bilinear.
        shrink = placement[2] * 2 <= region[2] and placement[3] * 2 <= region[3]
        return self._warp(img, region, placement, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR, self.fill)

    def apply_to_mask(self, mask: np.ndarray, region, placement, **params: Any) -> np.ndarray:
        return self._warp(mask, region, placement, cv2.INTER_NEAREST_EXACT, self.fill_mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "scale_range", "fill", "fill_mask", "long_side")


def train_transform(aug: AugmentConfig, height: int, width: int, long_side: int | None = None) -> A.Compose:
    """Scale + crop/pad to (height, width), horizontal flip, lighting jitter, optional blur and
    noise. Geometry comes first so the photometric transforms only touch the (smaller) window. Scales are
    relative to the photo brought to `long_side` pixels on its long side (None: its own resolution)."""
    transforms: list[A.BasicTransform] = [
        ScaleCropPad(
            height, width, (aug.scale_min, aug.scale_max), fill=0, fill_mask=IGNORE_INDEX, long_side=long_side
        ),
        A.HorizontalFlip(p=aug.hflip_p),  # ModaNet's classes have no left/right variants
    ]
    if aug.color_jitter_p > 0:
        # Lighting jitter as byte lookup tables (~0.03 ms each on a 576x384 window). ColorJitter's
        # saturation and hue cost ~1.4 ms there, as much as decoding the JPEG, so they are left out.
        lighting = [A.RandomBrightnessContrast(0.25, 0.25, p=1.0), A.RandomGamma((80, 125), p=1.0)]
        transforms.append(A.Sequential(lighting, p=aug.color_jitter_p))
    if aug.blur_p > 0:
        transforms.append(A.GaussianBlur(blur_limit=(3, 5), p=aug.blur_p))
    if aug.noise_p > 0:
        transforms.append(A.GaussNoise(std_range=(0.02, 0.06), p=aug.noise_p))
    return A.Compose(transforms, p=1.0)


def seed_transform(transform: A.Compose, seed: int) -> None:
    """One random stream shared by all transforms of `transform`.

    `Compose(seed=...)` / `set_random_seed` start every transform's generator from the SAME seed
    (albumentations 2.0.8): their draws are the same sequence at different offsets, and right after
    seeding, flip and colour jitter (equal probabilities) are applied together or not at all.
    """
    rng = random.Random(seed)
    transform.set_random_state(np.random.default_rng(rng.getrandbits(64)), rng)
