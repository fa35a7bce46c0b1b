"""The streaming loaders, on shards written here to the contract in modaseg/manifest.py.

Two ranks are simulated by iterating the loaders for rank 0 and rank 1 (world_size=2) in one process:
the loaders take the rank as an argument and run no collective, so a second process adds nothing but
start-up time. One `multiprocess` test runs them under accelerate's debug_launcher over gloo anyway.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from modaseg import data as D
from modaseg.config import AugmentConfig, DataConfig
from modaseg.manifest import (
    Manifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    check_shards,
    read_manifest,
    write_manifest,
)

NUM_CLASSES = 4
COLOURS = {0: (0, 0, 0), 1: (200, 40, 40), 2: (40, 200, 40), 3: (40, 40, 200)}
CROP = 32  # training window (a multiple of 32)


# ------------------------------------------------------------------------------------------ fixture builder


def encode(image: np.ndarray, fmt: str = "png", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if mode:
        pil = pil.convert(mode)
    pil.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_sample(key: int, classes: list[int], height: int = 40, width: int = 24, fmt: str = "png") -> dict:
    """A photo of vertical bands, one per class in `classes` (+ background), and its label map."""
    mask = np.zeros((height, width), np.uint8)
    bands = np.array_split(np.arange(width), len(classes) + 1)
    for label, cols in zip(classes, bands[1:], strict=True):
        mask[:, cols] = label
    image = np.array([COLOURS[v] for v in range(NUM_CLASSES)], np.uint8)[mask]
    present = sorted({0, *classes})
    meta = {
        "id": key,
        "file_name": f"{key:07d}.jpg",
        "width": width,
        "height": height,
        "source": "test",
        "class_pixels": np.bincount(mask.ravel(), minlength=NUM_CLASSES).tolist(),
        "classes_present": present,
    }
    jpg = encode(image, "JPEG") if fmt == "jpeg" else encode(image, "PNG")
    return {"__key__": str(key), "jpg": jpg, "png": encode(mask, "PNG"), "json": json.dumps(meta).encode()}


def build_shards(root: Path, splits: dict[str, list[list[dict]]]) -> Manifest:
    """splits: name -> shards -> samples. Writes DIR/{split}-NNNNNN.tar and manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    infos = {}
    for split, shards in splits.items():
        shard_infos, pixels, images = [], np.zeros(NUM_CLASSES, np.int64), np.zeros(NUM_CLASSES, np.int64)
        for i, samples in enumerate(shards):
            name = f"{split}-{i:06d}.tar"
            with wds.TarWriter(str(root / name)) as writer:
                for sample in samples:
                    writer.write(sample)
                    meta = json.loads(sample["json"])
                    pixels += meta["class_pixels"]
                    images[meta["classes_present"]] += 1
            raw = (root / name).read_bytes()
            shard_infos.append(ShardInfo(name, len(samples), hashlib.sha256(raw).hexdigest(), len(raw)))
        infos[split] = SplitInfo(
            num_samples=sum(len(s) for s in shards),
            shards=shard_infos,
            class_pixels=pixels.tolist(),
            class_images=images.tolist(),
        )
    manifest = Manifest(
        tool_version="test",
        annotations_sha256="0" * 64,
        classes=["background", "a", "b", "c"],
        category_to_label={"1": 1, "2": 2, "3": 3},
        split_fractions={"train": 0.6, "val": 0.25, "test": 0.15},
        seed=0,
        splits=infos,
    )
    write_manifest(manifest, root)
    return read_manifest(root)


def resize_in_manifest(root: Path, name: str) -> Manifest:
    """Record a shard's current size: a damaged shard that check_shards cannot see."""
    manifest = read_manifest(root)
    for split in manifest.splits.values():
        for info in split.shards:
            if info.name == name:
                info.size_bytes = (root / name).stat().st_size
    write_manifest(manifest, root)
    return read_manifest(root)


def cfg(**kw) -> DataConfig:
    base = dict(
        batch_size=2,
        eval_batch_size=2,
        workers=0,
        prefetch_factor=2,
        pin_memory=False,
        shuffle_buffer=8,
        crop_height=CROP,
        crop_width=CROP,
        max_corrupt_samples=1000,
    )
    base.update(kw)
    return DataConfig(**{"shards": "", **base})


AUG = AugmentConfig(color_jitter_p=0.5, blur_p=0.2, noise_p=0.2)


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def train_batches(data: DataConfig, aug: AugmentConfig, manifest, root, *, epoch: int, **kw) -> list[dict]:
    """One epoch of a fresh TrainLoader (its workers closed afterwards)."""
    with D.TrainLoader(data, aug, manifest, root, **kw) as loader:
        loader.set_epoch(epoch)
        return list(loader)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, Manifest]:
    """3 train shards (5, 4, 3 samples) and 3 val shards (7, 5, 3 samples) of different image sizes."""
    root = tmp_path_factory.mktemp("uneven")
    key = iter(range(1000, 2000))

    def shard(n: int) -> list[dict]:
        return [
            make_sample(k := next(key), [1 + k % 3], height=30 + k % 7 * 5, width=20 + k % 5 * 7)
            for _ in range(n)
        ]

    manifest = build_shards(
        root, {"train": [shard(5), shard(4), shard(3)], "val": [shard(7), shard(5), shard(3)]}
    )
    return root, manifest


# ------------------------------------------------------------------------------------------ pure functions


def test_batches_per_epoch_rounds_up_to_whole_accumulation_groups():
    assert D.batches_per_epoch(100, 2, 4, 1) == 13  # ceil(100 / 8)
    assert D.batches_per_epoch(100, 2, 4, 3) == 15  # ceil(100 / 24) = 5 groups of 3
    assert D.batches_per_epoch(1, 8, 16, 4) == 4  # a tiny split still gives one full group
    for n in range(1, 60):
        assert D.batches_per_epoch(n, 3, 2, 4) % 4 == 0
        assert D.batches_per_epoch(n, 3, 2, 4) * 3 * 2 >= n
    with pytest.raises(ValueError):
        D.batches_per_epoch(0, 1, 1, 1)


def test_repeat_factors_lvis():
    # f = [1, 0.1, 0.5, 0]; t = 0.4: sqrt(0.4/0.1) = 2, sqrt(0.4/0.5) < 1 -> 1
    assert D.repeat_factors([10, 1, 5, 0], 10, 0.4) == pytest.approx([1.0, 2.0, 1.0, 1.0])
    assert D.repeat_factors([10, 1, 5, 0], 10, 0.0) == [1.0] * 4
    assert D.repeat_factors([100, 1], 100, 0.25)[1] == pytest.approx(5.0)


def test_class_exposure_exact_by_hand():
    # 18 images {0,1}, 2 images {0,2}; t = 0.4: r_2 = sqrt(0.4/0.1) = 2, r_1 = 1.
    # Stream share of class 2: 2*2 / (18 + 4) vs 2/20 plainly -> 20/11.
    images = [[0, 1]] * 18 + [[0, 2]] * 2
    exact = D.class_exposure([20, 18, 2], 20, 0.4, image_classes=images)
    assert exact == pytest.approx([1.0, 20 / 22, 40 / 22])
    assert D.class_exposure([20, 18, 2], 20, 0.0, image_classes=images) == pytest.approx([1.0] * 3)
    assert math.isnan(D.class_exposure([20, 18, 0], 20, 0.4, image_classes=[[0, 1]] * 20)[2])


def test_class_exposure_estimate_matches_enumeration_under_independence():
    """From counts alone the estimate assumes independent classes: check it against enumerating every
    subset of classes with its product probability."""
    freqs = [0.9, 0.3, 0.05, 0.12, 0.02]
    n = 1000
    counts = [round(f * n) for f in freqs]
    t = 0.2
    r = D.repeat_factors(counts, n, t)

    def expectation(given: int | None) -> float:
        total = 0.0
        others = [c for c in range(len(freqs)) if c != given]
        for k in range(len(others) + 1):
            for subset in combinations(others, k):
                p = math.prod(freqs[c] if c in subset else 1 - freqs[c] for c in others)
                present = [*subset, *([given] if given is not None else [])]
                total += p * max([1.0, *(r[c] for c in present)])
        return total

    mean = expectation(None)
    expected = [expectation(c) / mean for c in range(len(freqs))]
    assert D.class_exposure(counts, n, t) == pytest.approx(expected, rel=1e-9)
    assert D.class_exposure(counts, n, t)[4] > 2  # the rarest class is seen much more often


def test_stream_seed_is_stable_and_distinct():
    assert D.stream_seed(0, 1, 2, 3) == D.stream_seed(0, 1, 2, 3)
    seeds = {
        D.stream_seed(s, e, r, w) for s in range(2) for e in range(3) for r in range(2) for w in range(2)
    }
    assert len(seeds) == 24


# ------------------------------------------------------------------------------------------ training stream


@pytest.mark.slow
def test_train_same_batch_count_on_every_rank(uneven):
    root, manifest = uneven
    for num_batches in (5, 8):
        for rank in (0, 1):
            with D.TrainLoader(
                cfg(workers=2), AUG, manifest, root, rank=rank, world_size=2, seed=0, num_batches=num_batches
            ) as loader:
                batches = list(loader)
            assert len(batches) == num_batches == len(loader)
            for b in batches:
                assert b["image"].shape == (2, 3, CROP, CROP) and b["image"].dtype == torch.uint8
                assert b["image"].is_contiguous(memory_format=torch.channels_last)
                assert b["mask"].shape == (2, CROP, CROP) and b["mask"].dtype == torch.int64
                assert b["skipped"] == 0


@pytest.mark.slow
def test_train_deterministic_in_seed_and_epoch(uneven):
    root, manifest = uneven

    def loader(seed: int, rank: int = 0) -> D.TrainLoader:
        return D.TrainLoader(
            cfg(workers=2), AUG, manifest, root, rank=rank, world_size=2, seed=seed, num_batches=6
        )

    def run(seed: int, epoch: int, rank: int = 0) -> list[dict]:
        with loader(seed, rank) as fresh:
            fresh.set_epoch(epoch)
            return list(fresh)

    first = run(0, 0)
    again = run(0, 0)  # a fresh loader (new workers) must give the same batches
    assert keys(first) == keys(again)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    with loader(0) as persistent:  # the same persistent workers, epoch after epoch
        persistent.set_epoch(1)
        other_epoch = list(persistent)
        persistent.set_epoch(0)
        back = list(persistent)
    assert len(other_epoch) == 6
    assert keys(other_epoch) != keys(first)
    assert keys(back) == keys(first)  # back to epoch 0 on the same workers: same batches
    assert keys(run(1, 0)) != keys(first)
    assert keys(run(0, 0, rank=1)) != keys(first)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> tuple[Path, Manifest]:
    """13 train shards of 7 small samples (91), a few with the rare class 3."""
    root = tmp_path_factory.mktemp("many")
    key = iter(range(4000, 5000))
    shards = [
        [make_sample(k := next(key), [3] if k % 11 == 0 else [1 + k % 2], 32, 32) for _ in range(7)]
        for _ in range(13)
    ]
    return root, build_shards(root, {"train": shards})


@pytest.mark.parametrize(
    ("world_size", "workers"),
    [
        (1, 0),
        (1, 2),
        pytest.param(8, 2, marks=pytest.mark.slow),
        pytest.param(16, 0, marks=pytest.mark.slow),
        pytest.param(32, 0, marks=pytest.mark.slow),
    ],
)
def test_train_epoch_sees_every_sample_at_any_scale(many_shards, world_size, workers):
    """Over all ranks and workers, an epoch of batches_per_epoch batches trains on every sample of the
    split (the rest of the quota is padding), with the same batch count on every rank; also with
    repeat-factor copies (repeat_threshold 0.3, the epoch sized by epoch_samples) and a batch size that
    does not divide the split."""
    root, manifest = many_shards
    info = manifest.splits["train"]
    everything = {str(k) for k in range(4000, 4091)}
    for threshold, batch in ((0.0, 2), (0.3, 3)):
        expected = D.epoch_samples(info.num_samples, info.class_images, threshold)
        num_batches = D.batches_per_epoch(expected, world_size, batch, 1)
        seen: list[str] = []
        for rank in range(world_size):
            batches = train_batches(
                cfg(workers=workers, batch_size=batch, repeat_threshold=threshold, shuffle_buffer=4),
                AugmentConfig(color_jitter_p=0),
                manifest,
                root,
                rank=rank,
                world_size=world_size,
                seed=7,
                epoch=2,
                num_batches=num_batches,
            )
            assert len(batches) == num_batches
            seen += keys(batches)
        assert set(seen) == everything, sorted(everything - set(seen))
        assert len(seen) == world_size * num_batches * batch


def test_uint8_masks_carry_the_same_labels(uneven):
    root, manifest = uneven
    args = dict(rank=0, world_size=1, seed=0, epoch=0, num_batches=3)
    wide = train_batches(cfg(), AUG, manifest, root, **args)
    narrow = train_batches(cfg(), AUG, manifest, root, mask_dtype=torch.uint8, **args)
    for a, b in zip(wide, narrow, strict=True):
        assert b["mask"].dtype == torch.uint8 and torch.equal(a["mask"], b["mask"].long())
        assert torch.equal(a["image"], b["image"])
    val = next(
        iter(D.eval_loader(cfg(), manifest, root, "val", rank=0, world_size=1, mask_dtype=torch.uint8))
    )
    assert val["mask"].dtype == torch.uint8


def test_train_workers_are_not_copies(uneven):
    root, manifest = uneven
    batches = train_batches(
        cfg(workers=2), AUG, manifest, root, rank=0, world_size=1, seed=0, epoch=0, num_batches=8
    )
    # DataLoader alternates workers: even batches from worker 0, odd from worker 1
    assert keys(batches[0::2]) != keys(batches[1::2])


def test_repeat_factor_sampling_raises_rare_class_exposure(tmp_path):
    """2 shards of 10 images: 9 with class 1 and 1 with the rare class 2 each, so f_2 = 0.1 and with
    t = 0.4, r_2 = 2: every shard pass yields 11 samples of which 2 contain class 2 (share 2/11, plainly
    1/10). Exposure multiplier 20/11 = 1.82, as class_exposure predicts."""
    key = iter(range(10, 100))
    shards = [[make_sample(next(key), [2] if i == 0 else [1], 32, 32) for i in range(10)] for _ in range(2)]
    manifest = build_shards(tmp_path, {"train": shards})
    rare = {
        s["__key__"] for shard in shards for s in shard if json.loads(s["json"])["classes_present"] == [0, 2]
    }
    info = manifest.splits["train"]
    images = [json.loads(s["json"])["classes_present"] for shard in shards for s in shard]
    assert D.class_exposure(info.class_images, info.num_samples, 0.4, images)[2] == pytest.approx(20 / 11)

    shares = {}
    for t in (0.0, 0.4):
        seen = keys(
            train_batches(
                cfg(batch_size=4, repeat_threshold=t, shuffle_buffer=16),
                AugmentConfig(color_jitter_p=0),
                manifest,
                tmp_path,
                rank=0,
                world_size=1,
                seed=3,
                epoch=0,
                num_batches=150,
            )
        )
        shares[t] = sum(k in rare for k in seen) / len(seen)
    assert shares[0.0] == pytest.approx(0.1, abs=0.012)
    assert shares[0.4] / 0.1 == pytest.approx(20 / 11, abs=0.12)


@pytest.mark.slow
def test_several_folders_are_drawn_in_the_proportions_of_mix(tmp_path):
    """Two shard folders trained together (data.shards as a list): by default every sample is as likely as
    any other; data.mix [1, 3] makes the second folder three times as frequent as the first."""
    from modaseg.manifest import open_shards

    key = iter(range(2000, 3000))
    folders = [tmp_path / "a", tmp_path / "b"]
    sizes = {folders[0]: [6, 2], folders[1]: [4]}  # folder a: two shards of unequal size
    for folder, shard_sizes in sizes.items():
        build_shards(
            folder, {"train": [[make_sample(next(key), [1], 32, 32) for _ in range(n)] for n in shard_sizes]}
        )
    in_b = {str(k) for k in range(2008, 2012)}
    for mix, share_b in ((None, 4 / 12), ([1.0, 3.0], 3 / 4)):
        data = cfg(batch_size=4, shards=[str(f) for f in folders], mix=mix, shuffle_buffer=0)
        manifest = open_shards(data.shards, mix)
        seen = keys(
            train_batches(
                data,
                AugmentConfig(color_jitter_p=0),
                manifest,
                "",
                rank=0,
                world_size=1,
                seed=5,
                epoch=0,
                num_batches=1500,
            )
        )
        assert sum(k in in_b for k in seen) / len(seen) == pytest.approx(share_b, abs=0.04)


# ------------------------------------------------------------------------------------------ evaluation stream


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_every_sample_exactly_once_across_ranks(uneven, workers):
    root, manifest = uneven
    expected = {
        s["__key__"]: s
        for s in (make_sample(k, [1 + k % 3], 30 + k % 7 * 5, 20 + k % 5 * 7) for k in range(1012, 1027))
    }
    seen: list[str] = []
    for rank in (0, 1):
        for batch in D.eval_loader(cfg(workers=workers), manifest, root, "val", rank=rank, world_size=2):
            seen += batch["key"]
            _, _, height, width = batch["image"].shape
            assert height % 32 == 0 and width % 32 == 0
            for i, (key, (h, w)) in enumerate(zip(batch["key"], batch["size"], strict=True)):
                meta = json.loads(expected[key]["json"])
                assert (h, w) == (meta["height"], meta["width"])  # original resolution
                mask = np.asarray(Image.open(io.BytesIO(expected[key]["png"])))
                image = np.asarray(Image.open(io.BytesIO(expected[key]["jpg"])).convert("RGB"))
                assert np.array_equal(batch["mask"][i, :h, :w].numpy(), mask)
                assert np.array_equal(batch["image"][i, :, :h, :w].permute(1, 2, 0).numpy(), image)
                assert (batch["mask"][i, h:, :] == 255).all() and (batch["mask"][i, :, w:] == 255).all()
                assert (batch["image"][i, :, h:, :] == 0).all() and (batch["image"][i, :, :, w:] == 0).all()
    assert len(seen) == len(set(seen)) == manifest.splits["val"].num_samples
    assert set(seen) == set(expected)


def test_eval_more_ranks_and_workers_than_samples(tmp_path):
    manifest = build_shards(tmp_path, {"val": [[make_sample(7, [1])]]})
    seen = []
    for rank in range(3):
        seen += keys(D.eval_loader(cfg(workers=2), manifest, tmp_path, "val", rank=rank, world_size=3))
    assert seen == ["7"]


def test_eval_more_ranks_than_shards_gives_every_rank_work(tmp_path):
    """3 ranks on 2 shards of 4 samples: blocks of 2, 3 and 3 samples, every sample exactly once (a split
    dealt by shard would leave rank 2 idle)."""
    key = iter(range(300, 400))
    manifest = build_shards(
        tmp_path, {"val": [[make_sample(next(key), [1]) for _ in range(4)] for _ in range(2)]}
    )
    per_rank = [
        keys(D.eval_loader(cfg(workers=2), manifest, tmp_path, "val", rank=r, world_size=3)) for r in range(3)
    ]
    assert [len(k) for k in per_rank] == [2, 3, 3]
    everything = [k for ks in per_rank for k in ks]
    assert sorted(everything) == [str(k) for k in range(300, 308)]


@pytest.mark.parametrize(("total", "world"), [(15, 2), (15, 4), (3, 5), (0, 2), (12, 12)])
def test_rank_slices_partition_the_split(total, world):
    counts = {f"s{i}": n for i, n in enumerate(np.array_split(np.arange(total), 3))}
    counts = {k: len(v) for k, v in counts.items()}
    taken = []
    for rank in range(world):
        for s in D.rank_slices(counts, rank, world):
            assert 0 <= s.start < s.stop <= s.total == counts[s.url]
            taken += [(s.url, i) for i in range(s.start, s.stop)]
    assert sorted(taken) == sorted((url, i) for url, n in counts.items() for i in range(n))


def test_train_loader_close_ends_its_workers(uneven):
    import multiprocessing

    root, manifest = uneven
    before = set(multiprocessing.active_children())
    loader = D.TrainLoader(cfg(workers=2), AUG, manifest, root, rank=0, world_size=1, seed=0, num_batches=4)
    assert len(list(loader)) == 4
    assert len(set(multiprocessing.active_children()) - before) == 2  # persistent: alive between epochs
    loader.close()
    assert set(multiprocessing.active_children()) - before == set()
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)


# ------------------------------------------------------------------------------------------ corrupt data


@pytest.fixture
def damaged(tmp_path) -> tuple[Path, Manifest, list[str]]:
    """train and val: one good shard, one shard to damage (5 samples each)."""
    key = iter(range(500, 600))
    split = lambda: [[make_sample(next(key), [1, 2]) for _ in range(5)] for _ in range(2)]  # noqa: E731
    manifest = build_shards(tmp_path, {"train": split(), "val": split()})
    damaged_keys = [str(k) for k in range(505, 510)] + [str(k) for k in range(515, 520)]
    return tmp_path, manifest, damaged_keys


def member_offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (header start, data start, data end)"""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.offset_data + m.size) for m in tar.getmembers()}


def test_missing_or_truncated_shard_is_a_startup_error(damaged):
    root, manifest, _ = damaged
    path = root / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ManifestError, match="train-000001.tar has 1500 bytes"):
        train_batches(cfg(), AUG, manifest, root, rank=0, world_size=1, seed=0, epoch=0, num_batches=2)
    path.unlink()
    with pytest.raises(ManifestError, match="train-000001.tar is listed in the manifest but missing"):
        check_shards(manifest, root, "train")
    with pytest.raises(ManifestError, match="missing"):
        D.eval_loader(cfg(), manifest, root, "train", rank=0, world_size=1)


def test_truncated_shard_training_skips_counts_logs_evaluation_raises(damaged, caplog):
    root, _, _ = damaged
    for split, first_key in (("train", 505), ("val", 515)):
        path = root / f"{split}-000001.tar"
        _, start, end = member_offsets(path)[f"{first_key + 2}.png"]
        path.write_bytes(path.read_bytes()[: (start + end) // 2])  # cut inside sample 3's label map
        manifest = resize_in_manifest(root, path.name)

    with caplog.at_level(logging.WARNING, logger="modaseg.data"):
        batches = train_batches(
            cfg(), AUG, manifest, root, rank=0, world_size=1, seed=0, epoch=0, num_batches=20
        )
    assert len(batches) == 20
    skipped = sum(b["skipped"] for b in batches)
    reads = sum("train-000001.tar" in r.getMessage() for r in caplog.records)
    assert reads >= 1 and skipped == 3 * reads  # samples 3..5 of the shard lost on every read
    assert "sample 507" in caplog.text and "train-000001.tar" in caplog.text
    assert {"507", "508", "509"}.isdisjoint(keys(batches))
    assert {"505", "506"} & set(keys(batches))  # the samples before the cut are still used

    with pytest.raises(D.CorruptDataError, match=r"val-000001.tar, sample 517: unreadable shard"):
        list(D.eval_loader(cfg(), manifest, root, "val", rank=0, world_size=1))

    with pytest.raises(D.CorruptDataError, match="more than data.max_corrupt_samples=2"):
        (
            train_batches(
                cfg(max_corrupt_samples=2),
                AUG,
                manifest,
                root,
                rank=0,
                world_size=1,
                seed=0,
                epoch=0,
                num_batches=20,
            )
        )


def test_shard_cut_at_a_member_boundary_is_caught_by_the_sample_count(damaged):
    """tarfile takes a shard cut exactly between members for a complete archive. (workers=0 in the
    error tests: after an exception in a worker, torch 2.14 takes 5 s per worker to shut down.)"""
    root, _, _ = damaged
    path = root / "val-000001.tar"
    start, _, _ = member_offsets(path)["518.jpg"]
    path.write_bytes(path.read_bytes()[:start])
    manifest = resize_in_manifest(root, path.name)
    with pytest.raises(
        D.CorruptDataError, match=r"val-000001.tar, sample \(after 517\): shard ends after 3 of 5"
    ):
        list(D.eval_loader(cfg(), manifest, root, "val", rank=0, world_size=1))


def test_undecodable_sample(damaged, caplog):
    root, manifest, _ = damaged
    for split, bad in (("train", "507"), ("val", "517")):
        path = root / f"{split}-000001.tar"
        _, start, end = member_offsets(path)[f"{bad}.jpg"]
        raw = bytearray(path.read_bytes())
        raw[start:end] = b"\x00" * (end - start)  # same size, garbage image bytes
        path.write_bytes(bytes(raw))
    manifest = read_manifest(root)  # sizes unchanged: check_shards cannot see this
    with caplog.at_level(logging.WARNING, logger="modaseg.data"):
        batches = train_batches(
            cfg(), AUG, manifest, root, rank=0, world_size=1, seed=1, epoch=0, num_batches=20
        )
    skipped = sum(b["skipped"] for b in batches)
    assert skipped >= 1 and skipped == caplog.text.count("sample 507: image bytes do not decode")
    assert "507" not in keys(batches)
    with pytest.raises(D.CorruptDataError, match="val-000001.tar, sample 517: image bytes do not decode"):
        list(D.eval_loader(cfg(), manifest, root, "val", rank=0, world_size=1))


def test_label_values_outside_the_label_space_are_corrupt(tmp_path):
    sample = make_sample(9, [1])
    mask = np.asarray(Image.open(io.BytesIO(sample["png"]))).copy()
    mask[0, 0] = 7  # not a label (4 classes) and not 255
    sample["png"] = encode(mask, "PNG")
    manifest = build_shards(tmp_path, {"val": [[sample]]})
    with pytest.raises(D.CorruptDataError, match=r"sample 9: label values \[7\]"):
        list(D.eval_loader(cfg(), manifest, tmp_path, "val", rank=0, world_size=1))


# ------------------------------------------------------------------------------------------ real processes


def _two_ranks(root: str) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    manifest = read_manifest(root)
    train = train_batches(
        cfg(workers=2),
        AUG,
        manifest,
        root,
        rank=state.process_index,
        world_size=2,
        seed=0,
        epoch=0,
        num_batches=5,
    )
    evaluated = keys(
        D.eval_loader(cfg(workers=2), manifest, root, "val", rank=state.process_index, world_size=2)
    )
    gathered: list = [None, None]
    torch.distributed.all_gather_object(gathered, (len(train), evaluated))
    counts = [c for c, _ in gathered]
    everything = [k for _, ks in gathered for k in ks]
    assert counts == [5, 5], counts
    assert len(everything) == len(set(everything)) == manifest.splits["val"].num_samples, everything


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_over_gloo(uneven):
    from accelerate import debug_launcher

    root, _ = uneven
    debug_launcher(_two_ranks, args=(str(root),), num_processes=2)
