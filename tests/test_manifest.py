import json
import shutil

import pytest

from modaseg.manifest import ManifestError, check_shards, probe_sha256, read_manifest
from modaseg.shard import main as shard_main


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(ManifestError, match="run modaseg-shard first"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("name", ["../train-000000.tar", "/etc/passwd", "sub/train-000000.tar", "..", 7])
def test_shard_names_cannot_escape_the_folder(shard_dir, tmp_path, name):
    raw = json.loads((shard_dir / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="not a plain file name"):
        read_manifest(tmp_path)


def test_missing_or_truncated_shard_is_named_at_start_up(shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    manifest = read_manifest(copy)
    first = copy / manifest.splits["val"].shards[0].name
    first.write_bytes(first.read_bytes()[:512])
    with pytest.raises(ManifestError, match=f"shard {first} has 512 bytes"):
        check_shards(manifest, copy, "val")
    first.unlink()
    with pytest.raises(ManifestError, match=f"shard {first} is listed in the manifest but missing"):
        check_shards(manifest, copy, "val")
    assert len(check_shards(manifest, copy, "train")) == len(manifest.splits["train"].shards)


def test_a_shard_swapped_for_one_of_the_same_size_fails_at_start_up(shard_dir, tmp_path):
    """Tar records pad every shard to 10 KiB: a val shard overwritten by a train shard of the same size
    passes a size check, and training would then see validation images (or the reverse)."""
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    manifest = read_manifest(copy)
    infos = [(split, info) for split, s in manifest.splits.items() for info in s.shards]
    pairs = [(a, b) for a in infos for b in infos if a[0] != b[0] and a[1].size_bytes == b[1].size_bytes]
    assert pairs, "no two shards of one size in two splits: the test would prove nothing"
    (_, source), (split, target) = pairs[0]
    shutil.copyfile(copy / source.name, copy / target.name)
    with pytest.raises(
        ManifestError, match=f"shard {copy / target.name} is not the shard the manifest lists"
    ):
        check_shards(manifest, copy, split)
    for other in manifest.splits.keys() - {split}:
        check_shards(manifest, copy, other)


def test_manifests_without_the_probe_are_read_and_checked_by_size(shard_dir, tmp_path):
    raw = json.loads((shard_dir / "manifest.json").read_text())
    for split in raw["splits"].values():
        for info in split["shards"]:
            assert info.pop("probe_sha256") == probe_sha256(shard_dir / info["name"])
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    for name in {i["name"] for s in raw["splits"].values() for i in s["shards"]}:
        shutil.copyfile(shard_dir / name, tmp_path / name)
    manifest = read_manifest(tmp_path)
    assert all(i.probe_sha256 == "" for s in manifest.splits.values() for i in s.shards)
    assert check_shards(manifest, tmp_path, "train")  # no probe recorded: that comparison is skipped


def _extra_top(raw):
    raw["extra"] = 1


def _extra_in_shard(raw):
    raw["splits"]["val"]["shards"][0]["extra"] = 1


def _extra_in_split(raw):
    raw["splits"]["test"]["extra"] = 1


def _no_classes(raw):
    del raw["classes"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_extra_top, "unknown key 'extra' in the manifest"),
        (_extra_in_shard, "unknown key 'extra' in a shard of split 'val'"),
        (_extra_in_split, "unknown key 'extra' in split 'test'"),
        (_no_classes, "the manifest lacks the key 'classes'"),
    ],
    ids=["top level", "shard entry", "split entry", "missing key"],
)
def test_a_manifest_with_unknown_or_missing_keys_is_named_not_a_traceback(
    shard_dir, tmp_path, capsys, edit, message
):
    raw = json.loads((shard_dir / "manifest.json").read_text())
    edit(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)
    assert shard_main(["--out", str(tmp_path), "--verify"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["[1, 2]", '{"format": "modaseg-shards/1", "splits": []}', "{"])
def test_malformed_manifests_are_a_manifest_error(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError):
        read_manifest(tmp_path)


def test_open_shards_combines_folders_of_one_label_space(shard_dir, tmp_path):
    """data.shards as a list: one manifest over both folders, absolute shard paths, summed statistics;
    with data.mix the train split's class statistics are the mixture's."""
    import shutil

    from modaseg.manifest import check_shards, open_shards

    twin = tmp_path / "twin"
    shutil.copytree(shard_dir, twin)
    one, both = open_shards(str(shard_dir)), open_shards([str(shard_dir), str(twin)])
    for split in ("train", "val", "test"):
        assert both.splits[split].num_samples == 2 * one.splits[split].num_samples
        assert both.splits[split].class_pixels == [2 * n for n in one.splits[split].class_pixels]
        paths = check_shards(both, "", split)
        assert all(p.is_absolute() and p.is_file() for p in paths)
        assert {p.parent for p in paths} == ({shard_dir.resolve(), twin.resolve()} if paths else set())
    weighted = open_shards([str(shard_dir), str(twin)], mix=[3.0, 1.0])
    assert weighted.splits["train"].class_pixels == pytest.approx(
        [2 * n for n in one.splits["train"].class_pixels]
    )
    assert weighted.splits["val"].class_pixels == both.splits["val"].class_pixels


def test_open_shards_refuses_folders_with_other_classes(shard_dir, tmp_path):
    import json
    import shutil

    from modaseg.manifest import open_shards

    other = tmp_path / "other"
    shutil.copytree(shard_dir, other)
    raw = json.loads((other / "manifest.json").read_text())
    raw["classes"][1] = "handbag"
    (other / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="need one label space"):
        open_shards([str(shard_dir), str(other)])
