"""Pictures for people: colours from the fixed palette, overlays that leave the background alone."""

from __future__ import annotations

import numpy as np
import pytest

from modaseg.classes import IGNORE_COLOR, IGNORE_INDEX, palette
from modaseg.visualize import colorize, overlay, side_by_side


def test_colorize_uses_the_palette_and_white_for_ignore():
    labels = np.array([[0, 1, 2], [13, IGNORE_INDEX, 1]], np.uint8)
    colours = colorize(labels, 14)
    assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
    assert [tuple(c) for c in colours[0]] == [tuple(palette(14)[i]) for i in (0, 1, 2)]
    assert tuple(colours[1, 0]) == tuple(palette(14)[13]) and tuple(colours[1, 1]) == tuple(IGNORE_COLOR)
    assert np.array_equal(colorize(labels.astype(np.int64), 14), colours)


def test_colorize_refuses_labels_that_would_wrap():
    with pytest.raises(ValueError, match="outside 0..255"):
        colorize(np.array([[256]], np.int64), 14)  # as uint8 it would be 0: drawn as background


def test_overlay_blends_classes_and_leaves_background_and_ignore_untouched():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 3], [IGNORE_INDEX, 3]], np.uint8)
    out = overlay(image, labels, 14, alpha=0.5)
    assert (out[0, 0] == 100).all() and (out[1, 0] == 100).all()
    expected = ((np.float32(100) + np.array(palette(14)[3], np.float32)) / 2).astype(np.uint8)
    assert np.array_equal(out[0, 1], expected) and np.array_equal(out[1, 1], expected)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, labels[:1], 14)


def test_side_by_side_is_top_aligned_with_white_gaps():
    a, b = np.zeros((3, 2, 3), np.uint8), np.full((1, 4, 3), 9, np.uint8)
    out = side_by_side(a, b, gap=1)
    assert out.shape == (3, 7, 3)
    assert (out[:, :2] == 0).all() and (out[:, 2] == 255).all()
    assert (out[0, 3:] == 9).all() and (out[1:, 3:] == 255).all()
