"""Pictures for people: colour masks, overlays with a legend, the confusion-matrix heatmap, IoU bars.

Shared by training (TensorBoard), evaluation (PNG reports) and prediction (per-image outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from modaseg.classes import IGNORE_COLOR, IGNORE_INDEX, palette


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label map [H,W] -> RGB [H,W,3] with the fixed palette (ignore in white). Values of a wider integer
    type must lie in 0..255: 256 would wrap to background and be drawn as such, so it is refused."""
    if labels.dtype != np.uint8 and labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels {labels.min()}..{labels.max()} outside 0..255 cannot be drawn")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:num_classes] = np.array(palette(num_classes), dtype=np.uint8)
    lut[IGNORE_INDEX] = IGNORE_COLOR
    return lut[labels.astype(np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask over the photo; background pixels keep the photo untouched."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colour = colorize(labels, num_classes).astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels != 0) & (labels != IGNORE_INDEX)
    out[fg] = (1 - alpha) * out[fg] + alpha * colour[fg]
    return out.clip(0, 255).astype(np.uint8)


def legend(class_names: Sequence[str], present: Sequence[int] | None = None, row: int = 16) -> np.ndarray:
    """A small RGB legend image listing the classes (only `present` ones when given)."""
    labels = list(present) if present is not None else list(range(len(class_names)))
    colours = palette(len(class_names))
    img = Image.new("RGB", (150, row * max(len(labels), 1) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, label in enumerate(labels):
        y = 2 + i * row
        draw.rectangle([4, y + 2, 4 + row - 4, y + row - 2], fill=colours[label], outline=(0, 0, 0))
        draw.text((row + 6, y + 2), f"{label} {class_names[label]}", fill=(0, 0, 0))
    return np.asarray(img)


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate RGB panels horizontally (top-aligned, white gaps), e.g. image | truth | prediction."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]):
    """Row-normalised confusion matrix heatmap (rows: ground truth) as a matplotlib Figure."""
    import matplotlib

    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.55 * n + 2.5, 0.55 * n + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for i in range(n):
        for j in range(n):
            if norm[i, j] >= 0.005:
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix (row-normalised)")
    fig.tight_layout()
    return fig


def iou_bar_figure(ious: Sequence[float], class_names: Sequence[str]):
    """Per-class IoU bar chart; NaN (class absent) bars are left empty and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.nan_to_num(np.asarray(ious, dtype=np.float64), nan=0.0)
    fig, ax = plt.subplots(figsize=(0.5 * len(class_names) + 2, 3.5))
    ax.bar(
        range(len(values)),
        values,
        color=[np.array(c) / 255 for c in palette(len(class_names))],
        edgecolor="black",
    )
    for i, v in enumerate(ious):
        ax.text(
            i, (0 if np.isnan(v) else v) + 0.01, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", fontsize=7
        )
    ax.set_xticks(range(len(values)), class_names, rotation=60, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IoU")
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib Figure to an RGB uint8 array (for TensorBoard) and close it."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
