"""Export a trained model for use without modaseg: SMP's `save_pretrained` layout (+ `modaseg.json`),
and optionally ONNX, checked against PyTorch before it is kept.

    modaseg-export --checkpoint runs/demo/best --out exports/demo --onnx

`model.onnx` takes the photo as it comes and returns logits at the photo's size:

    input  "image":  uint8 [N, 3, H, W], RGB, 0..255, any N, H, W (no resizing, no normalising)
    output "logits": float32 [N, C, H, W]; labels = logits.argmax(1), class names in the file's
                     metadata ("classes", JSON) and in modaseg.json

Inside the graph: the input normalisation of `modaseg.model.preprocess` (the model's own, from
modaseg.json), zero padding (bottom/right) to a multiple of 32 and cropping back, exactly what
`modaseg-predict` does. The file is kept only if ONNX Runtime (or, without it, onnx's reference evaluator)
gives the PyTorch logits on two input sizes.

Exporting an export again (into itself or elsewhere) keeps its metrics (SMP's model card, modaseg.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modaseg.console import UserError, run_cli
from modaseg.model import (
    EXPORT_META,
    STRIDE,
    Normalization,
    export_model,
    infer_logits,
    is_export,
    load_for_inference,
    preprocess,
)

ONNX_NAME = "model.onnx"
ONNX_FILES = (ONNX_NAME, ONNX_NAME + ".data")  # the graph and, for large weights, its external data
DEFAULT_OPSET = 18  # the native opset of torch's ONNX exporter: no version conversion, ORT >= 1.14
MIN_OPSET = 18  # below it torch converts the graph and silently keeps 18 when it cannot (Pad has no adapter)
# Float32 ONNX Runtime and PyTorch convolve with different algorithms and summation orders; measured on a
# resnet18 U-Net: max |diff| 4e-5..1.2e-4 for logits up to |14| (~1e-5 of the logit scale). The bound
# below is 10x that and still orders of magnitude under what a wrong normalisation, padding or crop does.
ATOL = 1e-4
RTOL = 1e-4  # of the largest |logit| of the PyTorch output
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps one file at 2 GB: larger weights go to model.onnx.data


class ExportError(UserError, RuntimeError):
    """The export cannot be made as asked (missing package, bad option, output folder in the way)."""


class ImageToLogits(nn.Module):
    """The U-Net behind the photo-in, logits-out interface of `model.onnx` (uint8 RGB NCHW, any size)."""

    def __init__(self, model: nn.Module, normalization: Normalization, long_side: int | None = None):
        super().__init__()
        self.model = model
        self.normalization = normalization
        self.long_side = long_side

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """`modaseg.model.infer_logits` for a batch of one size, in ops with symbolic sizes (no early
        return, no Python branching on the size)."""
        h, w = image.shape[-2:]
        x = preprocess(image, self.normalization)
        if self.long_side is not None:
            m = torch.sym_max(h, w)
            size = (
                (2 * h * self.long_side + m) // (2 * m),
                (2 * w * self.long_side + m) // (2 * m),
            )  # round()
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        rh, rw = x.shape[-2:]
        x = F.pad(x, (0, (-rw) % STRIDE, 0, (-rh) % STRIDE), value=0.0)
        logits = self.model(x)[:, :, :rh, :rw]
        if self.long_side is not None:
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits


@dataclass
class CheckResult:
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    argmax_agreement: float  # fraction of pixels whose predicted class is the same

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        return (
            f"{'x'.join(map(str, self.shape))}: max |onnx - torch| {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:.2e}, max |logit| {self.max_abs_logit:.3g}), "
            f"same class on {100 * self.argmax_agreement:.2f}% of pixels: {'OK' if self.ok else 'MISMATCH'}"
        )


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(
            f"{why} needs the Python package '{module}': pip install onnx onnxscript onnxruntime"
        )


def check_onnx_options(opset: int, height: int, width: int) -> None:
    """Fail before any work when the exporter is missing or an option cannot be honoured."""
    _require("onnxscript", "ONNX export (torch's exporter)")
    _require("onnx", "ONNX export")
    if opset < MIN_OPSET:
        raise ExportError(
            f"--opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} and up (its conversion to older "
            f"opsets fails for this model and silently keeps {MIN_OPSET}); use --opset {MIN_OPSET} or higher"
        )
    if min(height, width) < 2:
        raise ExportError(
            f"example size {height}x{width}: must be at least 2x2 (sizes 0 and 1 are not dynamic)"
        )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    class_names: list[str],
    normalization: Normalization,
    opset: int = DEFAULT_OPSET,
    example_hw: tuple[int, int] = (96, 64),
    long_side: int | None = None,
) -> Path:
    """Write `model` wrapped in `ImageToLogits` to `path` with dynamic batch, height and width, through
    torch's torch.export-based exporter: the default and maintained one (the TorchScript exporter,
    `dynamo=False`, also works here and exports 10x faster, but warns that it will be removed). Class
    names and the input contract go in the metadata."""
    h, w = example_hw
    check_onnx_options(opset, h, w)
    path = Path(path)
    wrapped = ImageToLogits(model, normalization, long_side).eval()
    example = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)  # batch 2: torch.export fixes sizes of 1
    dim = torch.export.Dim
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"image": {0: dim("batch"), 2: dim("height"), 3: dim("width")}},
            opset_version=opset,
            verbose=False,
        )
    written = program.model.opset_imports.get("")
    if written != opset:
        raise ExportError(f"asked for opset {opset}, torch's exporter produced opset {written}")
    program.model.metadata_props.update(
        {
            "classes": json.dumps(list(class_names)),
            "input": "image: uint8 [N,3,H,W] RGB 0..255, any size (normalised, padded to /32 and cropped inside)",
            "output": "logits: float32 [N,C,H,W]; labels = argmax over C",
            "normalization": normalization.name,
            "input_long_side": json.dumps(long_side),
            "mean": json.dumps(list(normalization.mean)),
            "std": json.dumps(list(normalization.std)),
            "producer": "modaseg-export",
        }
    )
    program.save(str(path), external_data=big)
    return path


def onnx_runner(path: str | Path, runtime: str = "auto"):
    """A function image(uint8 numpy NCHW) -> logits for `path`, and the runtime's name. `auto` prefers ONNX
    Runtime and falls back to onnx's reference evaluator (pure numpy, slow, but an independent runtime)."""
    if runtime == "auto":
        runtime = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "reference"
    if runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return (lambda x: session.run(["logits"], {"image": x})[0]), f"onnxruntime {ort.__version__}"
    if runtime == "reference":
        import onnx
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(onnx.load(str(path)))
        return (lambda x: evaluator.run(["logits"], {"image": x})[0]), f"onnx.reference {onnx.__version__}"
    raise ExportError(f"unknown ONNX runtime {runtime!r} (auto, onnxruntime, reference)")


def check_sizes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The asked size with batch 1, and a batch of 2 whose sides are not multiples of 32 (padding + crop)."""
    h2 = -(-height // STRIDE) * STRIDE + 13
    w2 = -(-width // STRIDE) * STRIDE + 7
    return [(1, 3, height, width), (2, 3, h2, w2)]


@torch.no_grad()
def check_onnx(
    path: str | Path,
    model: nn.Module,
    shapes: list[tuple[int, int, int, int]],
    normalization: Normalization,
    runtime: str = "auto",
    seed: int = 0,
    long_side: int | None = None,
) -> tuple[list[CheckResult], str]:
    """Compare the ONNX logits with PyTorch's on random photos of each shape. The PyTorch side is the
    path `modaseg-predict` takes (`model.infer_logits`), not the exported wrapper."""
    run, name = onnx_runner(path, runtime)
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    results = []
    for shape in shapes:
        image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        ref = torch.stack(infer_logits(model, list(image), normalization, long_side)).cpu().numpy()
        out = run(image.numpy())
        if out.shape != ref.shape:
            raise ExportError(
                f"ONNX logits have shape {out.shape} for input {shape}; PyTorch gives {ref.shape}"
            )
        scale = float(np.abs(ref).max())
        results.append(
            CheckResult(
                shape=tuple(shape),
                max_abs_diff=float(np.abs(out - ref).max()),
                max_abs_logit=scale,
                tolerance=ATOL + RTOL * scale,
                argmax_agreement=float((out.argmax(1) == ref.argmax(1)).mean()),
            )
        )
    return results, name


def check_out_dir(out: Path) -> None:
    """`export_model` replaces the folder: refuse one that holds anything but a previous export."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_export(out))):
        raise ExportError(
            f"--out {out}: exists and is not a modaseg export (config.json + {EXPORT_META}); it would be "
            "replaced. Choose a new or empty folder."
        )


def export_onnx_checked(
    model: nn.Module,
    out: Path,
    class_names: list[str],
    normalization: Normalization,
    opset: int,
    height: int,
    width: int,
    runtime: str = "auto",
    long_side: int | None = None,
) -> tuple[list[CheckResult], str]:
    """Export to a temporary folder, check, then move `model.onnx` (and its data file, if any) into `out`.
    On a mismatch the files go to `out/onnx-mismatch/` for inspection and `model.onnx` is not written."""
    tmp = out / ".onnx-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_onnx(model, tmp / ONNX_NAME, class_names, normalization, opset, (height, width), long_side)
    sizes = check_sizes(height, width)
    results, name = check_onnx(tmp / ONNX_NAME, model, sizes, normalization, runtime, long_side=long_side)
    if all(r.ok for r in results):
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
    else:
        rejected = out / "onnx-mismatch"
        shutil.rmtree(rejected, ignore_errors=True)
        os.replace(tmp, rejected)
    return results, name


def _set_aside(files: list[Path]) -> list[tuple[Path, Path]]:
    """Hard links (copies where links fail) of `files` beside their folder, which export_model replaces
    as a whole; (link, original) pairs."""
    pairs = []
    for path in files:
        aside = path.parent.with_name(f".keep-{path.parent.name}-{path.name}")
        aside.unlink(missing_ok=True)
        try:
            os.link(path, aside)
        except OSError:
            shutil.copy2(path, aside)
        pairs.append((aside, path))
    return pairs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="modaseg-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="RUN/best, RUN/final, RUN/checkpoints/step-N, ...")
    p.add_argument(
        "--out", required=True, help="output folder: new, empty, or an export (replaced; may be --checkpoint)"
    )
    p.add_argument("--onnx", action="store_true", help=f"also write {ONNX_NAME} and check it against PyTorch")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--height", type=int, default=96, help="height of the example traced and checked")
    p.add_argument("--width", type=int, default=64, help="width of the example traced and checked")
    p.add_argument(
        "--runtime",
        choices=["auto", "onnxruntime", "reference"],
        default="auto",
        help="what runs the ONNX check: ONNX Runtime if installed, else onnx's reference evaluator",
    )
    return p.parse_args(argv)


def read_export_metrics(folder: Path) -> dict | None:
    """The metrics an export records, so that exporting it again (into itself or elsewhere) keeps them:
    modaseg.json's `metrics`, or for exports written before modaseg.json held them, the JSON block of
    the README model card that SMP's save_pretrained writes. None for a training checkpoint."""
    meta, card = folder / EXPORT_META, folder / "README.md"
    if not is_export(folder):
        return None
    try:
        metrics = json.loads(meta.read_text()).get("metrics")
        if metrics is None and card.is_file():
            block = re.search(r"## Model metrics\s*```json\n(.*?)\n```", card.read_text(), re.DOTALL)
            metrics = json.loads(block.group(1)) if block else None
    except (OSError, ValueError, AttributeError) as e:
        raise ExportError(f"{folder}: its metrics ({meta.name}, {card.name}) are unreadable: {e}") from e
    if metrics is not None and not isinstance(metrics, dict):
        raise ExportError(f"{folder}: metrics in {meta.name} must be a JSON object, not {metrics!r:.60}")
    return metrics


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    check_out_dir(out)
    if args.onnx:
        check_onnx_options(args.opset, args.height, args.width)
    source = Path(args.checkpoint)
    if not source.is_dir():
        raise ExportError(f"--checkpoint {source}: no such folder")
    # Everything is read from the source before anything is written: --out may be the source itself.
    model, names, normalization, long_side = load_for_inference(source, "cpu")
    metrics = read_export_metrics(source)
    model = model.float().to(memory_format=torch.contiguous_format)
    onnx_files = [out / n for n in ONNX_FILES if (out / n).is_file()] if out.is_dir() else []
    same = out.is_dir() and os.path.samefile(out, source)
    saved = _set_aside(onnx_files) if same and not args.onnx else []
    try:
        export_model(model, out, names, normalization, metrics, long_side)
        for aside, path in saved:  # the same weights: the ONNX graph made from them still holds
            os.replace(aside, out / path.name)
    finally:
        for aside, _ in saved:
            aside.unlink(missing_ok=True)
    kept = f"; metrics kept: {', '.join(metrics)}" if metrics else ""
    if saved:
        kept += f"; {ONNX_NAME} kept (same weights)"
    elif onnx_files and not args.onnx:
        kept += f"; the {ONNX_NAME} of the export replaced here is gone (other weights): --onnx writes one"
    print(f"{out}: config.json + model.safetensors + {EXPORT_META} ({len(names)} classes{kept})")
    if not args.onnx:
        return 0
    results, runtime = export_onnx_checked(
        model, out, names, normalization, args.opset, args.height, args.width, args.runtime, long_side
    )
    print(f"ONNX check with {runtime} against PyTorch (CPU, float32):")
    for r in results:
        print("  " + r.line())
    if not all(r.ok for r in results):
        print(
            f"MISMATCH: {ONNX_NAME} not written; the exported files are in {out / 'onnx-mismatch'}",
            file=sys.stderr,
        )
        return 1
    print(f"{out / ONNX_NAME}: opset {args.opset}, input image uint8 [N,3,H,W] RGB, output logits [N,C,H,W]")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("modaseg-export", run, argv)


if __name__ == "__main__":
    sys.exit(main())
