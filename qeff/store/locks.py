"""Exclusive locks on paths, safe against ``qeff clean`` removing a lock file.

A lock is ``flock`` on ``<path>``: the kernel drops it when its holder exits, however it exits
(SIGKILL included), so a killed build never leaves a lock that blocks the next one — only an
empty file, which ``qeff clean`` may remove. Removing a lock file races with a process that
opened it and waits: that process would then hold a lock on a file no longer in the directory
while a third locks a new one. So :meth:`PathLock.acquire` checks, once it holds the lock, that
the path still names the file it locked, and starts over when it does not.

The holder writes ``pid host start-time`` into the file, so ``qeff doctor`` can say who holds it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: fall back to the filelock package
    fcntl = None  # type: ignore[assignment]

__all__ = ["PathLock", "is_held", "holder", "holder_pid", "pid_alive", "remove_if_free"]


class PathLock:
    """``with PathLock(path): ...`` — held by one process (or thread) at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._fallback = None

    def acquire(self, blocking: bool = True, on_wait: Callable[[str], None] | None = None) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if another holds it.
        ``on_wait(holder)`` is called once before blocking on a lock someone else holds."""
        if fcntl is None:  # pragma: no cover
            from filelock import FileLock, Timeout

            self._fallback = FileLock(str(self.path))
            try:
                self._fallback.acquire(timeout=-1 if blocking else 0)
            except Timeout:
                return False
            return True
        waited = False
        while True:
            fd = _open(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return False
                if on_wait is not None and not waited:
                    on_wait(holder(self.path) or "another process")
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed (or replaced) between our open and our lock: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            _stamp(fd)
            return True

    def release(self) -> None:
        if self._fallback is not None:  # pragma: no cover
            self._fallback.release()
            self._fallback = None
            return
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # no stale holder text once released
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None or self._fallback is not None

    def __enter__(self) -> PathLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies: a shared cache stays shared
    except PermissionError:
        return os.open(path, os.O_RDONLY)  # another user's lock file: flock works on a read-only descriptor


def _stamp(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode(), 0)
    except OSError:
        pass  # read-only descriptor: the lock still holds, only the holder text is missing


def holder(path: str | os.PathLike) -> str:
    """``pid N on HOST since HH:MM:SS`` as the holder wrote it, or ``""``."""
    try:
        text = Path(path).read_text().split()
        pid, host, started = text[0], text[1], float(text[2])
    except (OSError, ValueError, IndexError):
        return ""
    return f"pid {pid} on {host} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"


def holder_pid(path: str | os.PathLike) -> tuple[int, str] | None:
    """(pid, host) the last holder of the lock at ``path`` wrote, or None. A holder that exits
    normally truncates it; one the kernel killed leaves its stamp."""
    try:
        text = Path(path).read_text().split()
        return int(text[0]), text[1]
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_held(path: str | os.PathLike) -> bool:
    """Whether some process holds the lock at ``path`` now (False when there is no such file)."""
    path = Path(path)
    if not path.exists():
        return False
    lock = PathLock(path)
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def remove_if_free(path: str | os.PathLike) -> bool:
    """Remove the lock file at ``path`` unless someone holds it; True if removed. Done while
    holding it, so no build can be inside it (see the module docstring for waiters)."""
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        return False
    lock = PathLock(path)
    if not lock.acquire(blocking=False):
        return False
    try:
        path.unlink(missing_ok=True)
    finally:
        lock.release()
    return True
