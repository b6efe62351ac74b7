"""A/B of fused-graph variants on SmolLM2-135M: decode steps of two graphs, interleaved in one process.

    python benchmarks/ab_fused.py [--batch 4] [--steps 64] [--rounds 7]

Builds the fused graph twice from the same weights (variant A: gate|up packed + Split; B: two
MatMuls) and times decode steps alternately, so machine load hits both alike; prints the median
ms per step of each and the ratio. Used to choose the default lowering in qeff.compilers.ort_fused.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import qeff
    from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
    from qeff.compilers.ort_fused_weights import from_hf
    from qeff.runtime.ort_fused import FusedOrtSession

    model, _ = qeff.load("smollm2-135m")
    ctx = 256
    weights = from_hf(model, ctx)
    del model
    root = Path(tempfile.mkdtemp())
    sessions = {}
    for name, packed in (("A packed gate|up", True), ("B two MatMuls", False)):
        (root / name[0]).mkdir()
        write_fused_graph(weights, root / name[0], pack_gate_up=packed)
        sessions[name] = FusedOrtSession(root / name[0] / FUSED_GRAPH, batch_size=args.batch, ctx_len=ctx, prompt_len=64)
    del weights
    prompt = np.arange(100, 133)[None].repeat(args.batch, 0)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            s.run(prompt, np.arange(33)[None].repeat(args.batch, 0))
            start = time.perf_counter()
            for t in range(args.steps):
                s.run(np.full((args.batch, 1), 7), np.full((args.batch, 1), 33 + t))
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    for name, ms in times.items():
        print(f"{name}: median {statistics.median(ms):.2f} ms/step  {[round(x, 1) for x in ms]}")
    a, b = (statistics.median(v) for v in times.values())
    print(f"B/A time ratio {b / a:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
