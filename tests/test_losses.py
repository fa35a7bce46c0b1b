"""Losses against independent float64 references and against SMP where both compute the same thing."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import segmentation_models_pytorch.losses as smp_losses
import torch
import torch.nn.functional as F
from conftest import spawn_gloo
from segmentation_models_pytorch.losses._functional import softmax_focal_loss_with_logits

from modaseg.config import LossConfig
from modaseg.losses import (
    CompositeLoss,
    class_weights,
    cross_entropy,
    focal_loss,
    format_class_weights,
    lovasz_softmax,
    soft_dice_loss,
)

IGNORE = 255
C = 6


def make_batch(
    seed: int, b: int = 2, h: int = 12, w: int = 16, c: int = C, ignore_frac: float = 0.1, scale: float = 3.0
):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = IGNORE
    return logits, target


def rel_close(a: torch.Tensor | float, b: torch.Tensor | float, rtol: float) -> bool:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) <= rtol * max(abs(b), 1e-12)


# --------------------------------------------------------------------------- float64 oracles


def ref_probs_labels(logits: torch.Tensor, target: torch.Tensor):
    """[P, C] float64 probabilities and [P] labels of the non-ignored pixels (Berman's flatten_probas)."""
    probs = logits.double().softmax(1)
    c = probs.shape[1]
    probs = probs.movedim(1, -1).reshape(-1, c)
    labels = target.reshape(-1)
    valid = labels != IGNORE
    return probs[valid], labels[valid]


def berman_lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Berman et al., lovasz_losses.py, lovasz_grad: gradient of the Lovasz extension (Alg. 1)."""
    p = len(gt_sorted)
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if p > 1:
        jaccard[1:p] = jaccard[1:p] - jaccard[0:-1]
    return jaccard


def berman_lovasz_softmax_flat(probas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Berman et al., lovasz_softmax_flat with classes="present": one sort per class."""
    if probas.numel() == 0:
        return probas.sum() * 0.0
    losses = []
    for c in range(probas.size(1)):
        fg = (labels == c).to(probas.dtype)
        if fg.sum() == 0:
            continue
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, berman_lovasz_grad(fg[perm])))
    return torch.stack(losses).mean()


def ref_focal(logits, target, gamma, alpha=None):
    probs, labels = ref_probs_labels(logits, target)
    pt = probs[torch.arange(len(labels)), labels]
    w = torch.ones_like(pt) if alpha is None else alpha.double()[labels]
    return (w * (1 - pt) ** gamma * -torch.log(pt)).sum() / w.sum()


def ref_dice(logits, target, weights=None):
    probs, labels = ref_probs_labels(logits, target)
    onehot = F.one_hot(labels, probs.shape[1]).double()
    inter = (probs * onehot).sum(0)
    card = probs.sum(0) + onehot.sum(0)
    present = onehot.sum(0) > 0
    w = torch.ones(probs.shape[1], dtype=torch.float64) if weights is None else weights.double()
    loss = 1 - 2 * inter / card
    return (loss * w)[present].sum() / w[present].sum()


# --------------------------------------------------------------------------- class weights


COUNTS = [800, 100, 50, 50]


def test_class_weights_inverse_clipped_and_normalised():
    # f = [.8, .1, .05, .05] -> 1/f = [1.25, 10, 20, 20]; clip at 10 x 1.25 = 12.5; mean 1.
    raw = torch.tensor([1.25, 10.0, 12.5, 12.5])
    expected = raw / raw.mean()
    got = class_weights(COUNTS, "inverse", max_ratio=10.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    assert math.isclose(float(got.max() / got.min()), 10.0, rel_tol=1e-6)


def test_class_weights_power_and_none():
    raw = torch.tensor([0.8, 0.1, 0.05, 0.05]) ** -0.5
    torch.testing.assert_close(class_weights(COUNTS, "power", power=0.5), raw / raw.mean())
    torch.testing.assert_close(class_weights(COUNTS, "none"), torch.ones(4))


def test_class_weights_effective_number():
    beta = 0.99
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in COUNTS], dtype=torch.float64)
    got = class_weights(COUNTS, "effective_number", beta=beta, max_ratio=100.0)
    torch.testing.assert_close(got, (raw / raw.mean()).float())


def test_class_weights_zero_count_class_gets_the_clip_value():
    got = class_weights([900, 100, 0], "inverse", max_ratio=5.0)
    assert torch.isfinite(got).all()
    assert math.isclose(float(got[2] / got[0]), 5.0, rel_tol=1e-6)
    assert math.isclose(float(got[1] / got[0]), 5.0, rel_tol=1e-6)  # 9x, clipped to 5x


@pytest.mark.parametrize(
    ("counts", "scheme", "kwargs", "message"),
    [
        ([1, 2], "sqrt", {}, "not one of"),
        ([1, -2], "inverse", {}, "negative"),
        ([0, 0], "inverse", {}, "all zero"),
        ([], "inverse", {}, "empty"),
        ([1, 2], "inverse", {"max_ratio": 0.5}, "max_ratio"),
        ([1, 2], "effective_number", {"beta": 1.0}, "effective_beta"),
    ],
)
def test_class_weights_bad_input(counts, scheme, kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_weights(counts, scheme, **kwargs)


def test_format_class_weights():
    assert format_class_weights(torch.tensor([0.5, 2.0]), ["background", "bag"]) == "background=0.5 bag=2"


# --------------------------------------------------------------------------- components vs references


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_matches_torch_and_float64(seed):
    logits, target = make_batch(seed)
    weight = torch.rand(C, generator=torch.Generator().manual_seed(seed)) + 0.1
    probs, labels = ref_probs_labels(logits, target)
    nll = -torch.log(probs[torch.arange(len(labels)), labels])
    assert rel_close(cross_entropy(logits, target), nll.mean(), 1e-5)
    w = weight.double()[labels]
    assert rel_close(cross_entropy(logits, target, weight), (w * nll).sum() / w.sum(), 1e-5)
    torch_ce = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE)
    assert rel_close(cross_entropy(logits, target, weight), torch_ce, 1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_float64_reference(gamma):
    logits, target = make_batch(3)
    alpha = torch.rand(C, generator=torch.Generator().manual_seed(1)) + 0.1
    assert rel_close(focal_loss(logits, target, gamma), ref_focal(logits, target, gamma), 1e-5)
    assert rel_close(focal_loss(logits, target, gamma, alpha), ref_focal(logits, target, gamma, alpha), 1e-5)


def test_focal_equals_smp_softmax_focal_without_ignore_or_alpha():
    # SMP's functional softmax focal has neither alpha nor an ignore label; where it applies, it agrees.
    logits, target = make_batch(4, ignore_frac=0.0)
    ours = focal_loss(logits.float(), target, gamma=2.0)
    smp = softmax_focal_loss_with_logits(logits.float(), target, gamma=2.0, reduction="mean")
    assert rel_close(ours, smp, 1e-5)


def test_focal_is_not_smp_sigmoid_focal():
    # Documented difference: SMP's FocalLoss("multiclass") is a one-vs-all sigmoid loss.
    logits, target = make_batch(5)
    smp = smp_losses.FocalLoss("multiclass", gamma=2.0, ignore_index=IGNORE)(logits.float(), target)
    assert not rel_close(focal_loss(logits, target, gamma=2.0), smp, 1e-2)


def test_focal_gamma_zero_is_weighted_cross_entropy():
    logits, target = make_batch(6)
    alpha = torch.linspace(0.5, 3.0, C)
    assert rel_close(focal_loss(logits, target, 0.0, alpha), cross_entropy(logits, target, alpha), 1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_dice_matches_float64_reference(weighted):
    logits, target = make_batch(7)
    target[target == 2] = 0  # one class absent from the ground truth
    weights = torch.linspace(0.2, 2.0, C) if weighted else None
    assert rel_close(soft_dice_loss(logits, target, weights), ref_dice(logits, target, weights), 1e-5)


def test_dice_equals_smp_when_all_classes_present_and_scales_otherwise():
    logits, target = make_batch(8)
    weights = torch.linspace(0.2, 2.0, C)
    smp = smp_losses.DiceLoss("multiclass", ignore_index=IGNORE, class_weights=weights.tolist())
    assert all((target == c).any() for c in range(C))
    assert rel_close(soft_dice_loss(logits, target, weights), smp(logits.float(), target), 1e-5)
    # SMP counts an absent class as loss 0 in a mean over all classes; we average over present ones.
    target[target == 3] = 0
    present = torch.tensor([(target == c).any() for c in range(C)])
    scale = weights[present].sum() / weights.sum()
    assert rel_close(soft_dice_loss(logits, target, weights) * scale, smp(logits.float(), target), 1e-5)


@pytest.mark.parametrize(("seed", "scale"), [(0, 3.0), (1, 0.3), (2, 10.0)])
def test_lovasz_matches_berman_reference_float64(seed, scale):
    logits, target = make_batch(seed, b=2, h=20, w=24, scale=scale)
    target[target == 4] = 1  # classes="present": an absent class is skipped
    expected = berman_lovasz_softmax_flat(*ref_probs_labels(logits, target))
    assert rel_close(lovasz_softmax(logits, target), expected, 1e-5)  # our float32 path
    assert rel_close(lovasz_softmax(logits.float(), target), expected, 1e-5)


def test_lovasz_gradient_matches_reference():
    logits, target = make_batch(9, b=2, h=16, w=16)
    ours_x = logits.float().requires_grad_()
    lovasz_softmax(ours_x, target).backward()
    ref_x = logits.clone().requires_grad_()
    berman_lovasz_softmax_flat(*ref_probs_labels(ref_x, target)).backward()
    torch.testing.assert_close(ours_x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-7)


def test_lovasz_large_batch_precision():
    # 200k pixels: the reference algorithm in float32 (SMP) is off by ~1.3e-6 relative here, from
    # differences of nearly equal Jaccard values; our closed-form increments stay at ~3e-8.
    logits, target = make_batch(10, b=2, h=250, w=400, c=4, scale=1.0)
    expected = berman_lovasz_softmax_flat(*ref_probs_labels(logits, target))
    assert rel_close(lovasz_softmax(logits.float(), target), expected, 5e-7)


def test_lovasz_equals_smp():
    logits, target = make_batch(11, b=2, h=20, w=24)
    smp = smp_losses.LovaszLoss("multiclass", ignore_index=IGNORE)(logits.float(), target)
    assert rel_close(lovasz_softmax(logits.float(), target), smp, 1e-5)


def test_lovasz_ignored_pixels_get_no_gradient():
    logits, target = make_batch(12, ignore_frac=0.3)
    x = logits.float().requires_grad_()
    lovasz_softmax(x, target).backward()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(x)
    assert ignored.any()
    assert x.grad[ignored].abs().max() == 0
    assert x.grad[~ignored].abs().max() > 0


# --------------------------------------------------------------------------- composite


def composite_cfg(**kw) -> LossConfig:
    base = {
        "ce": 0.5,
        "focal": 1.0,
        "dice": 0.7,
        "lovasz": 0.3,
        "focal_gamma": 2.0,
        "focal_alpha": True,
        "ce_weighted": True,
    }
    base.update(kw)
    return LossConfig(**base)


def test_composite_is_weighted_sum_of_components():
    logits, target = make_batch(13)
    logits = logits.float()
    weights = torch.linspace(0.5, 2.0, C)
    total, parts = CompositeLoss(composite_cfg(), C, weights)(logits, target)
    expected = {
        "ce": cross_entropy(logits, target, weights),
        "focal": focal_loss(logits, target, 2.0, weights),
        "dice": soft_dice_loss(logits, target, weights),
        "lovasz": lovasz_softmax(logits, target),
    }
    assert set(parts) == set(expected)
    for name, value in expected.items():
        assert rel_close(parts[name], value, 1e-6), name
        assert not parts[name].requires_grad
    assert rel_close(
        total,
        0.5 * expected["ce"] + expected["focal"] + 0.7 * expected["dice"] + 0.3 * expected["lovasz"],
        1e-6,
    )


def test_composite_reports_only_weighted_in_components_and_honours_flags():
    logits, target = make_batch(14)
    weights = torch.linspace(0.5, 2.0, C)
    cfg = composite_cfg(dice=0.0, lovasz=0.0, focal_alpha=False, ce_weighted=False)
    total, parts = CompositeLoss(cfg, C, weights)(logits, target)
    assert set(parts) == {"ce", "focal"}
    assert rel_close(parts["ce"], cross_entropy(logits, target), 1e-6)
    assert rel_close(parts["focal"], focal_loss(logits, target, 2.0), 1e-6)
    assert rel_close(total, 0.5 * parts["ce"] + parts["focal"], 1e-6)


def test_composite_class_weights_follow_the_module_device_and_validate():
    loss = CompositeLoss(composite_cfg(), C, torch.ones(C))
    assert "class_weights" in dict(loss.named_buffers())
    with pytest.raises(ValueError, match="shape"):
        CompositeLoss(composite_cfg(), C, torch.ones(C + 1))
    with pytest.raises(ValueError, match="finite and > 0"):
        CompositeLoss(composite_cfg(), C, torch.zeros(C))
    with pytest.raises(ValueError, match="not all 0"):
        CompositeLoss(composite_cfg(ce=0.0, focal=0.0, dice=0.0, lovasz=0.0), C)


def test_bad_inputs_name_the_problem():
    loss = CompositeLoss(composite_cfg(), C)
    logits, target = make_batch(15)
    with pytest.raises(ValueError, match="channels"):
        loss(logits[:, :4], target)
    bad = target.clone()
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"outside 0\.\.5.*\[9\]"):
        loss(logits, bad)
    with pytest.raises(ValueError, match="spatial"):
        loss(logits, target[:, :5])
    with pytest.raises(ValueError, match="integer"):
        loss(logits, target.float())


EDGE_CASES = {
    "all_ignored": lambda t: torch.full_like(t, IGNORE),
    "single_class": lambda t: torch.full_like(t, 3),
    "single_class_with_ignore": lambda t: torch.where(t == IGNORE, t, torch.full_like(t, 0)),
    "two_classes_present": lambda t: t % 2,
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("dice_global", [False, True])
def test_edge_cases_finite_loss_and_gradient(case, dice_global):
    logits, target = make_batch(16)
    target = EDGE_CASES[case](target)
    x = logits.float().requires_grad_()
    total, parts = CompositeLoss(composite_cfg(dice_global=dice_global), C, torch.linspace(0.5, 2, C))(
        x, target
    )
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())
    assert torch.isfinite(x.grad).all()
    if case == "all_ignored":
        assert total.item() == 0.0
        assert x.grad.abs().max() == 0


def test_extreme_logits_finite():
    logits, target = make_batch(17, scale=1e4)
    x = logits.float().requires_grad_()
    total, _ = CompositeLoss(composite_cfg(focal_gamma=0.5), C)(x, target)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(x.grad).all()


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, C, 3, padding=1)
    images = torch.randn(2, 3, 24, 32)
    target = torch.randint(0, C, (2, 24, 32))
    loss = CompositeLoss(composite_cfg(), C, torch.linspace(0.5, 2, C))
    ref_total, ref_parts = loss(conv(images), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(images)
        assert logits.dtype == torch.bfloat16
        total, parts = loss(logits, target)
    assert total.dtype == torch.float32
    # Only the bf16 rounding of the logits differs (relative 2^-8); the loss math is float32.
    assert rel_close(total, ref_total, 2e-2)
    for name in ref_parts:
        assert rel_close(parts[name], ref_parts[name], 2e-2), name
    exact, _ = loss(logits.detach().float(), target)
    assert rel_close(total, exact, 1e-6)


# --------------------------------------------------------------------------- dice_global on 2 processes

SIZES = (3, 1)  # uneven images per rank


def global_batch():
    logits, target = make_batch(20, b=sum(SIZES), h=10, w=12)
    target[target == 5] = 2  # a class absent everywhere
    target[0] = 1  # rank 0 and rank 1 see different class sets
    return logits.float(), target


def _dice_global_worker(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    logits, target = global_batch()
    start = sum(SIZES[:rank])
    x = logits[start : start + SIZES[rank]].clone().requires_grad_()
    weights = torch.linspace(0.5, 2.0, C)
    total, parts = CompositeLoss(
        composite_cfg(ce=0.0, focal=0.0, dice=1.0, lovasz=0.0, dice_global=True), C, weights
    )(x, target[start : start + SIZES[rank]])
    total.backward()
    local = soft_dice_loss(x.detach(), target[start : start + SIZES[rank]], weights)
    torch.save(
        {"loss": total.detach(), "dice": parts["dice"], "local": local, "grad": x.grad, "world": world},
        Path(out_dir) / f"rank{rank}.pt",
    )


@pytest.mark.multiprocess
@pytest.mark.slow
def test_dice_global_two_processes_equals_one_process_on_the_whole_batch():
    logits, target = global_batch()
    weights = torch.linspace(0.5, 2.0, C)
    x = logits.clone().requires_grad_()
    expected = soft_dice_loss(x, target, weights)
    expected.backward()
    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo(_dice_global_worker, args=(tmp,))
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    grads = torch.cat([r["grad"] for r in ranks])
    for r in ranks:
        assert r["world"] == 2
        assert rel_close(r["loss"], expected, 1e-6)
        assert rel_close(r["dice"], expected, 1e-6)
        assert not rel_close(r["local"], expected, 1e-3)  # the per-rank Dice really differs
    # The all-reduce backward sums the (equal) upstream gradients of the 2 ranks; DDP's averaging of
    # parameter gradients divides by 2 again, giving the gradient of the global-batch Dice.
    torch.testing.assert_close(grads / 2, x.grad, rtol=1e-5, atol=1e-8)


def test_lovasz_releases_its_buffer_after_backward():
    """The custom backward keeps one [K, N] fp32 gradient; it must not outlive the backward pass while the
    caller still holds the loss (the trainer logs it after backward)."""
    from modaseg.losses import _LovaszSoftmax

    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    target = torch.randint(0, 4, (2, 16, 16))
    loss = lovasz_softmax(logits, target)
    node = loss.grad_fn
    while (
        not isinstance(getattr(node, "_forward_cls", None), type) or node._forward_cls is not _LovaszSoftmax
    ):
        node = node.next_functions[0][0]
    assert node.grad is not None  # the custom function's context holds the buffer until backward
    loss.backward()
    assert node.grad is None


# --------------------------------------------------------------------------- sync-free, deterministic


class _OpAudit(torch.overrides.TorchFunctionMode):
    """Every torch call made inside, with its keyword arguments and its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, dict, list[torch.Tensor]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in (out if isinstance(out, tuple | list) else (out,)) if isinstance(t, torch.Tensor)]
        self.calls.append((getattr(func, "__name__", str(func)), kwargs, outs))
        return out


def test_composite_loss_runs_on_the_meta_device_so_it_never_reads_data_back():
    """The meta device has shapes and no data: any host sync (`.any()`/`.item()` in a branch, boolean
    indexing, nonzero, bincount) raises there. Forward and backward of every component must run, so the
    training step can be compiled and CUDA-graphed without a sync per micro-batch."""
    loss = CompositeLoss(composite_cfg(), C, torch.linspace(0.5, 2.0, C)).to("meta")
    logits = torch.empty(2, C, 12, 16, device="meta", requires_grad=True)
    target = torch.empty(2, 12, 16, dtype=torch.long, device="meta")
    total, parts = loss(logits, target)
    assert set(parts) == {"ce", "focal", "dice", "lovasz"} and total.shape == ()
    total.backward()
    assert logits.grad.shape == logits.shape


def test_lovasz_sorts_32_bit_keys_per_class_row():
    """One sort along the rows of a [C, N] int32 key (no [C*N] int64 keys or flat sort): the only int64
    tensor of C*N elements is the sort's permutation."""
    logits, target = make_batch(21, b=2, h=24, w=20)
    n = target.numel()
    with _OpAudit() as audit:
        lovasz_softmax(logits.float(), target)
    sorts = [(kw, outs) for name, kw, outs in audit.calls if name == "sort"]
    assert len(sorts) == 1
    kwargs, (values, indices) = sorts[0]
    assert kwargs.get("dim") == 1 and values.dtype == torch.int32 and values.shape == (C, n)
    wide = [
        o
        for _, _, outs in audit.calls
        for o in outs
        if o.dtype == torch.int64 and o.numel() >= C * n and o is not indices
    ]
    assert wide == []


def test_cross_entropy_uses_no_reduction_without_a_deterministic_cuda_kernel():
    """nll_loss with reduction "sum"/"mean" has no deterministic CUDA kernel (train.deterministic=true
    refuses it there): the loss sums reduction="none" itself. The GPU test below runs it on CUDA."""
    logits, target = make_batch(22)
    weights = torch.linspace(0.5, 2.0, C)
    with _OpAudit() as audit:
        value = cross_entropy(logits, target, weights)
        CompositeLoss(composite_cfg(), C, weights)(logits, target)
    reductions = {kw.get("reduction", "mean") for name, kw, _ in audit.calls if name == "nll_loss"}
    assert reductions == {"none"}
    expected = F.cross_entropy(logits, target, weight=weights.double(), ignore_index=IGNORE)
    assert rel_close(value, expected, 1e-6)


GPU_LOSS_SCRIPT = """
import torch
from modaseg.config import LossConfig
from modaseg.losses import CompositeLoss
torch.use_deterministic_algorithms(True)
cfg = LossConfig(ce=0.5, focal=1.0, dice=0.7, lovasz=0.3)
g = torch.Generator().manual_seed(0)
logits = torch.randn(4, 14, 96, 64, generator=g, dtype=torch.float32) * 3
target = torch.randint(0, 14, (4, 96, 64), generator=g)
target[:, :8] = 255
weights = torch.linspace(0.5, 2.0, 14)
results = []
for device in ("cpu", "cuda"):
    x = logits.to(device).requires_grad_()
    loss = CompositeLoss(cfg, 14, weights).to(device)
    t = target.to(device)
    loss(x, t)[0].backward()  # warm-up: the first forward and backward allocate, and may sync
    x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    total, parts = loss(x, t)
    total.backward()
    if device == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    results.append((total.detach().cpu(), x.grad.cpu()))
(a, ga), (b, gb) = results
torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
print("ok")
"""


@pytest.mark.gpu
def test_composite_loss_on_cuda_is_sync_free_deterministic_and_equals_cpu():
    """On a GPU: under torch.use_deterministic_algorithms(True) and torch.cuda.set_sync_debug_mode("error")
    the composite loss's forward and backward run (no non-deterministic kernel, no host sync) and equal
    the CPU's."""
    import subprocess
    import sys

    from conftest import ROOT, gpu_env, require_gpus

    require_gpus(1)
    env = gpu_env(PYTHONPATH=str(ROOT), CUBLAS_WORKSPACE_CONFIG=":4096:8")
    result = subprocess.run(
        [sys.executable, "-c", GPU_LOSS_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
