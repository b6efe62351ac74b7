"""Integrity records of the artifact cache (qeff.store.integrity through qeff.store.artifacts.build_artifact).

Each fault is seeded on a real built artifact and must be detected (the artifact is rebuilt and
says why); the reference is the builder's own bytes, written independently of the check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qeff.store import integrity
from qeff.store.artifacts import build_artifact, check_artifact, read_manifest, verify_cache
from qeff.errors import ArtifactError
from qeff.store.locks import PathLock

BIG = bytes(range(256)) * 8192  # 2 MiB: larger than the sample, so quick and full differ


def _builder(calls: list, payload: bytes = BIG):
    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "small.json").write_text('{"k": 1}')
        return {}

    return build


def _build(target: Path, calls: list, **kw):
    return build_artifact(target, {"k": "v"}, _builder(calls), required=("weights.bin",), **kw)


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


FAULTS = {
    "truncate": lambda p: os.truncate(p, p.stat().st_size // 2),
    "grow": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    "same-size overwrite (middle)": lambda p: _overwrite(p, p.stat().st_size // 2 + 12345, b"\xff\xfe"),
    "same-size overwrite (first byte)": lambda p: _overwrite(p, 0, bytes([p.read_bytes()[0] ^ 1])),
    "delete": lambda p: p.unlink(),
    "replaced by a directory": lambda p: (p.unlink(), p.mkdir()),
}


@pytest.mark.parametrize("mode", ["quick", "full"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("victim", ["weights.bin", "sub/small.json"])
def test_every_fault_on_every_file_is_detected_and_repaired(tmp_path, capsys, fault, victim, mode):
    calls: list = []
    target = tmp_path / "art"
    _build(target, calls)
    FAULTS[fault](target / victim)
    with verify_cache(mode):
        again = _build(target, calls)
    assert not again.reused and len(calls) == 2
    assert again.repaired and again.repaired.startswith(victim + ":")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed its integrity check" in err and "rebuilding it" in err
    assert (target / "weights.bin").read_bytes() == BIG and (target / "sub" / "small.json").read_text() == '{"k": 1}'
    assert _build(target, calls).reused  # repaired for good


def test_an_unreadable_file_is_detected(tmp_path, monkeypatch):
    """chmod 000 does not stop root (these tests run as root), so the OS's refusal is simulated at
    the boundary: opening that one path raises PermissionError."""
    calls: list = []
    target = tmp_path / "art"
    _build(target, calls)
    victim = target / "weights.bin"
    victim.chmod(0)
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if Path(file) == victim:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    problems, _ = integrity.check_tree(target, read_manifest(target)["files"])
    assert [(p.file, p.kind) for p in problems] == [("weights.bin", "unreadable")]
    rebuilt = _build(target, calls)
    assert not rebuilt.reused and "weights.bin: cannot be read (Permission denied)" in rebuilt.repaired
    monkeypatch.undo()
    assert victim.read_bytes() == BIG and victim.stat().st_mode & 0o777


def test_manifest_edits_are_detected(tmp_path):
    calls: list = []
    target = tmp_path / "art"
    _build(target, calls)
    text = (target / "manifest.json").read_text()
    record = json.loads(text)
    digest = record["files"]["weights.bin"]["blake2b"]
    forged = text.replace(digest, digest[:-1] + ("0" if digest[-1] != "0" else "1"))  # still valid JSON, same size
    (target / "manifest.json").write_text(forged)
    with pytest.raises(ArtifactError, match="does not match its digest"):
        read_manifest(target)
    rebuilt = _build(target, calls)
    assert not rebuilt.reused and "digest" in rebuilt.repaired


def test_a_copied_cache_is_verified_in_full_once_then_quick_again(tmp_path):
    """cp -r changes every inode and ctime: the full digest runs, matches, and the new stat is stored."""
    import shutil

    calls: list = []
    _build(tmp_path / "a" / "art", calls)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = tmp_path / "b" / "art"
    before = read_manifest(copy)["files"]["weights.bin"]["stat"]
    assert before != integrity.stat_key((copy / "weights.bin").stat())
    assert _build(copy, calls).reused and len(calls) == 1
    after = read_manifest(copy)["files"]["weights.bin"]["stat"]
    assert after == integrity.stat_key((copy / "weights.bin").stat())


def test_the_quick_check_limits_are_what_the_docs_say(tmp_path):
    """Damage that bypasses the file system keeps the stat key (simulated: the record's stat is
    forged to the damaged file's). The quick check then catches it only inside a sampled block;
    the full check catches it anywhere."""
    calls: list = []
    target = tmp_path / "art"
    _build(target, calls)
    files = read_manifest(target)["files"]
    path = target / "weights.bin"
    size = path.stat().st_size
    sampled = integrity.sample_offsets(size)
    outside = sampled[1] + integrity.SAMPLE_BLOCK + 10  # between two sampled blocks
    assert all(not (o <= outside < o + integrity.SAMPLE_BLOCK) for o in sampled)
    for offset, quick_sees in ((sampled[3] + 5, True), (outside, False)):
        _overwrite(path, offset, b"\x00\x11")
        forged = {**files, "weights.bin": {**files["weights.bin"], "stat": integrity.stat_key(path.stat())}}
        quick, _ = integrity.check_tree(target, forged, full=False)
        full, _ = integrity.check_tree(target, forged, full=True)
        assert bool(quick) is quick_sees and [p.kind for p in full] == ["content"]
        path.write_bytes(BIG)


def test_files_get_shared_permissions(tmp_path):
    """Issue 14: model.onnx.data was written 0600 (a library's temporary file) beside 0644 siblings."""
    calls: list = []

    def build(tmp: Path) -> dict:
        (tmp / "private.bin").write_bytes(b"x")
        (tmp / "private.bin").chmod(0o600)
        return {}

    target = tmp_path / "art"
    build_artifact(target, {"k": 1}, build)
    from qeff.store.atomic import default_mode

    assert (target / "private.bin").stat().st_mode & 0o777 == default_mode()
    assert (target / "manifest.json").stat().st_mode & 0o777 == default_mode()
    assert not calls


def test_stale_temporaries_are_removed_by_the_next_build_but_not_while_a_build_holds_the_lock(tmp_path):
    calls: list = []
    target = tmp_path / "art"
    stale = tmp_path / ".tmp-art-0badc0de"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 1000)
    other = tmp_path / ".tmp-art-2-0badc0de"  # another artifact's ("art-2") build: not ours to remove
    other.mkdir()
    _build(target, calls)
    assert not stale.exists() and other.exists()
    # A holder of art's lock means a build is running: its temporary directory stays.
    live = tmp_path / ".tmp-art-1234abcd"
    live.mkdir()
    holder = PathLock(str(target) + ".lock")
    holder.acquire()
    try:
        assert _build(target, calls).reused  # a reuse needs no lock and removes nothing
        assert live.exists()
    finally:
        holder.release()


def test_rebuilding_a_parent_keeps_the_artifacts_nested_in_it(tmp_path):
    """An export directory holds its compile and verify directories: repairing or forcing the
    export must not move them (or another process's build inside it) away."""
    calls: list = []
    parent = tmp_path / "export"
    _build(parent, calls)
    child = build_artifact(parent / "ort_1BS", {"c": 1}, _builder(calls))
    in_progress = parent / ".tmp-ort_2BS-abcdef12"
    in_progress.mkdir()
    (parent / "ort_2BS.lock").write_text("")
    os.truncate(parent / "weights.bin", 10)
    rebuilt = _build(parent, calls)
    assert not rebuilt.reused and (parent / "weights.bin").read_bytes() == BIG
    assert in_progress.is_dir() and (parent / "ort_2BS.lock").exists()
    assert build_artifact(parent / "ort_1BS", {"c": 1}, _builder(calls)).reused and child.path.is_dir()
    forced = _build(parent, calls, force=True)
    assert not forced.reused and check_artifact(parent) and check_artifact(parent / "ort_1BS")
    assert not list(tmp_path.glob(".trash-*")) and not list(tmp_path.glob(".tmp-*"))


def test_check_artifact_names_the_bad_file(tmp_path):
    calls: list = []
    target = tmp_path / "art"
    _build(target, calls)
    os.truncate(target / "weights.bin", 7)
    with pytest.raises(ArtifactError, match=r"weights.bin: 7 bytes where the manifest records 2,097,152 \(truncated\)"):
        check_artifact(target, mode="quick")


def test_a_finished_build_leaves_no_lock_file_behind(tmp_path):
    """Every build used to leave `<artifact>.lock` (0 B) that `qeff doctor` then listed as a stale
    leftover; a lock someone holds is never removed."""
    from qeff.store.doctor import scan

    target = tmp_path / "m" / "art"
    _build(target, [])
    assert not Path(str(target) + ".lock").exists()
    assert not scan(tmp_path).stale
    other = tmp_path / "m" / "art2"
    holder = PathLock(str(other) + ".lock")
    assert holder.acquire(blocking=False)
    try:
        from qeff.store.locks import remove_if_free

        assert not remove_if_free(holder.path) and holder.path.exists()
    finally:
        holder.release()
