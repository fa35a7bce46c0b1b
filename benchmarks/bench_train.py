"""Full training step vs a bare PyTorch step, same model and batch, side by side in one run.

full: bf16 autocast forward, CompositeLoss (focal + weighted dice + lovasz, fp32), backward, grad clip,
      AdamW, ConfusionMatrix update on the batch's predictions, the per-step loss reduction the trainer does
bare: bf16 autocast forward, cross-entropy, backward, AdamW

    .venv/bin/python benchmarks/bench_train.py [--encoder resnet34 --height 384 --width 576 --batch 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from modaseg.config import LossConfig, ModelConfig
from modaseg.losses import CompositeLoss, class_weights
from modaseg.metrics import ConfusionMatrix
from modaseg.model import build_model, preprocess
from modaseg.train import tune_cpu_allocator


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--default-malloc", action="store_true", help="skip the trainer's CPU allocator tuning")
    args = p.parse_args()
    if not args.default_malloc:
        tune_cpu_allocator()  # what modaseg/train.py does on CPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    C = 14
    model = build_model(ModelConfig(encoder=args.encoder), C).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (args.batch, 3, args.height, args.width), dtype=torch.uint8, device=device)
    target = torch.randint(0, C, (args.batch, args.height, args.width), device=device)
    target[:, :8] = 255
    pixels = [int(1e6 / (i + 1) ** 2) for i in range(C)]
    loss_fn = CompositeLoss(LossConfig(), C, class_weights(pixels, "power").to(device))
    matrix = ConfusionMatrix(C, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def bare() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(preprocess(images))
        F.cross_entropy(logits.float(), target, ignore_index=255).backward()
        opt.step()

    def full() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(preprocess(images))
        loss, parts = loss_fn(logits, target)
        values = torch.stack([(~torch.isfinite(loss)).float(), loss.detach(), *parts.values()])
        values.tolist()  # the trainer's per-step reduction result, read on the host
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        matrix.update(logits.detach().argmax(1), target)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    bare(), full()  # warm-up
    times: dict[str, list[float]] = {"bare": [], "full": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        times["bare"].append(timed(bare))
        times["full"].append(timed(full))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"device {device}, U-Net {args.encoder}, batch {args.batch}x3x{args.height}x{args.width}, {args.dtype}, "
        f"median of {args.repeats}, threads {torch.get_num_threads()}"
    )
    print(f"{'step':<8}{'s/step':>10}{'img/s':>10}{'ratio':>8}")
    for k in ("bare", "full"):
        print(f"{k:<8}{med[k]:>10.3f}{args.batch / med[k]:>10.2f}{med[k] / med['bare']:>8.2f}")


if __name__ == "__main__":
    main()
