"""modaseg.files: the one strict YAML loader every YAML the project reads goes through."""

from __future__ import annotations

import pytest
import yaml

from modaseg.console import InputError
from modaseg.files import DuplicateKeyError, read_yaml, strict_yaml


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
