"""Epochs from a time budget: the largest run whose epochs and validations fit, never fewer than done."""

from __future__ import annotations

import pytest

from modaseg.budget import epochs_for_budget, validations


@pytest.mark.parametrize(
    ("epochs", "val_every", "expected"), [(1, 1, 1), (10, 5, 2), (11, 5, 3), (4, 5, 1), (0, 3, 0)]
)
def test_validations_every_n_epochs_and_after_the_last(epochs, val_every, expected):
    assert validations(epochs, val_every) == expected


def brute_force(budget, spent, epoch_s, val_s, val_every, done, done_val, most):
    fits = [
        e
        for e in range(max(1, done), most + 1)
        if spent + (e - done) * epoch_s + (validations(e, val_every) - done_val) * val_s <= budget
    ]
    return max(fits, default=max(1, done))


@pytest.mark.parametrize("budget", [0, 50, 60, 61, 100, 599, 600, 601, 3600])
@pytest.mark.parametrize("val_s", [0.0, 3.0, 25.0])
@pytest.mark.parametrize("val_every", [1, 4])
def test_epochs_for_budget_is_the_largest_run_that_fits(budget, val_s, val_every):
    args = dict(spent_s=10.0, epoch_s=10.0, validation_s=val_s, val_every=val_every, done_epochs=1)
    got = epochs_for_budget(budget, **args, done_validations=0, most=200)
    assert got == brute_force(budget, 10.0, 10.0, val_s, val_every, 1, 0, 200)


def test_the_cap_and_the_epochs_done_bound_the_answer():
    assert epochs_for_budget(1e9, 10, 10, 1, 1, done_epochs=1, done_validations=0, most=7) == 7
    assert epochs_for_budget(5, 50, 10, 1, 1, done_epochs=3, done_validations=0, most=7) == 3


@pytest.mark.parametrize("epoch_s", [0.0, -1.0, float("nan"), float("inf")])
def test_an_unusable_epoch_time_is_an_error(epoch_s):
    with pytest.raises(ValueError):
        epochs_for_budget(100, 0, epoch_s, 1, 1, done_epochs=1, done_validations=0, most=5)
