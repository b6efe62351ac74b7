"""Start-up as a user meets it: wall time of ``qeff --help``, of a usage error, and of a cached
``qeff infer`` up to its first token, each a fresh process (issue 12, item 4).

    python benchmarks/bench_startup.py [--trials 5] [--model smollm2-135m] [--weights fp32|native]

The infer run is cached first (one untimed run builds or verifies the artifacts), then timed with
``--generation_len 1``: the process exits right after the first token, so its wall time bounds
the time to the first token from the moment the command was typed (imports, manifest and
integrity checks, opening the ONNX Runtime session, prefill). Peak RSS of that process comes from
``wait4`` (its own, not the parent's) and is set against the bytes of the weights the session
holds. Medians over ``--trials`` fresh processes; a table on stderr, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QEFF = [sys.executable, "-m", "qeff.cli"]


def timed(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, exit code, stderr) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0, proc.returncode, proc.stderr.decode(errors="replace")


def peak_rss(cmd: list[str], env: dict) -> int:
    """Peak RSS (bytes) of ``cmd`` alone: spawned and reaped with ``os.wait4``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


def weights_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.iterdir() if p.is_file() and ".onnx" in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="fp32", choices=["fp32", "native"])
    parser.add_argument("--home", default=None, help="artifact cache (default: $QEFF_HOME or ./qeff_models)")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.home:
        env["QEFF_HOME"] = args.home
    infer = [*QEFF, "infer", "--model_name", args.model, "--prompt", "The capital of France is", "--prompt_len", "32",
             "--ctx_len", "256", "--weights", args.weights, "--no-stream", "--json"]
    print(f"[startup] caching {args.model} ({args.weights}) with one untimed run …", file=sys.stderr, flush=True)
    warm = subprocess.run([*infer, "--generation_len", "4"], capture_output=True, env=env, cwd=ROOT)
    if warm.returncode != 0:
        print(warm.stderr.decode(errors="replace"), file=sys.stderr)
        return 1
    artifact = Path(json.loads(warm.stdout.decode().strip().splitlines()[-1])["artifact"])
    cases = {
        "qeff --help": [*QEFF, "--help"],
        "usage error (--batch_size 0)": [*QEFF, "infer", "--model_name", args.model, "--batch_size", "0"],
        "cached infer, first token": [*infer, "--generation_len", "1"],
    }
    walls: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.trials):  # interleaved: load on a shared machine hits every case alike
        for name, cmd in cases.items():
            wall, code, err = timed(cmd, env)
            expected = 2 if name.startswith("usage") else 0
            if code != expected:
                print(f"[startup] {name}: exit {code} (expected {expected}): {err.strip()[-300:]}", file=sys.stderr)
                return 1
            walls[name].append(wall)
    rss = peak_rss([*infer, "--generation_len", "1"], env)
    held = weights_bytes(artifact)
    targets = {"qeff --help": 1.0, "usage error (--batch_size 0)": 1.0, "cached infer, first token": 3.0}
    result = {"model": args.model, "weights": args.weights, "trials": args.trials, "artifact": str(artifact),
              "median_s": {k: round(statistics.median(v), 3) for k, v in walls.items()},
              "max_s": {k: round(max(v), 3) for k, v in walls.items()},
              "target_s": targets, "peak_rss_bytes": rss, "weights_bytes": held,
              "rss_over_weights": round(rss / held, 3) if held else None}
    print(f"\n{'case':<32} {'median':>8} {'max':>8} {'target':>8}", file=sys.stderr)
    for name in cases:
        print(f"{name:<32} {result['median_s'][name]:>7.2f}s {result['max_s'][name]:>7.2f}s {targets[name]:>7.1f}s", file=sys.stderr)
    print(f"peak RSS of the cached infer: {rss / 2**20:.0f} MiB = {result['rss_over_weights']}x the {held / 2**20:.0f} MiB "
          f"of weights its artifact holds ({artifact.name})", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
