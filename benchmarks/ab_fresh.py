"""Old vs new fused fp32 lowering vs onnxruntime-genai, each trial a fresh process per engine.

    python benchmarks/ab_fresh.py [--trials 9] [--new-tokens 128] [--genai .bench/genai-fp32]

Builds SmolLM2-135M's batch-1 fp32 fused artifact twice — the lowering ``fused_lowering`` gives
now, and the one before issue 21's change (``OLD``: the LM head in column slices + Concat, gate|up
packed + Split, norm statistics named) — into the qeff cache, then runs trials: in each, every engine
starts in its own ``peer_worker.py`` process (genai's in ``--peers-venv``), runs one warm-up
generation and one timed one (the same 33 prompt ids as ``make bench-peers``, greedy, exactly
``--new-tokens`` tokens), and exits; the order rotates per trial. Prints decode tok/s per trial and
the medians of the per-trial ratios (the engines of one trial ran under the same load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OLD = dict(pack_gate_up=True, slice_lm_head=True, norm_stats=True)


def build(prompt_tokens: int) -> tuple[dict[str, str], list[int]]:
    import qeff.compilers.ort_fused_artifact as artifact
    from benchmarks.peer_setup import PROMPT
    from qeff.pipeline import prepare

    prepared = prepare("smollm2-135m", progress=True)
    ids = prepared.tokenizer(PROMPT)["input_ids"][:prompt_tokens]
    shape = dict(batch_size=1, prompt_len=64, ctx_len=256, load_model=lambda: prepared.model)
    paths = {"qeff-new": str(artifact.compile_fused(prepared.export_dir, **shape).path)}
    new_lowering = artifact.fused_lowering
    artifact.fused_lowering = lambda batch_size, weights: OLD
    try:
        paths["qeff-old"] = str(artifact.compile_fused(prepared.export_dir, **shape, out_dir=prepared.export_dir / "ort-fused-old-lowering").path)
    finally:
        artifact.fused_lowering = new_lowering
    return paths, ids


def trial(engine: str, path: str, python: str, ids: list[int], new_tokens: int, threads: int) -> dict:
    kind = "genai" if engine == "genai" else "qeff"
    cmd = ["nice", "-n", "10", python, str(HERE / "peer_worker.py"), kind, path, "--batch", "1", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert json.loads(proc.stdout.readline())["ready"]
    replies = []
    for _ in range(2):  # a warm-up, then the timed run
        proc.stdin.write(json.dumps({"cmd": "run", "prompt_ids": ids, "new_tokens": new_tokens}) + "\n")
        proc.stdin.flush()
        replies.append(json.loads(proc.stdout.readline()))
    proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    proc.stdin.close()
    proc.wait()
    r = replies[-1]
    return {"tok_s": (len(r["tokens"][0]) - 1) / r["decode_s"], "ttft_ms": 1000 * r["ttft_s"], "tokens": r["tokens"][0]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genai", default=str(ROOT / ".bench" / "genai-fp32"))
    parser.add_argument("--peers-venv", default=str(ROOT / ".venv-peers"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    paths, ids = build(33)
    pythons = {"qeff-new": sys.executable, "qeff-old": sys.executable}
    if Path(args.genai, "model.onnx").is_file() and Path(args.peers_venv, "bin", "python").is_file():
        paths["genai"], pythons["genai"] = args.genai, str(Path(args.peers_venv, "bin", "python"))
    names = list(paths)
    rates: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    for t in range(args.trials):
        order = names[t % len(names):] + names[: t % len(names)]
        for name in order:
            r = trial(name, paths[name], pythons[name], ids, args.new_tokens, args.threads)
            rates[name].append(r["tok_s"])
            tokens[name] = r["tokens"]
        print(f"trial {t + 1} (load {os.getloadavg()[0]:.1f}): " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names), flush=True)
    print(f"decode tok/s, median of {args.trials} trials: " + ", ".join(f"{n} {statistics.median(rates[n]):.1f}" for n in names))
    pairs = [("qeff-new", "qeff-old")] + [(n, "genai") for n in ("qeff-new", "qeff-old") if "genai" in rates]
    for a, b in pairs:
        ratio = [x / y for x, y in zip(rates[a], rates[b])]
        print(f"{a} / {b} decode rate: median of per-trial ratios {statistics.median(ratio):.3f} "
              f"(range {min(ratio):.3f}-{max(ratio):.3f}), {a} faster in {sum(x > 1 for x in ratio)}/{len(ratio)}")
    first = tokens[names[0]]
    print("tokens equal: " + ", ".join(f"{n} {tokens[n] == first}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
