"""qeff doctor / qeff clean: the whole cache verified, leftovers of killed runs shown and removed,
never a build in progress."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from qeff.store.artifacts import build_artifact
from qeff.store.atomic import human_bytes
from qeff.cli import main
from qeff.store.doctor import clean, scan
from qeff.store.locks import PathLock

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
    from qeff.store.home import mark

    home = tmp_path / "home"
    mark(home)  # a cache qeff made (a bare build_artifact has no cache root to mark)
    flag = tmp_path / "started"
    code = f"""
import time
from pathlib import Path
from qeff.store.artifacts import build_artifact
def build(tmp):
    (tmp / "part").write_text("1")
    Path({str(flag)!r}).write_text("x")
    time.sleep(60)
build_artifact(Path({str(home / "export-a1b2c3")!r}), {{"k": 1}}, build)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for _ in range(1200):
            if flag.exists():
                break
            assert proc.poll() is None
            time.sleep(0.05)
        tmp = next(home.glob(".tmp-export-a1b2c3-*"))
        done = clean(home)
        assert tmp.is_dir() and (tmp / "part").is_file() and not done.removed
        kept = {item.path: why for item, why in done.kept}
        assert kept[tmp].startswith(f"a build in progress (pid {proc.pid} on ")
        assert kept[home / "export-a1b2c3.lock"].startswith(f"held by pid {proc.pid} on ")
    finally:
        proc.kill()
        proc.wait()
    done = clean(home)  # killed: now stale
    assert not list(home.glob(".tmp-export-a1b2c3-*")) and not (home / "export-a1b2c3.lock").exists()


def _versioned(path: Path, versions: dict, payload: bytes = b"w" * 4000):
    def build(tmp: Path) -> dict:
        (tmp / "model.onnx.data").write_bytes(payload)
        return {}

    return build_artifact(path, {"stage": "export", "k": path.name, "versions": versions}, build).path


def test_superseded_artifacts_are_listed_and_removed_only_on_request(tmp_path, capsys):
    """An export built by another qeff source (or another onnxruntime) can never be reused: `qeff
    list` and `qeff doctor` say so with the bytes it holds, `qeff clean --superseded` removes it
    with what is nested in it, and nothing current, and nothing in use."""
    from qeff._system import library_versions

    home = tmp_path / "home"
    now = library_versions("export")  # these records are exports: keyed on the export's code (issue 18)
    current = _versioned(home / "m" / "export-new", now)
    old = _versioned(home / "m" / "export-old", {**now, "qeff_source": "0" * 24})
    nested = _versioned(old / "ort_1BS", {**now, "qeff_source": "0" * 24}, b"o" * 6000)
    build_artifact(old / "verify-1", {"stage": "verify"}, lambda tmp: {})  # records no versions: goes with its export
    older_ort = _versioned(home / "m2" / "export-x", {**now, "onnxruntime": "1.0.0"})
    in_use = _versioned(home / "m2" / "export-y", {**now, "torch": "1.0"})

    found = scan(home)
    assert {a.path: a.superseded for a in found.artifacts}[current] is None
    roots = {a.path: a for a in found.superseded}
    assert set(roots) == {old, older_ort, in_use}  # the nested one goes with its export
    assert roots[old].bytes >= 10000 and "another revision of qeff's source" in roots[old].superseded
    assert f"onnxruntime 1.0.0 (now {now['onnxruntime']})" in roots[older_ort].superseded
    assert found.healthy  # superseded is not damage: `qeff doctor` still exits 0

    assert main(["list", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "5 superseded artifact(s)" in out and "`qeff clean --superseded`" in out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith(("m/", "m2/"))}
    assert rows["m/export-new"] == "current" and rows["m/export-old/ort_1BS"] == "superseded"
    assert rows["m/export-old/verify-1"] == "superseded"
    assert main(["doctor", "--home", str(home)]) == 0
    assert "3 superseded artifact(s)" in capsys.readouterr().out

    assert main(["clean", "--home", str(home)]) == 0
    assert old.is_dir() and older_ort.is_dir()  # only on request
    capsys.readouterr()
    freed = sum(f.stat().st_size for d in (old, older_ort) for f in d.rglob("*") if f.is_file())
    holder = PathLock(in_use / "ort_2BS.lock")
    holder.acquire()  # a build nested in a superseded export is in progress
    try:
        assert main(["clean", "--home", str(home), "--superseded"]) == 0
    finally:
        holder.release()
    out = capsys.readouterr().out
    assert f"removed superseded artifact (built with another revision of qeff's source): {old}" in out
    assert not old.exists() and not nested.exists() and not older_ort.exists()
    assert current.is_dir() and (current / "model.onnx.data").is_file()
    assert in_use.is_dir() and "kept superseded artifact" in out and "in use by" in out
    assert f"freed {human_bytes(freed)} under {home}" in out, out


def test_a_new_export_names_the_superseded_ones_beside_it(tmp_path, capsys):
    """After building an export, the pipeline says how much the exports of an older qeff hold."""
    from qeff._system import library_versions
    from qeff.pipeline import Pipeline
    from tests.tiny import tiny_model

    home = tmp_path / "home"
    pipe = Pipeline("tiny-llama", model=tiny_model("llama", seed=1), identity={"test": "superseded-hint"}, home=home,
                    progress=True)
    _versioned(home / "tiny-llama" / "export-from-an-upgrade", {**library_versions(), "qeff": "0.0.1"}, b"w" * 3 * 2**20)
    pipe.export()
    err = capsys.readouterr().err
    assert "note: 1 export(s) of tiny-llama built by another qeff or library version hold 3.0 MiB" in err, err
    assert "`qeff clean --superseded`" in err
