"""An exponential moving average of the model's weights (train.ema_decay), the weights that validation,
`best/` and `final/` use when it is on.

Every rank keeps its own copy: under DDP the replicas are identical after each update, so the copies are
too, and no collective is needed. Floating-point buffers (BatchNorm statistics) are averaged like the
weights, integer ones copied. The average is fp32 whatever the training precision, and it is saved in each
checkpoint (`ema.safetensors`) so that a resumed run continues it bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from torch import nn


class WeightAverage:
    """EMA with the usual warm-up of the decay, min(decay, (1 + n) / (10 + n)) at update n: the first
    updates move the average quickly, so an early validation does not score the random decoder."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.tensors = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            average = self.tensors[name]
            if value.is_floating_point():
                average.lerp_(value.detach().float(), 1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors file; the update count travels as a one-element tensor."""
        return {
            **{k: v.contiguous().cpu() for k, v in self.tensors.items()},
            "__updates__": torch.tensor([self.updates]),
        }

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        saved = dict(saved)
        self.updates = int(saved.pop("__updates__").item())
        if saved.keys() != self.tensors.keys():
            raise KeyError(
                f"the saved weight average holds other tensors than the model ({len(saved)} vs {len(self.tensors)})"
            )
        for k, v in saved.items():
            self.tensors[k].copy_(v)

    @contextmanager
    def swapped_in(self, model: nn.Module, accelerator: Accelerator | None = None) -> Iterator[None]:
        """The average in the model for the block (validation, export), the training weights back after.
        Under DDP each rank's BatchNorm statistics, and so their averages, differ: rank 0's go to all."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(live[k].dtype) for k, v in self.tensors.items()})
        if accelerator is not None and accelerator.num_processes > 1:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        try:
            yield
        finally:
            model.load_state_dict(live)
