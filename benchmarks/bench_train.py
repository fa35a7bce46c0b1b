"""The trainer's full step vs a bare PyTorch step, same model and batch, side by side in one run.

full: the trainer's own update (benchmarks/trainer_step.py): forward under the run's precision,
      CompositeLoss (focal + weighted Dice + Lovasz, fp32), backward, the one StepSync all-reduce read on
      the host, gradient norm + clip, AdamW
bare: forward under the same precision, cross-entropy, backward, AdamW

The precision follows the trainer's rule (optim.mixed_precision=auto: bf16 only where the CPU or GPU
computes it natively, else fp32) unless --precision says otherwise; the table says which ran.

    .venv/bin/python benchmarks/bench_train.py [--encoder resnet34 --height 384 --width 576 --batch 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from trainer_step import random_batch, trainer_step

from modaseg.config import load_config
from modaseg.hardware import cpu_has_native_bf16, tune_cpu_allocator
from modaseg.model import preprocess


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"])
    p.add_argument("--default-malloc", action="store_true", help="skip the trainer's CPU allocator tuning")
    args = p.parse_args()
    if not args.default_malloc:
        tune_cpu_allocator()  # what the trainer does on CPU
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            f"model.encoder={args.encoder}",
            f"data.batch_size={args.batch}",
            f"optim.mixed_precision={args.precision}",
            "optim.lr=1e-4",
        ],
    )
    accelerator, precision, model, full_step = trainer_step(cfg)
    device = accelerator.device
    batch = random_batch(args.batch, args.height, args.width, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def bare() -> None:
        opt.zero_grad(set_to_none=True)
        with accelerator.autocast():
            logits = model(preprocess(batch["image"]))
        F.cross_entropy(logits.float(), batch["mask"].long(), ignore_index=255).backward()
        opt.step()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    bare(), full_step(batch)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "full": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        times["bare"].append(timed(bare))
        times["full"].append(timed(lambda: full_step(batch)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"device {device} (native bf16 on this CPU: {cpu_has_native_bf16()}), U-Net {args.encoder}, batch "
        f"{args.batch}x3x{args.height}x{args.width}, precision {precision.label} ({precision.reason}), "
        f"median of {args.repeats}, threads {torch.get_num_threads()}"
    )
    print(f"{'step':<8}{'s/step':>10}{'img/s':>10}{'ratio':>8}")
    for k in ("bare", "full"):
        print(f"{k:<8}{med[k]:>10.3f}{args.batch / med[k]:>10.2f}{med[k] / med['bare']:>8.2f}")


if __name__ == "__main__":
    main()
