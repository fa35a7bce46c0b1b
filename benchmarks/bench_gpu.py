"""GPU throughput of the training step: images/s, peak memory and MFU for the SMP U-Net, a batch sweep and
gradient accumulation. Ready to run on a lent GPU machine (`python benchmarks/bench_gpu.py`); on CPU it
runs a tiny smoke configuration only.

MFU = (FLOPs of forward+backward, counted by torch.utils.flop_counter) / step time / --peak-tflops
(default 989: H100 SXM dense bf16; H200 has the same tensor-core peak).

    .venv/bin/python benchmarks/bench_gpu.py --encoder resnet34 --height 576 --width 384 --batches 8,16,32,64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from modaseg.config import LossConfig, ModelConfig
from modaseg.losses import CompositeLoss, class_weights
from modaseg.model import build_model, preprocess


def step_fn(model, opt, loss_fn, images, target, accum: int, channels_last: bool):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for k in range(accum):
            x = preprocess(images[k::accum], channels_last)
            with torch.autocast(images.device.type, dtype=torch.bfloat16):
                logits = model(x)
            loss, _ = loss_fn(logits, target[k::accum])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--batches", default="8,16,32,64")
    p.add_argument("--accum", default="1,4", help="accumulation steps to try at the largest batch")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        args.height, args.width, args.batches, args.accum, args.repeats = 64, 64, "2", "1,2", 2
        print("no GPU: tiny CPU smoke configuration")
    torch.backends.cudnn.benchmark = True
    C = 14
    model = build_model(ModelConfig(encoder=args.encoder, channels_last=args.channels_last), C).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    loss_fn = CompositeLoss(
        LossConfig(), C, class_weights([1000 // (i + 1) for i in range(C)], "power").to(device)
    )
    print(
        f"{torch.cuda.get_device_name() if cuda else 'cpu'}; U-Net {args.encoder} {args.height}x{args.width} bf16, "
        f"composite loss, median of {args.repeats}"
    )
    print(f"{'batch':>6}{'accum':>6}{'s/step':>9}{'img/s':>9}{'peak GiB':>10}{'TFLOP/s':>9}{'MFU':>7}")
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        for accum in [int(a) for a in args.accum.split(",")] if batch == batches[-1] else [1]:
            images = torch.randint(
                0, 256, (batch, 3, args.height, args.width), dtype=torch.uint8, device=device
            )
            target = torch.randint(0, C, (batch, args.height, args.width), device=device)
            step = step_fn(model, opt, loss_fn, images, target, accum, args.channels_last)
            try:
                step()
                with FlopCounterMode(display=False) as counter:
                    step()
                flops = counter.get_total_flops()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(args.repeats):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    step()
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            except torch.OutOfMemoryError:
                print(f"{batch:>6}{accum:>6}  out of memory")
                torch.cuda.empty_cache()
                continue
            t = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            tflops = flops / t / 1e12
            print(
                f"{batch:>6}{accum:>6}{t:>9.3f}{batch / t:>9.1f}{peak:>10.2f}{tflops:>9.1f}"
                f"{100 * tflops / args.peak_tflops:>6.1f}%"
            )


if __name__ == "__main__":
    main()
