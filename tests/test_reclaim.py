"""Issue 18: a build the kernel kills (SIGKILL, as the OOM killer does) leaves its temporary
directory in the cache (a 3B export left 12 GB in ``.tmp-export-…``). The next run of that model
reclaims it before its own checks — even when the memory preflight then refuses the run — and so
does ``qeff clean``; a build whose builder is alive is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qeff.cli import main
from qeff.store.layout import slug

REPO = Path(__file__).resolve().parents[1]

#: A child that builds an artifact under <home>/<model slug>/ and is killed mid-build: it writes a
#: large-ish file (the raw export's stand-in), says so, then sleeps until the test kills it.
CHILD = """
import sys, time
from pathlib import Path
from qeff.store.artifacts import build_artifact

target = Path(sys.argv[1])

def build(tmp):
    (tmp / "raw.onnx").write_bytes(b"\\0" * (4 << 20))
    print("building", flush=True)
    time.sleep(600)

build_artifact(target, {"stage": "export", "test": 1}, build)
"""


def _killed_build(home: Path, model: str) -> Path:
    """Start a child building <home>/<slug>/export-0face5, SIGKILL it mid-build; its leftover."""
    from qeff.store.home import mark

    target = home / slug(model) / "export-0face5"
    mark(home)  # as a real run does before it builds (its source digest is written first)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == b"building"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(target.parent.glob(".tmp-export-0face5-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "raw.onnx").stat().st_size == 4 << 20
    assert (target.parent / "export-0face5.lock").read_text().split()[0] == str(proc.pid)  # the dead builder's stamp
    return leftovers[0]


@pytest.fixture
def model(tmp_path) -> Path:
    """A sparse synthetic checkpoint: headers only, nothing any test here may load."""
    from qeff.synthetic import SHAPES, write_llama

    return write_llama(tmp_path / "llama-135m", SHAPES["135m"], tokenizer=False, sparse=True)


def test_the_next_run_reclaims_a_killed_build_even_when_it_is_refused(tmp_path, model, capsys, monkeypatch):
    home = tmp_path / "home"
    leftover = _killed_build(home, str(model))
    monkeypatch.setenv("QEFF_MEMORY_LIMIT", "1M")  # the next run is refused by the preflight …
    assert main(["infer", "-m", str(model), "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "reclaimed 4.0 MiB that killed runs left" in err and str(leftover) in err
    assert not leftover.exists()  # … and still frees what the killed one left
    assert not (leftover.parent / "export-0face5.lock").exists()


def test_qeff_clean_reclaims_a_killed_build(tmp_path, model, capsys):
    home = tmp_path / "home"
    leftover = _killed_build(home, str(model))
    assert main(["clean", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert f"removed build: {leftover}" in out and not leftover.exists()


def test_a_build_whose_builder_is_alive_is_kept(tmp_path, model):
    """The lock free but its stamp naming a live pid on this host (this test's own parent): not
    provably dead, so the automatic reclaim keeps it."""
    import socket

    from qeff.store.doctor import reclaim

    root = tmp_path / "home" / slug(str(model))
    build = root / ".tmp-export-0face5-0123abcd"
    build.mkdir(parents=True)
    (build / "raw.onnx").write_bytes(b"x")
    (root / "export-0face5.lock").write_text(f"{os.getppid()} {socket.gethostname()} {time.time():.0f}\n")
    done = reclaim(root)
    assert not done.removed and build.exists()
    assert "may be running" in done.kept[0][1]
    (root / "export-0face5.lock").write_text(f"999999999 {socket.gethostname()} {time.time():.0f}\n")  # no such pid
    assert [x.path for x in reclaim(root).removed] == [build] and not build.exists()


def test_something_not_made_by_qeff_is_never_reclaimed(tmp_path):
    from qeff.store.doctor import reclaim

    root = tmp_path / "model"
    for name in (".tmp-export-0face5", ".tmp-notours-XYZ12345", "export-0face5-0123abcd"):
        (root / name).mkdir(parents=True)
    assert not reclaim(root).removed
    assert sorted(p.name for p in root.iterdir()) == [".tmp-export-0face5", ".tmp-notours-XYZ12345", "export-0face5-0123abcd"]
