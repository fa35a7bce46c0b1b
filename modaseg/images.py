"""One decoder for every stage: training, evaluation and prediction see the same pixels of a photo.

OpenCV decodes JPEG and PNG in every mode (grey, RGB, RGBA, CMYK, 16 bit scaled to 8) to RGB uint8; label
maps must be single-channel 8-bit PNGs and are never converted. A photo is always seen as displayed: its
EXIF orientation (a phone's Orientation=6 photo is stored sideways) is applied here, once, by `orient`,
which the sharder also applies to label maps drawn on the stored pixel grid, so a shard's label map is in
the displayed orientation of its (verbatim stored) photo. Files named by a user (modaseg-predict)
are measured from their header before anything is decoded, so one huge photo is refused instead of
exhausting memory, and only regular files are opened (a FIFO named photo.jpg would block forever).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: more than any phone photo, about 4 GB of fp32 U-Net activations
# Above this PIL refuses to read even the header (its decompression-bomb error): the largest usable limit.
MAX_PIXELS_CEILING = 2 * Image.MAX_IMAGE_PIXELS
# The most bytes any file may hold per allowed pixel (uncompressed 32-bit float RGBA TIFF) plus metadata
# (EXIF, ICC profiles, embedded previews): a larger file is refused before it is read into memory.
BYTES_PER_PIXEL = 16
METADATA_BYTES = 64 << 20


EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5..8 swap the axes: the displayed image is the stored one turned by 90 degrees.
SWAPS_AXES = frozenset({5, 6, 7, 8})
# Only the first 64 KiB are searched for EXIF (a JPEG APP1 segment opening with "Exif\0\0", a PNG eXIf
# chunk before the pixel data): every reader (decoder, header check, sharder) sees the same orientation,
# and bytes without either marker skip PIL's header parse (the training hot path).
_EXIF_MARKERS = (b"Exif\0\0", b"eXIf")
_EXIF_SCAN_BYTES = 1 << 16


class ImageFileError(ValueError):
    """A file that cannot be predicted: not a regular file, not an image, or over the pixel limit."""


def exif_orientation(data: bytes) -> int:
    """The EXIF Orientation (1..8) of encoded image bytes; 1 when absent, unreadable or out of range."""
    head = bytes(data[:_EXIF_SCAN_BYTES])
    if not any(marker in head for marker in _EXIF_MARKERS):
        return 1
    try:
        with Image.open(io.BytesIO(head)) as im:  # parses the header only, never the pixels
            raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not lose a photo: it is shown as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixel grid `array` (HxW or HxWxC) turned as EXIF `orientation` says it is displayed
    (the transforms of PIL's ImageOps.exif_transpose), C-contiguous."""
    a = array
    if orientation in (2, 3, 7, 8):  # mirrored left-right (3, 7: also top-bottom; 8: then transposed)
        a = a[:, ::-1]
    if orientation in (3, 4, 6, 7):
        a = a[::-1]
    if orientation in SWAPS_AXES:
        a = a.swapaxes(0, 1)
    return np.ascontiguousarray(a) if a is not array else array


def displayed_size(height: int, width: int, orientation: int) -> tuple[int, int]:
    """(height, width) as displayed, of a stored grid of (height, width) with EXIF `orientation`."""
    return (width, height) if orientation in SWAPS_AXES else (height, width)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded JPEG or PNG (grey, RGB, RGBA, CMYK, 16 bit) -> HxWx3 uint8 RGB as displayed: EXIF
    orientation applied, the same way for every stage (OpenCV's own EXIF handling covers JPEG only)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError("image bytes do not decode")
    return orient(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), exif_orientation(data))


def decode_mask(data: bytes) -> np.ndarray:
    """Single-channel 8-bit PNG -> HxW uint8; anything else is an error, never a silent conversion."""
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError("label map bytes do not decode")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"label map is {mask.dtype} with shape {mask.shape}, expected single-channel uint8")
    return mask


def encode_image(image: np.ndarray, suffix: str, quality: int = 90) -> bytes:
    """HxW (grey) or HxWx3 (RGB) uint8 -> the bytes of a `.png` or `.jpg` file, through the same library
    that decodes."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(suffix, image, [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix == ".jpg" else [])
    if not ok:
        raise ValueError(f"cannot encode a {image.dtype} {image.shape} image as {suffix}")
    return data.tobytes()


def _open_regular(path: Path):
    """`path` opened for reading if it is a regular file (opened without blocking, then checked)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageFileError("not a regular file")
    return os.fdopen(fd, "rb")


def _header_size(f, max_pixels: int) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the header of the open file `f`;
    nothing is decoded."""
    size = os.fstat(f.fileno()).st_size
    if size > BYTES_PER_PIXEL * max_pixels + METADATA_BYTES:
        raise ImageFileError(f"{size} bytes, more than any image of at most {max_pixels} pixels holds")
    try:
        with warnings.catch_warnings():  # PIL warns above 89 MP; the limit here is max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                width, height = img.size
    except Image.DecompressionBombError as e:
        raise ImageFileError(f"more than {MAX_PIXELS_CEILING} pixels (limit {max_pixels})") from e
    except Exception as e:  # PIL's format parsers raise many types for a file that is not an image
        raise ImageFileError(f"not an image ({type(e).__name__}: {e})") from e
    if height < 1 or width < 1 or height * width > max_pixels:
        raise ImageFileError(f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    f.seek(0)
    return displayed_size(height, width, exif_orientation(f.read(_EXIF_SCAN_BYTES)))


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the image file at `path` as displayed, read from its header alone. ImageFileError when it is
    not a regular image file or has more than `max_pixels` pixels; OSError when it cannot be opened."""
    with _open_regular(Path(path)) as f:
        return _header_size(f, max_pixels)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image file at `path` as HxWx3 uint8 RGB, decoded by `decode_image` after its header showed at
    most `max_pixels` pixels. Raises ImageFileError (or OSError) like `image_size`."""
    with _open_regular(Path(path)) as f:
        _header_size(f, max_pixels)
        f.seek(0)
        return decode_image(f.read())
