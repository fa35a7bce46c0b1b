"""The weight average against a plain loop written from its definition."""

from __future__ import annotations

import torch
from torch import nn

from modaseg.ema import WeightAverage


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def test_average_follows_its_definition_for_weights_and_buffers():
    model = small_model()
    average = WeightAverage(model, decay=0.9)
    reference = {k: v.clone().double() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in range(25):
        model.train()
        loss = model(torch.randn(2, 3, 8, 8)).square().mean()  # BatchNorm statistics move too
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average.update(model)
        decay = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            reference[k] = (
                decay * reference[k] + (1 - decay) * v.double() if v.is_floating_point() else v.clone()
            )
    for k, v in reference.items():
        if v.is_floating_point():
            torch.testing.assert_close(average.tensors[k].double(), v, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(average.tensors[k], v), k


def test_swapped_in_uses_the_average_then_restores_the_training_weights_exactly():
    model = small_model()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with average.swapped_in(model):
        for k, v in model.state_dict().items():
            assert torch.equal(v, average.tensors[k].to(v.dtype)), k
        assert not torch.equal(model[0].weight, live["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_state_dict_round_trip_continues_identically():
    model = small_model()
    a = WeightAverage(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        a.update(model)
    b = WeightAverage(small_model(), decay=0.99)
    b.load_state_dict(a.state_dict())
    assert b.updates == a.updates == 3
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    a.update(model)
    b.update(model)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
