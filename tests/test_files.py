"""modaseg.files: the one strict YAML loader every YAML the project reads goes through; folder locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modaseg.console import InputError
from modaseg.files import (
    LOCK_NAME,
    DuplicateKeyError,
    FolderBusy,
    lock_folder,
    read_yaml,
    strict_yaml,
)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "lr", (2, 3)),
        ("labels:\n  bag: bag\n  hat: headwear\n  bag: belt\n", "bag", (2, 4)),
        ("a: 1\nb: {x: 1, x: 2}\n", "x", (2, 2)),
        ("train: {}\ntrain: {}\n", "train", (1, 2)),
    ],
    ids=["config", "label map", "flow mapping", "section"],
)
def test_a_key_given_twice_is_refused_naming_file_key_and_lines(tmp_path, text, key, lines):
    with pytest.raises(DuplicateKeyError, match=f"key '{key}' given twice"):
        strict_yaml(text)
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        read_yaml(path)
    assert str(e.value) == (
        f"{path}: key '{key}' given twice (line {lines[0]} and line {lines[1]}); keep one of them"
    )


def test_merge_keys_may_be_overridden_and_plain_yaml_reads_as_safe_load():
    text = "base: &b {lr: 1, wd: 2}\nrun:\n  <<: *b\n  lr: 3\nlist: [1, 2]\n"
    assert strict_yaml(text) == yaml.safe_load(text)
    assert strict_yaml(text)["run"] == {"lr": 3, "wd": 2}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"optim:\n  lr: 0.1\n# caf\xe9\n", "not UTF-8 text (byte 0xe9 on line 3); save it as UTF-8"),
        (b"model: [unclosed\n", "is not valid YAML"),
        (b"x: !!python/object/apply:os.system ['echo pwned']\n", "is not valid YAML"),
    ],
    ids=["latin-1", "invalid", "python tag"],
)
def test_unreadable_yaml_is_one_line(tmp_path, content, message):
    path = tmp_path / "x.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        read_yaml(path)
    assert "\n" not in str(e.value)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(InputError, match=f"cannot read {tmp_path / 'no.yaml'}: No such file"):
        read_yaml(tmp_path / "no.yaml")


# ------------------------------------------------------------------------------------------------ locks


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_holder(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", **holder}))
    return path


def test_a_folder_lock_is_taken_once_and_released(tmp_path):
    folder = tmp_path / "run"
    lock, replaced = lock_folder(folder)
    assert replaced is None
    holder = json.loads((folder / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    with pytest.raises(FolderBusy, match=rf"in use by another training \(pid {os.getpid()} on this host"):
        lock_folder(folder)
    lock.release()
    assert not folder.exists(), "taking the lock created the folder and nothing else was written"
    folder.mkdir()
    (folder / "train.log").write_text("x")
    lock, _ = lock_folder(folder)
    lock.release()
    assert sorted(p.name for p in folder.iterdir()) == ["train.log"]


@pytest.mark.parametrize(
    ("holder", "taken_over"),
    [
        (lambda: {"pid": dead_pid(), "host": socket.gethostname()}, True),
        (
            lambda: {"pid": os.getpid(), "host": socket.gethostname(), "process_start": "1"},
            True,
        ),  # pid reused
        (lambda: {"pid": os.getpid(), "host": socket.gethostname()}, False),
        (lambda: {"pid": dead_pid(), "host": "another-node"}, False),  # cannot tell: refused
    ],
    ids=["dead pid", "reused pid", "running", "other host"],
)
def test_a_stale_lock_is_taken_over_only_when_its_process_is_gone_on_this_host(tmp_path, holder, taken_over):
    record = holder()
    path = write_holder(tmp_path, **record)
    if taken_over:
        lock, replaced = lock_folder(tmp_path)
        assert replaced["pid"] == record["pid"]
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
        assert not path.exists()
    else:
        before = path.read_text()
        with pytest.raises(FolderBusy, match=f"pid {record['pid']} on .*delete {path}"):
            lock_folder(tmp_path)
        assert path.read_text() == before


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock, _ = lock_folder(tmp_path)
    path = write_holder(tmp_path, pid=1, host="elsewhere", token="theirs")
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"
