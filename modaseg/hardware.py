"""What the machine can do, decided in one place: the device, the numeric precision, the micro-batch
that fits, the data workers the cores allow, and the CPU allocator.

`auto` precision: on CUDA, bf16 where the GPU computes it natively (Ampere and newer), else fp16 with loss
scaling; on CPU, bf16 only where the CPU has native bf16 instructions (AVX512_BF16 or AMX), else fp32.
Without them PyTorch emulates bf16: a U-Net step under bf16 autocast was measured 28x slower than in fp32
on a 2-core AMD EPYC without AVX-512 (benchmarks/README.md).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modaseg.console import UserError

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


# ---------------------------------------------------------------------------------------------- device


class DeviceError(UserError, RuntimeError):
    """A GPU was asked for and none is usable."""


CUDA12_HINT = (
    "install the CUDA 12 build of the same torch (README: 'GPUs with an older driver or a V100'), "
    "or run on CPU with train.device=cpu"
)
NO_GPU_HINT = (
    "run on a machine or SLURM job with a GPU (check nvidia-smi and the job's GPU request), "
    "or run on CPU with train.device=cpu"
)


def gpu_requested(setting: str) -> str | None:
    """Why this process was asked to use a GPU, or None. A GPU is asked for by `train.device=cuda`, by a
    SLURM job that allocated GPUs, or by a launcher that chose devices (CUDA_VISIBLE_DEVICES set to one
    or more ids, as `accelerate launch` does for a launch config with gpu_ids). An empty
    CUDA_VISIBLE_DEVICES hides every GPU: no request (the test suite pins itself to the CPU that way)."""
    if setting == "cuda":
        return "train.device=cuda"
    if setting == "cpu":
        return None
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        value = os.environ.get(var, "").strip()
        if value and value not in ("0", "(null)"):
            return f"the SLURM job allocated GPUs ({var}={value})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible and visible.strip() not in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    return None


def cuda_driver_version() -> tuple[int, int] | None:
    """The CUDA version the installed NVIDIA driver supports (cuDriverGetVersion, which needs no device
    and initialises nothing), or None when there is no driver (libcuda cannot be loaded)."""
    import ctypes

    version = ctypes.c_int(0)
    try:
        libcuda = ctypes.CDLL("libcuda.so.1" if sys.platform == "linux" else "nvcuda.dll")
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000, version.value % 1000 // 10


@dataclass(frozen=True)
class CudaProblem:
    why: str
    fix: str


def cuda_problem() -> CudaProblem | None:
    """Why CUDA cannot be used here and what to do (None when it can): a CPU-only torch, no NVIDIA
    driver, a driver too old for this wheel's CUDA, no device visible, or a GPU this wheel has no
    kernels for (a V100 with a CUDA 13 build)."""
    if torch.version.cuda is None:
        return CudaProblem(f"this torch ({torch.__version__}) is a CPU-only build", CUDA12_HINT)
    built_for = f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
    driver = cuda_driver_version()
    if driver is None:
        return CudaProblem(
            f"no NVIDIA driver is installed here (libcuda.so.1 cannot be loaded); {built_for}", NO_GPU_HINT
        )
    needed = int(torch.version.cuda.split(".")[0])
    if driver[0] < needed:  # within a major version, CUDA's minor-version compatibility applies
        return CudaProblem(
            f"the NVIDIA driver supports CUDA up to {driver[0]}.{driver[1]}, older than this torch needs "
            f"({built_for})",
            CUDA12_HINT,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        said = " ".join(str(w.message) for w in caught).strip()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        detail = f": {said[:300]}" if said else ""
        return CudaProblem(f"no CUDA device is visible{where}{detail}", NO_GPU_HINT)
    arches = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if arches and not has_kernels_for(arches, major, minor):
            name = torch.cuda.get_device_name(index)
            return CudaProblem(
                f"GPU {index} ({name}, sm_{major}{minor}) is not supported by this torch build "
                f"({built_for}, kernels for {', '.join(arches)})",
                CUDA12_HINT,
            )
    return None


def has_kernels_for(arches: list[str], major: int, minor: int) -> bool:
    """Whether a torch build compiled for `arches` (torch.cuda.get_arch_list()) runs on a GPU of compute
    capability major.minor. Binary code for sm_XY runs on any GPU of the same major and a minor >= Y (so an
    Ada sm_89 runs sm_86 or sm_80 code); PTX (compute_XY) is compiled by the driver for any capability
    >= X.Y; arch-specific code (sm_90a) runs on exactly that capability."""
    for arch in arches:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
        if found is None:
            continue
        kind, have = found.group(1), (int(found.group(2)), int(found.group(3)))
        if found.group(4) == "a":
            ok = have == (major, minor)
        elif kind == "compute":
            ok = have <= (major, minor)
        else:
            ok = have[0] == major and have[1] <= minor
        if ok:
            return True
    return False


@dataclass(frozen=True)
class DeviceChoice:
    type: str  # "cuda" or "cpu"
    reason: str


def choose_device(setting: str = "auto") -> DeviceChoice:
    """The one decision of where a process computes. A GPU that was asked for and cannot be used is an
    error naming why and what to do, never a silent CPU run."""
    if setting == "cpu":
        return DeviceChoice("cpu", "train.device=cpu")
    asked = gpu_requested(setting)
    problem = cuda_problem()
    if problem is None:
        return DeviceChoice("cuda", asked or "a CUDA device is available")
    if asked is not None:
        raise DeviceError(f"a GPU was asked for ({asked}) but {problem.why}: {problem.fix}")
    return DeviceChoice("cpu", "no usable CUDA device")


def configure_kernels(device: torch.device, deterministic: bool, training: bool) -> str:
    """cuDNN autotuning for the fixed training crop (not for evaluation, whose sizes vary), or
    deterministic kernels when asked; returns what the run may promise about repeatability."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        return "deterministic kernels: a resumed run repeats the uninterrupted one bit for bit"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = training
        return (
            "GPU kernels (cuDNN autotuning, scatter_add backward) are not deterministic: a resumed run "
            "matches the uninterrupted one statistically, not bit for bit (train.deterministic=true for that)"
        )
    return "CPU kernels are deterministic: a resumed run repeats the uninterrupted one bit for bit"


def tune_cpu_allocator() -> bool:
    """glibc serves every buffer over 32 MB with a fresh mmap and unmaps it on free, so each large
    activation of a CPU training step is page-faulted again on every step. Raising the mmap and trim
    thresholds keeps them in the heap (benchmarks/README.md: ~20% faster CPU steps). No-op elsewhere."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or not ctypes.util.find_library("c"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1))


# ---------------------------------------------------------------------------------------------- workers

# One DataLoader worker prepares about 200 training samples per second at 576x384 (uint8 masks, handed
# to the main process; benchmarks/data.md measured 217-275 per CPU-second): the planning figure.
WORKER_SAMPLES_PER_S = 200.0


def available_cores() -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2/v1 CPU quota."""
    cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    quota = _cgroup_quota()
    return min(cores, quota) if quota else cores


def _cgroup_quota() -> float | None:
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]  # noqa: SIM115 (tiny file)
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())  # noqa: SIM115
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())  # noqa: SIM115
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """Processes of this run on this machine, as the launcher says (torchrun/accelerate, SLURM)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def plan_workers(
    samples_per_s: float | None, cores: float | None = None, processes: int | None = None
) -> tuple[int, str]:
    """Data workers for one process: enough to feed `samples_per_s` (the measured training rate of this
    process) at WORKER_SAMPLES_PER_S each, within the cores left to this process after its own main
    thread (the cores available, shared by the local processes). 0 = load in the training process."""
    cores = available_cores() if cores is None else cores
    processes = local_processes() if processes is None else processes
    spare = int(cores / processes) - 1
    if spare <= 0:
        return 0, f"{cores:g} core(s) for {processes} process(es): no core to spare, loading in-process"
    needed = 1 if samples_per_s is None else max(1, math.ceil(samples_per_s / WORKER_SAMPLES_PER_S))
    workers = min(spare, needed)
    return workers, (
        f"{cores:g} core(s) for {processes} process(es), {spare} spare each; "
        f"{needed} worker(s) feed the measured rate"
    )


# ---------------------------------------------------------------------------------------------- micro-batch

FAULT_OOM_ENV = "MODASEG_FAULT_OOM_ABOVE"  # fault injection: a probe step above this micro-batch raises OOM
FAULT_OOM_RANK_ENV = "MODASEG_FAULT_OOM_RANK"  # ... on this rank only (unset: on every rank)
MEMORY_MARGIN = 0.9  # a micro-batch fits when its peak stays under this fraction of the device memory


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_micro_batch(fits: Callable[[int], bool], batch_size: int) -> tuple[int, list[tuple[int, bool]]]:
    """The largest divisor of `batch_size` for which `fits` holds: halve from the full batch until one
    fits, then binary-search upward between it and the smallest that failed. Returns it and the tries.
    Assumes fitting is monotone in the micro-batch (memory grows with it)."""
    options = divisors(batch_size)
    tries: list[tuple[int, bool]] = []

    def probe(m: int) -> bool:
        ok = fits(m)
        tries.append((m, ok))
        return ok

    failed = None
    m = batch_size
    while not probe(m):
        failed = m
        smaller = [d for d in options if d <= m // 2]
        if not smaller:
            raise MicroBatchError(
                "even a micro-batch of 1 does not fit the device memory (tried "
                + ", ".join(f"{m} {'fits' if ok else 'out of memory'}" for m, ok in tries)
                + "): lower data.crop_height/crop_width, use a smaller model.encoder or a larger GPU"
            )
        m = smaller[-1]
    if failed is None:
        return m, tries
    lo, hi = options.index(m), options.index(failed)  # options[lo] fits, options[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(options[mid]):
            lo = mid
        else:
            hi = mid
    return options[lo], tries


class MicroBatchError(UserError, RuntimeError):
    """Not even one sample per forward/backward fits the device."""


def probe_step(
    model: torch.nn.Module,
    loss_fn: Callable,
    micro: int,
    crop: tuple[int, int],
    num_classes: int,
    device: torch.device,
    autocast: Callable,
) -> float:
    """One forward + backward of the real model and loss on a random micro-batch of the training crop;
    returns its seconds. Raises torch.OutOfMemoryError when it does not fit (or when the fault-injection
    variable says so). Leaves no gradient behind; the caller restores BatchNorm statistics."""
    limit = os.environ.get(FAULT_OOM_ENV, "")
    only = os.environ.get(FAULT_OOM_RANK_ENV, "").strip()
    if limit.strip() and micro > int(limit) and only in ("", os.environ.get("RANK", "0")):
        raise torch.OutOfMemoryError(f"injected by {FAULT_OOM_ENV}={limit}: micro-batch {micro}")
    gen = torch.Generator().manual_seed(micro)  # its own generator: the global RNG stays untouched
    h, w = crop
    images = torch.randn(micro, 3, h, w, generator=gen).to(device)
    target = torch.randint(0, num_classes, (micro, h, w), generator=gen).to(device)
    start = time.perf_counter()
    try:
        with autocast():
            logits = model(images)
        loss, _ = loss_fn(logits, target)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        for p in model.parameters():
            p.grad = None


# What cuDNN, cuBLAS and the CUDA runtime say when they cannot allocate their workspace: raised as a plain
# RuntimeError, not torch.OutOfMemoryError, but a micro-batch too large for the device all the same.
ALLOCATION_FAILURES = (
    "CUDNN_STATUS_",  # ALLOC_FAILED, and NOT_SUPPORTED/INTERNAL_ERROR when no algorithm's workspace fits
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDA error: out of memory",
)


def is_allocation_failure(error: BaseException) -> bool:
    """A RuntimeError that means the device ran out of memory (see ALLOCATION_FAILURES)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in ALLOCATION_FAILURES)
    )


def device_identity(device: torch.device) -> str:
    """What a micro-batch found to fit depends on: the GPU model and its memory (or the CPU)."""
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    return f"{props.name}, {props.total_memory / 2**30:.1f} GiB"


def fits_in_memory(device: torch.device, step: Callable[[], float]) -> tuple[bool, float | None]:
    """Run `step` with out-of-memory errors (and cuDNN/cuBLAS allocation failures) caught; on CUDA also require the peak to stay under
    MEMORY_MARGIN of the device's memory. Frees what the try left behind either way."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = step()
    except RuntimeError as e:  # torch.OutOfMemoryError included
        if not is_allocation_failure(e):
            raise
        ok, seconds = False, None
    else:
        ok = True
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            ok = torch.cuda.max_memory_allocated(device) <= MEMORY_MARGIN * total
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ok, seconds
