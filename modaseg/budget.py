"""A training run sized to the time a user gives (train.max_minutes): the number of epochs follows from
the measured time of the first one, so that the learning-rate schedule, which decays over the planned
updates, completes inside the budget instead of being cut off halfway."""

from __future__ import annotations

import math


def validations(epochs: int, val_every: int) -> int:
    """How many validations a run of `epochs` makes: every `val_every` epochs and after the last one."""
    return epochs // val_every + (1 if epochs % val_every else 0)


def epochs_for_budget(
    budget_s: float,
    spent_s: float,
    epoch_s: float,
    validation_s: float,
    val_every: int,
    done_epochs: int,
    done_validations: int,
    most: int,
) -> int:
    """The most epochs (at least `done_epochs` and 1, at most `most`) whose training and validations fit
    in `budget_s`, when `spent_s` went on the `done_epochs` and `done_validations` so far, an epoch takes
    `epoch_s` and a validation `validation_s`."""
    if not (epoch_s > 0 and math.isfinite(epoch_s)) or not (
        validation_s >= 0 and math.isfinite(validation_s)
    ):
        raise ValueError(
            f"epoch and validation times must be finite and positive, got {epoch_s}, {validation_s}"
        )
    best = max(1, done_epochs)
    for epochs in range(best + 1, most + 1):
        to_validate = validations(epochs, val_every) - done_validations
        if spent_s + (epochs - done_epochs) * epoch_s + to_validate * validation_s > budget_s:
            break
        best = epochs
    return min(best, most)
