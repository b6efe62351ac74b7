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


def test_every_engine_runs_first_once_and_follows_every_other_in_a_cycle_of_trials():
    orders = [bench_peers.rotated(ENGINES, t) for t in range(len(ENGINES))]
    assert all(sorted(o) == sorted(ENGINES) for o in orders)  # each trial runs every engine once
    assert sorted(o[0] for o in orders) == sorted(ENGINES)  # each engine opens one trial
    # Across trial boundaries (the previous trial's last engine, then this one's first), no engine
    # always follows the same one: the fixed order had qeff-fused-fp32 after llama.cpp every time.
    sequence = [name for o in orders * 2 for name in o]
    before = {n: {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == n} for n in ENGINES}
    assert all(len(b) >= 2 for b in before.values()), before
    assert bench_peers.rotated(ENGINES, len(ENGINES) + 1) == bench_peers.rotated(ENGINES, 1)


def test_the_ratio_is_the_median_of_the_per_trial_ratios_not_the_ratio_of_medians():
    # Load changed between trials; within each the engine ran 1.1x its peer, but for one trial where
    # the peer alone was hit (10 tok/s): its medians alone would say 1.25x.
    peer = [10.0, 20.0, 30.0]
    mine = [25.0, 22.0, 33.0]
    assert bench_peers.per_trial_ratio(mine, peer) == pytest.approx(1.1)
    assert statistics.median(mine) / statistics.median(peer) == pytest.approx(1.25)
    with pytest.raises(ValueError):  # a trial missing on one side is an error, not a shorter zip
        bench_peers.per_trial_ratio(mine[:2], peer)
