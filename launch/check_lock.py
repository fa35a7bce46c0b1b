"""requirements.lock against what it locks: every requirement of pyproject.toml (its dependencies, every
extra and the build backend) and every hold of constraints.txt must be met by exactly one entry of the lock,
and every entry must be an exact `==` pin with hashes. Prints one line per problem and exits 1.

`--sync-venv` (launch/setup.sh, after `pip install --require-hashes -r requirements.lock`) also makes the
running interpreter's packages equal the lock: it uninstalls what the lock does not pin (left by an older
lock) and fails on a pin that is missing or at another version. Only pip and modaseg itself may be extra.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = "requirements.lock"
RELOCK = "bash launch/lock.sh"
LOCKED_EXTRA = "dev"  # the extra launch/lock.sh compiles; it spells out every other extra
# in the venv but not pinned by the lock, besides modaseg itself (pip install --no-deps -e .): the venv's pip
NOT_LOCKED = {canonicalize_name("pip")}


@dataclass
class Pin:
    name: NormalizedName
    version: Version
    hashes: list[str] = field(default_factory=list)


def read_lock(text: str) -> tuple[dict[NormalizedName, list[Pin]], list[str]]:
    """The lock's entries by name, and what is wrong with its lines (not a pin, no hash)."""
    pins: dict[NormalizedName, list[Pin]] = {}
    problems: list[str] = []
    logical: list[str] = []
    joined = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not joined and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a `# via` comment inside a continued entry
            continue
        joined += " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            logical.append(joined.strip())
            joined = ""
    if joined:
        logical.append(joined.strip())
    for entry in logical:
        spec, *hashes = (part.strip() for part in entry.split(" --hash="))
        if spec.startswith("-"):
            problems.append(f"{LOCK}: '{spec}' is an option, not a pin")
            continue
        try:
            req = Requirement(spec.strip())
        except InvalidRequirement as e:
            problems.append(f"{LOCK}: '{spec}' is not a requirement ({e})")
            continue
        specs = list(req.specifier)
        if req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"{LOCK}: '{spec}' is not an exact pin (name==version)")
            continue
        if req.marker and not req.marker.evaluate():
            continue
        if not hashes:
            problems.append(f"{LOCK}: '{spec}' has no --hash")
        name = canonicalize_name(req.name)
        pins.setdefault(name, []).append(Pin(name, Version(specs[0].version), hashes))
    return pins, problems


def locked_requirements(pyproject: dict, constraints: str) -> list[tuple[str, Requirement]]:
    """(where it is declared, requirement) for everything the lock must satisfy."""
    project = pyproject["project"]
    found = [("[build-system] requires", r) for r in pyproject.get("build-system", {}).get("requires", [])]
    found += [("[project] dependencies", r) for r in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        found += [(f"extra '{extra}'", r) for r in reqs]
    for line in constraints.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found.append(("constraints.txt", line))
    out: list[tuple[str, Requirement]] = []
    for where, text in found:
        req = Requirement(text)
        extra = where.removeprefix("extra '").removesuffix("'") if where.startswith("extra") else ""
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue  # not for this platform or Python
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            continue  # modaseg[other-extra]: those extras are checked themselves
        out.append((where, req))
    return out


def check(pyproject: dict, constraints: str, lock_text: str) -> list[str]:
    """What disagrees between the declared requirements and the lock; empty when they agree."""
    pins, problems = read_lock(lock_text)
    for name, entries in pins.items():
        if len(entries) > 1:
            versions = ", ".join(str(p.version) for p in entries)
            problems.append(f"{LOCK}: {name} is pinned {len(entries)} times ({versions})")
    for where, req in locked_requirements(pyproject, constraints):
        entries = pins.get(canonicalize_name(req.name), [])
        source = "constraints.txt" if where == "constraints.txt" else f"pyproject.toml {where}"
        if not entries:
            other_extra = where.startswith("extra") and where != f"extra '{LOCKED_EXTRA}'"
            todo = f"add it to the {LOCKED_EXTRA} extra too, then re-lock" if other_extra else "re-lock"
            problems.append(f"{source}: '{req}' is not in {LOCK}: {todo} with `{RELOCK}`")
        elif len(entries) == 1 and not req.specifier.contains(entries[0].version, prereleases=True):
            problems.append(
                f"{source}: '{req}' but {LOCK} pins {req.name}=={entries[0].version}: re-lock with `{RELOCK}`"
            )
    return problems


def sync_venv(lock_text: str, project: str) -> list[str]:
    """Uninstalls from this interpreter what the lock does not pin; the pins missing or at another version."""
    pins, _ = read_lock(lock_text)
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    stale = sorted(set(installed) - set(pins) - NOT_LOCKED - {project})
    if stale:
        print(f"uninstalling what {LOCK} does not pin: {' '.join(stale)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *stale], check=True)
    problems = []
    for name, (pin, *_) in sorted(pins.items()):
        if name not in installed:
            problems.append(f"{LOCK} pins {name}=={pin.version}, which is not installed")
        elif Version(installed[name].version) != pin.version:
            problems.append(f"{LOCK} pins {name}=={pin.version}, installed: {installed[name].version}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sync-venv", action="store_true", help="also make this interpreter's packages equal the lock"
    )
    args = parser.parse_args()
    lock_text = (ROOT / LOCK).read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = check(pyproject, (ROOT / "constraints.txt").read_text(), lock_text)
    if args.sync_venv and not problems:
        problems += sync_venv(lock_text, canonicalize_name(pyproject["project"]["name"]))
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
