"""The precision ladder of a real model: what each Cloud AI number format costs, measured on CPU.

Each tier (fp32, fp16, mxfp6, mxint8, mxfp6+mxint8, and MXFP6's other encoding E3M2) is emulated
in the exported ONNX graph and run by ONNX Runtime; HF eager in fp32 on the untouched model is the
reference. Teacher-forced over the corpus shipped in ``qeff/data/corpus.txt`` (``--rows`` windows
of ``--window`` tokens) for KL divergence, top-1/top-5 agreement and perplexity, and over the
prompts for greedy tokens. See docs/precision.md.

    python benchmarks/bench_precision.py                   # SmolLM2-135M, 8 x 512 tokens; table on stderr, JSON on stdout
    python benchmarks/bench_precision.py --out reports/precision/smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Three reasons to learn Python are",
]
ALL_TIERS = "fp32,fp16,mxfp6,mxint8,mxfp6+mxint8,mxfp6-e3m2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiers", default=ALL_TIERS)
    parser.add_argument("--rows", type=int, default=8, help="corpus windows, run as one batch (default 8)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--steps", type=int, default=32, help="greedy steps per prompt (default 32)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the JSON record to this file")
    args = parser.parse_args(argv)

    from qeff.data import corpus_token_ids
    from qeff.pipeline import Pipeline
    from qeff.precision.ladder import run_ladder

    start = time.perf_counter()
    pipe = Pipeline.open(args.model)
    pipe.export()
    tokenizer = pipe.tokenizer
    ladder = run_ladder(
        pipe.model, pipe.onnx_path, args.tiers,
        corpus_ids=corpus_token_ids(tokenizer), prompt_token_ids=[tokenizer(p)["input_ids"] for p in PROMPTS[: args.rows]],
        rows=args.rows, window=args.window, steps=args.steps, threads=args.threads,
    )
    print(ladder.describe(), file=sys.stderr)
    record = {"model": args.model, **ladder.to_dict(), "wall_s": round(time.perf_counter() - start, 1)}
    line = json.dumps(record)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")  # tiers stay in ladder order
    return 0 if ladder.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
