"""Scratch folders outside the cache (in the system's temporary directory) that a killed run does
not leave behind for good.

Two stages spill to disk while they run: the per-layer ONNX Runtime check keeps each step's
cache slots and hidden states in files (``qeff-layer-check-…``; a 7B's run writes hundreds of MB),
and the precision ladder keeps its reference logits in one (``qeff-reference-…``; SmolLM2's corpus:
805 MB). A run that ends, however it fails, deletes its folder. One the kernel kills (SIGKILL: the
OOM killer) cannot, and ``/tmp`` may never be emptied on a machine that is not rebooted.

So each folder holds a lock file, :data:`LOCK_NAME`, locked for the folder's whole life with
:class:`~qeff.store.locks.PathLock` (``flock``: the kernel drops it when its holder dies, however it
dies) and stamped with the holder's pid and host. :func:`reclaim_scratch` removes a folder only when
all of these hold, so it deletes nothing but what a dead qeff run made:

- its name starts with one of qeff's scratch prefixes (:data:`PREFIXES`) and it is a real folder;
- it has the lock file, and the lock is free now (taken, without waiting, while removing);
- the lock file carries a holder's stamp of a pid on this host that is no longer running — or
  none, and is over a minute old (its creator stamps it the moment it makes it).

A stamp is read before the lock is tried (taking the lock re-stamps it): a folder of another host
or of a pid still running is kept without being locked.

It runs when a new scratch folder is made (the next run reclaims what the last left) and in
``qeff clean``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qeff.store.atomic import tree_bytes
from qeff.store.locks import PathLock, holder_pid, pid_alive

__all__ = ["ScratchDir", "reclaim_scratch", "PREFIXES", "LOCK_NAME"]

PREFIXES = ("qeff-layer-check-", "qeff-reference-")
LOCK_NAME = ".qeff-scratch.lock"
#: A lock file with no stamp this old is no creator's in progress (one stamps it within microseconds).
UNSTAMPED_GRACE_S = 60.0


class ScratchDir:
    """A new folder ``<tmp>/<prefix>XXXXXXXX`` held by this process until :meth:`close` (which
    deletes it). Making one first reclaims the folders dead runs left (:func:`reclaim_scratch`)."""

    def __init__(self, prefix: str):
        if prefix not in PREFIXES:
            raise ValueError(f"{prefix!r} is not one of qeff's scratch prefixes {PREFIXES}")
        reclaim_scratch()
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._lock = PathLock(self.path / LOCK_NAME)
        try:
            if not self._lock.acquire(blocking=False):  # a folder mkdtemp just made: no one else knows it
                raise OSError(f"cannot lock the new scratch folder {self.path}")
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def close(self) -> None:
        if self.path is None:
            return
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._lock.release()
            self.path = None

    def __enter__(self) -> ScratchDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Reclaimed:
    removed: list[tuple[Path, int]] = field(default_factory=list)  # (folder, bytes)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why): only qeff's own folders

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.removed)


def reclaim_scratch(tmp: str | os.PathLike | None = None) -> Reclaimed:
    """Remove the scratch folders under ``tmp`` (the system's temporary directory) that qeff runs
    which are no longer running left behind; see the module's docstring for the rule."""
    out = Reclaimed()
    root = Path(tmp if tmp is not None else tempfile.gettempdir())
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return out
    host = socket.gethostname()
    for entry in entries:
        if not entry.name.startswith(PREFIXES) or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        lock_path = path / LOCK_NAME
        if not lock_path.is_file():
            continue  # not provably qeff's (or made by a qeff before these locks): left alone
        # The stamp is read before the lock is tried: taking the lock writes our own stamp.
        stamp = holder_pid(lock_path)
        if stamp is None:
            try:
                age = time.time() - lock_path.stat().st_mtime
            except OSError:
                continue
            if age < UNSTAMPED_GRACE_S:  # its creator locks and stamps it the moment it makes it
                out.kept.append((path, "being made"))
                continue
        else:
            pid, stamped_host = stamp
            if stamped_host != host:
                out.kept.append((path, f"made on {stamped_host}"))
                continue
            if pid != os.getpid() and pid_alive(pid):
                out.kept.append((path, f"pid {pid} is running"))
                continue
        lock = PathLock(lock_path)
        try:
            got = lock.acquire(blocking=False)
        except OSError:
            continue  # another user's folder we may not lock: theirs to clean
        if not got:
            out.kept.append((path, "its run is still going"))
            continue
        try:
            size = tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)  # the lock file too: the lock holds on its open descriptor
            if path.exists():
                continue
            out.removed.append((path, size))
        finally:
            lock.release()
    return out
