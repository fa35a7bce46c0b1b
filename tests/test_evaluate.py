"""modaseg-eval: exact metrics whatever the number of processes, checked against a direct computation."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import ROOT, accelerate_cmd, clean_env
from PIL import Image

from modaseg.config import ModelConfig
from modaseg.evaluate import main as eval_main
from modaseg.manifest import read_manifest
from modaseg.model import IMAGENET, build_model, export_model, pad_to_stride, preprocess


@pytest.fixture(scope="module")
def exported(shard_dir, tmp_path_factory):
    """An untrained but deterministic model: evaluation logic does not need a good one."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18"), read_manifest(shard_dir).num_classes).eval()
    return export_model(
        model, tmp_path_factory.mktemp("model") / "export", list(read_manifest(shard_dir).classes), IMAGENET
    )


def reference_matrix(model_dir, shard_dir, split: str) -> np.ndarray:
    """Independent of modaseg's loader: tarfile + PIL, one image at a time, numpy bincount."""
    import segmentation_models_pytorch as smp

    model = smp.from_pretrained(str(model_dir)).eval()
    manifest = read_manifest(shard_dir)
    n = manifest.num_classes
    matrix = np.zeros((n, n), dtype=np.int64)
    for shard in manifest.splits[split].shards:
        with tarfile.open(shard_dir / shard.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        for key in keys:
            image = np.array(Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("RGB"))
            label = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
            x = torch.from_numpy(image).permute(2, 0, 1)[None]
            with torch.no_grad():
                logits = model(pad_to_stride(preprocess(x), 0.0))
            pred = logits.argmax(1)[0, : label.shape[0], : label.shape[1]].numpy()
            keep = label != 255
            matrix += np.bincount(label[keep].astype(np.int64) * n + pred[keep], minlength=n * n).reshape(
                n, n
            )
    return matrix


def test_eval_matches_a_direct_computation_and_writes_reports(exported, shard_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        eval_main(
            [
                "--checkpoint",
                str(exported),
                "--shards",
                str(shard_dir),
                "--split",
                "test",
                "--out",
                str(out),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    np.testing.assert_array_equal(
        np.array(report["confusion"]), reference_matrix(exported, shard_dir, "test")
    )
    for name in ("metrics.json", "metrics.csv", "metrics.md", "confusion.png", "iou.png", "confusion.csv"):
        assert (out / name).stat().st_size > 0
    title = (out / "metrics.md").read_text().splitlines()[0]
    assert f"test: {read_manifest(shard_dir).splits['test'].num_samples} images" in title
    printed = capsys.readouterr().out
    assert "Precision" in printed and "background" in printed and "scarf/tie" in printed


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_give_the_single_process_matrix(exported, shard_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--checkpoint", str(exported), "--shards", str(shard_dir), "--split", "val", "--workers", "0"]
    subprocess.run(
        [sys.executable, "-m", "modaseg.evaluate", *args, "--out", str(one)],
        cwd=ROOT,
        env=clean_env(),
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [*accelerate_cmd(2), "-m", "modaseg.evaluate", *args, "--out", str(two)],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    a = json.loads((one / "metrics.json").read_text())
    b = json.loads((two / "metrics.json").read_text())
    assert a["confusion"] == b["confusion"]
    assert sum(map(sum, a["confusion"])) > 0


def test_compare_prints_per_class_differences(exported, shard_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--checkpoint", str(exported), "--shards", str(shard_dir), "--split", "test", "--workers", "0"]
    assert eval_main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert eval_main([*args, "--tta-flip", "--compare", str(out / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    assert "ΔIoU" in printed and "scarf/tie" in printed
