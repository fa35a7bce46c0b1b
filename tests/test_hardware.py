"""What the machine can do: the micro-batch search, the data-worker plan, the cores a process may use, and
which settings ask for a GPU. Pure functions and real subprocesses; the GPU test skips without CUDA."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, gpu_env, require_gpus

from modaseg.hardware import (
    CUDA12_HINT,
    WORKER_SAMPLES_PER_S,
    DeviceError,
    MicroBatchError,
    choose_device,
    divisors,
    fits_in_memory,
    gpu_requested,
    has_kernels_for,
    local_processes,
    plan_workers,
    search_micro_batch,
)


def limit(largest: int, calls: list[int] | None = None):
    """`fits` for a device on which micro-batches up to `largest` fit (monotone, as memory is)."""

    def fits(m: int) -> bool:
        if calls is not None:
            calls.append(m)
        return m <= largest

    return fits


@pytest.mark.parametrize(
    ("batch", "largest", "found", "tried"),
    [
        (8, 8, 8, [8]),  # the full batch fits: one try
        (8, 1, 1, [8, 4, 2, 1]),  # halving down to 1
        (12, 5, 4, [12, 6, 3, 4]),  # halving to 3 fits, 6 does not; 4 is the only divisor between
        (24, 7, 6, [24, 12, 6, 8]),  # halving to 6, then 8 (between 6 and 12) does not fit
        (16, 13, 8, [16, 8]),  # 8 fits and 16 does not: no divisor between them
        (7, 6, 1, [7, 1]),  # a prime batch: 7 or 1, nothing between
        (9, 4, 3, [9, 3]),  # 9 -> 3 (the largest divisor <= 4) fits
    ],
)
def test_search_micro_batch_halves_then_searches_upward(batch, largest, found, tried):
    calls: list[int] = []
    micro, tries = search_micro_batch(limit(largest, calls), batch)
    assert micro == found
    assert [m for m, _ in tries] == tried == calls  # every probe is recorded, none repeated
    assert all(ok == (m <= largest) for m, ok in tries)
    assert batch % micro == 0


@pytest.mark.parametrize("batch", [1, 2, 6, 7, 12, 30, 64, 97])
def test_search_micro_batch_finds_the_largest_fitting_divisor(batch):
    for largest in range(1, batch + 1):
        micro, tries = search_micro_batch(limit(largest), batch)
        assert micro == max(d for d in divisors(batch) if d <= largest)
        halvings, bisections = math.log2(batch) + 1, math.log2(len(divisors(batch))) + 1
        assert len({m for m, _ in tries}) == len(tries) <= halvings + bisections
        # Monotone: whatever was tried above the answer did not fit, whatever was tried at or below fit.
        assert all(ok == (m <= micro) for m, ok in tries)


def test_search_micro_batch_when_not_even_one_fits():
    with pytest.raises(MicroBatchError, match=r"even a micro-batch of 1 does not fit .*4 out of memory"):
        search_micro_batch(lambda m: False, 4)
    with pytest.raises(MicroBatchError, match="data.crop_height"):
        search_micro_batch(lambda m: False, 1)


def test_search_micro_batch_larger_micro_batches_never_fit_when_smaller_fail():
    """The search trusts monotonicity: it never probes above a size that failed."""
    for batch in (12, 24, 48):
        for largest in range(1, batch + 1):
            _, tries = search_micro_batch(limit(largest), batch)
            failed = [m for m, ok in tries if not ok]
            for a, b in itertools.pairwise(tries):
                if not a[1]:
                    assert b[0] < a[0], tries
            assert all(m > largest for m in failed)


@pytest.mark.parametrize(
    ("rate", "cores", "processes", "workers"),
    [
        (None, 8, 1, 1),  # rate unknown: one worker
        (None, 1, 1, 0),  # one core: load in the training process
        (None, 2, 2, 0),  # two processes on two cores: no core to spare
        (5 * WORKER_SAMPLES_PER_S, 8, 1, 5),  # enough to feed the measured rate
        (50 * WORKER_SAMPLES_PER_S, 8, 1, 7),  # ... within the spare cores
        (50 * WORKER_SAMPLES_PER_S, 32, 4, 7),  # 8 cores per process, one for the process itself
        (0.5, 16, 2, 1),  # a slow model still gets one worker
        (3 * WORKER_SAMPLES_PER_S, 2.5, 1, 1),  # a fractional cgroup quota rounds down
    ],
)
def test_plan_workers(rate, cores, processes, workers):
    planned, reason = plan_workers(rate, cores=cores, processes=processes)
    assert planned == workers
    assert f"{cores:g} core(s) for {processes} process(es)" in reason


def test_local_processes_as_the_launcher_says(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_processes() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    assert local_processes() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's (accelerate launch) wins
    assert local_processes() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "garbage")
    assert local_processes() == 2


@pytest.mark.slow
def test_available_cores_follow_the_cpu_affinity_and_the_local_ranks():
    """In a real subprocess pinned to one core: available_cores() sees 1, and plan_workers shares the
    cores between the local ranks that LOCAL_WORLD_SIZE announces."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = textwrap.dedent(
        """
        import os
        from modaseg.hardware import available_cores, plan_workers
        full = available_cores()
        first = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {first})
        print(full, available_cores(), plan_workers(None)[0], plan_workers(None, cores=16)[0])
        """
    )
    env = {**os.environ, "LOCAL_WORLD_SIZE": "4"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    full, pinned, workers_pinned, workers_16 = out.stdout.split()
    assert 1 <= float(full) <= len(os.sched_getaffinity(0))
    assert float(pinned) == 1.0
    assert int(workers_pinned) == 0  # 1 core for 4 local processes
    assert int(workers_16) == 1  # 16 cores / 4 processes = 4 each: 3 spare, 1 needed


@pytest.mark.parametrize(
    ("setting", "env", "asked"),
    [
        ("auto", {}, None),
        ("auto", {"CUDA_VISIBLE_DEVICES": ""}, None),  # what the test suite sets: hidden, not asked
        ("auto", {"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ("auto", {"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
        ("auto", {"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
        ("auto", {"SLURM_GPUS_ON_NODE": "1"}, "SLURM_GPUS_ON_NODE=1"),
        ("auto", {"SLURM_GPUS_ON_NODE": "0"}, None),
        ("auto", {"SLURM_JOB_GPUS": "(null)"}, None),
        ("cuda", {}, "train.device=cuda"),
        ("cpu", {"CUDA_VISIBLE_DEVICES": "0", "SLURM_GPUS_ON_NODE": "4"}, None),
    ],
)
def test_gpu_requested(monkeypatch, setting, env, asked):
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    found = gpu_requested(setting)
    assert found is None if asked is None else asked in found


def test_the_suite_sees_no_gpu_and_asks_for_none():
    """conftest hides the GPUs (CUDA_VISIBLE_DEVICES=""), which is no GPU request: the CPU is chosen."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert choose_device("auto").type == "cpu"
    assert choose_device("cpu").reason == "train.device=cpu"
    with pytest.raises(
        DeviceError, match=r"a GPU was asked for \(train.device=cuda\) but .*train.device=cpu"
    ):
        choose_device("cuda")


def test_cuda12_hint_points_at_the_readme_section():
    heading = "## GPUs with an older driver or a V100"
    assert heading in (ROOT / "README.md").read_text()
    assert f"'{heading.removeprefix('## ')}'" in CUDA12_HINT


@pytest.mark.gpu
def test_micro_batch_search_on_a_real_gpu():
    """On a GPU limited to 10% of its memory: the search ends at a divisor that fits, the next larger
    divisor does not (a real out-of-memory error), and the probes leave no memory allocated."""
    require_gpus(1)
    code = textwrap.dedent(
        """
        import torch
        from modaseg.config import LossConfig, ModelConfig
        from modaseg.hardware import divisors, fits_in_memory, probe_step, search_micro_batch
        from modaseg.losses import CompositeLoss
        from modaseg.model import build_model

        device = torch.device("cuda", 0)
        torch.cuda.set_per_process_memory_fraction(0.1, device)
        model = build_model(ModelConfig(encoder="resnet18"), 14).to(device)
        loss = CompositeLoss(LossConfig(), 14, torch.ones(14, device=device), 255)
        crop, batch = (256, 256), 1024  # tens of GB of activations: more than 10% of any GPU holds

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)

        def fits(m):
            return fits_in_memory(device, lambda: probe_step(model, loss, m, crop, 14, device, autocast))[0]

        micro, tries = search_micro_batch(fits, batch)
        larger = [d for d in divisors(batch) if d > micro][0]
        print(micro, larger, fits(micro), fits(larger), len(tries), torch.cuda.memory_allocated(device))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    micro, larger, fits_micro, fits_larger, tries, allocated = out.stdout.split()
    assert 1 <= int(micro) < int(larger) <= 1024 and 1024 % int(larger) == 0
    assert fits_micro == "True" and fits_larger == "False"
    assert int(tries) >= 2
    # Only the model and loss stay: no activation of a probe is left behind.
    assert int(allocated) < 200 * 2**20


# torch.cuda.get_arch_list() of a CUDA 13 build of torch 2.14 (no sm_89: Ada runs the sm_86/sm_80 code)
CUDA13_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_110", "sm_120", "compute_120"]


@pytest.mark.parametrize(
    ("arches", "capability", "ok"),
    [
        (CUDA13_ARCHES, (8, 9), True),  # L4, L40S: same major, lower minor present
        (CUDA13_ARCHES, (8, 0), True),  # A100: exact
        (CUDA13_ARCHES, (12, 1), True),  # sm_120 binary code runs on 12.1
        (CUDA13_ARCHES, (7, 0), False),  # V100: no sm_70 and no PTX old enough
        (CUDA13_ARCHES, (13, 0), True),  # a newer major runs the compute_120 PTX
        (["sm_75", "sm_80", "sm_86", "sm_90"], (13, 0), False),  # no PTX: a newer major has no kernels
        (["sm_86"], (8, 0), False),  # code for a higher minor does not run on a lower one
        (["sm_90a"], (9, 0), True),  # arch-specific code: that capability only
        (["sm_90a"], (9, 1), False),
        (["compute_70"], (8, 6), True),  # PTX is compiled for any newer GPU
    ],
)
def test_has_kernels_for_follows_cuda_compatibility(arches, capability, ok):
    assert has_kernels_for(arches, *capability) is ok


@pytest.mark.parametrize(("capability", "device"), [((8, 9), "cuda"), ((7, 0), "cpu")])
def test_device_auto_takes_an_ada_gpu(monkeypatch, capability, device):
    """device=auto with a usable driver and a GPU of `capability` on a CUDA 13 build (the device queries
    answered as such a machine would): Ada (sm_89) trains on the GPU, a V100 (sm_70) falls back to CPU."""
    import torch

    import modaseg.hardware as hardware

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(hardware, "cuda_driver_version", lambda: (13, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CUDA13_ARCHES)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA L4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert choose_device("auto").type == device


@pytest.mark.parametrize(
    "message",
    [
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    ],
)
def test_cudnn_and_cublas_allocation_failures_do_not_fit(message):
    """What cuDNN, cuBLAS and the CUDA runtime raise (a plain RuntimeError) when a micro-batch's workspace
    does not fit counts as out of memory: the search goes on with a smaller one."""
    import torch

    def step() -> float:
        raise RuntimeError(message)

    assert fits_in_memory(torch.device("cpu"), step) == (False, None)


def test_other_errors_of_a_probe_step_are_not_taken_for_out_of_memory():
    import torch

    def step() -> float:
        raise RuntimeError("Given groups=1, weight of size [64, 3, 7, 7], expected input to have 3 channels")

    with pytest.raises(RuntimeError, match="expected input"):
        fits_in_memory(torch.device("cpu"), step)
