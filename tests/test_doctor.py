"""qeff doctor / qeff clean: the whole cache verified, leftovers of killed runs shown and removed,
never a build in progress."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from qeff.artifacts import build_artifact
from qeff.cli import main
from qeff.doctor import clean, scan
from qeff.locks import PathLock

REPO = Path(__file__).resolve().parents[1]


def _artifact(path: Path, payload: bytes = b"w" * 5000):
    def build(tmp: Path) -> dict:
        (tmp / "w.bin").write_bytes(payload)
        return {}

    return build_artifact(path, {"k": str(path.name)}, build)


def _killed_build(home: Path, name: str, size: int = 3000) -> Path:
    """What a SIGKILLed build leaves: its temporary directory and its (free) lock file."""
    tmp = home / "m" / f".tmp-{name}-deadbeef"
    tmp.mkdir(parents=True)
    (tmp / "half.onnx.data").write_bytes(b"x" * size)
    (home / "m" / f"{name}.lock").write_text("")
    return tmp


def test_doctor_reports_damage_and_leftovers_then_clean_removes_only_stale_ones(tmp_path, capsys):
    home = tmp_path / "home"
    good = _artifact(home / "m" / "export-aaa").path
    bad = _artifact(home / "m" / "export-aaa" / "ort_1BS").path
    os.truncate(bad / "w.bin", 10)
    stale = _killed_build(home, "export-bbb")
    aside = home / "m" / ".results.json.999999.0123456789ab.tmp"  # an atomic write of a dead pid
    aside.write_text("{")
    # A build in progress: its lock is held and its temporary directory must survive `clean`.
    live = _killed_build(home, "export-ccc")
    holder = PathLock(home / "m" / "export-ccc.lock")
    holder.acquire()
    try:
        found = scan(home)
        assert [a.path for a in found.artifacts] == [good, bad]
        assert found.artifacts[0].ok and "w.bin: 10 bytes where the manifest records 5,000 (truncated)" in found.artifacts[1].problem
        kinds = {(x.kind, x.path.name, x.in_use is None) for x in found.leftovers}
        assert ("build", stale.name, True) in kinds and ("build", live.name, False) in kinds
        assert ("lock", "export-bbb.lock", True) in kinds and ("lock", "export-ccc.lock", False) in kinds
        assert ("temporary file", aside.name, True) in kinds
        assert not found.healthy

        assert main(["doctor", "--home", str(home)]) == 1
        out = capsys.readouterr().out
        assert "DAMAGED" in out and "stale" in out and "in use (pid" in out and "`qeff clean`" in out
        assert main(["list", "--home", str(home)]) == 0
        assert "stale leftover(s) of killed runs" in capsys.readouterr().out

        done = clean(home)
        removed = {x.path for x in done.removed}
        assert {stale, aside, home / "m" / "export-bbb.lock"} <= removed
        assert live.is_dir() and (home / "m" / "export-ccc.lock").exists()  # never a build in progress
        assert any(item.path == live for item, why in done.kept)
        assert bad.is_dir()  # damaged artifacts only with --damaged
    finally:
        holder.release()
    assert main(["clean", "--home", str(home), "--damaged"]) == 0
    out = capsys.readouterr().out
    assert f"removed damaged artifact: {bad}" in out and not bad.exists() and good.is_dir() and not live.exists()
    assert main(["doctor", "--home", str(home), "--full"]) == 0
    assert "cache healthy: 1 artifact(s) verified" in capsys.readouterr().out


def test_clean_waits_for_nobody_and_a_concurrent_build_is_untouched(tmp_path):
    """A real build in another process, paused inside its builder: clean keeps its directory."""
    home = tmp_path / "home"
    home.mkdir()
    flag = tmp_path / "started"
    code = f"""
import time
from pathlib import Path
from qeff.artifacts import build_artifact
def build(tmp):
    (tmp / "part").write_text("1")
    Path({str(flag)!r}).write_text("x")
    time.sleep(60)
build_artifact(Path({str(home / "art")!r}), {{"k": 1}}, build)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for _ in range(1200):
            if flag.exists():
                break
            assert proc.poll() is None
            time.sleep(0.05)
        tmp = next(home.glob(".tmp-art-*"))
        done = clean(home)
        assert tmp.is_dir() and (tmp / "part").is_file() and not done.removed
        kept = {item.path: why for item, why in done.kept}
        assert kept[tmp].startswith(f"a build in progress (pid {proc.pid} on ")
        assert kept[home / "art.lock"].startswith(f"held by pid {proc.pid} on ")
    finally:
        proc.kill()
        proc.wait()
    done = clean(home)  # killed: now stale
    assert not list(home.glob(".tmp-art-*")) and not (home / "art.lock").exists()
