"""A/B of fused-graph variants on SmolLM2-135M: decode steps of two graphs, interleaved in one process.

    python benchmarks/ab_fused.py [--compare gate-up|lm-head] [--batch 4] [--steps 64] [--rounds 7]

Builds the fused graph twice from the same weights and times decode steps alternately, so machine
load hits both alike; prints the median ms per step of each and the ratio. ``gate-up``: A packs
gate|up in one MatMul + Split, B uses two MatMuls. ``lm-head``: A runs the vocabulary projection
in ~32 MB column slices + Concat, B in one MatMul. Used to choose the default lowerings in
qeff.compilers.ort_fused. On a shared machine prefer short rounds and many of them (``--steps 8
--rounds 60``): the per-round ratio is what to read.
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
    parser.add_argument("--compare", choices=("gate-up", "lm-head"), default="gate-up")
    args = parser.parse_args()
    import qeff
    from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
    from qeff.compilers.ort_fused_weights import from_hf
    from qeff.runtime.ort_fused import FusedOrtSession

    model, _ = qeff.load("smollm2-135m")
    ctx = 256
    root = Path(tempfile.mkdtemp())
    sessions = {}
    if args.compare == "gate-up":
        variants = (("A packed gate|up", dict(pack_gate_up=True)), ("B two MatMuls", dict(pack_gate_up=False)))
    else:
        rows = dict(pack_gate_up=args.batch == 1)
        variants = (("A sliced LM head", dict(rows, slice_lm_head=True)), ("B one LM head MatMul", dict(rows, slice_lm_head=False)))
    for name, lowering in variants:
        (root / name[0]).mkdir()
        write_fused_graph(from_hf(model, ctx), root / name[0], **lowering)  # its layers are read once
        sessions[name] = FusedOrtSession(root / name[0] / FUSED_GRAPH, batch_size=args.batch, ctx_len=ctx, prompt_len=64)
    del model
    prompt = np.arange(100, 133)[None].repeat(args.batch, 0)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for r in range(args.rounds):
        for name, s in (list(sessions.items()) if r % 2 == 0 else list(sessions.items())[::-1]):
            s.run(prompt, np.arange(33)[None].repeat(args.batch, 0))
            start = time.perf_counter()
            for t in range(args.steps):
                s.run(np.full((args.batch, 1), 7), np.full((args.batch, 1), 33 + t))
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    for name, ms in times.items():
        print(f"{name}: median {statistics.median(ms):.2f} ms/step  {[round(x, 1) for x in ms]}")
    a, b = (statistics.median(v) for v in times.values())
    ta, tb = times.values()
    per_round = [y / x for x, y in zip(ta, tb)]
    print(f"B/A time ratio {b / a:.3f} (medians); per round: median {statistics.median(per_round):.3f}, "
          f"B faster in {sum(x < 1 for x in per_round)}/{len(per_round)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
