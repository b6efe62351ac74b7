"""Each stage's peak resident memory and wall time, measured in the process that runs it.

``with metering() as meter:`` around a run, and ``with measured("export"):`` around each stage
(:mod:`qeff.pipeline`, :mod:`qeff.cli`); a stage outside any meter costs nothing. The records go
to ``qeff infer --json`` / ``qeff verify --json`` (``"stages"``), to the pytest plugin's results
and to ``make bench-scale``; :mod:`qeff.memory`'s factors were calibrated from them.

A process's peak RSS (``ru_maxrss``, ``VmHWM``) only grows, so a later stage would inherit an
earlier one's peak. On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the
current RSS: each stage resets it when it starts and reads it when it ends, so its peak is the
most this process held *while that stage ran* — what the stage's estimate must cover, the memory
earlier stages still hold (the loaded model) included. A stage that starts inside another folds
the outer stage's peak so far in before resetting. Where ``clear_refs`` cannot be written
(another OS), the peak is the process's peak so far and ``resettable`` is False.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Measurement", "Meter", "metering", "measured", "current_rss", "peak_rss", "reset_peak", "process_peak"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss() -> int:
    """Resident bytes of this process now (0 where /proc is absent)."""
    return _status_bytes("VmRSS") or 0


def peak_rss() -> int:
    """This process's peak resident bytes since the last :func:`reset_peak` (or since it started)."""
    found = _status_bytes("VmHWM")
    if found is not None:
        return found
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


_PEAK_BEFORE_RESETS = 0  # the process's peak, which resets must not lose (``peak_rss_mb`` reports it)


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS; False where the OS does not allow it."""
    global _PEAK_BEFORE_RESETS
    _PEAK_BEFORE_RESETS = max(_PEAK_BEFORE_RESETS, peak_rss())
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def process_peak() -> int:
    """This process's peak resident bytes since it started, across :func:`reset_peak` calls."""
    return max(_PEAK_BEFORE_RESETS, peak_rss())


@dataclass
class Measurement:
    """One stage of one run. ``estimate`` is what :mod:`qeff.memory` predicted for it, when known."""

    name: str
    peak_rss: int = 0  # bytes
    wall_s: float = 0.0
    rss_before: int = 0  # bytes resident when the stage started (what earlier stages still hold)
    estimate: int | None = None
    resettable: bool = True

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peak_rss_mb"] = round(self.peak_rss / 2**20, 1)
        out["rss_before_mb"] = round(self.rss_before / 2**20, 1)
        out["wall_s"] = round(self.wall_s, 3)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(name=str(data["name"]), peak_rss=int(data.get("peak_rss", 0)), wall_s=float(data.get("wall_s", 0.0)),
                   rss_before=int(data.get("rss_before", 0)),
                   estimate=None if data.get("estimate") is None else int(data["estimate"]),
                   resettable=bool(data.get("resettable", True)))


@dataclass
class Meter:
    records: list[Measurement] = field(default_factory=list)
    estimates: dict[str, int] = field(default_factory=dict)  # stage → bytes, from the preflight
    _open: list[Measurement] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[Measurement]:
        hwm = peak_rss()
        for outer in self._open:
            outer.peak_rss = max(outer.peak_rss, hwm)
        record = Measurement(name, estimate=self.estimates.get(name), rss_before=current_rss(), resettable=reset_peak())
        self._open.append(record)
        start = time.perf_counter()
        try:
            yield record
        finally:
            record.wall_s = time.perf_counter() - start
            # The kernel's RSS counters are per-thread and folded in lazily, so VmHWM right after a reset
            # can read a few pages below the VmRSS read a moment earlier: the stage held rss_before at its
            # start, so its peak is at least that.
            hwm = max(peak_rss(), record.rss_before)
            for open_record in self._open:
                open_record.peak_rss = max(open_record.peak_rss, hwm)
            self._open.remove(record)
            self.records.append(record)

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self.records]


_METER: ContextVar[Meter | None] = ContextVar("qeff_meter", default=None)


@contextmanager
def metering(estimates: dict[str, int] | None = None) -> Iterator[Meter]:
    """Record every :func:`measured` stage run inside into the returned :class:`Meter`."""
    meter = Meter(estimates=dict(estimates or {}))
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


@contextmanager
def measured(name: str) -> Iterator[None]:
    """A stage of the chain: recorded by the active :func:`metering`, if any."""
    meter = _METER.get()
    if meter is None:
        yield
        return
    with meter.stage(name):
        yield
