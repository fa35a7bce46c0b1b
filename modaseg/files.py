"""Files, written so that no reader ever sees half of one, and read so that nothing outside the folder
the user named is opened.

Every module that writes a result (shards, manifests, reports, checkpoints' state, exports' metadata)
writes it here: a temporary name in the same folder, flushed to disk, then renamed over the target.
Every YAML the project reads (configs, overrides, label maps, label-name lists) is parsed here too, by one
strict loader that refuses a key given twice instead of letting the last one win.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from modaseg.console import InputError, UserError


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a crash after os.replace may otherwise undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename. The temporary name
    carries the pid, so two processes (or an orphaned worker) never write the same temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(
    path: str | Path, obj: object, *, indent: int | None = 1, sort_keys: bool = False
) -> Path:
    """JSON that is valid by construction: NaN and infinity are refused (they are not JSON) instead of
    being written as bare `NaN` that strict readers reject; callers turn them into null first."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_atomic(path, text + "\n")


def json_safe(value: object) -> object:
    """A copy of `value` with every non-finite float replaced by None (JSON null)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class UnsafeFileError(OSError):
    """A file that must not be read: outside its folder, or not a regular file (FIFO, device, folder)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def inside(folder: str | Path, path: str | Path) -> bool:
    """Whether `path`, with every symlink resolved, lies inside `folder` (also resolved)."""
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def read_inside(folder: str | Path, name: str | Path) -> bytes:
    """The bytes of the regular file `folder/name`. Raises UnsafeFileError for a path that resolves
    outside `folder` (a symlink out of it, `..`) or that is not a regular file: a FIFO would block the
    reader forever, a device could be endless. FileNotFoundError when it does not exist."""
    path = Path(folder) / name
    if not inside(folder, path):
        raise UnsafeFileError("outside_folder", f"{path} resolves outside {folder}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError("not_a_regular_file", f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def file_fingerprint(path: str | Path) -> tuple[int, int]:
    """(size, mtime in ns): what changes when a file is replaced or edited, without reading it."""
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


# ------------------------------------------------------------------------------------------------ YAML


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: object, first: int, again: int):
        super().__init__(f"key {key!r} given twice (line {first} and line {again})")


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one silently: a
    config with two `lr:` trains with the second, a label map with `bag: bag` then `bag: belt` maps every
    bag to belt). Keys brought in by a merge (`<<: *base`) may be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def strict_yaml(data: bytes | str) -> object:
    """The YAML document in `data`, read safely (plain data only) and strictly: raises yaml.YAMLError for
    invalid YAML, bytes that are not UTF-8 and a key given twice (DuplicateKeyError, with both lines)."""
    return yaml.load(data, Loader=_StrictLoader)  # a SafeLoader subclass: plain data only


def read_yaml(path: str | Path, error: type[UserError] = InputError) -> object:
    """strict_yaml of the file at `path`; an unreadable file, bytes that are not UTF-8, invalid YAML or a
    duplicate key raise `error` in one line naming the file (and the key and lines)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        return strict_yaml(text)
    except DuplicateKeyError as e:
        raise error(f"{path}: {e}; keep one of them") from None
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None


# ------------------------------------------------------------------------------------------------ locks

LOCK_NAME = ".modaseg.lock"


class FolderBusy(UserError):
    """A folder that another process owns (its lock file names the holder)."""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), which tells a
    running holder from a new process that reuses its pid; None where /proc does not say."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return stat_line.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, start: str | None) -> bool:
    """Whether `pid` is alive on this host and is still the process that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    now = _process_start(pid)
    return start is None or now is None or now == start


@dataclass
class FolderLock:
    """The lock file `folder/.modaseg.lock` held by this process: its pid, host, start time and a token
    that tells this taking apart from any other. `release` removes it (only if it is still ours), and the
    folder too when taking the lock created it and nothing else was written."""

    path: Path
    token: str
    created_folder: bool

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            return
        if self.created_folder:
            with contextlib.suppress(OSError):  # only when empty: refused before writing anything
                self.path.parent.rmdir()


def lock_folder(folder: str | Path, what: str = "run folder") -> tuple[FolderLock, dict | None]:
    """Take `folder`'s lock file (created with O_EXCL: of two processes only one gets it), creating the
    folder if needed. Returns the lock and the holder it replaced: a lock whose process is no longer
    running on this host is stale (a killed job) and taken over. Raises FolderBusy naming the holder
    (pid, host, start) when it runs, or runs on another host where this process cannot tell."""
    import secrets
    import socket
    from datetime import datetime

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    host = socket.gethostname()
    replaced = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                raise FolderBusy(
                    f"{folder}: the lock file {path} is being written or unreadable; if no training uses "
                    "this folder, delete it"
                ) from None
            if holder.get("host") != host or _running(
                int(holder.get("pid", -1)), holder.get("process_start")
            ):
                where = "this host" if holder.get("host") == host else f"host {holder.get('host')}"
                raise FolderBusy(
                    f"{folder}: this {what} is in use by another training (pid {holder.get('pid')} on "
                    f"{where}, started {holder.get('started')}): wait for it to end, or use another "
                    f"train.output_dir; if that process is gone (its machine crashed), delete {path}"
                ) from None
            stale = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
            try:
                os.rename(path, stale)  # one taker wins the stale lock; the others find it gone
            except FileNotFoundError:
                continue
            if _read_holder(stale) != holder:  # taken afresh in between: put it back, it is in use
                os.rename(stale, path)
                continue
            stale.unlink()
            replaced = holder
            continue
        token = secrets.token_hex(8)
        record = {
            "pid": os.getpid(),
            "host": host,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()),
            "token": token,
        }
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return FolderLock(path, token, created), replaced
    raise FolderBusy(f"{folder}: another process keeps taking {path}; is a training starting there?")


def _read_holder(path: Path) -> dict | None:
    """The holder a lock file names, or None while it is being written (or unreadable)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None
