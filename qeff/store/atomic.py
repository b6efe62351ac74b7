"""Atomic, collision-free file writes: every file qeff and pytest_qeff write goes through here.

A write goes to a temporary file of its own in the target's directory
(``.<name>.<pid>.<random>.tmp``: two writers never share one, as they did a fixed
``<file>.tmp``), is flushed and fsync'd, gets the permissions a plain ``open()`` would give (or
the replaced file's), and is renamed over the target with ``os.replace`` — atomic on POSIX, so a
reader sees the old content or the new, never a torn file. The directory is then fsync'd so the
rename survives a power loss. A failed write removes its temporary file; a full disk is reported
as :class:`~qeff.errors.DiskFullError` naming the directory and the space the write needed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from qeff.errors import DiskFullError

__all__ = [
    "tree_bytes",
    "write_bytes",
    "write_text",
    "write_json",
    "atomic_open",
    "fsync_dir",
    "fsync_file",
    "default_mode",
    "umask",
    "is_disk_full",
    "disk_full_error",
    "human_bytes",
    "TEMPORARY",
]

#: The names of this module's temporary files (for ``qeff doctor`` / ``qeff clean``).
TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{12}\.tmp$")

_UMASK: int | None = None


def umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` sets it)."""
    global _UMASK
    if _UMASK is None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    _UMASK = int(line.split()[1], 8)
                    break
        except OSError:
            pass
        if _UMASK is None:  # not Linux: set and restore (once, at first use)
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def default_mode(executable: bool = False) -> int:
    """What ``open(path, "w")`` would create: 0o666 (0o777 for executables) less the umask.
    Temporary files are created 0o600, so a rename alone would leave a shared cache unreadable to
    other users (issue 14: ``model.onnx.data`` was 0600 while its siblings were 0644)."""
    return (0o777 if executable else 0o666) & ~umask()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of the regular files under a folder (symbolic links not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exhausted quota. Libraries that
    write through native code (ONNX Runtime, protobuf) raise their own types with the OS's text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(directory: Path, *, what: str, needed: int | None = None, written: int | None = None) -> DiskFullError:
    """One sentence: which directory's disk is full, how much it has free, what the write needed."""
    directory = Path(directory)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = human_bytes(shutil.disk_usage(probe).free)
    except OSError:
        free = "unknown"
    if needed:
        need = f"it needs about {human_bytes(needed)}"
    elif written:
        need = f"it needs more than the {human_bytes(written)} it had written"
    else:
        need = "it needs more space"
    return DiskFullError(
        f"the disk holding {directory} is full ({free} free): {what} failed, and {need}; "
        f"free some space or point --home / QEFF_HOME at a larger disk"
    )


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                perm: int | None = None, expected_size: int | None = None) -> Iterator[IO[Any]]:
    """``with atomic_open(p, "w") as f: f.write(...)`` — ``p`` appears complete or not at all.

    ``perm`` defaults to the replaced file's permissions, else :func:`default_mode`.
    ``expected_size`` is only for the message if the disk fills up."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    if perm is None:
        try:
            perm = path.stat().st_mode & 0o7777
        except OSError:
            perm = default_mode()
    tmp = _temporary_path(path)
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            written = f.tell()
        os.chmod(tmp, perm)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            written = tmp.stat().st_size
        except OSError:
            written = 0
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path.parent, what=f"writing {path.name}", needed=expected_size, written=written) from exc
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, *, perm: int | None = None) -> Path:
    with atomic_open(path, "wb", perm=perm, expected_size=len(data)) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", perm: int | None = None) -> Path:
    return write_bytes(path, text.encode(encoding), perm=perm)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               perm: int | None = None) -> Path:
    """JSON plus a final newline, written atomically."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n", perm=perm)
