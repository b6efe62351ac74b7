"""Prompt-lookup decoding against plain decoding on a copy-heavy prompt (issue 21), SmolLM2-135M.

    python benchmarks/bench_prompt_lookup.py [--rounds 3] [--k 5] [--new-tokens 160] [--peers .venv-peers]

qeff: ``qeff infer --json`` (the fused CPU graph, batch 1, --no-verify) with and without
``--prompt_lookup K``, rounds interleaved (each round runs every engine once, in an order shuffled
per round) so load from other processes hits all alike; medians of decode tokens/s, the speed-up
as the median of the per-round ratios, the mean tokens kept per verify step, and whether the token
ids are equal (they must be: greedy output is unchanged).

llama.cpp: when the peers venv (``make bench-peers`` builds it) has llama-cpp-python, the same
prompt on the F32 GGUF of the same weights, plain and with ``LlamaPromptLookupDecoding``
(``num_pred_tokens=K``, ``max_ngram_size=3``), same rounds; otherwise the table says it did not run.
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

from bench_peers import per_trial_ratio, trial_order

ROOT = Path(__file__).resolve().parent.parent
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a cloth for "
    "the lens. He polished the glass until it shone, trimmed the wick, and lit the lamp, and the beam swept across "
    "the dark water toward the ships that passed the rocky point. In winter the storms came from the north, and "
    "the waves broke over the lower gallery, but the light never failed while he kept it."
)
PROMPTS = {
    "copy": f"Repeat the following text exactly:\n\n{PASSAGE}\n\nRepeated text:\n",
    # Free writing: little to look up, so the cost of steps whose drafts are rejected shows.
    "free": "Once upon a time, in a small village at the edge of a forest, there lived",
}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def qeff_run(args, lookup: int | None) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "qeff"), "infer", "--json", "--no-stream", "--no-verify", "--backend", "ort",
           "--prompt", PROMPTS[args.prompt], "--prompt_len", "32", "--ctx_len", str(args.ctx_len), "--generation_len", str(args.new_tokens),
           "--threads", str(args.threads)]
    if lookup:
        cmd += ["--prompt_lookup", str(lookup)]
    if args.prompt == "free":  # the instruct model may end it at once: a fixed length, as benchmarks run
        cmd += ["--ignore_eos"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"qeff infer failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
path, prompt, k, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
draft = LlamaPromptLookupDecoding(num_pred_tokens=k, max_ngram_size=3) if k else None
llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, draft_model=draft, verbose=False,
            logits_all=draft is not None)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
start = time.perf_counter(); first = None; tokens = []
for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
    if first is None: first = time.perf_counter()
    if t == llm.token_eos(): break
    tokens.append(int(t))
    if len(tokens) >= new: break
end = time.perf_counter()
print(json.dumps({"decode_tok_s": (len(tokens) - 1) / (end - first), "token_ids": tokens}))
"""


def llama_run(python: Path, gguf: Path, args, lookup: int) -> dict:
    done = subprocess.run([str(python), "-c", LLAMA_SCRIPT, str(gguf), PROMPTS[args.prompt], str(lookup), str(args.new_tokens), str(args.threads)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama-cpp-python failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peers_llama(peers: Path) -> tuple[Path, Path] | None:
    python = peers / "bin" / "python"
    gguf = ROOT / ".bench" / "smollm2-f32.gguf"  # benchmarks/peer_setup.py writes it (make bench-peers)
    if not python.is_file() or not gguf.is_file():
        return None
    ok = subprocess.run([str(python), "-c", "import llama_cpp.llama_speculative"], capture_output=True).returncode == 0
    return (python, gguf) if ok else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", choices=sorted(PROMPTS), default="copy", help="copy-heavy (default) or free writing")
    p.add_argument("--k", type=int, default=5, help="draft tokens per step")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--ctx-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--peers", type=Path, default=ROOT / ".venv-peers")
    args = p.parse_args()

    qeff_run(args, None)  # builds (or reuses) the artifact, warms the page cache
    runs: dict[str, list[dict]] = {"qeff-plain": [], "qeff-lookup": []}
    llama = peers_llama(args.peers)
    if llama:
        runs.update({"llama.cpp-plain": [], "llama.cpp-lookup": []})
    engines = {
        "qeff-plain": lambda: qeff_run(args, None),
        "qeff-lookup": lambda: qeff_run(args, args.k),
        "llama.cpp-plain": lambda: llama_run(*llama, args, 0),
        "llama.cpp-lookup": lambda: llama_run(*llama, args, args.k),
    }
    for r in range(args.rounds):
        for name in trial_order(list(runs), r):  # shuffled per round: no run always follows another
            runs[name].append(engines[name]())
        log(f"[round {r + 1}] " + ", ".join(f"{name} {rs[-1]['decode_tok_s']:.1f} tok/s" for name, rs in runs.items()))
    med = {name: statistics.median(x["decode_tok_s"] for x in rs) for name, rs in runs.items()}
    rate = lambda rs: [x["decode_tok_s"] for x in rs]  # noqa: E731
    look = runs["qeff-lookup"]
    record = {
        "prompt": args.prompt, "new_tokens": look[0]["new_tokens"], "k": args.k, "rounds": args.rounds,
        "decode_tok_s_median": {k: round(v, 2) for k, v in med.items()},
        "qeff_speedup_of_medians": round(med["qeff-lookup"] / med["qeff-plain"], 3),
        "qeff_speedup": round(per_trial_ratio(rate(runs["qeff-lookup"]), rate(runs["qeff-plain"])), 3),
        "qeff_mean_accepted_tokens": look[0]["mean_accepted_tokens"],
        "qeff_tokens_equal": all(x["token_ids"] == runs["qeff-plain"][0]["token_ids"] for x in runs["qeff-plain"] + look),
        "llama_cpp": "ran" if llama else f"not run: no llama-cpp-python in {args.peers} or no .bench/smollm2-f32.gguf (make bench-peers builds them)",
    }
    if llama:
        record["llama_cpp_speedup_of_medians"] = round(med["llama.cpp-lookup"] / med["llama.cpp-plain"], 3)
        record["llama_cpp_speedup"] = round(per_trial_ratio(rate(runs["llama.cpp-lookup"]), rate(runs["llama.cpp-plain"])), 3)
        record["llama_cpp_tokens_equal"] = runs["llama.cpp-lookup"][0]["token_ids"] == runs["llama.cpp-plain"][0]["token_ids"]
    log(f"\n{'engine':<18}{'decode tok/s (median)':>24}")
    for name, v in med.items():
        log(f"{name:<18}{v:>24.2f}")
    log(f"speed-ups are medians of the per-round ratios (ratios of the medians: qeff {record['qeff_speedup_of_medians']:.2f}x"
        f"{', llama.cpp ' + format(record['llama_cpp_speedup_of_medians'], '.2f') + 'x' if llama else ''})")
    log(f"qeff prompt lookup K={args.k}: {record['qeff_speedup']:.2f}x plain, {record['qeff_mean_accepted_tokens']:.2f} tokens per "
        f"verify step, tokens equal: {record['qeff_tokens_equal']}; llama.cpp: {record.get('llama_cpp_speedup', record['llama_cpp'])}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
