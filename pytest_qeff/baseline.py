"""Benchmark baselines: ``<dir>/<backend>/<card>.json``, committed under ``reports/published/``.

A file holds one entry per tier and case (``"tiny/bs1-pl32-cl128"``) with the median figures of
the run that recorded it. The benchmark stage compares its own medians with the entry and fails
when the card's ``max_regression`` is exceeded; ``--qeff-update-baseline`` rewrites the entries
instead (the controller does it once, at the end of the session, from the merged records).

"Change" is always a change in *speed*: +10 % is faster. Throughputs compare as
``now / baseline - 1``; time to first token as ``baseline / now - 1``. When both the entry and the
run carry a machine-speed ``probe`` (runs/s of :mod:`pytest_qeff.probe`, measured side by side),
the baseline's figures are first scaled by ``probe_now / probe_baseline``: a machine running at
half speed expects half the tokens/s, so load on a shared machine is not read as a regression.

A change is a regression only when it also costs more than :data:`NOISE_FLOOR_S` of wall time
for the whole phase it measures (the prefill for time to first token, every decode step for
decode tokens/s, the run for total tokens/s). Tiny-tier steps take a fraction of a millisecond:
there a scheduler hiccup of a shared machine is a large relative change, and the probe — a
different workload — does not scale overhead-bound figures reliably (CI once measured its machine
at 8x the baseline's probe speed while a 0.6 ms prefill stayed 0.6 ms). Such changes are still
reported (``changes``) and flagged ``within_noise``; they do not fail the stage.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SCHEMA", "METRICS", "path_for", "entry_key", "read", "check", "update", "update_command", "BaselineUpdate",
           "UnreadableBaseline"]

SCHEMA = "qeff-baseline/1"

#: Wall time below which a slowdown of a whole measured phase is read as noise (see module doc).
NOISE_FLOOR_S = 0.002

#: metric → (label, unit, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "decode_tok_s": ("decode tokens/s", "tok/s", True),
    "total_tok_s": ("total tokens/s", "tok/s", True),
    "ttft_s": ("time to first token", "s", False),
}


def path_for(directory: Path, backend: str, card_id: str) -> Path:
    return Path(directory) / backend / f"{card_id}.json"


def entry_key(tier: str, case_id: str) -> str:
    return f"{tier}/{case_id}"


class UnreadableBaseline(ValueError):
    """A baseline file that cannot be used; ``reason`` is the short why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"baseline {path} {reason}; fix it, or --qeff-update-baseline moves it aside and starts anew")
        self.reason = reason


def read(path: Path) -> dict | None:
    """The baseline file's content, None if there is none; ValueError if it is unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UnreadableBaseline(path, f"cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise UnreadableBaseline(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("cases"), dict):
        raise UnreadableBaseline(path, f"is not a {SCHEMA} file")
    return data


def update_command(card_id: str, tier: str, backend: str, directory: Path, default_dir: Path) -> str:
    # ``ort-fused`` (the fused CPU graph's baselines, beside ``ort``'s) and ``ort-fused-<mode>`` (its
    # compressed weights') are selected by --qeff-graph; a weights mode by its backend value (-k).
    if backend == "ort-fused":
        chosen = ["--qeff-backend", "ort", "--qeff-graph", "fused"]
    elif backend.startswith("ort-fused-"):
        chosen = ["--qeff-backend", "ort", "--qeff-graph", "compressed", "-k", backend]
    else:
        chosen = ["--qeff-backend", backend]
    args = ["pytest", "--qeff-model", card_id, "--qeff-tier", tier, *chosen, "-m", "qeff_benchmark"]
    if Path(directory).resolve() != Path(default_dir).resolve():
        args += ["--qeff-baseline", str(directory)]
    return shlex.join(args + ["--qeff-update-baseline"])


def _change(metric: str, now: float, base: float) -> float:
    higher_better = METRICS[metric][2]
    if now <= 0 or base <= 0:
        return float("nan")
    return now / base - 1 if higher_better else base / now - 1


def _phase_seconds(metric: str, value: float, entry: dict) -> float | None:
    """Wall time of the phase ``metric`` measures at ``value``, from the entry's run shape; None
    when the shape is unknown (then no floor applies)."""
    if value <= 0:
        return None
    if metric == "ttft_s":
        return value
    gen, rows = entry.get("generation_len"), entry.get("batch_size") or 1
    if not gen:
        return None
    tokens = (gen - 1) * rows if metric == "decode_tok_s" else gen * rows
    return tokens / value if tokens > 0 else None


def _fmt(value: float, unit: str) -> str:
    return f"{value * 1000:.3g} ms" if unit == "s" else f"{value:.1f} {unit}"


def check(
    path: Path, key: str, figures: dict[str, float], max_regression: float, command: str, probe: float | None = None
) -> dict:
    """Compare ``figures`` with the entry ``key`` of the baseline file ``path``, normalised by the
    machine-speed ``probe`` when both sides have one.

    Returns a builtin-typed record: the baseline's figures, one change per metric and the
    regression messages (empty when within ``max_regression``)."""
    data = read(path)
    entry = (data or {}).get("cases", {}).get(key)
    out: dict = {"file": str(path), "key": key, "found": entry is not None, "allowed": -max_regression,
                 "command": command, "changes": {}, "regressions": []}
    if entry is None:
        out["note"] = f"no baseline for {key} in {path}; record one with: {command}"
        return out
    out["baseline"] = {m: entry[m] for m in METRICS if m in entry}
    speed = 1.0
    if probe and entry.get("probe") and probe == probe and entry["probe"] > 0:
        speed = probe / entry["probe"]
        out["machine_speed"] = speed  # this run's machine speed relative to the baseline's
    note = f" after scaling the baseline by this machine's speed ({speed:.0%} of the baseline run's)" if speed != 1.0 else ""
    for metric, (label, unit, higher_better) in METRICS.items():
        if metric not in entry or metric not in figures:
            continue
        expected = entry[metric] * speed if higher_better else entry[metric] / speed
        change = _change(metric, figures[metric], expected)
        out["changes"][metric] = change
        now_s, expected_s = _phase_seconds(metric, figures[metric], entry), _phase_seconds(metric, expected, entry)
        if (not change >= -max_regression and now_s is not None and expected_s is not None
                and now_s - expected_s < NOISE_FLOOR_S):
            out.setdefault("within_noise", []).append(metric)
            continue
        if not change >= -max_regression:  # NaN counts as a regression
            out["regressions"].append(
                f"{label} regressed: {_fmt(figures[metric], unit)} now vs {_fmt(entry[metric], unit)} in the baseline "
                f"{path} [{key}] ({change:+.0%} speed{note}; the card allows -{max_regression:.0%}). If this slowdown "
                f"is expected, update the baseline: {command}"
            )
    return out


@dataclass(frozen=True)
class BaselineUpdate:
    """One baseline file written by :func:`update`; ``str()`` is its path."""

    path: Path
    added: int  # entries of this run
    kept: int  # entries of earlier runs it kept (merged)
    moved_aside: Path | None = None  # where an unreadable earlier file went
    problem: str = ""  # why it was unreadable

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def message(self) -> str | None:
        if self.moved_aside is None:
            return None
        return (f"baseline {self.path} was unreadable ({self.problem}); moved it aside to {self.moved_aside} "
                f"(its entries are not lost) and started it anew with this run's {self.added} entr{'y' if self.added == 1 else 'ies'}")


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.stem}.unreadable-{stamp}-{uuid.uuid4().hex[:6]}{path.suffix}")
    os.replace(path, aside)
    return aside


def update(directory: Path, records: Iterable[dict], environment: dict) -> list[BaselineUpdate]:
    """Merge the benchmark figures of ``records`` into their baseline files; return what was written.

    Entries of other tiers, cases and runs are kept (issue 14: an update rewrote a 3-case file with
    the 1 case of its run). Read, merge and write happen under a lock on the file, so concurrent
    sessions updating the same baseline lose nothing, and the write is atomic, so a reader never
    sees a torn file. A file that cannot be read is never overwritten: it is moved aside, said so."""
    from qeff.store.atomic import write_json
    from qeff.store.locks import PathLock, remove_if_free
    from pytest_qeff.records import BenchmarkRecord, record_of

    by_file: dict[Path, dict[str, dict]] = {}
    for rec in records:
        stage = record_of(rec)
        if not isinstance(stage, BenchmarkRecord):
            continue
        path = path_for(directory, rec["backend"], rec["card"])
        entry = {**stage.figures, **{k: getattr(stage, k) for k in ("generation_len", "repeats", "threads", "batch_size", "prompt_len", "ctx_len", "probe")}}
        by_file.setdefault(path, {})[entry_key(rec["tier"], rec["case"])] = entry
    written = []
    for path, entries in sorted(by_file.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock")
        with PathLock(lock):
            moved, problem = None, ""
            try:
                data = read(path) or {}
            except UnreadableBaseline as exc:
                problem = exc.reason
                moved, data = _move_aside(path), {}
            earlier = {k: v for k, v in data.get("cases", {}).items() if k not in entries}
            cases = {**data.get("cases", {}), **entries}
            card, backend = path.stem, path.parent.name
            write_json(path, {"schema": SCHEMA, "card": card, "backend": backend, "environment": environment, "cases": cases},
                       sort_keys=True)
        remove_if_free(lock)  # baselines live in the repository: leave no lock file behind
        written.append(BaselineUpdate(path, added=len(entries), kept=len(earlier), moved_aside=moved, problem=problem))
    return written
