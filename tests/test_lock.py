"""pyproject.toml declares every import; requirements.lock agrees with pyproject.toml and constraints.txt
(launch/check_lock.py, which launch/setup.sh also runs), and that check fails on each kind of disagreement."""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_lock", ROOT / "launch" / "check_lock.py")
check_lock = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check_lock  # its dataclasses look their module up there
_spec.loader.exec_module(check_lock)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = (ROOT / "constraints.txt").read_text()
LOCK = (ROOT / "requirements.lock").read_text()
RELOCK = "re-lock with `bash launch/lock.sh`"


def test_the_lock_agrees_with_pyproject_and_constraints():
    assert check_lock.check(PYPROJECT, CONSTRAINTS, LOCK) == []


@functools.cache
def _providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _imports(folder: Path) -> set[str]:
    """The top-level modules the .py files under `folder` import, less the standard library and their own."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    own = {"modaseg"} | {p.stem for p in folder.rglob("*.py")}
    return names - set(sys.stdlib_module_names) - own


@pytest.mark.parametrize(
    ("folder", "declared_in"),
    [("modaseg", ["onnx", "pretrained"]), ("benchmarks", ["dev"]), ("tests", ["dev"]), ("launch", ["dev"])],
)
def test_every_import_is_declared(folder, declared_in):
    """Each third-party module imported under `folder` comes from a distribution that pyproject.toml declares
    (in [project] dependencies or the extras named), so that the lock pins it."""
    project = PYPROJECT["project"]
    reqs = project["dependencies"] + [
        r for extra in declared_in for r in project["optional-dependencies"][extra]
    ]
    declared = {canonicalize_name(Requirement(r).name) for r in reqs}
    providers = _providers()
    undeclared = {
        module: providers.get(module, ["(no installed distribution provides it)"])
        for module in sorted(_imports(ROOT / folder))
        if not declared & {canonicalize_name(d) for d in providers.get(module, [])}
    }
    assert undeclared == {}, f"{folder}/ imports modules whose distributions pyproject.toml does not declare"


def _with(section: str, requirement: str) -> dict:
    pyproject = copy.deepcopy(PYPROJECT)
    if section == "dependencies":
        pyproject["project"]["dependencies"].append(requirement)
    else:
        pyproject["project"]["optional-dependencies"][section].append(requirement)
    return pyproject


@pytest.mark.parametrize(
    ("section", "todo"),
    [("dependencies", "re-lock"), ("dev", "re-lock"), ("onnx", "add it to the dev extra too, then re-lock")],
)
def test_a_requirement_added_without_relocking_fails_saying_what_to_run(section, todo):
    (line,) = check_lock.check(_with(section, "nosuchpackage-for-the-lock-check>=1"), CONSTRAINTS, LOCK)
    assert line.endswith(
        f"'nosuchpackage-for-the-lock-check>=1' is not in requirements.lock: {todo} with `bash launch/lock.sh`"
    )


def test_a_range_that_excludes_the_pin_fails():
    (line,) = check_lock.check(_with("dependencies", "numpy<1"), CONSTRAINTS, LOCK)
    assert "'numpy<1' but requirements.lock pins numpy==" in line and RELOCK in line


def test_a_requirement_for_another_platform_is_not_required():
    windows_only = _with("dependencies", "pywin32>=300; sys_platform == 'win32'")
    assert check_lock.check(windows_only, CONSTRAINTS, LOCK) == []


def test_a_hold_the_lock_does_not_meet_fails():
    (line,) = check_lock.check(PYPROJECT, CONSTRAINTS + "torch==2.13.0\n", LOCK)
    assert line.startswith("constraints.txt: 'torch==2.13.0' but requirements.lock pins torch==2.14.1")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("rich>=13 \\\n    --hash=sha256:00\n", "'rich>=13' is not an exact pin"),
        ("nosuchpackage==1.0\n", "'nosuchpackage==1.0' has no --hash"),
        ("rich==14.0.0 \\\n    --hash=sha256:00\n", "rich is pinned 2 times (15.0.0, 14.0.0)"),
        ("--extra-index-url https://example.invalid/simple\n", "is an option, not a pin"),
    ],
)
def test_a_lock_entry_that_is_not_one_hashed_pin_fails(entry, message):
    problems = check_lock.check(PYPROJECT, CONSTRAINTS, LOCK + entry)
    assert len(problems) == 1 and message in problems[0], problems
