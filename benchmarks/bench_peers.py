"""qeff's ONNX Runtime backend beside the CPU peers, on SmolLM2-135M: one command, one table.

    make bench-peers          # or: python benchmarks/bench_peers.py [--trials 5] [--new-tokens 128]

Engines (each in its own process, so peak RSS is its own; peers from ``.venv-peers`` when present):

    qeff-fused-fp32     qeff's fused CPU graph, fp32 weights
    qeff-fused-native   the same graph with the GGUF file's own Q4_1/Q8_0 blocks (MatMulNBits), exact
    qeff-fused-native-a8  … with int8 activations inside MatMulNBits (as llama.cpp's Q4_1 x Q8_1 dot products)
    qeff-fused-int8, -int4  round-to-nearest blocks of 32 made from the float weights (not the file's)
    qeff-portable       qeff's portable (Cloud AI) graph on ONNX Runtime: the "before"
    genai-fp32          onnxruntime-genai 0.18 on a model folder from its own builder (-p fp32 -e cpu)
    llama.cpp-F32       llama-cpp-python on an F32 GGUF holding the very weights HF loads
    llama.cpp-Q4_1      llama-cpp-python on the shipped Q4_1 file itself
    hf-eager            HF transformers eager generate (``--engines`` to add it)

An LLM answers in two phases: prefill reads the prompt (time to first token, TTFT, compute-bound)
and decode yields one token per step, each step reading every weight once: on a CPU, decode
tokens/s is bound by memory bandwidth. So the table also gives decode as a share of this
machine's roofline: measured bandwidth (ONNX Runtime streaming a 256 MB weight through a
matrix-vector product, best of several) divided by the bytes each engine's decode step reads.

Same prompt token ids for all, greedy, exactly ``--new-tokens`` tokens, threads = ``--threads``.
A warm-up run each, then ``--trials`` rounds; within a round every engine runs once, in turn (in an
order shuffled per round, seeded by its number, so no engine always runs first or after the same
one), so load from other processes on a shared machine hits all alike. Rates are medians over the rounds;
each engine's tokens are compared with the first qeff engine's (and with HF's when it runs).
Ratios, against onnxruntime-genai fp32 and llama.cpp, are medians of the per-round ratios;
absolute numbers drift with the machine.
Accuracy beside speed (batch 1, ``--kld``, on by default): HF eager (fp32, the untouched
reference) generates the continuation once; every scoring engine then reads the same prompt +
continuation teacher-forced, and the table gives the mean KL divergence of its next-token
distribution from HF's over those positions (nats; qeff.metrics.kl_divergence) and how many of
its argmax tokens equal HF's. An exact engine reads ~1e-9 or less (fp32 rounding); a quantized one
shows what its speed costs.

Table on stderr, one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_ENGINES = ("qeff-fused-fp32,qeff-fused-native,qeff-fused-native-a8,qeff-fused-int8,qeff-fused-int4,qeff-portable,genai-fp32,"
                   "llama.cpp-F32,llama.cpp-Q4_1")
#: Engines whose accuracy is reported beside their speed (batch 1): every compressed one, and the
#: fp32 ones as the floor (their KL divergence is fp32 rounding).
SCORED = ("qeff-fused-fp32", "qeff-fused-native", "qeff-fused-native-a8", "qeff-fused-int8", "qeff-fused-int4",
          "llama.cpp-F32", "llama.cpp-Q4_1")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def python_of(venv: Path) -> Path | None:
    exe = venv / "bin" / "python"
    return exe if exe.is_file() else None


def has_module(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def measure_bandwidth(threads: int, mbytes: int = 256, repeats: int = 7) -> dict:
    """GB/s of ONNX Runtime's fp32 matrix-vector product over a weight far larger than any cache."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 1024
    n = mbytes * 2**20 // (4 * k)
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(w, "w")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    del w, graph
    x = np.ones((1, k), np.float32)
    session.run(None, {"x": x})
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        rates.append(mbytes * 2**20 / (time.perf_counter() - start) / 1e9)
    return {"gb_s_best": max(rates), "gb_s_median": statistics.median(rates), "mbytes": mbytes}


def trial_order(names: list[str], trial: int) -> list[str]:
    """The order trial ``trial`` runs the engines in: a permutation seeded by the trial's number.

    A fixed order made one engine always run first, right after the same one (the fused fp32 graph
    after llama.cpp's Q4_1, whatever that leaves behind); rotating it keeps every engine's
    neighbours. A shuffle per trial gives each engine varied places and predecessors, and the same run
    repeats the same orders."""
    order = list(names)
    random.Random(f"bench-peers trial {trial}").shuffle(order)
    return order


def per_trial_ratio(runs: list[float], peer_runs: list[float]) -> float:
    """The median over trials of ``runs[t] / peer_runs[t]``: both engines of a trial ran under the
    same load, so the ratio within a trial is what the machine's drift leaves alone (a ratio of
    the two medians mixes trials)."""
    return statistics.median(a / b for a, b in zip(runs, peer_runs, strict=True))


class Worker:
    def __init__(self, name: str, python: Path, engine: str, path: str, batch: int, threads: int):
        self.name, self.batch = name, batch
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([str(python), str(HERE / "peer_worker.py"), engine, path, "--batch", str(batch), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def engine_specs(setup: dict, batch: int, peers_python: Path | None, main_python: Path, work: Path, threads: int) -> dict:
    """name → (python, engine, path, bytes read per decode step), for what is available at this batch."""
    specs = {}
    step = setup["step_bytes"]
    for name, by_batch in setup["artifacts"].items():
        path = by_batch.get(str(batch)) or by_batch.get(batch)
        if path:
            kind = "qeff-native" if "native" in name else "qeff-int8" if "int8" in name else "qeff-int4" if "int4" in name else "fp32"
            specs[name] = (main_python, "qeff", path, step.get(kind, step["fp32"]))
    specs["hf-eager"] = (main_python, "hf", setup["paths"]["hf"], step["fp32"])
    if peers_python is not None:
        genai = work / "genai-fp32"
        if (genai / "genai_config.json").is_file():
            specs["genai-fp32"] = (peers_python, "genai", str(genai), step["fp32"])
        if batch == 1:
            specs["llama.cpp-F32"] = (peers_python, "llama.cpp", setup["paths"]["gguf_f32"], step["fp32"])
            specs["llama.cpp-Q4_1"] = (peers_python, "llama.cpp", setup["paths"]["gguf_q4_1"], step["gguf-q4_1"])
    return specs


def build_genai(peers_python: Path, work: Path, hf_dir: str, threads: int) -> None:
    out = work / "genai-fp32"
    if (out / "genai_config.json").is_file():
        return
    log("[bench] building the onnxruntime-genai model (its builder, -p fp32 -e cpu)")
    subprocess.run([str(peers_python), "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", str(out), "-p", "fp32", "-e", "cpu",
                    "-c", str(work / "genai-cache")], check=True, stdout=sys.stderr)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    # Same threads as every other engine.
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated (default {DEFAULT_ENGINES}; add hf-eager)")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / ".bench"))
    parser.add_argument("--peers-venv", default=str(ROOT / ".venv-peers"))
    parser.add_argument("--kld", action=argparse.BooleanOptionalAction, default=True,
                        help="KL divergence from HF fp32 beside every compressed engine (batch 1)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    main_python = Path(sys.executable)
    peers_python = python_of(Path(args.peers_venv))
    if peers_python is None:
        log(f"[bench] no {args.peers_venv}: running qeff alone (make bench-peers installs the peers)")
    wanted = [e for e in args.engines.split(",") if e]

    log("[bench] setup (cached after the first run)")
    setup_out = subprocess.run([str(main_python), str(HERE / "peer_setup.py"), "--work", str(work), "--batch-sizes", args.batch_sizes,
                                *([] if "qeff-portable" in wanted else ["--no-portable"])],
                               check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    setup = json.loads(setup_out.stdout.strip().splitlines()[-1])
    if peers_python is not None and "genai-fp32" in wanted:
        if has_module(peers_python, "onnxruntime_genai"):
            build_genai(peers_python, work, setup["paths"]["hf"], args.threads)
        else:
            log("[bench] onnxruntime-genai is not installed in the peers venv: skipped")
    bandwidth = measure_bandwidth(args.threads)
    log(f"[bench] memory bandwidth (ORT fp32 GEMV over 256 MB, {args.threads} threads): best {bandwidth['gb_s_best']:.1f} GB/s, "
        f"median {bandwidth['gb_s_median']:.1f} GB/s")
    ids = setup["prompt_ids"]
    reference = None  # HF fp32's continuation and the path of its logits, for the KL column
    if args.kld and "1" in args.batch_sizes.split(","):
        log("[bench] HF eager fp32: the reference continuation and logits for the KL column")
        hf = Worker("hf-eager", main_python, "hf", setup["paths"]["hf"], 1, args.threads)
        sequence = ids + hf.ask(cmd="run", prompt_ids=ids, new_tokens=args.new_tokens)["tokens"][0]
        reference = {"ids": sequence, "logits": str(work / "kld-hf-fp32.npy")}
        hf.ask(cmd="score", ids=sequence, start=len(ids), out=reference["logits"])
        hf.close()
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        specs = engine_specs(setup, batch, peers_python, main_python, work, args.threads)
        names = [n for n in wanted if n in specs]
        missing = [n for n in wanted if n not in specs]
        if missing:
            log(f"[bench] batch {batch}: not available: {', '.join(missing)}")
        workers = {}
        for name in names:
            python, engine, path, _ = specs[name]
            workers[name] = Worker(name, python, engine, path, batch, args.threads)
            workers[name].ask(cmd="run", prompt_ids=ids, new_tokens=8)  # warm-up
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for trial in range(args.trials):
            order = trial_order(names, trial)
            for name in order:
                r = workers[name].ask(cmd="run", prompt_ids=ids, new_tokens=args.new_tokens)
                runs[name].append(r)
            log(f"[bench] batch {batch} trial {trial + 1}/{args.trials} (in the order run): " + ", ".join(
                f"{n} {(len(runs[n][-1]['tokens'][0]) - 1) * batch / runs[n][-1]['decode_s']:.1f}" for n in order) + " decode tok/s")
        accuracy = {}
        if reference is not None and batch == 1:
            import numpy as np

            from qeff.metrics import kl_divergence, top1_agreement

            ref_logits = np.load(reference["logits"])
            for name in (n for n in names if n in SCORED):
                out = str(work / f"kld-{name}.npy")
                answer = workers[name].ask(cmd="score", ids=reference["ids"], start=len(ids), out=out)
                if "error" in answer:
                    continue
                logits = np.load(out)
                kl = kl_divergence(ref_logits, logits)
                accuracy[name] = {"kld_mean": float(kl.mean()), "kld_max": float(kl.max()),
                                  "top1_equal": int(top1_agreement(ref_logits, logits).sum()), "positions": len(kl)}
        reference_engine = next((n for n in names if n.startswith("qeff")), None)
        for name in names:
            rss = workers[name].ask(cmd="rss")
            workers[name].close()
            tokens = runs[name][-1]["tokens"]
            generated = min(len(t) for t in tokens)
            decode = statistics.median((len(r["tokens"][0]) - 1) * batch / r["decode_s"] for r in runs[name])
            step_bytes = specs[name][3]
            roofline = bandwidth["gb_s_best"] * 1e9 / step_bytes * batch  # weights read once per step for all rows
            same = None
            if reference_engine and name != reference_engine:
                ref_tokens = runs[reference_engine][-1]["tokens"]
                same = sum(a == b for x, y in zip(tokens, ref_tokens) for a, b in zip(x, y))
            rows.append({
                "engine": name, "batch_size": batch, "decode_tok_s": decode,
                "ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in runs[name]),
                "decode_runs": [(len(r["tokens"][0]) - 1) * batch / r["decode_s"] for r in runs[name]],
                "new_tokens": generated, "peak_rss_mb": rss["peak_rss_mb"], "load_s": rss["load_s"],
                "step_mb": step_bytes / 1e6, "roofline_share": decode / roofline,
                "tokens_equal_to": reference_engine if name != reference_engine else None,
                "tokens_matched": same, "tokens_total": generated * batch if same is not None else None,
                "vs_hf_fp32": accuracy.get(name),
            })

    def ratio(row, peer):
        other = next((r for r in rows if r["engine"] == peer and r["batch_size"] == row["batch_size"]), None)
        return per_trial_ratio(row["decode_runs"], other["decode_runs"]) if other else None

    log(f"\nSmolLM2-135M, {len(ids)}-token prompt, {args.new_tokens} new tokens, {args.threads} threads, median of {args.trials} "
        f"interleaved trials (ratios: medians of the per-trial ratios); roofline = {bandwidth['gb_s_best']:.1f} GB/s / bytes read per step")
    log(f"{'engine':<18} {'batch':>5} | {'decode tok/s':>12} {'vs genai':>8} {'vs l.cpp':>8} {'roofline':>8} | {'TTFT ms':>8} | "
        f"{'peak RSS MB':>11} | {'step MB':>7} | {'KL vs HF fp32':>13} {'top-1':>7} | tokens")
    for r in rows:
        vs_genai = ratio(r, "genai-fp32")
        compressed = any(k in r["engine"] for k in ("native", "Q4", "int8", "int4"))
        vs_llama = ratio(r, "llama.cpp-Q4_1" if compressed else "llama.cpp-F32")
        r["vs_genai_fp32"], r["vs_llama_cpp"] = vs_genai, vs_llama
        fmt = lambda v: f"{v:>7.2f}x" if v else f"{'-':>8}"  # noqa: E731
        tokens = "reference" if r["tokens_matched"] is None else f"{r['tokens_matched']}/{r['tokens_total']} = {r['tokens_equal_to']}"
        acc = r["vs_hf_fp32"]
        kld = f"{acc['kld_mean']:>13.2e} {acc['top1_equal']:>3}/{acc['positions']:<3}" if acc else f"{'-':>13} {'-':>7}"
        log(f"{r['engine']:<18} {r['batch_size']:>5} | {r['decode_tok_s']:>12.1f} {fmt(vs_genai)} {fmt(vs_llama)} {r['roofline_share']:>7.0%} | "
            f"{r['ttft_ms']:>8.1f} | {r['peak_rss_mb']:>11.0f} | {r['step_mb']:>7.0f} | {kld} | {tokens}")
    spread = {f"{r['engine']}@{r['batch_size']}": round((max(r["decode_runs"]) - min(r["decode_runs"])) / r["decode_tok_s"], 3) for r in rows}
    log(f"noise (max-min)/median of decode per engine: {json.dumps(spread)}")
    from qeff._system import library_versions

    print(json.dumps({"benchmark": "peers", "model": "smollm2-135m", "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
                      "kld_reference": "hf-eager fp32, teacher-forced on its own continuation" if reference else None,
                      "threads": args.threads, "trials": args.trials, "bandwidth": bandwidth, "rows": rows, "noise": spread,
                      "load_average": os.getloadavg(), "versions": library_versions()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
