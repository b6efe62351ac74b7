"""The artifact cache: exact-manifest reuse, atomic builds, crash safety, one build under contention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qeff.store.artifacts import build_artifact, read_manifest
from qeff.errors import ArtifactError


def _builder(calls: list):
    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "payload.bin").write_bytes(b"x" * 100)
        return {"bytes": 100}

    return build


def test_reuse_only_on_an_exact_manifest(tmp_path):
    calls: list = []
    target = tmp_path / "art"
    first = build_artifact(target, {"a": 1, "opts": [1, 2]}, _builder(calls), required=("payload.bin",))
    assert not first.reused and len(calls) == 1 and (target / "payload.bin").is_file()
    again = build_artifact(target, {"opts": [1, 2], "a": 1}, _builder(calls), required=("payload.bin",))
    assert again.reused and len(calls) == 1 and again.build_seconds == pytest.approx(first.seconds, abs=1e-3)
    changed = build_artifact(target, {"a": 2, "opts": [1, 2]}, _builder(calls))
    assert not changed.reused and len(calls) == 2
    assert read_manifest(target)["inputs"] == {"a": 2, "opts": [1, 2]}
    forced = build_artifact(target, {"a": 2, "opts": [1, 2]}, _builder(calls), force=True)
    assert not forced.reused and len(calls) == 3
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".trash-*"))


def test_missing_required_file_or_corrupt_manifest_rebuilds(tmp_path):
    calls: list = []
    target = tmp_path / "art"
    build_artifact(target, {"a": 1}, _builder(calls), required=("payload.bin",))
    (target / "payload.bin").unlink()
    assert not build_artifact(target, {"a": 1}, _builder(calls), required=("payload.bin",)).reused
    (target / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest is corrupt"):
        read_manifest(target)
    assert not build_artifact(target, {"a": 1}, _builder(calls), required=("payload.bin",)).reused
    assert len(calls) == 3


def test_a_failing_build_leaves_nothing(tmp_path):
    target = tmp_path / "art"

    def broken(tmp: Path):
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError):
        build_artifact(target, {"a": 1}, broken)
    assert not target.exists() and not list(tmp_path.glob(".tmp-*"))


_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from qeff.store.artifacts import build_artifact

    target, log, sleep = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def build(tmp):
        with open(log, "a") as f:
            f.write("build\\n")
        (tmp / "part1").write_text("1")
        time.sleep(sleep)
        (tmp / "part2").write_text("2")
        return {}

    built = build_artifact(target, {"k": "v"}, build, required=("part1", "part2"))
    print("reused" if built.reused else "built")
    """
)


def _spawn(tmp_path: Path, sleep: float) -> subprocess.Popen:
    script = tmp_path / "build.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "art"), str(tmp_path / "log"), str(sleep)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_a_killed_build_is_never_trusted(tmp_path):
    proc = _spawn(tmp_path, sleep=30)
    deadline = time.time() + 30
    while not list(tmp_path.glob(".tmp-art-*/part1")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".tmp-art-*/part1")), "the build never started"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "art").exists()  # the half-built directory was never renamed into place
    second = _spawn(tmp_path, sleep=0)
    assert second.communicate(timeout=60)[0].strip() == "built"
    assert (tmp_path / "art" / "part2").is_file()


def test_two_processes_build_once(tmp_path):
    procs = [_spawn(tmp_path, sleep=1.0) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outputs == ["built", "reused"]
    assert (tmp_path / "log").read_text().count("build") == 1
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["inputs"] == {"k": "v"}
