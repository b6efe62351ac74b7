"""The compute-context ladder on the portable graph (issue 21 item 1), SmolLM2-135M.

    python benchmarks/bench_ctx_ladder.py [--rounds 3] [--new-tokens 64] [--threads 2]

Three runs of ``qeff infer --json --ort-graph portable --ignore_eos`` on the same prompt, each a
fresh process, rounds interleaved (each round runs A, B, C once, in an order shuffled per round)
so load from other processes hits all alike:

- ``ctx256``: ``--ctx_len 256 --comp_ctx_lengths off`` (the plain portable graph, the baseline);
- ``ctx4096``: ``--ctx_len 4096 --comp_ctx_lengths off`` (every step attends 4096 slots);
- ``ctx4096+ladder``: ``--ctx_len 4096`` (the default ladder 256, 1024, 4096).

Reports medians of decode tokens/s and TTFT, each one's ratio to ``ctx256`` (the target: the
ladder within 15 %, i.e. ≥ 0.85), and whether the three produced the same tokens (they must).
Table on stderr, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_peers import trial_order

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "My name is"
CONFIGS = {
    "ctx256": ["--ctx_len", "256", "--comp_ctx_lengths", "off"],
    "ctx4096": ["--ctx_len", "4096", "--comp_ctx_lengths", "off"],
    "ctx4096+ladder": ["--ctx_len", "4096"],
}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def run(args, extra: list[str]) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "qeff"), "infer", "--json", "--no-stream", "--no-verify", "--backend", "ort",
           "--ort-graph", "portable", "--prompt", PROMPT, "--prompt_len", "32", "--generation_len", str(args.new_tokens),
           "--ignore_eos", "--threads", str(args.threads), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"qeff infer failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name, extra in CONFIGS.items():  # build (export, compile) outside the timed rounds
        run(argparse.Namespace(**{**vars(args), "new_tokens": 2}), extra)
        log(f"warm: {name}")
    rows: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name in trial_order(list(CONFIGS), r):  # shuffled per round: no config always follows another
            extra = CONFIGS[name]
            out = run(args, extra)
            rows[name].append(out)
            log(f"round {r + 1} {name:15s} decode {out['decode_tok_s']:7.2f} tok/s  TTFT {out['ttft_s'] * 1000:7.1f} ms")
    med = {name: {"decode_tok_s": statistics.median(o["decode_tok_s"] for o in outs),
                  "ttft_ms": statistics.median(o["ttft_s"] * 1000 for o in outs)} for name, outs in rows.items()}
    base = med["ctx256"]["decode_tok_s"]
    tokens = {name: [outs[0]["token_ids"]] for name, outs in rows.items()}
    same = all(t == tokens["ctx256"] for t in tokens.values())
    log(f"\n{'config':16s} {'decode tok/s':>13s} {'vs ctx256':>10s} {'TTFT ms':>9s}   (medians of {args.rounds} interleaved rounds)")
    for name, m in med.items():
        log(f"{name:16s} {m['decode_tok_s']:13.2f} {m['decode_tok_s'] / base:10.2f} {m['ttft_ms']:9.1f}")
    # Paired within a round (the runs of one round share the machine's load at that time).
    paired = {n: statistics.median(o["decode_tok_s"] / b["decode_tok_s"] for o, b in zip(outs, rows["ctx256"]))
              for n, outs in rows.items()}
    log("median of per-round ratios to ctx256: " + ", ".join(f"{n} {r:.2f}" for n, r in paired.items()))
    log(f"same tokens in all three: {same}")
    print(json.dumps({"bench": "ctx_ladder", "model": "smollm2-135m", "graph": "portable", "new_tokens": args.new_tokens,
                      "rounds": args.rounds, "threads": args.threads, "medians": med,
                      "ratio_vs_ctx256": {n: m["decode_tok_s"] / base for n, m in med.items()},
                      "paired_ratio_vs_ctx256": paired, "same_tokens": same}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
