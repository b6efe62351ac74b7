"""benchmarks/bench_peers.py's arithmetic: the order engines run in within a trial, and the ratio
it prints against a peer. Both decided the README's figures: with a fixed order the fused fp32
graph always ran first (right after llama.cpp) and read 0.88x onnxruntime-genai while fresh
processes, interleaved, read 1.005x (batch 1) and 1.03x (batch 4) the same day."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_peers  # noqa: E402

ENGINES = ["qeff-fused-fp32", "qeff-fused-native", "genai-fp32", "llama.cpp-F32"]


def test_engines_run_in_varied_places_and_after_varied_engines():
    engines = ENGINES + ["qeff-portable", "llama.cpp-Q4_1"]
    orders = [bench_peers.trial_order(engines, t) for t in range(5)]  # the default 5 trials
    assert all(sorted(o) == sorted(engines) for o in orders)  # each trial runs every engine once
    assert orders == [bench_peers.trial_order(engines, t) for t in range(5)]  # a run repeats its orders
    assert engines == ENGINES + ["qeff-portable", "llama.cpp-Q4_1"]  # the caller's list is left alone
    # No engine runs in the same place, or right after the same engine, in every trial (a fixed
    # order had qeff-fused-fp32 first every time; a rotation kept it after llama.cpp-Q4_1).
    for name in engines:
        places = {o.index(name) for o in orders}
        before = {o[o.index(name) - 1] if o.index(name) else None for o in orders}
        assert len(places) >= 2 and len(before) >= 2, (name, places, before)


def test_the_ratio_is_the_median_of_the_per_trial_ratios_not_the_ratio_of_medians():
    # Load changed between trials; within each the engine ran 1.1x its peer, but for one trial where
    # the peer alone was hit (10 tok/s): its medians alone would say 1.25x.
    peer = [10.0, 20.0, 30.0]
    mine = [25.0, 22.0, 33.0]
    assert bench_peers.per_trial_ratio(mine, peer) == pytest.approx(1.1)
    assert statistics.median(mine) / statistics.median(peer) == pytest.approx(1.25)
    with pytest.raises(ValueError):  # a trial missing on one side is an error, not a shorter zip
        bench_peers.per_trial_ratio(mine[:2], peer)
