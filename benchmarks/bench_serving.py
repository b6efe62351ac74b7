"""Serving throughput: continuous batching against static batching, and speculative decoding
against plain greedy decoding, side by side in one process.

*Continuous batching.* A server sees requests that want very different numbers of tokens. Static
batching runs F requests together until the longest is done: rows that finished early still
occupy the batch (they are padding, yet every step costs as much). Continuous batching refills a
row as soon as its request finishes, so each decode step does useful work in more rows. The
workload here: ``--requests`` prompts of mixed lengths, each wanting a different number of new
tokens (a long tail, as chat traffic has). Throughput = the tokens the requests asked for / wall
seconds, for both. Both produce exactly the same tokens per request (checked).

*Speculative decoding.* A draft proposes K tokens one by one, the target scores them all in one
step. It pays when the draft is much cheaper than the target and agrees with it often. The only
real model here is SmolLM2-135M, so the drafts are: the model itself (agrees always, costs as
much: the upper bound of acceptance and the lower bound of speed), and its first
``--draft-layers`` layers with the final norm and head (an early-exit draft that shares weights and
tokenizer). Reported: mean tokens per verify step, and decode tokens/s against plain greedy.

Each comparison runs a warm-up, then ``--trials`` interleaved trials (A, B, A, B, …); medians and
the ratio B/A are reported. Timings on a shared machine are noisy: read the ratios.

    python benchmarks/bench_serving.py continuous [--tiny]
    python benchmarks/bench_serving.py speculative [--draft-layers 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import qeff
from qeff.runtime.ort import OrtSession
from qeff.generation.continuous import generate_continuous
from qeff.serving.graph import GraphVariant
from qeff.runtime.ort_serving import ServingOrtSession
from qeff.generation.speculative import generate_speculative


def _model(tiny: bool):
    if tiny:
        from tests.serving_helpers import serving_model

        return serving_model("llama", seed=1), None
    return qeff.load("smollm2-135m")


def workload(n: int, seed: int, vocab: int, max_new: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 4 … 48 tokens; new tokens from a long-tailed mix (most short, some long)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, vocab - 1, int(rng.integers(4, 49))).tolist() for _ in range(n)]
    gens = np.clip(rng.exponential(max_new / 4, n).astype(int) + 4, 4, max_new).tolist()
    return prompts, gens


def static_run(session, prompts, gens, prompt_len: int) -> tuple[float, list[list[int]]]:
    """Batches of ``session.batch_size`` in arrival order; each batch runs to its longest request."""
    start, out, b = time.perf_counter(), [], session.batch_size
    for i in range(0, len(prompts), b):
        rows, want = prompts[i : i + b], gens[i : i + b]
        r = qeff.generate(session, prompt_token_ids=rows, prompt_len=prompt_len, generation_len=max(want), eos_token_id=[])
        out += [t[:g] for t, g in zip(r.token_ids, want)]
    return time.perf_counter() - start, out


def continuous_run(session, prompts, gens, prompt_len: int) -> tuple[float, list[list[int]], float]:
    start = time.perf_counter()
    r = generate_continuous(session, prompt_token_ids=prompts, prompt_len=prompt_len, generation_len=gens, eos_token_id=[])
    return time.perf_counter() - start, r.token_ids, r.slot_occupancy


def bench_continuous(args) -> dict:
    model, _ = _model(args.tiny)
    qmodel = qeff.transform(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    base = qeff.export(qmodel, tmp / "base").path
    cb = qeff.export(qmodel, tmp / "cb", variant=GraphVariant(continuous_batching=True)).path
    del model, qmodel
    prompts, gens = workload(args.requests, args.seed, qeff_vocab(base), args.max_new)
    ctx = 48 + args.max_new + 1
    static = OrtSession(base, batch_size=args.slots, ctx_len=ctx, threads=args.threads)
    slots = ServingOrtSession(cb, batch_size=args.slots, full_batch_size=args.slots, ctx_len=ctx, threads=args.threads)
    wanted = sum(gens)
    static_run(static, prompts[: args.slots], gens[: args.slots], args.prompt_len)  # warm-up
    continuous_run(slots, prompts[: args.slots], gens[: args.slots], args.prompt_len)
    times = {"static": [], "continuous": []}
    occupancy = 0.0
    for _ in range(args.trials):
        t, ref = static_run(static, prompts, gens, args.prompt_len)
        times["static"].append(t)
        t, got, occupancy = continuous_run(slots, prompts, gens, args.prompt_len)
        times["continuous"].append(t)
        if got != ref:
            raise SystemExit("continuous batching produced other tokens than static batching: not a valid comparison")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bench": "continuous",
        "model": "tiny-llama" if args.tiny else "smollm2-135m",
        "requests": args.requests,
        "slots": args.slots,
        "tokens_wanted": wanted,
        "static_tok_s": wanted / med["static"],
        "continuous_tok_s": wanted / med["continuous"],
        "ratio": med["static"] / med["continuous"],
        "continuous_slot_occupancy": occupancy,
        "static_row_utilization": wanted / sum(max(gens[i : i + args.slots]) * len(gens[i : i + args.slots]) for i in range(0, len(gens), args.slots)),
        "trials": args.trials,
    }


def qeff_vocab(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return int(dict((p.key, p.value) for p in model.metadata_props)["qeff.vocab_size"])


def early_exit_draft(model, layers: int):
    """The first ``layers`` decoder layers of ``model`` with its final norm and head (shared weights)."""
    from qeff.transforms.model import shared_copy

    draft = shared_copy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:layers]
    return draft


def bench_speculative(args) -> dict:
    model, tokenizer = _model(args.tiny)
    tmp = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    base = qeff.export(qeff.transform(model), tmp / "base").path
    tlm = qeff.export(qeff.transform(model), tmp / "tlm", variant=GraphVariant(speculative=True)).path
    early = qeff.export(qeff.transform(early_exit_draft(model, args.draft_layers)), tmp / "early").path
    del model
    prompts = ["The capital of France is", "Write a short story about a robot who learns to paint.",
               "def fibonacci(n):", "Three reasons to learn Python are"]
    ids = [tokenizer(p)["input_ids"] for p in prompts] if tokenizer is not None else workload(4, args.seed, 256, 8)[0]
    ctx, new = 256, args.new_tokens
    plain = OrtSession(base, batch_size=1, ctx_len=ctx, threads=args.threads)
    target = ServingOrtSession(tlm, batch_size=1, ctx_len=ctx, threads=args.threads)
    drafts = {"self": OrtSession(base, batch_size=1, ctx_len=ctx, threads=args.threads),
              f"first-{args.draft_layers}-layers": OrtSession(early, batch_size=1, ctx_len=ctx, threads=args.threads)}
    out: dict = {"bench": "speculative", "model": "tiny-llama" if args.tiny else "smollm2-135m", "k": args.k, "new_tokens": new, "drafts": {}}

    def greedy(p):
        return qeff.generate(plain, prompt_token_ids=[p], prompt_len=args.prompt_len, generation_len=new, eos_token_id=[])

    for name, draft in drafts.items():
        def spec(p, draft=draft):
            return generate_speculative(target, draft, prompt_token_ids=[p], prompt_len=args.prompt_len, generation_len=new,
                                        eos_token_id=[], num_speculative_tokens=args.k)

        greedy(ids[0]), spec(ids[0])  # warm-up
        rates = {"plain": [], "speculative": []}
        accepted = []
        for _ in range(args.trials):
            for p in ids:
                a, b = greedy(p), spec(p)
                if a.token_ids != b.token_ids:
                    raise SystemExit(f"speculative decoding with draft {name} differs from greedy: a bug")
                rates["plain"].append(a.decode_tok_s)
                rates["speculative"].append(b.decode_tok_s)
                accepted.append(b.mean_accepted_tokens)
        med = {k: statistics.median(v) for k, v in rates.items()}
        out["drafts"][name] = {"mean_accepted_tokens": statistics.mean(accepted), "plain_decode_tok_s": med["plain"],
                               "speculative_decode_tok_s": med["speculative"], "speedup": med["speculative"] / med["plain"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["continuous", "speculative"])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (seconds, for a smoke run)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--slots", type=int, default=4, help="static batch size = continuous-batching slots (default 4)")
    parser.add_argument("--max-new", type=int, default=96, help="the longest request's new tokens (default 96)")
    parser.add_argument("--new-tokens", type=int, default=48, help="speculative: new tokens per prompt (default 48)")
    parser.add_argument("--k", type=int, default=4, help="speculative: drafted tokens per step (default 4)")
    parser.add_argument("--draft-layers", type=int, default=8, help="speculative: layers of the early-exit draft (default 8 of 30)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = bench_continuous(args) if args.which == "continuous" else bench_speculative(args)
    if args.which == "continuous":
        print(f"static batching    : {result['static_tok_s']:9.1f} tok/s (rows doing useful work: {result['static_row_utilization']:.0%})", file=sys.stderr)
        print(f"continuous batching: {result['continuous_tok_s']:9.1f} tok/s (slot occupancy {result['continuous_slot_occupancy']:.0%})", file=sys.stderr)
        print(f"ratio              : {result['ratio']:9.2f}x", file=sys.stderr)
    else:
        for name, d in result["drafts"].items():
            print(f"draft {name:18s}: {d['mean_accepted_tokens']:.2f} tokens/step, decode {d['speculative_decode_tok_s']:.1f} vs "
                  f"{d['plain_decode_tok_s']:.1f} tok/s plain = {d['speedup']:.2f}x", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
