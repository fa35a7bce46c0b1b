"""Predict label maps for photos: a label PNG (values = class ids), a colour mask, and an overlay with a
legend per image. Any image size (padded to the U-Net stride, cropped back); unreadable images are
reported and skipped, the rest carry on.

    modaseg-predict --checkpoint runs/demo/best photos/ one.jpg --out predictions/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from modaseg.model import Normalization, load_for_inference, pad_to_stride, predict_logits, preprocess
from modaseg.visualize import colorize, legend, overlay, side_by_side

log = logging.getLogger("modaseg")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def find_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded (sorted, image suffixes only). A missing path is an error."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.array(img.convert("RGB"))


@torch.no_grad()
def predict_batch(
    model: torch.nn.Module,
    images: list[np.ndarray],
    device,
    normalization: Normalization,
    tta_flip: bool = False,
) -> list[np.ndarray]:
    """Label maps for RGB uint8 images of any sizes: each padded to the batch's largest size (rounded up
    to the stride), predicted together, and cropped back to its own size."""
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    batch = torch.zeros((len(images), 3, h, w), dtype=torch.uint8)
    for k, img in enumerate(images):
        batch[k, :, : img.shape[0], : img.shape[1]] = torch.from_numpy(img).permute(2, 0, 1)
    x = pad_to_stride(preprocess(batch.to(device), normalization), value=0.0)
    pred = predict_logits(model, x, tta_flip).argmax(dim=1).to(torch.uint8).cpu().numpy()
    return [pred[k, : img.shape[0], : img.shape[1]] for k, img in enumerate(images)]


def save_outputs(out_dir: Path, stem: str, image: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    Image.fromarray(labels, mode="L").save(out_dir / f"{stem}.png")
    Image.fromarray(colorize(labels, len(names))).save(out_dir / f"{stem}_color.png")
    present = [int(c) for c in np.unique(labels) if c < len(names)]
    panel = side_by_side(overlay(image, labels, len(names)), legend(names, present))
    Image.fromarray(panel).save(out_dir / f"{stem}_overlay.jpg", quality=90)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="modaseg-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument(
        "--checkpoint", required=True, help="an export (RUN/best, RUN/final) or RUN/checkpoints/step-N"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tta-flip", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.progress import Progress

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    paths = find_images(args.inputs)
    stems = Counter(p.stem for p in paths)
    clashes = sorted(s for s, n in stems.items() if n > 1)
    if clashes:
        raise SystemExit(
            f"modaseg-predict: several inputs would write the same outputs: {clashes[:5]} "
            "(outputs are named after the file stem); predict them into separate --out folders"
        )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, names, normalization = load_for_inference(args.checkpoint, args.device)
    failed: list[tuple[Path, str]] = []
    written = 0
    with Progress(disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("predicting", total=len(paths))
        for start in range(0, len(paths), args.batch_size):
            chunk, images = [], []
            for path in paths[start : start + args.batch_size]:
                try:
                    images.append(load_rgb(path))
                    chunk.append(path)
                except (OSError, UnidentifiedImageError, ValueError) as e:
                    failed.append((path, f"{type(e).__name__}: {e}"))
                    log.error("cannot read %s: %s", path, e)
            if images:
                for path, image, labels in zip(
                    chunk,
                    images,
                    predict_batch(model, images, args.device, normalization, args.tta_flip),
                    strict=True,
                ):
                    save_outputs(out_dir, path.stem, image, labels, names)
                    written += 1
            progress.advance(task, len(paths[start : start + args.batch_size]))
    log.info("%d of %d images predicted into %s; %d unreadable", written, len(paths), out_dir, len(failed))
    for path, why in failed:
        log.info("  skipped %s: %s", path, why)
    return 0 if written or not paths else 1


if __name__ == "__main__":
    sys.exit(main())
