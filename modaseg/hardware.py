"""What the machine can do, decided in one place: the numeric precision of a run.

`auto` precision: on CUDA, bf16 where the GPU computes it natively (Ampere and newer), else fp16 with loss
scaling; on CPU, bf16 only where the CPU has native bf16 instructions (AVX512_BF16 or AMX), else fp32.
Without them PyTorch emulates bf16: a U-Net step under bf16 autocast was measured 28x slower than in fp32
on a 2-core AMD EPYC without AVX-512 (benchmarks/README.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("modaseg")

PRECISIONS = ("auto", "no", "bf16", "fp16")
CPU_BF16_EMULATION_SLOWDOWN = 28  # measured, see the module docstring


@dataclass(frozen=True)
class Precision:
    """The precision a run uses (accelerate's `mixed_precision` value) and why."""

    mode: str  # "no" (fp32), "bf16" or "fp16"
    reason: str

    @property
    def label(self) -> str:
        return "fp32" if self.mode == "no" else self.mode


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX, as PyTorch's own CPU feature detection reports them."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cuda_has_native_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere (sm_80) and newer


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """`setting` is one of PRECISIONS (config aliases such as `false`/`fp32` already mapped to `no`)."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r} is not one of {PRECISIONS}")
    if device.type == "cuda":
        native = cuda_has_native_bf16(device)
        name = torch.cuda.get_device_name(device)
        if setting == "auto":
            if native:
                return Precision("bf16", f"{name} computes bf16 natively")
            return Precision("fp16", f"{name} has no native bf16 (before Ampere): fp16 with loss scaling")
        if setting == "bf16" and not native:
            log.warning(
                "bf16 on %s, which emulates it (before Ampere): expect slow steps; fp16 is native", name
            )
        return Precision(setting, "set in the config")
    if setting == "fp16":
        raise ValueError("fp16 mixed precision needs a CUDA device; on CPU use auto, bf16 or no")
    native = cpu_has_native_bf16()
    if setting == "auto":
        if native:
            return Precision("bf16", "the CPU has native bf16 (AVX512_BF16/AMX)")
        return Precision(
            "no", "the CPU has no native bf16 (no AVX512_BF16/AMX): fp32 is faster than emulated bf16"
        )
    if setting == "bf16" and not native:
        log.warning(
            "bf16 on a CPU without native bf16 (no AVX512_BF16/AMX): PyTorch emulates it, expect steps about "
            "%dx slower than fp32 (optim.mixed_precision=auto picks fp32 here)",
            CPU_BF16_EMULATION_SLOWDOWN,
        )
    return Precision(setting, "set in the config")
