"""``results.json``: the one source of every qeff report.

Stage tests hand their numbers to ``user_properties`` as ``("qeff", dict)`` (builtin types only),
and :func:`pytest_qeff.collect.mark_items` adds ``("qeff_test", meta)``; pytest-xdist carries
both to the controller inside each test report. Only the controller (or a run without xdist) owns
a :class:`Collector`: it merges reports into records and writes the file. Workers never write.

Schema (``"schema": "qeff-results", "version": 2``)::

    {
      "schema": "qeff-results", "version": 1, "created": "<UTC ISO time>",
      "environment": {machine, platform, python, cores, physical_cores, versions{...}, commit, ...},
      "run": {tier, backends, device_groups, models, changed_since, baseline_dir, update_baseline, exit_status},
      "cards": {"<id>": <the card, as validated>},
      "records": [   # one per stage test, sorted by card, case, stage, backend
        {"nodeid", "card", "case", "tier", "stage", "backend", "outcome", "duration_s", "message",
         "data": {"kind": "<stage>", ...}}   # a pytest_qeff.records.StageRecord, {} when none was made
      ]
    }

``outcome`` is one of passed, failed, error, skipped, xfailed, xpassed.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_qeff.cards import STAGES, Card
from qeff import compat

__all__ = ["SCHEMA", "VERSION", "Collector", "build", "environment", "write", "load", "OUTCOMES"]

SCHEMA = "qeff-results"
VERSION = 2  # 2: every record's "data" is a typed stage record with its "kind" (pytest_qeff.records)
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def _message(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail") and report.skipped:
        return str(report.wasxfail)
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # a skip: (path, lineno, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    return str(longrepr).strip().splitlines()[-1] if str(longrepr).strip() else ""


def _outcome(report: pytest.TestReport) -> str:
    xfail = hasattr(report, "wasxfail")
    if report.when != "call":
        if report.failed:
            return "error"
        return "xfailed" if xfail else "skipped"
    if report.passed:
        return "xpassed" if xfail else "passed"
    if report.skipped:
        return "xfailed" if xfail else "skipped"
    if str(report.longrepr).startswith("[XPASS(strict)]"):  # a known failure that passed: fails the run
        return "xpassed"
    return "failed"


@dataclass(eq=False)  # registered as a plugin: hashed by identity
class Collector:
    """Merges test reports (local or from xdist workers) into records, by node id."""

    records: dict[str, dict] = field(default_factory=dict)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:  # registered as a plugin
        self.add(report)

    def add(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        meta = props.get("qeff_test")
        if meta is None:
            return
        rec = self.records.setdefault(
            report.nodeid, {"nodeid": report.nodeid, **meta, "outcome": "passed", "duration_s": 0.0, "message": "", "data": {}}
        )
        rec["duration_s"] = round(rec["duration_s"] + float(report.duration), 4)
        if "qeff" in props:
            rec["data"] = props["qeff"]
        # setup decides when it did not pass; call decides otherwise; a teardown failure is an error.
        if report.when == "setup" and not report.passed or report.when == "call":
            rec["outcome"], rec["message"] = _outcome(report), _message(report)
        elif report.when == "teardown" and report.failed:
            rec["outcome"], rec["message"] = "error", _message(report)

    def sorted_records(self, cards: dict[str, Card]) -> list[dict]:
        def key(rec: dict) -> tuple:
            card = cards.get(rec["card"])
            cases = [c.id for c in card.all_cases] if card else []
            case_index = cases.index(rec["case"]) if rec["case"] in cases else len(cases)
            stage = STAGES.index(rec["stage"]) if rec["stage"] in STAGES else len(STAGES)
            return (rec["card"], case_index, stage, rec["backend"] or "", rec["nodeid"])

        return sorted(self.records.values(), key=key)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("qeff", "torch", "transformers", "onnx", "onnxruntime", "numpy", "pytest", "pytest-xdist", "pydantic", "jinja2"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _physical_cores() -> int | None:
    try:
        from qeff._system import physical_cores
    except ImportError:
        return None
    return physical_cores()


def _source_root(fallback: Path) -> Path:
    """The checkout holding the qeff under test (its commit is what was tested), else ``fallback``."""
    spec = importlib.util.find_spec("qeff")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent.parent
    return fallback


def environment(root: Path, backends: list[str]) -> dict:
    root = _source_root(root)
    commit = _git(root, "rev-parse", "HEAD")
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no")) if commit else None
    return {
        "machine": platform.node(),
        "platform": platform.platform(),
        "architecture": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "versions": _versions(),
        # The releases the lock was tested with, for the libraries that shape an artifact: a run on
        # others (``make test-compat``) says so on every page (issue 17).
        "locked": {lib: ver for lib, ver in compat.locked_versions().items() if lib in compat.ARTIFACT_LIBRARIES},
        "backends": backends,
        "commit": commit,
        "dirty": dirty,
    }


def write(path: Path, content: dict) -> Path:
    """Atomically (a temporary file of this writer's own, fsync, rename): a concurrent reader sees
    the previous file or this one, and two writers never collide (issue 14)."""
    from qeff.store.atomic import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, content, indent=2)


def load(path: str | os.PathLike) -> dict:
    """A results file, checked to be one this version can read."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a qeff results file (no \"schema\": \"{SCHEMA}\")")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: results version {data.get('version')!r}; this pytest_qeff reads version {VERSION}")
    return data


def build(collector: Collector, cards: dict[str, Card], env: dict, run: dict) -> dict:
    records = collector.sorted_records(cards)
    used = sorted({r["card"] for r in records})
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "run": run,
        "cards": {cid: cards[cid].model_dump(mode="json") for cid in used if cid in cards},
        "records": records,
    }
