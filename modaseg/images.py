"""One decoder for every stage: training, evaluation and prediction see the same pixels of a photo.

OpenCV decodes JPEG and PNG in every mode (grey, RGB, RGBA, CMYK, 16 bit scaled to 8) to RGB uint8; label
maps must be single-channel 8-bit PNGs and are never converted.
"""

from __future__ import annotations

import cv2
import numpy as np


def decode_image(data: bytes) -> np.ndarray:
    """Encoded JPEG or PNG (grey, RGB, RGBA, CMYK, 16 bit) -> HxWx3 uint8 RGB. EXIF orientation is not
    applied: the label map was drawn on the stored pixel grid."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError("image bytes do not decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_mask(data: bytes) -> np.ndarray:
    """Single-channel 8-bit PNG -> HxW uint8; anything else is an error, never a silent conversion."""
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError("label map bytes do not decode")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"label map is {mask.dtype} with shape {mask.shape}, expected single-channel uint8")
    return mask
