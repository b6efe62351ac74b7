"""Generation speed: qeff's ONNX Runtime backend against HF transformers eager ``generate``.

An LLM answers in two phases. *Prefill* reads the whole prompt in one pass and yields the first
token: its latency is the time to first token (TTFT), bound by compute. *Decode* then yields one
token per step, each step reading every weight once: its rate (tokens/s) is bound by memory
bandwidth, and on a CPU by per-step overhead too. Users feel TTFT on short answers and decode
tokens/s on long ones; total tokens/s = all new tokens / end-to-end seconds.

Both sides run in this one process, side by side, on the same prompt (exactly ``--prompt-tokens``
tokens), greedy, exactly ``--new-tokens`` new tokens (EOS ignored): a warm-up, then ``--trials``
interleaved trials (HF, ORT, HF, ORT, …) so drift in machine load hits both alike; we report
medians. The verdict compares ratios, never absolute numbers, against the targets of issue 2:
decode ≥ 3x HF eager at batch 1, TTFT below HF's.

    python benchmarks/bench_generate.py            # table on stderr, one JSON line on stdout
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def hf_run(model, input_ids: torch.Tensor, new_tokens: int) -> dict:
    """TTFT from a 1-token generate; decode rate from a full one (same prompt, same cache path)."""
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        e2e = time.perf_counter() - start
    batch = input_ids.shape[0]
    generated = (out.shape[1] - input_ids.shape[1]) * batch
    assert generated == new_tokens * batch
    decode_s = max(e2e - ttft, 1e-9)
    return {"ttft_s": ttft, "decode_tok_s": (generated - batch) / decode_s, "total_tok_s": generated / e2e, "e2e_s": e2e}


def ort_run(session, prompt_ids: list[list[int]], prompt_len: int, new_tokens: int) -> dict:
    import qeff

    r = qeff.generate(session, prompt_token_ids=prompt_ids, prompt_len=prompt_len, generation_len=new_tokens, eos_token_id=[])
    assert r.new_tokens == new_tokens * len(prompt_ids)
    return {"ttft_s": r.ttft_s, "decode_tok_s": r.decode_tok_s, "total_tok_s": r.total_tok_s, "e2e_s": r.e2e_s}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated (default 1,4)")
    parser.add_argument("--prompt-tokens", type=int, default=33)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64, help="prefill chunk of the compiled graph (default 64)")
    parser.add_argument("--ctx-len", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--binding", default="inplace", choices=["inplace", "swap", "numpy"])
    parser.add_argument("--specialize-decode", action=argparse.BooleanOptionalAction, default=None,
                        help="portable graph: a second ORT session with every dim pinned for decode (default: qeff's, on for weights under 2 GiB)")
    parser.add_argument("--graph", choices=["fused", "portable"], default="fused",
                        help="qeff's ONNX Runtime graph: the fused CPU graph (default) or the portable one")
    args = parser.parse_args(argv)

    import qeff
    from qeff.exporter import library_versions
    from qeff.pipeline import prepare

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    prepared = prepare(args.model, progress=False)
    model, tokenizer = prepared.model, prepared.tokenizer
    text = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. " * 4
    ids = tokenizer(text)["input_ids"][: args.prompt_tokens]
    assert len(ids) == args.prompt_tokens
    threads = torch.get_num_threads()
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        if args.graph == "fused":
            from qeff.compilers.ort_fused_artifact import compile_fused

            built = compile_fused(prepared.export_dir, batch_size=batch, prompt_len=args.prompt_len, ctx_len=args.ctx_len,
                                  load_model=lambda: model)
        else:
            built = qeff.compile(prepared.onnx_path, batch_size=batch, prompt_len=args.prompt_len, ctx_len=args.ctx_len)
        session = qeff.open_session(built.path, binding=args.binding, specialize_decode=args.specialize_decode)
        prompts = [ids] * batch
        tensor = torch.tensor(prompts)
        hf_run(model, tensor, 8)  # warm-up both
        ort_run(session, prompts, args.prompt_len, 8)
        hf, ort = [], []
        for trial in range(args.trials):
            hf.append(hf_run(model, tensor, args.new_tokens))
            ort.append(ort_run(session, prompts, args.prompt_len, args.new_tokens))
            log(f"batch {batch} trial {trial + 1}/{args.trials}: HF decode {hf[-1]['decode_tok_s']:.1f} tok/s, ORT decode {ort[-1]['decode_tok_s']:.1f} tok/s")
        h, o = median_of(hf), median_of(ort)
        rows.append({
            "batch_size": batch, "hf": h, "ort": o,
            "decode_ratio": o["decode_tok_s"] / h["decode_tok_s"],
            "ttft_ratio": o["ttft_s"] / h["ttft_s"],
            "total_ratio": o["total_tok_s"] / h["total_tok_s"],
        })

    log(f"\n{args.model}: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.trials} trials, torch threads {threads}, ORT threads {session.threads}, graph {args.graph}, binding {args.binding}, specialize_decode {session.decode_session is not session.session}")
    log(f"{'batch':>5} | {'HF TTFT ms':>10} {'ORT TTFT ms':>11} | {'HF dec tok/s':>12} {'ORT dec tok/s':>13} {'ratio':>6} | {'HF tot tok/s':>12} {'ORT tot tok/s':>13}")
    for r in rows:
        h, o = r["hf"], r["ort"]
        log(f"{r['batch_size']:>5} | {h['ttft_s'] * 1e3:>10.1f} {o['ttft_s'] * 1e3:>11.1f} | {h['decode_tok_s']:>12.2f} {o['decode_tok_s']:>13.2f} {r['decode_ratio']:>5.2f}x | {h['total_tok_s']:>12.2f} {o['total_tok_s']:>13.2f}")
    bs1 = next((r for r in rows if r["batch_size"] == 1), None)
    verdict = {}
    if bs1:
        verdict = {"decode_ge_3x_at_bs1": bs1["decode_ratio"] >= 3.0, "ttft_below_hf_at_bs1": bs1["ttft_ratio"] < 1.0}
        log(f"target decode >= 3x HF at batch 1: {'met' if verdict['decode_ge_3x_at_bs1'] else 'NOT met'} ({bs1['decode_ratio']:.2f}x); "
            f"TTFT below HF: {'met' if verdict['ttft_below_hf_at_bs1'] else 'NOT met'} ({bs1['ttft_ratio']:.2f}x of HF)")
    print(json.dumps({"benchmark": "generate", "model": args.model, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "trials": args.trials, "graph": args.graph, "binding": args.binding, "specialize_decode": session.decode_session is not session.session,
                      "rows": rows, "verdict": verdict, "versions": library_versions()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
