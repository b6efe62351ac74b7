"""Issue 18, item 5: the scratch folders two stages spill to outside the cache (the per-layer ORT
check, ``qeff-layer-check-…``, and the precision ladder's reference logits, ``qeff-reference-…``)
are not left in the system's temporary directory for good by a run the kernel kills: the next one
that makes such a folder, and ``qeff clean``, reclaim them — and nothing else (qeff.store.scratch).

Found on 2026-12-07: a 7B plugin run stopped with SIGTERM had left /tmp/qeff-layer-check-7ys1eenz
(50 MB) four hours earlier; nothing would have removed it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from qeff.cli import main
from qeff.store import scratch
from qeff.store.scratch import LOCK_NAME, ScratchDir, reclaim_scratch

REPO = Path(__file__).resolve().parents[1]

#: A child that makes a scratch folder the way a stage does, fills it, says where, then waits to be
#: killed (or, given "exit", returns normally).
CHILD = """
import sys, time
from qeff.layer_check import _Spill
import numpy as np

spill = _Spill()
spill.put(np.zeros(1 << 18, np.float32))  # 1 MiB
print(spill.dir, flush=True)
if sys.argv[1] == "exit":
    spill.close()
else:
    time.sleep(600)
"""


@pytest.fixture
def tmp(tmp_path, monkeypatch) -> Path:
    """The system's temporary directory, for this test and its children: a folder of its own."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setenv("TMPDIR", str(root))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _child(mode: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, cwd=REPO, text=True)
    folder = Path(proc.stdout.readline().strip())
    return proc, folder


def _killed(tmp: Path) -> Path:
    proc, folder = _child("sleep")
    try:
        assert folder.parent == tmp and folder.name.startswith("qeff-layer-check-")
        assert (folder / "0.npy").stat().st_size > 1 << 20
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert folder.is_dir()  # what a killed run leaves
    assert (folder / LOCK_NAME).read_text().split()[0] == str(proc.pid)  # stamped by its dead maker
    return folder


def test_a_finished_run_leaves_nothing(tmp):
    proc, folder = _child("exit")
    assert proc.wait() == 0
    proc.stdout.close()
    assert folder.parent == tmp and not folder.exists() and list(tmp.iterdir()) == []


def test_the_next_scratch_folder_reclaims_a_killed_runs(tmp):
    left = _killed(tmp)
    with ScratchDir("qeff-reference-") as mine:  # the next stage that spills (here: the ladder's)
        assert not left.exists()
        assert [p.name for p in tmp.iterdir()] == [mine.path.name]
    assert list(tmp.iterdir()) == []


def test_qeff_clean_reclaims_it_and_says_so(tmp, tmp_path, capsys):
    left = _killed(tmp)
    assert main(["clean", "--home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr().out
    assert f"removed scratch folder of a run that is gone: {left}" in out and "freed 1.0 MiB" in out
    assert not left.exists()


def test_a_live_runs_folder_is_kept(tmp):
    proc, folder = _child("sleep")
    try:
        done = reclaim_scratch()
        assert done.removed == [] and folder.is_dir() and (folder / "0.npy").is_file()
        assert done.kept == [(folder, f"pid {proc.pid} is running")]
        # Its stamp gone (say, a reused pid's): the lock alone still keeps it.
        (folder / LOCK_NAME).write_text(f"999999999 {socket.gethostname()} {time.time():.0f}\n")
        done = reclaim_scratch()
        assert done.removed == [] and done.kept == [(folder, "its run is still going")]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_only_qeff_s_own_folders_of_gone_runs_are_removed(tmp, monkeypatch):
    host = socket.gethostname()
    dead = f"999999999 {host} {time.time():.0f}\n"

    def folder(name: str, lock: str | None, files=("data.npy",)) -> Path:
        path = tmp / name
        path.mkdir()
        for f in files:
            (path / f).write_bytes(b"x")
        if lock is not None:
            (path / LOCK_NAME).write_text(lock)
        return path

    not_ours = [
        folder("qeff-layer-check-nolock1", None),  # no lock file: a qeff before these locks, or not qeff
        folder("someone-else-abc", dead),  # another prefix
        folder("qeff-reference-elsewhere", f"999999999 another-host {time.time():.0f}\n"),  # another host's
        folder("qeff-reference-fresh0000", ""),  # unstamped and new: its maker is about to lock it
    ]
    (tmp / "qeff-layer-check-file").write_text("a file, not a folder")
    gone = folder("qeff-layer-check-gone0000", dead)
    stale = folder("qeff-reference-stale0000", "")  # unstamped for over a minute
    old = time.time() - 2 * scratch.UNSTAMPED_GRACE_S
    os.utime(stale / LOCK_NAME, (old, old))
    done = reclaim_scratch()
    assert sorted(p for p, _ in done.removed) == sorted([gone, stale])
    assert not gone.exists() and not stale.exists()
    assert all(p.is_dir() for p in not_ours) and (tmp / "qeff-layer-check-file").is_file()
    assert dict(done.kept) == {tmp / "qeff-reference-elsewhere": "made on another-host",
                               tmp / "qeff-reference-fresh0000": "being made"}


def test_the_layer_check_and_the_ladder_spill_into_locked_scratch_folders(tmp):
    from qeff.layer_check import _Spill
    from qeff.precision.ladder import _ReferenceStore

    spill = _Spill()
    store = _ReferenceStore(4, 256, 65600)  # just past IN_MEMORY_MAX (256 MiB), so on disk
    try:
        assert isinstance(store.array, np.memmap)
        assert sorted(p.name.split("-")[1] for p in tmp.iterdir()) == ["layer", "reference"]
        for path in tmp.iterdir():
            assert (path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        assert reclaim_scratch().removed == []  # this process is alive: both kept
    finally:
        spill.close()
        store.close()
    assert list(tmp.iterdir()) == []
