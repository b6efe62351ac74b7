"""qeff.store.atomic and qeff.store.locks: whole files or nothing, no collisions, no lock lost to `qeff clean`."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qeff.store import atomic
from qeff.errors import DiskFullError
from qeff.store.locks import PathLock, holder, is_held, remove_if_free

REPO = Path(__file__).resolve().parents[1]


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_new_files_get_open_permissions_and_replaced_files_keep_theirs(tmp_path):
    fresh = atomic.write_text(tmp_path / "fresh.txt", "x")
    assert fresh.stat().st_mode & 0o777 == atomic.default_mode()  # not mkstemp's 0600
    shared = tmp_path / "shared.txt"
    shared.write_text("old")
    shared.chmod(0o664)
    atomic.write_text(shared, "new")
    assert shared.stat().st_mode & 0o777 == 0o664 and shared.read_text() == "new"


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_two_writers_never_share_a_temporary_and_readers_never_see_a_torn_file(tmp_path):
    """Issue 14: a fixed `<file>.tmp` made two writers collide (FileNotFoundError) and a reader
    saw torn files. Here 4 writers and 2 readers hammer one file for 400 writes."""
    target = tmp_path / "results.json"
    atomic.write_json(target, {"writer": -1, "payload": ["x" * 2000] * 20})
    errors: list[BaseException] = []
    torn: list[str] = []
    done = threading.Event()

    def writer(k: int) -> None:
        try:
            for i in range(100):
                atomic.write_json(target, {"writer": k, "i": i, "payload": ["x" * 2000] * 20})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    def reader() -> None:
        while not done.is_set():
            text = target.read_text()
            try:
                json.loads(text)
            except ValueError:
                torn.append(text[:80])

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors and not torn
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_disk_full_is_one_sentence_with_the_directory_and_the_need(tmp_path, monkeypatch):
    """Simulated ENOSPC (the real one, on a small tmpfs, is in test_fault_injection.py)."""
    real_replace = os.replace

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFullError) as err:
        atomic.write_bytes(tmp_path / "big.bin", b"x" * 3 * 2**20)
    monkeypatch.setattr(os, "replace", real_replace)
    message = str(err.value)
    assert f"the disk holding {tmp_path} is full" in message and "writing big.bin" in message and "3.0 MiB" in message
    assert list(tmp_path.iterdir()) == []  # the partial temporary file is gone


def test_is_disk_full_sees_through_wrapping_and_native_messages():
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as exc:
            raise RuntimeError("export failed") from exc
    except RuntimeError as outer:
        assert atomic.is_disk_full(outer)
    assert atomic.is_disk_full(RuntimeError("[ONNXRuntimeError] : 1 : FAIL : write: No space left on device"))
    assert not atomic.is_disk_full(RuntimeError("something else"))


# -- locks ------------------------------------------------------------------------------------


def test_lock_excludes_and_names_its_holder(tmp_path):
    path = tmp_path / "a.lock"
    first = PathLock(path)
    assert first.acquire()
    assert is_held(path) and f"pid {os.getpid()}" in holder(path)
    assert not PathLock(path).acquire(blocking=False)
    assert not remove_if_free(path) and path.exists()  # never removed while held
    first.release()
    assert not is_held(path) and holder(path) == ""
    assert remove_if_free(path) and not path.exists()


def test_a_lock_removed_while_a_waiter_waits_is_not_shared(tmp_path):
    """The race `qeff clean` opens: A holds, B waits on the same file, the file is removed and
    C locks a new one. B must not believe it holds the lock while C does."""
    path = tmp_path / "a.lock"
    a = PathLock(path)
    a.acquire()
    got, waiting = threading.Event(), threading.Event()
    b = PathLock(path)
    waiter = threading.Thread(target=lambda: (b.acquire(on_wait=lambda who: waiting.set()), got.set()))
    waiter.start()
    assert waiting.wait(10)  # B has opened the file and is about to block on it
    path.unlink()  # `qeff clean` (here without the lock, the worst case)
    c = PathLock(path)
    assert c.acquire(blocking=False)  # a new file: free
    a.release()  # B wakes up holding the removed file's lock: it must notice and wait for C's
    assert not got.wait(0.5)
    c.release()
    assert got.wait(10)
    b.release()
    waiter.join()


def test_a_killed_holder_releases_its_lock(tmp_path):
    path = tmp_path / "k.lock"
    code = f"from qeff.store.locks import PathLock; import os, signal; PathLock({str(path)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert path.exists() and not is_held(path)
    assert PathLock(path).acquire(blocking=False)
