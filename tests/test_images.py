"""modaseg.images: the one decoder of every stage, and the guarded reading of files a user names
(measured from the header before anything is decoded; only regular files opened)."""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from modaseg.images import (
    MAX_PIXELS_CEILING,
    ImageFileError,
    decode_image,
    decode_mask,
    encode_image,
    exif_orientation,
    image_size,
    orient,
    read_image,
)


def pil_bytes(image: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    """Encoded by PIL, independently of the OpenCV decoder under test."""
    buf = io.BytesIO()
    (Image.fromarray(image).convert(mode) if mode else Image.fromarray(image)).save(
        buf, format=fmt, quality=95
    )
    return buf.getvalue()


def oriented(image: np.ndarray, fmt: str, orientation: int) -> bytes:
    """`image` as stored pixels, encoded by PIL with an EXIF Orientation tag (as a phone writes it)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(image).save(
        buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {})
    )
    return buf.getvalue()


def claiming(data: bytes, height: int, width: int) -> bytes:
    """A small JPEG or PNG whose header claims another size (the pixel data stays the small one's)."""
    if data.startswith(b"\x89PNG"):
        ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_image_any_jpeg_mode_to_rgb(mode):
    image = np.zeros((16, 24, 3), np.uint8)
    image[:, 12:] = (200, 40, 40)
    out = decode_image(pil_bytes(image, "JPEG", mode))
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    reference = np.asarray(Image.open(io.BytesIO(pil_bytes(image, "JPEG", mode))).convert("RGB"))
    assert np.abs(out.astype(int) - reference).max() <= 2


def test_decode_image_png_bytes_in_jpg_field():
    image = np.random.default_rng(0).integers(0, 255, (10, 12, 4), dtype=np.uint8)  # RGBA PNG source
    out = decode_image(pil_bytes(image, "PNG"))
    assert np.array_equal(out, image[..., :3])
    with pytest.raises(ValueError, match="do not decode"):
        decode_image(b"not an image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil(tmp_path, fmt, orientation):
    """Every stage sees the photo as displayed (a phone's Orientation=6 is stored sideways), and the
    header size agrees; `orient` turns a label map exactly as PIL's exif_transpose turns the photo."""
    yy, xx = np.mgrid[0:24, 0:40]  # smooth, so OpenCV's and PIL's JPEG decoders agree within 2 levels
    image = np.stack([xx * 6, yy * 10, (xx + yy) * 4], -1).astype(np.uint8)
    data = oriented(image, fmt, orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    out = decode_image(data)
    assert exif_orientation(data) == orientation
    assert out.shape == expected.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
    assert np.abs(out.astype(int) - expected).max() <= (2 if fmt == "JPEG" else 0)
    (tmp_path / "photo").write_bytes(data)
    assert image_size(tmp_path / "photo") == out.shape[:2]
    assert np.array_equal(read_image(tmp_path / "photo"), out)
    label = np.arange(24 * 40, dtype=np.uint16).reshape(24, 40) % 251
    label_png = Image.open(io.BytesIO(oriented(label.astype(np.uint8), "PNG", orientation)))
    assert np.array_equal(
        orient(label.astype(np.uint8), orientation), np.asarray(ImageOps.exif_transpose(label_png))
    )


def test_a_broken_or_odd_exif_block_shows_the_photo_as_stored():
    image = np.full((6, 10, 3), 90, np.uint8)
    for data in (
        oriented(image, "JPEG", 9),  # out of range
        pil_bytes(image, "JPEG").replace(b"\xff\xd8", b"\xff\xd8\xff\xe1\x00\x0aExif\x00\x00II", 1),
    ):
        assert exif_orientation(data) == 1 and decode_image(data).shape == (6, 10, 3)


def test_decode_mask_single_channel_only():
    mask = np.array([[0, 1, 13], [255, 2, 0]], np.uint8)
    assert np.array_equal(decode_mask(pil_bytes(mask, "PNG")), mask)
    with pytest.raises(ValueError, match="single-channel"):
        decode_mask(pil_bytes(np.stack([mask] * 3, -1), "PNG"))  # an RGB "label map"


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_decodes_to_its_8_bit_pixels(channels):
    """x * 257 is x on a 16-bit scale: PIL's convert("RGB") clips a 16-bit grey PNG to white instead."""
    image = np.random.default_rng(1).integers(0, 256, (9, 13, channels), dtype=np.uint8).squeeze()
    ok, png16 = cv2.imencode(".png", image.astype(np.uint16) * 257)
    expected = np.stack([image] * 3, -1) if channels == 1 else image[..., ::-1]  # cv2 wrote BGR
    assert ok and np.array_equal(decode_image(png16.tobytes()), expected)


@pytest.mark.parametrize(
    ("fmt", "height", "width", "max_pixels", "expected"),
    [
        ("JPEG", 9000, 12000, MAX_PIXELS_CEILING, (9000, 12000)),  # 108 MP: measured, not decoded
        ("PNG", 3, 70000, 10**6, (3, 70000)),
        ("JPEG", 20000, 20000, MAX_PIXELS_CEILING, f"more than {MAX_PIXELS_CEILING} pixels"),
        ("PNG", 6000, 7000, 40_000_000, "6000 = 42000000 pixels, over the limit of 40000000"),
        ("PNG", 0, 5, 100, "not an image"),
    ],
)
def test_size_comes_from_the_header(tmp_path, fmt, height, width, max_pixels, expected):
    path = tmp_path / "photo"
    path.write_bytes(claiming(pil_bytes(np.zeros((8, 8, 3), np.uint8), fmt), height, width))
    if isinstance(expected, tuple):
        assert image_size(path, max_pixels) == expected
    else:
        for read in (image_size, read_image):
            with pytest.raises(ImageFileError, match=expected):
                read(path, max_pixels)


def test_only_regular_image_files_are_read(tmp_path):
    (tmp_path / "photo.png").write_bytes(pil_bytes(np.full((5, 6, 3), 7, np.uint8), "PNG"))
    assert read_image(tmp_path / "photo.png").shape == (5, 6, 3)
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it for reading the ordinary way blocks forever
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "notes.jpg").write_text("not an image")
    with open(tmp_path / "sparse.png", "wb") as f:  # a 10x10 header followed by 100 MB (sparse: no disk)
        f.write(pil_bytes(np.zeros((10, 10, 3), np.uint8), "PNG"))
        f.truncate(100 << 20)
    cases = {
        "fifo.jpg": "not a regular file",
        "folder.png": "not a regular file",
        "notes.jpg": "not an image",
    }
    for name, why in {**cases, "sparse.png": "104857600 bytes, more than any image of at most 100"}.items():
        with pytest.raises(ImageFileError, match=why):
            read_image(tmp_path / name, max_pixels=100)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_encode_image_round_trip():
    rng = np.random.default_rng(2)
    grey, rgb = rng.integers(0, 256, (7, 5), dtype=np.uint8), rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(grey, ".png")))), grey)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(rgb, ".png")))), rgb)
    smooth = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], 16, 0).repeat(3, 2)
    jpeg = np.asarray(Image.open(io.BytesIO(encode_image(smooth, ".jpg", quality=95))))
    assert jpeg.shape == smooth.shape and np.abs(jpeg.astype(int) - smooth).mean() < 2
