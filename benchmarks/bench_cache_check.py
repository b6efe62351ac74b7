"""The cost of the artifact cache's integrity checks on a cached ``qeff infer`` (issue 14).

A cached run reuses the export and the ORT artifact; before trusting them it checks every file
against its manifest (:mod:`qeff.store.integrity`):

- ``quick`` (the default): sizes, stat keys, and a sampled digest (16 blocks of 64 KiB per file);
- ``full`` (``--verify-cache``): every file's whole blake2b digest (~1.3 GB for SmolLM2-135M);
- ``off``: no file check at all (what qeff did before issue 14; here by patching the check out).

All three run in this one process, interleaved (off, quick, full, off, …) so drift in machine load
hits each alike, on the same cached SmolLM2 run (``qeff infer``, 16 new tokens, verification
cached). We report medians of the whole command's wall time and of the time the checks took
(``Built.check_seconds`` of both reused artifacts), and the checks' cost as a ratio of the run.

    python benchmarks/bench_cache_check.py [--trials 5] [--home DIR]   # table on stderr, JSON on stdout
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path


def run_once(argv: list[str], mode: str, *, cached: bool = True) -> dict:
    import qeff.store.artifacts as artifacts
    import qeff.store.integrity as integrity
    from qeff.cli import main

    checks: list[float] = []
    real_reused = artifacts._reused

    def spy(directory, record, check_seconds):
        checks.append(check_seconds)
        return real_reused(directory, record, check_seconds)

    artifacts._reused = spy
    real_check = integrity.check_tree
    if mode == "off":
        integrity.check_tree = lambda directory, files, full=False: ([], {})
    artifacts._VERIFIED.clear()  # every trial checks from scratch, as a new process would
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with artifacts.verify_cache(mode) if mode != "off" else contextlib.nullcontext():
                code = main(argv)
    finally:
        artifacts._reused = real_reused
        integrity.check_tree = real_check
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"qeff infer failed ({code}): {err.getvalue()[-2000:]}")
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    if cached and result["reused"] != {"export": True, "compile": True}:
        raise SystemExit(f"the run was not fully cached: {result['reused']}")
    return {"wall_s": wall, "check_s": sum(checks), "token_ids": result["token_ids"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--home", default=None, help="artifact cache (default: $QEFF_HOME or ./qeff_models)")
    args = parser.parse_args()
    argv = ["infer", "--json", "--no-stream", "--generation_len", "16"] + (["--home", args.home] if args.home else [])
    run_once(argv, "quick", cached=False)  # build (if needed) and warm the page cache
    run_once(argv, "quick")
    modes = ("off", "quick", "full")
    trials: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.trials):
        for mode in modes:
            trials[mode].append(run_once(argv, mode))
    tokens = {json.dumps(t["token_ids"]) for m in modes for t in trials[m]}
    assert len(tokens) == 1, "the modes disagree on the output"
    summary = {}
    for mode in modes:
        wall = statistics.median(t["wall_s"] for t in trials[mode])
        check = statistics.median(t["check_s"] for t in trials[mode])
        summary[mode] = {"wall_s": round(wall, 3), "check_s": round(check, 4)}
    off = summary["off"]["wall_s"]
    for mode in ("quick", "full"):
        summary[mode]["check_share_of_run"] = round(summary[mode]["check_s"] / summary[mode]["wall_s"], 4)
        summary[mode]["wall_vs_off"] = round(summary[mode]["wall_s"] / off, 3)
    print(f"cached `qeff infer` on SmolLM2-135M, medians of {args.trials} interleaved trials:", file=sys.stderr)
    print(f"  {'mode':<6} {'wall s':>8} {'checks s':>9} {'checks/run':>11} {'wall/off':>9}", file=sys.stderr)
    for mode in modes:
        s = summary[mode]
        print(f"  {mode:<6} {s['wall_s']:>8.3f} {s['check_s']:>9.4f} {s.get('check_share_of_run', 0):>10.2%} "
              f"{s.get('wall_vs_off', 1.0):>9.3f}", file=sys.stderr)
    print(json.dumps({"benchmark": "cache_check", "trials": args.trials, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
