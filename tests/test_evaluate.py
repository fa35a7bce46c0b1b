"""modaseg-eval: exact metrics whatever the number of processes, checked against a direct computation."""

from __future__ import annotations

import io
import json
import shutil
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


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """modaseg-eval's main() makes an Accelerator with the precision asked for; within one test process the
    previous test's state would refuse another precision (the CLI makes one per process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield


@pytest.fixture(scope="module")
def exported(shard_dir, tmp_path_factory):
    """An untrained but deterministic model: evaluation logic does not need a good one."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18"), read_manifest(shard_dir).num_classes).eval()
    return export_model(
        model, tmp_path_factory.mktemp("model") / "export", list(read_manifest(shard_dir).classes), IMAGENET
    )


def reference_matrix(model_dir, shard_dir, split: str, tta: bool = False) -> np.ndarray:
    """Independent of modaseg's loader: tarfile + PIL, one image at a time, numpy bincount; with `tta`
    the logits are averaged with those of the mirrored image, mirrored back."""
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
                padded = pad_to_stride(preprocess(x), 0.0)
                logits = model(padded)
                if tta:
                    logits = (logits + model(padded.flip(-1)).flip(-1)) / 2
            pred = logits.argmax(1)[0, : label.shape[0], : label.shape[1]].numpy()
            keep = label != 255
            matrix += np.bincount(label[keep].astype(np.int64) * n + pred[keep], minlength=n * n).reshape(
                n, n
            )
    return matrix


@pytest.mark.slow
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
                "--mixed-precision",
                "no",  # the reference is computed in fp32; auto is bf16 on a CPU with AVX512_BF16
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


@pytest.mark.slow
def test_tta_flip_and_compare(exported, shard_dir, tmp_path, capsys):
    """--tta-flip gives the mirrored-average matrix computed by hand; --compare prints the differences."""
    out, tta = tmp_path / "eval", tmp_path / "tta"
    args = ["--checkpoint", str(exported), "--shards", str(shard_dir), "--split", "test", "--workers", "0"]
    args += ["--mixed-precision", "no"]  # the hand-computed reference is fp32; auto is bf16 where native
    assert eval_main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert eval_main([*args, "--tta-flip", "--out", str(tta), "--compare", str(out / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    assert "ΔIoU" in printed and "scarf/tie" in printed
    with_tta = json.loads((tta / "metrics.json").read_text())["confusion"]
    assert with_tta == reference_matrix(exported, shard_dir, "test", tta=True).tolist()
    assert with_tta != json.loads((out / "metrics.json").read_text())["confusion"]


def _export_with(name: str, change):
    """A case: a copy of the export whose file `name` holds change(its bytes)."""

    def make(tmp_path, exported, shard_dir):
        copy = tmp_path / "export"
        shutil.copytree(exported, copy, ignore=shutil.ignore_patterns(name))
        (copy / name).write_bytes(change((exported / name).read_bytes()))
        return {"--checkpoint": copy}

    return make


def _file(path: str, content: str):
    """A case: the file tmp_path/`path` holding `content`, given as --compare."""

    def make(tmp_path, exported, shard_dir):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
        return {"--compare": tmp_path / path}

    return make


# (case, options it changes: (tmp_path, export, shards) -> {option: value}, what the one line says)
BAD_INPUTS = [
    ("missing shards folder", lambda t, e, s: {"--shards": t / "nowhere"}, "no manifest.json in"),
    ("missing checkpoint", lambda t, e, s: {"--checkpoint": t / "nowhere"}, "neither a modaseg export"),
    ("junk config.json", _export_with("config.json", lambda b: b"junk"), "JSONDecodeError"),
    ("truncated model.safetensors", _export_with("model.safetensors", lambda b: b[:1000]), "SafetensorError"),
    (
        "unknown encoder in config.json",
        _export_with("config.json", lambda b: b.replace(b'"resnet18"', b'"resnet1800"')),
        "Wrong encoder name `resnet1800`",
    ),
    (
        "classes differ from the shards'",
        _export_with("modaseg.json", lambda b: b.replace(b'"bag"', b'"handbag"')),
        "differ from the classes of --shards",
    ),
    ("--compare junk file", _file("old.json", "{not json"), "not a metrics.json written by modaseg-eval"),
    ("--compare a JSON list", _file("old.json", "[1, 2]"), "must hold a JSON object"),
    ("--compare missing", lambda t, e, s: {"--compare": t / "none.json"}, "--compare"),
    ("--compare is --out/metrics.json", _file("out/metrics.json", "{}"), "this run writes into --out"),
    ("--batch-size 0", lambda t, e, s: {"--batch-size": "0"}, "--batch-size 0: must be at least 1"),
    ("--workers -1", lambda t, e, s: {"--workers": "-1"}, "--workers -1: must be at least 0"),
    ("--out is a file", lambda t, e, s: {"--out": s / "manifest.json"}, "exists and is not a folder"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(("fp16 on CPU", lambda t, e, s: {"--mixed-precision": "fp16"}, "needs a CUDA device"))


@pytest.mark.parametrize(("change", "expected"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_before_any_evaluation(exported, shard_dir, tmp_path, capsys, change, expected):
    options = {"--checkpoint": exported, "--shards": shard_dir, "--out": tmp_path / "out", "--workers": "0"}
    options.update(change(tmp_path, exported, shard_dir))
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert eval_main([str(v) for item in options.items() for v in item]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("modaseg-eval: error: ") and expected in err.splitlines()[-1]
    assert "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == written  # no report written
