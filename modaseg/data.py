"""Streaming loaders over the shards written by `modaseg-shard` (layout and manifest: modaseg/manifest.py).

Training: an epoch is one pass over the training samples. Every process builds the same sequence of
shard segments for the epoch (the shards in an order drawn from (seed, epoch); with `data.mix`, each
folder's samples as often as its weight asks, see `epoch_segments`), cuts it into one contiguous block
per rank and the rank's block into one slice per data worker, in proportion to the batches each worker
yields. A worker reads its slice sequentially (one or two shard segments, from an offset), so every
sample of the epoch is read by exactly one worker, and its quota of batches holds the whole slice: every
sample is trained on once per epoch for any number of ranks and workers. The rest of a worker's quota
(the rounding up to whole batches, and repeat-factor copies beyond the planned count) is filled from
further passes drawn after the epoch's, so all ranks run the same number of steps and DDP never waits on
a rank that ran out of data. Everything random in a worker (repeat-factor rounding, shuffle buffer,
augmentation) comes from one RNG derived from (seed, epoch, rank, worker): a run resumed at an epoch
boundary, or fast-forwarded inside one, sees the batches an uninterrupted run would have seen.

Evaluation: the split's samples (in manifest order) are cut into one contiguous block per rank, and a
rank's samples are dealt round-robin to its workers, so every sample of the split is seen exactly once,
at its original resolution, and every rank has work whatever the number of shards. A corrupt sample is an error there: an evaluation that silently skips samples reports
wrong numbers. In training it is skipped, counted (`batch["skipped"]`) and logged with shard and key.

Only the fields the sharder wrote are decoded, with explicit decoders (never webdataset's default
decoders, which unpickle `.pyd` fields and turn single-channel PNG label maps into RGB).
Images stay uint8: normalisation happens on the device (smaller host->device copies). The loaders are
plain DataLoaders and must not go through `accelerator.prepare()`: with a WebDataset stream it either
crashes or drops samples (accelerate 1.x); batches are moved to the device by the trainer.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from modaseg.augment import seed_transform, train_transform
from modaseg.classes import IGNORE_INDEX
from modaseg.config import STRIDE, AugmentConfig, DataConfig
from modaseg.console import UserError
from modaseg.hardware import plan_workers
from modaseg.images import decode_image, decode_mask
from modaseg.manifest import Manifest, ManifestError, check_shards

log = logging.getLogger(__name__)

FIELDS = ("jpg", "png", "json")  # what modaseg-shard writes per sample; nothing else is read

ErrorFn = Callable[..., None]


class CorruptDataError(UserError, RuntimeError):
    """A sample or shard could not be read (evaluation), or too many were skipped (training)."""


# ---------------------------------------------------------------------------------------------- sampling


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int, grad_accum: int) -> int:
    """Batches per rank per epoch: enough for the split to be seen about once per epoch, rounded UP to a
    whole number of accumulation groups (so the last group is full). The same on every rank."""
    if min(world_size, batch_size, grad_accum) < 1:
        raise ValueError("world_size, batch_size and grad_accum must be >= 1")
    if num_samples < 1:
        raise ValueError("the training split has no samples")
    groups = math.ceil(num_samples / (world_size * batch_size * grad_accum))
    return groups * grad_accum


def epoch_samples(num_samples: int, class_images: Sequence[float], threshold: float) -> int:
    """Samples in an epoch of the training stream: the split once, plus the expected repeat-factor
    copies (mean r_i estimated from the manifest's class counts, as class_exposure does), so that an
    epoch sized from it holds every sample and the copies."""
    if threshold <= 0 or num_samples <= 0:
        return num_samples
    factors = repeat_factors(class_images, num_samples, threshold)
    freqs = [n / num_samples for n in class_images]
    return math.ceil(num_samples * _expected_max(factors, freqs, base=1.0, skip=-1))


def repeat_factors(class_images: Sequence[int], num_images: int, threshold: float) -> list[float]:
    """LVIS repeat factors per class: r_c = max(1, sqrt(t / f_c)), f_c = share of images containing c.
    `threshold` <= 0 switches sampling off (all 1.0); a class in no image gets 1.0 (it never decides)."""
    if threshold <= 0 or num_images <= 0:
        return [1.0] * len(class_images)
    return [max(1.0, math.sqrt(threshold * num_images / n)) if n > 0 else 1.0 for n in class_images]


def image_repeat_factor(classes_present: Iterable[int], factors: Sequence[float]) -> float:
    """An image repeats as often as its rarest class asks: r_i = max over its classes of r_c."""
    return max((factors[c] for c in classes_present), default=1.0)


def class_exposure(
    class_images: Sequence[int],
    num_images: int,
    threshold: float,
    image_classes: Iterable[Sequence[int]] | None = None,
) -> list[float]:
    """Expected exposure multiplier per class under repeat-factor sampling, for an epoch of fixed length:
    (share of the stream's images that contain c) / (that share under plain sampling)
      = mean r_i over images containing c / mean r_i over all images.

    Exact when `image_classes` (classes present, per image) is given. From the manifest's counts alone
    it assumes classes occur independently of each other (an estimate: garments co-occur). NaN for a
    class in no image.
    """
    factors = repeat_factors(class_images, num_images, threshold)
    if image_classes is not None:
        return _exact_exposure(image_classes, factors)
    freqs = [n / num_images if num_images else 0.0 for n in class_images]
    mean = _expected_max(factors, freqs, base=1.0, skip=-1)
    return [
        _expected_max(factors, freqs, base=factors[c], skip=c) / mean if class_images[c] else math.nan
        for c in range(len(class_images))
    ]


def _exact_exposure(image_classes: Iterable[Sequence[int]], factors: Sequence[float]) -> list[float]:
    sums = [0.0] * len(factors)
    counts = [0] * len(factors)
    total, num = 0.0, 0
    for classes in image_classes:
        r = image_repeat_factor(classes, factors)
        total, num = total + r, num + 1
        for c in set(classes):
            sums[c] += r
            counts[c] += 1
    mean = total / num if num else 1.0
    return [s / n / mean if n else math.nan for s, n in zip(sums, counts, strict=True)]


def _expected_max(factors: Sequence[float], freqs: Sequence[float], base: float, skip: int) -> float:
    """E[max(base, r_d for each class d present)] with class d present independently with probability
    freqs[d] (class `skip` excluded): walk the classes from the largest factor down; the first one
    present decides."""
    expected, none_yet = 0.0, 1.0
    for d in sorted(range(len(factors)), key=lambda d: -factors[d]):
        if d == skip or factors[d] <= base:
            continue
        expected += none_yet * freqs[d] * factors[d]
        none_yet *= 1.0 - freqs[d]
    return expected + none_yet * base


def folder_multiplicity(
    counts: Mapping[str, int], folders: Sequence[str], mix: Sequence[float] | None
) -> list[tuple[float, list[str]]]:
    """How often an epoch passes over each folder's samples, with the folder's shards:
    [(multiplicity, [shard path, ...]) per folder]. Without `data.mix` every sample once; with it (relative
    weights of the `data.shards` folders) a folder's samples make up its share of the epoch, which keeps
    the epoch's length (the multiplicities average 1 over the samples), so a folder weighted above its
    size is passed over more than once and one below it only in part (a different part every epoch)."""
    if mix is None:
        return [(1.0, list(counts))]
    resolved = [Path(f).resolve() for f in folders]
    groups: list[list[str]] = [[] for _ in resolved]
    for url in counts:
        groups[resolved.index(Path(url).parent)].append(url)
    total = sum(counts.values())
    out = []
    for weight, urls in zip(mix, groups, strict=True):
        size = sum(counts[url] for url in urls)
        if size:
            out.append((weight / sum(mix) * total / size, urls))
    return out


@dataclass(frozen=True)
class ShardSlice:
    """Samples [start, stop) of one shard (of `total` samples, for the truncation check)."""

    url: str
    start: int
    stop: int
    total: int


def epoch_segments(
    counts: Mapping[str, int], groups: Sequence[tuple[float, Sequence[str]]], rng: random.Random
) -> list[ShardSlice]:
    """One pass of the training stream as shard segments, in an order drawn from `rng`: each folder's
    shards whole floor(m) times, and the fraction of m as a window of the folder's samples (its shards
    laid end to end in a drawn order) at a drawn offset. The folders' sample counts are rounded to sum
    to the split's size (largest remainder), so the pass always has the split's length."""
    wanted = [m * sum(counts[url] for url in urls) for m, urls in groups]
    target = round(sum(wanted))
    sizes = [math.floor(w) for w in wanted]
    by_remainder = sorted(range(len(groups)), key=lambda i: (sizes[i] - wanted[i], i))
    for i in by_remainder[: max(0, target - sum(sizes))]:
        sizes[i] += 1
    segments = []
    for size, (_, urls) in zip(sizes, groups, strict=True):
        folder = sum(counts[url] for url in urls)
        full, rest = divmod(size, folder)
        segments += [ShardSlice(url, 0, counts[url], counts[url]) for url in urls for _ in range(full)]
        if rest:
            order = list(urls)
            rng.shuffle(order)
            laid = [ShardSlice(url, 0, counts[url], counts[url]) for url in order]
            offset = rng.randrange(folder)
            segments += take_range(laid, offset, min(offset + rest, folder))
            segments += take_range(laid, 0, max(0, offset + rest - folder))
    rng.shuffle(segments)
    return segments


def take_range(segments: Sequence[ShardSlice], lo: int, hi: int) -> list[ShardSlice]:
    """Positions [lo, hi) of the sequence the segments make, laid end to end, as segments."""
    out, offset = [], 0
    for s in segments:
        n = s.stop - s.start
        a, b = max(lo - offset, 0), min(hi - offset, n)
        if a < b:
            out.append(ShardSlice(s.url, s.start + a, s.start + b, s.total))
        offset += n
    return out


def worker_range(
    length: int, rank: int, world_size: int, quotas: Sequence[int], worker: int
) -> tuple[int, int]:
    """Worker `worker`'s positions [lo, hi) of a pass of `length` samples: the rank's contiguous block
    (blocks differ by at most one), cut in proportion to the workers' batch quotas. A slice is never
    longer than its worker's quota in samples when the rank's quota holds its block."""
    block_lo, block_hi = rank * length // world_size, (rank + 1) * length // world_size
    total = sum(quotas)
    if total == 0:
        return block_lo, block_lo
    before = sum(quotas[:worker])
    n = block_hi - block_lo
    return block_lo + n * before // total, block_lo + n * (before + quotas[worker]) // total


def worker_quotas(num_batches: int, workers: int) -> list[int]:
    """Batches per worker: the DataLoader takes them round-robin, worker 0 first."""
    return [num_batches // workers + (w < num_batches % workers) for w in range(workers)]


def epoch_seed(seed: int, epoch: int, run: int) -> int:
    """The seed of an epoch's shard order (`run` 0) and of the passes that fill quotas after it: the same
    on every rank and worker, so their slices partition the pass."""
    text = f"modaseg-epoch/{seed}/{epoch}/{run}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """A 64-bit seed for one worker's stream; the same in every process and Python session."""
    text = f"modaseg-train/{seed}/{epoch}/{rank}/{worker}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------- stages


@dataclass
class SkipCounter:
    """Training's answer to a corrupt sample: log it with shard and key, count it, and stop past `limit`
    (a worker whose every shard is corrupt would otherwise spin forever)."""

    limit: int
    total: int = 0
    pending: int = 0  # skipped since the last batch

    def __call__(self, shard: str, key: str, reason: str, lost: int = 1) -> None:
        log.warning(
            "skipped %d corrupt training sample(s): shard %s, sample %s: %s", lost, shard, key, reason
        )
        self.total += lost
        self.pending += lost
        if self.total > self.limit:
            raise CorruptDataError(
                f"{self.total} corrupt training samples skipped in one data worker, more than "
                f"data.max_corrupt_samples={self.limit} (last: shard {shard}, sample {key}: {reason})"
            )

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


def raise_corrupt(shard: str, key: str, reason: str, lost: int = 1) -> None:
    """Evaluation's answer to a corrupt sample."""
    raise CorruptDataError(f"shard {shard}, sample {key}: {reason}")


def read_shards(sources: Iterable[Mapping[str, Any]], expected: Mapping[str, int], on_error: ErrorFn):
    """{"url": path} -> samples {"__key__", "__url__", "jpg", "png", "json"} (raw bytes).

    Reads tar members itself rather than through webdataset's tar iterator so that a failure is
    attributed to the sample being read; a shard that ends early (tar readers treat a truncated header
    as the end of the archive) is caught by comparing with the manifest's sample count.
    """
    for source in sources:
        yield from _read_shard(str(source["url"]), expected[str(source["url"])], on_error)


def _read_shard(
    url: str, expected: int, on_error: ErrorFn, start: int = 0, stop: int | None = None
) -> Iterator[dict]:
    """Samples [start, stop) of a shard of `expected` samples, read sequentially: the members before
    `start` are stepped over without being read into memory, and reading ends at `stop`. What is lost to
    damage is counted within [start, stop) only."""
    stop = expected if stop is None else stop
    index = -1  # of the sample whose members are being read
    done = 0  # samples of [start, stop) yielded or reported
    key_now: str | None = None
    current: dict | None = None  # the sample being read, when inside [start, stop)
    member = None  # name of the member being read, for the error message
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                key, ext = base_plus_ext(info.name) if info.isreg() else (None, None)
                if key is None:
                    continue
                tar.members = []  # stream mode keeps every header otherwise
                if key != key_now:
                    if current is not None:
                        done += 1
                        yield from _complete(current, on_error)
                        current = None
                    index, key_now = index + 1, key
                    if index >= stop:
                        break
                    if index >= start:
                        current = {"__key__": key, "__url__": url}
                if current is None:
                    continue  # before the slice: the tar reader steps over the member's data
                member = info.name
                data = tar.extractfile(info).read()
                member = None
                if ext in FIELDS:
                    current[ext] = data
    except CorruptDataError:
        raise
    except Exception as e:  # a truncated or damaged shard: lose its rest, not the run
        if current is not None and member is None and all(k in current for k in FIELDS):
            done += 1
            yield from _complete(current, on_error)
            current = None
        key = current["__key__"] if current is not None else f"(after {done} samples)"
        lost = max(1, stop - start - done)
        on_error(url, key, f"unreadable shard ({type(e).__name__}: {e})", lost=lost)
        return
    if current is not None:
        done += 1
        yield from _complete(current, on_error)
    if start + done < stop:
        last = key_now if key_now is not None else "(none)"
        on_error(
            url,
            f"(after {last})",
            f"shard ends after {index + 1} of {expected} samples",
            lost=stop - start - done,
        )


def _complete(sample: dict, on_error: ErrorFn) -> Iterator[dict]:
    missing = [k for k in FIELDS if k not in sample]
    if missing:
        on_error(sample["__url__"], sample["__key__"], f"missing field(s) {', '.join(missing)}")
    else:
        yield sample


def parse_meta(samples: Iterable[dict], num_classes: int, on_error: ErrorFn) -> Iterator[dict]:
    """json bytes -> sample["meta"] (json.loads only), checked: a wrong size or label here would crash
    the loss on the device hours later."""
    for sample in samples:
        try:
            meta = json.loads(sample["json"])
            present = meta["classes_present"]
            if not all(isinstance(c, int) and 0 <= c < num_classes for c in present):
                raise ValueError(f"classes_present {present} outside 0..{num_classes - 1}")
            if not (isinstance(meta["width"], int) and isinstance(meta["height"], int)):
                raise ValueError("width/height are not integers")
        except (ValueError, KeyError, TypeError) as e:
            on_error(sample["__url__"], sample["__key__"], f"bad json: {e}")
            continue
        sample["meta"] = meta
        yield sample


def repeat_by_factor(samples: Iterable[dict], factors: Sequence[float], rng: random.Random) -> Iterator[dict]:
    """Repeat-factor sampling in the stream: each sample comes out floor(r) times, plus once more with
    probability frac(r) (stochastic rounding with the stream's RNG). Repeats share the encoded bytes and
    are decoded and augmented independently after the shuffle buffer."""
    for sample in samples:
        r = image_repeat_factor(sample["meta"]["classes_present"], factors)
        n = int(r) + (rng.random() < r - int(r))
        for _ in range(n):
            yield sample


def repeat_within_quota(
    samples: Iterable[dict], factors: Sequence[float], rng: random.Random, quota: int, originals: int
) -> Iterator[dict]:
    """repeat_by_factor over a worker's slice of the epoch, where the copies must not push an original
    out of the worker's quota: a copy comes out only while the quota still holds every original not yet
    read (`originals`: the slice's length). Copies that do not fit are dropped; the plan sizes the epoch
    for the expected copies (epoch_samples), so few are."""
    emitted, left = 0, originals
    for sample in samples:
        r = image_repeat_factor(sample["meta"]["classes_present"], factors)
        n = int(r) + (rng.random() < r - int(r))
        left -= 1
        for i in range(n):
            if i and emitted + max(left, 0) >= quota:
                break
            emitted += 1
            yield sample


def decode_samples(samples: Iterable[dict], num_classes: int, on_error: ErrorFn) -> Iterator[dict]:
    """-> {"key", "image" HxWx3 uint8, "mask" HxW uint8}, checked against each other and the json."""
    for sample in samples:
        try:
            image = decode_image(sample["jpg"])
            mask = decode_mask(sample["png"])
            meta = sample["meta"]
            if image.shape[:2] != mask.shape or mask.shape != (meta["height"], meta["width"]):
                raise ValueError(
                    f"image {image.shape[1]}x{image.shape[0]}, label map {mask.shape[1]}x{mask.shape[0]}, "
                    f"json {meta['width']}x{meta['height']} (w x h) disagree"
                )
            if mask.max() >= num_classes:  # fast path: no ignore pixels and no bad labels
                bad = mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]
                if bad.size:
                    values = np.unique(bad).tolist()
                    raise ValueError(f"label values {values} outside 0..{num_classes - 1} and 255")
        except (ValueError, cv2.error) as e:
            on_error(sample["__url__"], sample["__key__"], str(e))
            continue
        yield {"key": sample["__key__"], "image": image, "mask": mask}


def augment_samples(samples: Iterable[dict], transform: Callable[..., dict]) -> Iterator[dict]:
    for sample in samples:
        out = transform(image=sample["image"], mask=sample["mask"])
        yield {"key": sample["key"], "image": out["image"], "mask": out["mask"]}


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An output tensor, in shared memory inside a DataLoader worker: the batch is written once and
    crosses to the main process without another copy (what torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape))).view(shape)


def collate(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    height: int,
    width: int,
    mask_dtype: torch.dtype = torch.int64,
) -> dict:
    """HxWx3 images (top-left aligned, padded with 0) and HxW masks (padded with 255) -> "image" uint8
    [B,3,H,W] and "mask" [B,H,W] of `mask_dtype`. The image tensor is a channels-last view of the
    stacked HWC arrays (no transposing copy on the host); `.contiguous()` on the device if NCHW memory
    is wanted."""
    b = len(images)
    image = _batch_buffer((b, height, width, 3), torch.uint8)
    mask = _batch_buffer((b, height, width), mask_dtype)
    img_np, mask_np = image.numpy(), mask.numpy()
    for i, (x, m) in enumerate(zip(images, masks, strict=True)):
        h, w = m.shape
        img_np[i, :h, :w] = x
        mask_np[i, :h, :w] = m  # uint8 -> mask_dtype in the same pass
        if (h, w) != (height, width):
            img_np[i, h:], img_np[i, :h, w:] = 0, 0
            mask_np[i, h:], mask_np[i, :h, w:] = IGNORE_INDEX, IGNORE_INDEX
    return {"image": image.permute(0, 3, 1, 2), "mask": mask}


def train_batches(
    samples: Iterable[dict], batch_size: int, skips: SkipCounter, mask_dtype: torch.dtype = torch.int64
) -> Iterator[dict]:
    """Full batches only: {"image" uint8 [B,3,H,W], "mask" [B,H,W] of `mask_dtype`, "key", "skipped"}."""
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            height, width = batch[0]["mask"].shape
            out = collate([s["image"] for s in batch], [s["mask"] for s in batch], height, width, mask_dtype)
            yield {**out, "key": [s["key"] for s in batch], "skipped": skips.take()}
            batch = []


def pad_batch(samples: Sequence[dict], multiple: int = STRIDE, mask_dtype: torch.dtype = torch.int64) -> dict:
    """Pad every image to the batch's largest size, rounded up to `multiple`: image with 0, mask with
    the ignore label (so padding never counts in a metric). "size" is what to crop predictions back to."""
    sizes = [tuple(s["mask"].shape) for s in samples]
    height = max(-(-h // multiple) * multiple for h, _ in sizes)
    width = max(-(-w // multiple) * multiple for _, w in sizes)
    out = collate([s["image"] for s in samples], [s["mask"] for s in samples], height, width, mask_dtype)
    return {**out, "key": [s["key"] for s in samples], "size": sizes}


def eval_batches(
    samples: Iterable[dict], batch_size: int, mask_dtype: torch.dtype = torch.int64
) -> Iterator[dict]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield pad_batch(batch, mask_dtype=mask_dtype)
            batch = []
    if batch:
        yield pad_batch(batch, mask_dtype=mask_dtype)


# ---------------------------------------------------------------------------------------------- datasets


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    cv2.setNumThreads(1)  # the workers are the parallelism; OpenCV threads would oversubscribe
    return info.id, info.num_workers


class TrainStream(IterableDataset):
    """One rank's training stream. The epoch is read from shared memory when iteration starts, so
    persistent workers can be reused from epoch to epoch."""

    def __init__(
        self,
        data: DataConfig,
        aug: AugmentConfig,
        shards: Mapping[str, int],
        factors: Sequence[float],
        num_classes: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        num_batches: int,
        epoch: Any,
        mask_dtype: torch.dtype = torch.int64,
        long_side: int | None = None,
        groups: Sequence[tuple[float, Sequence[str]]] | None = None,
    ):
        super().__init__()
        self.data, self.aug = data, aug
        self.long_side = long_side
        self.shards = dict(shards)
        self.groups = [(m, list(urls)) for m, urls in groups] if groups else [(1.0, list(self.shards))]
        self.factors = list(factors)
        self.num_classes = num_classes
        self.rank, self.world_size = rank, world_size
        self.seed, self.num_batches = seed, num_batches
        self.epoch = epoch  # multiprocessing.Value("q")
        self.mask_dtype = mask_dtype

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        return self.iterate(worker, workers)

    def iterate(self, worker: int, workers: int) -> Iterator[dict]:
        """Worker `worker` of `workers`: its share of the rank's batches of the current epoch."""
        quotas = worker_quotas(self.num_batches, workers)
        if quotas[worker] == 0:
            return iter(())
        epoch = self.epoch.value
        rng = random.Random(stream_seed(self.seed, epoch, self.rank, worker))
        transform = train_transform(self.aug, self.data.crop_height, self.data.crop_width, self.long_side)
        seed_transform(transform, rng.getrandbits(64))
        skips = SkipCounter(self.data.max_corrupt_samples)
        samples = self.samples(epoch, worker, quotas, rng, skips)
        pipeline = wds.DataPipeline(
            lambda: samples,
            partial(decode_samples, num_classes=self.num_classes, on_error=skips),
            partial(augment_samples, transform=transform),
            partial(train_batches, batch_size=self.data.batch_size, skips=skips, mask_dtype=self.mask_dtype),
        )
        return itertools.islice(iter(pipeline), quotas[worker])

    def samples(
        self, epoch: int, worker: int, quotas: Sequence[int], rng: random.Random, on_error: ErrorFn
    ) -> Iterator[dict]:
        """The worker's undecoded samples in order: its slice of the epoch's pass, each sample once plus
        the repeat-factor copies that fit, shuffled (the buffer drains before anything else comes), then
        samples of further passes (drawn from the same seed, read from the slice's position on) for the
        rest of the quota."""
        first = epoch_segments(self.shards, self.groups, random.Random(epoch_seed(self.seed, epoch, 0)))
        length = sum(s.stop - s.start for s in first)
        lo, hi = worker_range(length, self.rank, self.world_size, quotas, worker)
        yield from self._shuffle(
            repeat_within_quota(
                self._parsed(take_range(first, lo, hi), on_error),
                self.factors,
                rng,
                quota=quotas[worker] * self.data.batch_size,
                originals=hi - lo,
            ),
            rng,
        )
        for run in itertools.count(1):
            if length == 0:
                return
            later = epoch_segments(self.shards, self.groups, random.Random(epoch_seed(self.seed, epoch, run)))
            ordered = take_range(later, lo, length) + take_range(later, 0, lo)
            yield from self._shuffle(
                repeat_by_factor(self._parsed(ordered, on_error), self.factors, rng), rng
            )

    def _parsed(self, segments: Sequence[ShardSlice], on_error: ErrorFn) -> Iterator[dict]:
        return parse_meta(read_slices(segments, on_error), self.num_classes, on_error)

    def _shuffle(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        size = self.data.shuffle_buffer
        return wds.shuffle(size, initial=size, rng=rng)(samples) if size > 1 else samples


def rank_slices(counts: Mapping[str, int], rank: int, world_size: int) -> list[ShardSlice]:
    """Rank `rank`'s contiguous block of the split's samples (in manifest order), as shard slices. Blocks
    differ in size by at most one sample, so every rank has work at any rank count (not only when there
    are more shards than ranks), and each rank opens only the one or two shards its block spans."""
    total = sum(counts.values())
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    slices, offset = [], 0
    for url, n in counts.items():
        start, stop = max(lo - offset, 0), min(hi - offset, n)
        if start < stop:
            slices.append(ShardSlice(url, start, stop, n))
        offset += n
    return slices


def read_slices(slices: Iterable[ShardSlice], on_error: ErrorFn) -> Iterator[dict]:
    """The samples of each slice; a shard is read only up to the end of its slice."""
    for s in slices:
        yield from _read_shard(s.url, s.total, on_error, s.start, s.stop)


class EvalStream(IterableDataset):
    """One rank's block of a split, its samples dealt round-robin to the workers (a worker with nothing
    to do just ends)."""

    def __init__(
        self,
        slices: Sequence[ShardSlice],
        batch_size: int,
        num_classes: int,
        mask_dtype: torch.dtype = torch.int64,
    ):
        super().__init__()
        self.slices = list(slices)
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.mask_dtype = mask_dtype

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        pipeline = wds.DataPipeline(
            lambda: read_slices(self.slices, raise_corrupt),
            lambda samples: itertools.islice(samples, worker, None, workers),
            partial(parse_meta, num_classes=self.num_classes, on_error=raise_corrupt),
            partial(decode_samples, num_classes=self.num_classes, on_error=raise_corrupt),
            partial(eval_batches, batch_size=self.batch_size, mask_dtype=self.mask_dtype),
        )
        return iter(pipeline)


# ---------------------------------------------------------------------------------------------- loaders


def _shard_counts(manifest: Manifest, root: str | Path, split: str) -> dict[str, int]:
    paths = check_shards(manifest, root, split)
    return {str(p): s.num_samples for p, s in zip(paths, manifest.splits[split].shards, strict=True)}


class TrainLoader:
    """One rank's training batches, epoch after epoch: exactly `num_batches` per epoch (split over the
    workers), deterministic in (seed, epoch, rank, world size, worker, workers), with every sample of
    the split in each epoch when `num_batches` holds the rank's share (batches_per_epoch of
    epoch_samples): {"image" uint8 [B,3,H,W], "mask" [B,H,W] of `mask_dtype`, "key", "skipped" (corrupt
    samples skipped by that worker since its previous batch)}. The workers persist across epochs (`set_epoch` before each); `close` ends them.

    Rare-class sampling: data.repeat_threshold (0 = off). `mask_dtype=torch.uint8` makes masks 8x
    smaller on the host and in the host->device copy (then `.long()` on the device). `long_side`: the
    model's working resolution (model.input_long_side), which the augmentation's scales are relative to.
    Several shard folders (`data.shards` as a list) make up an epoch in the proportions of `data.mix`
    (folder_multiplicity).
    """

    def __init__(
        self,
        data: DataConfig,
        aug: AugmentConfig,
        manifest: Manifest,
        root: str | Path,
        *,
        rank: int,
        world_size: int,
        seed: int,
        num_batches: int,
        mask_dtype: torch.dtype = torch.int64,
        long_side: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        counts = {url: n for url, n in _shard_counts(manifest, root, "train").items() if n > 0}
        folders = data.shards if isinstance(data.shards, list) else [data.shards]
        if not counts:
            raise ManifestError(f"the train split in {root} has no samples: shard a dataset with some")
        info = manifest.splits["train"]
        factors = repeat_factors(info.class_images, info.num_samples, data.repeat_threshold)
        self._epoch = multiprocessing.get_context().Value("q", 0, lock=False)  # read by the workers
        stream = TrainStream(
            data,
            aug,
            counts,
            factors,
            manifest.num_classes,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_batches=num_batches,
            epoch=self._epoch,
            mask_dtype=mask_dtype,
            long_side=long_side,
            groups=folder_multiplicity(counts, folders, data.mix),
        )
        self.num_batches = num_batches
        self._loader: DataLoader | None = _data_loader(stream, data, persistent=True)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (the workers read it when iteration starts)."""
        self._epoch.value = epoch

    def __iter__(self) -> Iterator[dict]:
        if self._loader is None:
            raise RuntimeError("TrainLoader is closed")
        return iter(self._loader)

    def __len__(self) -> int:
        return self.num_batches

    def close(self) -> None:
        """End the persistent workers now: dropping the DataLoader drops its worker iterator, whose
        shutdown (a sentinel per worker, a join, terminate for a straggler) runs right away."""
        self._loader = None
        gc.collect()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_loader(
    data: DataConfig,
    manifest: Manifest,
    root: str | Path,
    split: str,
    *,
    rank: int,
    world_size: int,
    mask_dtype: torch.dtype = torch.int64,
) -> Iterable[dict]:
    """Every sample of `split` exactly once across the ranks (rank r reads the r-th contiguous block of
    the split's samples), at the original resolution padded to a multiple of 32 (image 0, mask 255) and
    to the batch's largest size: {"image" uint8, "mask" int64, "key", "size" [(h, w)]}. Corrupt data
    raises CorruptDataError naming shard and key."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    slices = rank_slices(_shard_counts(manifest, root, split), rank, world_size)
    stream = EvalStream(slices, data.eval_batch_size, manifest.num_classes, mask_dtype)
    return _data_loader(stream, data, persistent=False)


def _ignore_stop_signals(worker_id: int) -> None:
    """Preemption signals are for the training process, which checkpoints and then ends its workers.
    SLURM (scancel --signal) and torchrun signal every process of the job, and torch's worker handler
    exits on any SIGTERM, so the trainer would crash on a dead worker instead of saving (in training or
    in validation). Here a worker exits on a SIGTERM only when its parent sends it (DataLoader shutdown,
    multiprocessing at exit) and ignores the others, the same test torch's own handler makes on the
    sender, inverted."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not POSIX (e.g. macOS): keep torch's handler
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    parent = os.getppid()

    def wait_for_parent_terminate() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_parent_terminate, name="sigterm-from-parent", daemon=True).start()


def _data_loader(dataset: IterableDataset, data: DataConfig, persistent: bool) -> DataLoader:
    workers = data.workers if isinstance(data.workers, int) else plan_workers(None)[0]
    return DataLoader(
        dataset,
        worker_init_fn=_ignore_stop_signals,
        batch_size=None,  # the streams batch themselves
        num_workers=workers,
        prefetch_factor=data.prefetch_factor if workers > 0 else None,
        persistent_workers=persistent and workers > 0,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
    )
