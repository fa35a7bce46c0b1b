import json

import pytest

from modaseg.manifest import ManifestError, check_shards, read_manifest


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(ManifestError, match="run modaseg-shard first"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("name", ["../train-000000.tar", "/etc/passwd", "sub/train-000000.tar", ".."])
def test_shard_names_cannot_escape_the_folder(shard_dir, tmp_path, name):
    raw = json.loads((shard_dir / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="not a plain file name"):
        read_manifest(tmp_path)


def test_missing_or_truncated_shard_is_named_at_start_up(shard_dir, tmp_path):
    import shutil

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
