"""Process infrastructure of a distributed run: stop requests, decisions taken once and shared, model
replicas kept and checked identical. Nothing here knows about segmentation.
"""

from __future__ import annotations

import signal
from typing import Any

import torch
from accelerate import Accelerator

EXIT_REQUEUE = 75  # EX_TEMPFAIL: a checkpoint was saved after a signal; run the same command again


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; the ranks agree on it at the next update and save together.
    Further signals while saving only set the flag again, so they cannot interrupt a write."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


def bare_model(accelerator: Accelerator | None, model: torch.nn.Module) -> torch.nn.Module:
    """The module without DDP and torch.compile wrappers, in whichever order they were put on: its state
    dict has the plain SMP keys, and it runs eagerly (validation sizes vary: no recompilation per size).
    accelerate's unwrap_model(keep_torch_compile=False) strips compile only when it is the outermost
    wrapper, and returns the compiled module from inside DDP (`_orig_mod.` keys)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model


def broadcast_from_main(accelerator: Accelerator, value: Any) -> Any:
    """Rank 0's `value` on every rank. Decisions that read a shared filesystem (which checkpoint to
    resume) are taken once: a rank whose directory listing lags would otherwise skip a collective the
    others make, and hang them."""
    if accelerator.num_processes == 1:
        return value
    box = [value if accelerator.is_main_process else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one all-reduce). For decisions every rank must take
    alike from a per-process flag that a signal may set at any moment: read locally, two ranks can
    differ by a few microseconds, one exits and the other waits in the next collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics. DDP broadcasts buffers only at the start of a
    forward pass, so after the last step of an epoch each rank holds its own; validating those would
    score a model that differs from the one rank 0 saves."""
    if accelerator.num_processes > 1:
        for buffer in bare_model(accelerator, model).buffers():
            torch.distributed.broadcast(buffer, src=0)


def check_replicas(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """DDP keeps replicas identical by construction; verify it (a cheap float64 checksum per rank) rather
    than trust it, so a silent divergence never ships as a checkpoint."""
    bare = bare_model(accelerator, model)
    with torch.no_grad():
        checksum = torch.stack([t.double().sum() for t in [*bare.parameters(), *bare.buffers()]]).sum()
    sums = accelerator.gather(checksum.reshape(1).to(accelerator.device))
    if not torch.equal(sums, sums[:1].expand_as(sums)):
        raise RuntimeError(f"model replicas differ across ranks after training: checksums {sums.tolist()}")
