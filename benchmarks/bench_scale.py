"""The chain's memory and time on checkpoints of real shapes (issue 18).

For each size (``--sizes 135m,1b,3b,7b``; shapes in :data:`qeff.synthetic.SHAPES`) it writes a
random seeded bf16 checkpoint once under ``--root`` (tensor by tensor: the model is never built
in memory), then runs, in a child process on a fresh artifact cache,

    qeff infer -m <checkpoint> --prompt "My name is" --generation_len 8 --json

and reports each stage's peak RSS and wall time as the child measured them (:mod:`qeff.meter`),
its whole peak (``ru_maxrss`` of the child, from ``wait4``), the estimate the memory preflight made
for each stage (:mod:`qeff.memory`) and, for a run the preflight refuses, its one sentence. A table
on stderr for people, one JSON line on stdout for machines.

    python benchmarks/bench_scale.py --sizes 135m,1b [--root /tmp/qeff-scale] [--keep-cache]

Peak RSS is reported as a ratio of the model's fp32 bytes too (``×fp32``): the factors of
:mod:`qeff.memory` are those ratios, measured here. The machine is shared: a 3B or 7B run is
refused (or lets the preflight decide) — run them only on a machine of your own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qeff.synthetic import SHAPES, write_llama  # noqa: E402


def checkpoint(root: Path, size: str) -> Path:
    """The synthetic checkpoint of ``size``, written once (a marker says it is complete)."""
    path = root / f"llama-{size}"
    marker = path / ".complete"
    if not marker.is_file():
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        write_llama(path, SHAPES[size], seed=0)
        marker.write_text(f"{time.perf_counter() - start:.1f}\n")
    return path


def refusal(root: Path, size: str, args) -> str | None:
    """The preflight's sentence for this size, asked on a sparse copy (headers over a hole): a
    refused 3B or 7B costs no 6–13 GB of writing first."""
    from qeff.cli import preflight
    from qeff.errors import UsageError

    path = root / f"headers-{size}"
    if not (path / "model.safetensors").is_file():
        write_llama(path, SHAPES[size], tokenizer=False, sparse=True)
    if args.memory_limit:
        os.environ["QEFF_MEMORY_LIMIT"] = args.memory_limit
    try:
        preflight(["infer", "-m", str(path), "--prompt", args.prompt, "--generation_len", str(args.generation_len)])
    except UsageError as exc:
        return f"qeff: error: {exc}"
    return None


def run_chain(model: Path, home: Path, args) -> dict:
    """``qeff infer`` in a child process; its JSON record, exit code, last stderr line and peak RSS."""
    cmd = [sys.executable, "-m", "qeff.cli", "infer", "-m", str(model), "--prompt", args.prompt,
           "--generation_len", str(args.generation_len), "--home", str(home), "--json", "--no-stream"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if args.memory_limit:
        env["QEFF_MEMORY_LIMIT"] = args.memory_limit
    start = time.perf_counter()
    with open(home.parent / f"{home.name}.stderr", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        killed = _watch(proc.pid, args.max_rss_gb * 2**30)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        killed.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.strip()]
    record = {}
    for line in stdout.decode().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
    # The child resets its peak at each stage (qeff.meter), so ru_maxrss is the last stage's: its
    # own record carries the whole run's.
    peak = max(usage.ru_maxrss * 1024, int(record.get("peak_rss_mb", 0) * 2**20))
    last = lines[-1] if lines else ""
    if getattr(killed, "fired", False):
        last = f"killed by this benchmark above --max-rss-gb {args.max_rss_gb}"
    return {"rc": proc.returncode, "record": record, "last_line": last, "child_peak_rss": peak,
            "wall_s": time.perf_counter() - start}


def _watch(pid: int, limit: int):
    """Kill the child if its RSS passes ``limit``: the machine is shared, and a run the preflight
    let through must not take another user's memory while these factors are being measured."""
    import signal
    import threading

    stop = threading.Event()

    def poll():
        while not stop.wait(0.2):
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return
            rss = next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("VmRSS:")), 0)
            if rss > limit:
                stop.fired = True
                os.kill(pid, signal.SIGKILL)
                return

    threading.Thread(target=poll, daemon=True).start()
    return stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="135m,1b,3b,7b", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--root", default="/tmp/qeff-scale", help="where checkpoints and caches go (default /tmp/qeff-scale)")
    parser.add_argument("--prompt", default="My name is")
    parser.add_argument("--generation-len", type=int, default=8)
    parser.add_argument("--memory-limit", default=None,
                        help="QEFF_MEMORY_LIMIT for the runs, e.g. 8G: the preflight's budget (default: the machine's)")
    parser.add_argument("--max-rss-gb", type=float, default=8.0,
                        help="kill a run whose RSS passes this (default 8: a shared machine's per-process budget)")
    parser.add_argument("--keep-cache", action="store_true", help="keep each run's artifact cache (default: removed after)")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for size in sizes:
        shape = SHAPES[size]
        refused = refusal(root, size, args)
        if refused:
            results.append({"size": size, "parameters": shape.parameters, "fp32_bytes": 4 * shape.parameters, "rc": 2,
                            "refused": refused, "error": None, "child_peak_rss": 0, "wall_s": 0.0, "stages": []})
            continue
        model = checkpoint(root, size)
        home = root / f"home-{size}"
        shutil.rmtree(home, ignore_errors=True)  # a fresh cache: every stage runs
        home.mkdir()
        out = run_chain(model, home, args)
        fp32 = 4 * shape.parameters
        record = out["record"]
        refused = out["rc"] == 2
        results.append({
            "size": size, "parameters": shape.parameters, "fp32_bytes": fp32, "rc": out["rc"],
            "refused": out["last_line"] if refused else None,
            "error": out["last_line"] if out["rc"] not in (0, 2) else None,
            "child_peak_rss": out["child_peak_rss"], "wall_s": round(out["wall_s"], 2),
            "stages": record.get("stages", []),
        })
        if not args.keep_cache:
            shutil.rmtree(home, ignore_errors=True)
    _table(results)
    print(json.dumps({"bench": "scale", "results": results}), flush=True)
    return 0 if all(r["rc"] in (0, 2) for r in results) else 1


def _table(results: list[dict]) -> None:
    gib = 2**30
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    width = max([4] + [len(r["size"]) for r in results])
    say(f"{'size':<{width}} {'stage':<12} {'peak RSS':>9} {'×fp32':>6} {'estimate':>9} {'wall s':>8}")
    for r in results:
        head = f"{r['size']:<{width}}"
        if r["refused"]:
            say(f"{head} refused by the preflight: {r['refused']}")
            continue
        if r["error"]:
            say(f"{head} failed (exit {r['rc']}): {r['error']}")
            continue
        for s in r["stages"]:
            est = f"{s['estimate'] / gib:8.2f}G" if s.get("estimate") else f"{'-':>9}"
            say(f"{head} {s['name']:<12} {s['peak_rss'] / gib:8.2f}G {s['peak_rss'] / r['fp32_bytes']:6.2f} {est} {s['wall_s']:8.1f}")
            head = " " * width
        say(f"{head} {'whole run':<12} {r['child_peak_rss'] / gib:8.2f}G {r['child_peak_rss'] / r['fp32_bytes']:6.2f} "
            f"{'':>9} {r['wall_s']:8.1f}   ({r['parameters'] / 1e9:.2f}B parameters, fp32 {r['fp32_bytes'] / gib:.2f} GiB)")


if __name__ == "__main__":
    raise SystemExit(main())
