"""GPU throughput of the trainer's own training step (benchmarks/trainer_step.py: the step train.py runs,
DDP when launched with several processes, channels_last and precision from the config): images/s, peak
memory per GPU and MFU over a batch sweep, micro-batching at the largest batch.

    python benchmarks/bench_gpu.py --encoder resnet34 --height 576 --width 384 --batches 8,16,32,64
    accelerate launch --config_file launch/gpu-8.yaml benchmarks/bench_gpu.py --batches 16,32   (DDP)

MFU = FLOPs of one update (counted by torch.utils.flop_counter) / step time / the GPU's dense bf16/fp16
tensor peak, looked up by name in PEAK_TFLOPS (or --peak-tflops); unknown GPUs get no MFU column value.
On CPU it runs a tiny smoke configuration only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from trainer_step import random_batch, trainer_step

from modaseg.config import load_config

# Dense bf16 (fp16 where the GPU has no bf16) tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 PCIe": 756, "H100": 756,
               "A100": 312, "L40S": 362, "A10G": 70, "A10": 125, "L4": 121, "V100": 125, "T4": 65}  # fmt: skip


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--batches", default="8,16,32,64", help="per-process batches")
    p.add_argument("--micro", default="", help="micro-batches to try at the largest batch, e.g. 8,16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak, if not in PEAK_TFLOPS")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        args.height, args.width, args.batches, args.micro, args.repeats = 64, 64, "2", "1", 2
        print("no GPU: tiny CPU smoke configuration")
    else:
        torch.backends.cudnn.benchmark = True  # as the trainer sets it for the fixed training crop
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for batch in batches:
        for micro in (
            [None, *[int(m) for m in args.micro.split(",") if m]] if batch == batches[-1] else [None]
        ):
            cfg = load_config(
                None,
                [
                    f"model.encoder={args.encoder}",
                    f"model.channels_last={str(args.channels_last).lower()}",
                    f"data.batch_size={batch}",
                    f"optim.mixed_precision={args.precision}",
                ],
            )
            accelerator, precision, _, step = trainer_step(cfg, micro)
            device = accelerator.device
            data = random_batch(batch, args.height, args.width, device)
            try:
                step(data)
                with FlopCounterMode(display=False) as counter:
                    step(data)
                flops = counter.get_total_flops()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(args.repeats):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    step(data)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            except torch.OutOfMemoryError:
                rows.append((batch, micro, None, None, None))
                torch.cuda.empty_cache()
                continue
            t = statistics.median(times)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append((batch, micro or batch, t, peak, flops / t / 1e12))
    if accelerator.is_main_process:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        peak_flops = args.peak_tflops or (peak_tflops(name) if cuda else None)
        print(
            f"{accelerator.num_processes} x {name}; U-Net {args.encoder} {args.height}x{args.width} "
            f"{precision.label} ({precision.reason}), composite loss, median of {args.repeats}; "
            f"peak {peak_flops or 'unknown'} TFLOP/s"
        )
        print(
            f"{'batch':>6}{'micro':>6}{'s/step':>9}{'img/s/GPU':>11}{'peak GiB':>10}{'TFLOP/s':>9}{'MFU':>7}"
        )
        for batch, micro, t, peak, tflops in rows:
            if t is None:
                print(f"{batch:>6}{micro or batch:>6}  out of memory")
                continue
            mfu = f"{100 * tflops / peak_flops:>6.1f}%" if peak_flops else "    n/a"
            print(f"{batch:>6}{micro:>6}{t:>9.3f}{batch / t:>11.1f}{peak:>10.2f}{tflops:>9.1f}{mfu}")


if __name__ == "__main__":
    main()
