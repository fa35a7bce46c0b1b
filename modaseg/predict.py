"""Predict label maps for photos: a label PNG (values = class ids), a colour mask, and an overlay with a
legend per image. Any image size (padded to the U-Net stride, cropped back); unreadable images and images
over --max-pixels are reported and skipped, the rest carry on. Images are decoded as in training
(`modaseg.images`), batched with images of the same padded size only, and no input or other output of the
run is ever overwritten: such a run is refused before anything is written.

    modaseg-predict --checkpoint runs/demo/best photos/ one.jpg --out predictions/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

from modaseg.console import UserError, progress_bar, run_cli
from modaseg.files import write_atomic
from modaseg.hardware import PRECISIONS, DeviceError, choose_device, cuda_problem, resolve_precision
from modaseg.images import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_CEILING,
    ImageFileError,
    encode_image,
    image_size,
    read_image,
)
from modaseg.model import STRIDE, Normalization, infer_logits, load_for_inference
from modaseg.visualize import colorize, legend, overlay, side_by_side

log = logging.getLogger("modaseg")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PredictError(UserError, ValueError):
    """The run cannot start as asked: a missing input, an output in the way, an option out of range."""


@dataclass(frozen=True)
class Outputs:
    """The files written for one photo, named after its stem."""

    labels: Path
    color: Path
    overlay: Path

    @classmethod
    def of(cls, image: Path, out_dir: Path) -> Outputs:
        stem = image.stem
        return cls(out_dir / f"{stem}.png", out_dir / f"{stem}_color.png", out_dir / f"{stem}_overlay.jpg")


def find_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded (sorted, image suffixes only, subfolders not entered); a file named
    twice (itself and through its folder) is predicted once. A missing path, or no image at all, is an
    error."""
    found: dict[Path, Path] = {}
    named = 0
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        elif path.exists():
            files = [path]
        else:
            raise PredictError(f"{path}: no such file or folder")
        named += len(files)
        for p in files:
            found.setdefault(p.resolve(), p)
    if not found:
        raise PredictError(f"no images ({' '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(inputs)}")
    if named > len(found):
        log.info("%d inputs named more than once: each is predicted once", named - len(found))
    return list(found.values())


def plan_outputs(images: list[Path], out_dir: Path) -> list[Outputs]:
    """The outputs of each image, after checking every one (symlinks resolved) against every input and
    every other output: a run that would overwrite any of them is refused as a whole, before anything is
    written. Refused rather than renamed: the names stay what scripts expect (stem.png, ...)."""
    inputs = {p.resolve(): p for p in images}
    claimed: dict[Path, Path] = {}
    clashes: list[str] = []
    plans = []
    for image in images:
        plan = Outputs.of(image, out_dir)
        for target in astuple(plan):
            real = target.resolve()
            if real in inputs:
                victim = "that input itself" if inputs[real] == image else f"the input {inputs[real]}"
                clashes.append(f"{target}, an output of {image}, would overwrite {victim}")
            elif real in claimed:
                clashes.append(f"{claimed[real]} and {image} would both write {target}")
            claimed[real] = image
        plans.append(plan)
    if clashes:
        more = f" (and {len(clashes) - 1} more clashes)" if len(clashes) > 1 else ""
        raise PredictError(
            f"{clashes[0]}{more}: outputs are named after the input's stem; use another --out folder "
            "or rename the inputs"
        )
    return plans


def plan_batches(sizes: dict[int, tuple[int, int]], batch_size: int, max_pixels: int) -> list[list[int]]:
    """Image indices grouped by padded size (sides rounded up to the stride): no image is ever padded to
    another's size. A batch holds at most `batch_size` images and `max_pixels` padded pixels, so an image
    near the limit is predicted alone."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (h, w) in sizes.items():
        groups[(-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE)].append(i)
    batches = []
    for (h, w), members in sorted(groups.items()):
        n = max(1, min(batch_size, max_pixels // (h * w)))
        batches.extend(members[k : k + n] for k in range(0, len(members), n))
    return batches


def predict_batch(
    model: torch.nn.Module,
    images: list[np.ndarray],
    device: str | torch.device,
    normalization: Normalization,
    tta_flip: bool = False,
    dtype: torch.dtype | None = None,
    long_side: int | None = None,
) -> list[np.ndarray]:
    """Label maps for RGB uint8 photos of any sizes, through `model.infer_logits` (the path evaluation
    and the ONNX graph take: normalised, brought to the working resolution `long_side`, zero-padded
    bottom/right to the stride, predicted together, logits back at each photo's size) under autocast to
    `dtype` (None: fp32)."""
    device = torch.device(device)
    pixels = [torch.from_numpy(img).to(device).permute(2, 0, 1) for img in images]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = infer_logits(model, pixels, normalization, long_side, tta_flip)
    return [one.argmax(dim=0).to(torch.uint8).cpu().numpy() for one in logits]


def save_outputs(outputs: Outputs, image: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    """Each file written whole (temporary name, then renamed): an interrupted run leaves no half image."""
    write_atomic(outputs.labels, encode_image(labels, ".png"))
    write_atomic(outputs.color, encode_image(colorize(labels, len(names)), ".png"))
    present = [int(c) for c in np.unique(labels) if c < len(names)]
    panel = side_by_side(overlay(image, labels, len(names)), legend(names, present))
    write_atomic(outputs.overlay, encode_image(panel, ".jpg", quality=90))


def inference_device(name: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device named by --device and the autocast dtype --mixed-precision resolves to there."""
    if name.split(":")[0] == "cuda" and (problem := cuda_problem()) is not None:
        raise PredictError(f"--device {name}: {problem.why}; use --device cpu (or a machine with a GPU)")
    if name in ("auto", "cpu", "cuda"):
        try:  # the one device decision: a GPU asked for (here: by SLURM or CUDA_VISIBLE_DEVICES) is needed
            name = choose_device(name).type
        except DeviceError as e:  # its advice names the training config, not this command's option
            raise PredictError(f"--device {name}: {str(e).split(': ')[0]}; use --device cpu") from None
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise PredictError(f"--device {name}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name}: no CUDA device is available here; use --device cpu")
    try:
        chosen = resolve_precision(precision, device)
    except ValueError as e:
        raise PredictError(f"--mixed-precision {precision}: {e}") from e
    log.info("predicting on %s in %s (%s)", device, chosen.label, chosen.reason)
    return device, AUTOCAST_DTYPES[chosen.mode]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="modaseg-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument(
        "--checkpoint", required=True, help="an export (RUN/best, RUN/final) or RUN/checkpoints/step-N"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (of one padded size)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images (width x height, read from the header) are reported and skipped; also the most "
        "padded pixels in one batch",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU when one is usable), cpu, cuda (a GPU or an error), cuda:N",
    )
    p.add_argument(
        "--mixed-precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 where the device computes it natively, else fp32 (fp16: CUDA only)",
    )
    p.add_argument("--tta-flip", action="store_true", help="average with the horizontally flipped prediction")
    return p.parse_args(argv)


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, ImageFileError) else f"{type(e).__name__}: {e}"


def predict(args: argparse.Namespace) -> int:
    """Every check that can fail the whole run comes before the first file is written."""
    if args.batch_size < 1:
        raise PredictError(f"--batch-size {args.batch_size}: must be at least 1")
    if not 1 <= args.max_pixels <= MAX_PIXELS_CEILING:
        raise PredictError(f"--max-pixels {args.max_pixels}: must be between 1 and {MAX_PIXELS_CEILING}")
    paths = find_images(args.inputs)
    out_dir = Path(args.out)
    outputs = plan_outputs(paths, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictError(f"--out {out_dir}: exists and is not a folder")
    device, dtype = inference_device(args.device, args.mixed_precision)
    model, names, normalization, long_side = load_for_inference(args.checkpoint, device)
    skipped: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for i, path in enumerate(paths):
        try:
            sizes[i] = image_size(path, args.max_pixels)
        except (OSError, ValueError) as e:
            skipped[i] = _why(e)
            log.error("cannot read %s: %s", path, skipped[i])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PredictError(f"--out {out_dir}: cannot create it ({e.strerror})") from e
    written = 0
    with progress_bar(True) as progress:
        task = progress.add_task("predicting", total=len(paths), completed=len(skipped))
        for batch in plan_batches(sizes, args.batch_size, args.max_pixels):
            loaded = []
            for i in batch:
                try:
                    loaded.append((i, read_image(paths[i], args.max_pixels)))
                except (OSError, ValueError) as e:
                    skipped[i] = _why(e)
                    log.error("cannot read %s: %s", paths[i], skipped[i])
            images = [image for _, image in loaded]
            if images:
                labels = predict_batch(model, images, device, normalization, args.tta_flip, dtype, long_side)
                for (i, image), label_map in zip(loaded, labels, strict=True):
                    try:
                        save_outputs(outputs[i], image, label_map, names)
                    except OSError as e:  # a full disk, a folder made read-only meanwhile
                        raise PredictError(
                            f"--out {out_dir}: cannot write {e.filename or outputs[i].labels} "
                            f"({e.strerror or e}); {written} of {len(paths)} images were written before"
                        ) from None
                    written += 1
            progress.advance(task, len(batch))
    log.info("%d of %d images predicted into %s; %d skipped", written, len(paths), out_dir, len(skipped))
    for i in sorted(skipped):
        log.info("  skipped %s: %s", paths[i], skipped[i])
    return 0 if written else 1


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return predict(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli("modaseg-predict", run, argv)


if __name__ == "__main__":
    sys.exit(main())
