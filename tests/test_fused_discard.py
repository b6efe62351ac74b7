"""Issue 20: a fused graph that fails its check is deleted under the lock its builders take
(qeff.store.artifacts.discard), never pulled from under a process that holds it; one rebuilt meanwhile is
kept for its own check to judge."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from qeff.store.artifacts import LOCK_SUFFIX, build_artifact, discard
from qeff.errors import VerificationError
from qeff.store.locks import PathLock


def _fused(home: Path, payload: bytes = b"g" * 5000):
    def build(tmp: Path) -> dict:
        (tmp / "model.fused.onnx").write_bytes(payload)
        return {"model": "model.fused.onnx"}

    return build_artifact(home / "ort-fused_1BS_4PL_8CL", {"backend": "ort", "graph": "fused"}, build)


def _while_locked(directory: Path, action) -> tuple[bool, threading.Thread, list]:
    """Run ``action`` in a thread while this test holds ``directory``'s lock: (whether the directory
    was still there after the thread had time to act, the thread, what it raised or returned)."""
    holder = PathLock(str(directory) + LOCK_SUFFIX)
    holder.acquire()
    outcome: list = []

    def run():
        try:
            outcome.append(action())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    try:
        thread.start()
        time.sleep(0.5)
        present = directory.is_dir() and thread.is_alive()
    finally:
        holder.release()
    thread.join(timeout=30)
    return present, thread, outcome


def test_discard_waits_for_the_builders_lock(tmp_path):
    built = _fused(tmp_path)
    present, thread, outcome = _while_locked(built.path, lambda: discard(built))
    assert present, "the failed graph was removed while another process held its lock"
    assert not thread.is_alive() and outcome == [True] and not built.path.exists()


def test_discard_keeps_a_graph_rebuilt_meanwhile(tmp_path):
    built = _fused(tmp_path)
    rebuilt = build_artifact(built.path, built.manifest["inputs"], lambda tmp: (tmp / "model.fused.onnx").write_bytes(b"h" * 5000) and {},
                             force=True)
    assert rebuilt.manifest["digest"] != built.manifest["digest"]
    assert discard(built) is False and (rebuilt.path / "model.fused.onnx").read_bytes() == b"h" * 5000


def test_check_fused_removes_a_failed_graph_under_its_lock(tmp_path, monkeypatch):
    """The real check_fused path: its check fails (seeded), and the graph goes only once the lock is free."""
    import qeff.cpu_graph as cpu_graph
    import qeff.runtime.ort_fused as ort_fused
    from qeff.cpu_graph import CompileTarget

    def failing_check(*args, **kwargs):
        raise VerificationError("seeded: the fused graph differs from the portable graph")

    monkeypatch.setattr(cpu_graph, "check_against_portable", failing_check)
    monkeypatch.setattr(ort_fused, "FusedOrtSession", lambda *a, **k: SimpleNamespace(close=lambda: None))
    built = _fused(tmp_path)
    pipe = SimpleNamespace(progress=False, export_built=SimpleNamespace(manifest={"inputs": {"stage": "export"}}),
                           onnx_path=tmp_path / "model.onnx")
    target = CompileTarget("ort", options={"batch_size": 1, "prompt_len": 4, "ctx_len": 8})
    present, thread, outcome = _while_locked(built.path, lambda: cpu_graph.check_fused(pipe, built, target, say=lambda s: None))
    assert present, "check_fused removed the failed graph while another process held its lock"
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], VerificationError)
    assert not built.path.exists()
    with pytest.raises(VerificationError):  # and a lock-free run removes it at once, as before
        rebuilt = _fused(tmp_path)
        cpu_graph.check_fused(pipe, rebuilt, target, say=lambda s: None)
    assert not rebuilt.path.exists()
