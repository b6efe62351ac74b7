"""A pytest plugin for benchmarks/bench_7b_chain.py: each test's peak resident memory and wall time.

Loaded with ``-p pytest_rss`` (``benchmarks/`` on ``PYTHONPATH``), it samples the process's
``VmRSS`` and ``RssAnon`` (``/proc/self/status``) every 20 ms while each test runs — setup and
teardown included — and appends one JSON line per test to the file ``$QEFF_BENCH_RSS`` names.
A skipped stage's peak counts too: the full tier's export stage exports, then skips.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

_KEYS = ("VmRSS", "RssAnon")


def _status() -> dict[str, int]:
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _KEYS:
            found[key] = int(value.split()[0]) * 1024
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    top = dict.fromkeys(_KEYS, 0)
    stop = threading.Event()

    def sample() -> None:
        while True:
            for key, value in _status().items():
                top[key] = max(top[key], value)
            if stop.wait(0.02):
                return

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    yield
    stop.set()
    thread.join()
    line = {"nodeid": item.nodeid, "peak_rss": top["VmRSS"], "peak_anon": top["RssAnon"],
            "wall_s": round(time.perf_counter() - start, 3)}
    with open(os.environ["QEFF_BENCH_RSS"], "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")
