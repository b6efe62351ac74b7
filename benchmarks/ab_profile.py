"""ONNX Runtime's profiler on decode steps of qeff's fused graph(s) and onnxruntime-genai's graph.

    python benchmarks/ab_profile.py --genai DIR [--variants current,one-head] [--rounds 20] [--steps 8]

Builds the fused graph of SmolLM2-135M in each asked lowering (``VARIANTS``) into a temporary
folder, opens it and genai's ``model.onnx`` (made by its model builder: ``make bench-peers`` leaves
it in ``.bench/genai-fp32``) with plain ``onnxruntime`` and the same session options (2 threads,
``enable_profiling``), and runs them in interleaved rounds: each round a 33-token prefill, then
``--steps`` decode steps of one row, the graphs in alternating order so machine load hits all alike.
The cache is one buffer bound as both past and present in every graph (genai's
``past_present_share_buffer``; qeff's ``RetainedCache``).

Prints, per graph: wall ms per decode step (median of the rounds), the per-round time ratio
against the first graph (median, and in how many rounds it was faster), and the profiler's kernel
time per decode step summed per op kind (MatMuls named by the projection they run) and the slowest
nodes. Prefill runs are left out of the sums. On a shared machine read the shares and the
per-round ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

CTX = 256
PROMPT = 33
#: qeff lowerings to compare: ``write_fused_graph`` keyword arguments.
VARIANTS = {
    "old": dict(pack_gate_up=True, slice_lm_head=True, norm_stats=True),  # the one-row fp32 lowering before issue 21's change
    "one-head": dict(pack_gate_up=True, slice_lm_head=False, norm_stats=True),
    "one-head-unpacked": dict(pack_gate_up=False, slice_lm_head=False, norm_stats=True),
    "new": dict(pack_gate_up=False, slice_lm_head=False, norm_stats=False),  # = fused_lowering(1, "fp32")
}


def options(ort, threads: int, prefix: str):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    return opts


class QeffGraph:
    """qeff's fused graph driven as ``qeff.runtime.ort_fused.FusedOrtSession`` drives it."""

    def __init__(self, ort, path: Path, threads: int, prefix: str):
        opts = options(ort, threads, prefix)
        opts.add_free_dimension_override_by_name("batch_size", 1)
        opts.add_free_dimension_override_by_name("ctx_len", CTX)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.io = self.session.io_binding()
        vocab = int(self.session.get_outputs()[0].shape[1])
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((1, vocab), np.float32, "cpu")
        self.io.bind_ortvalue_output("logits", self.logits)
        for inp in self.session.get_inputs():
            if inp.name.startswith("past_"):
                shape = (1, int(inp.shape[1]), CTX, int(inp.shape[3]))
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), "cpu")
                self.io.bind_ortvalue_input(inp.name, buf)
                self.io.bind_ortvalue_output(f"{inp.name}_RetainedState", buf)

    def step(self, ids: np.ndarray, start: int) -> np.ndarray:
        n = ids.shape[1]
        self.io.bind_cpu_input("input_ids", ids.astype(np.int64))
        self.io.bind_cpu_input("seqlens_k", np.array([start + n - 1], np.int32))
        self.io.bind_cpu_input("total_sequence_length", np.array(start + n, np.int32))
        self.io.bind_cpu_input("query_seqlens", np.array([n], np.int32))
        self.io.bind_cpu_input("last_index", np.array([n - 1], np.int64))
        self.session.run_with_iobinding(self.io)
        return self.logits.numpy()[0]


class GenaiGraph:
    """genai's model builder graph driven as its ``og.Generator`` drives it (shared past/present)."""

    def __init__(self, ort, path: Path, threads: int, prefix: str):
        self.ort = ort
        self.session = ort.InferenceSession(str(path), sess_options=options(ort, threads, prefix), providers=["CPUExecutionProvider"])
        self.io = self.session.io_binding()
        self.vocab = int(self.session.get_outputs()[0].shape[2])
        for inp in self.session.get_inputs():
            if inp.name.startswith("past_key_values"):
                shape = (1, int(inp.shape[1]), CTX, 64)
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), "cpu")
                self.io.bind_ortvalue_input(inp.name, buf)
                layer, kind = re.match(r"past_key_values\.(\d+)\.(key|value)", inp.name).groups()
                self.io.bind_ortvalue_output(f"present.{layer}.{kind}", buf)
        self.out: dict[int, object] = {}

    def step(self, ids: np.ndarray, start: int) -> np.ndarray:
        n = ids.shape[1]
        if n not in self.out:
            self.out[n] = self.ort.OrtValue.ortvalue_from_shape_and_type((1, n, self.vocab), np.float32, "cpu")
        self.io.bind_ortvalue_output("logits", self.out[n])
        self.io.bind_cpu_input("input_ids", ids.astype(np.int64))
        self.io.bind_cpu_input("attention_mask", np.ones((1, start + n), np.int64))
        self.session.run_with_iobinding(self.io)
        return self.out[n].numpy()[0, -1]


def node_kind(name: str, op: str) -> str:
    """An op kind for the sums: MatMuls by the projection they run, the rest by op type."""
    if op != "MatMul":
        return op
    for key in ("lm_head", "qkv", "gate_up", "gate", "up", "down", "o"):
        if re.search(rf"(^|[./_]){key}([./_]|$)", name):
            return f"MatMul {key}"
    return "MatMul other"


def summarise(profile: str, steps: int) -> tuple[dict[str, float], dict[str, float], float]:
    """Kernel µs per decode step per op kind and per node, and model_run µs per decode step, from
    a profile of rounds of (1 prefill + ``steps`` decodes)."""
    events = json.loads(Path(profile).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode = [r for i, r in enumerate(runs) if i % (steps + 1) != 0]
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in decode]
    starts = np.array([s for s, _ in spans])
    kinds: dict[str, float] = defaultdict(float)
    nodes: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > spans[i][1]:
            continue  # a prefill node
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        kinds[node_kind(name, op)] += e["dur"]
        nodes[f"{op} {name}"] += e["dur"]
    n = max(len(decode), 1)
    return ({k: v / n for k, v in kinds.items()}, {k: v / n for k, v in nodes.items()},
            sum(r["dur"] for r in decode) / n)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--genai", help="onnxruntime-genai's model folder (model.onnx); left out: qeff's variants only")
    parser.add_argument("--variants", default="old,new")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()
    import onnxruntime as ort

    import qeff
    from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
    from qeff.compilers.ort_fused_weights import from_hf

    root = Path(tempfile.mkdtemp(prefix="ab_profile_"))
    graphs: dict[str, object] = {}
    model, _ = qeff.load("smollm2-135m")
    for name in args.variants.split(","):
        (root / name).mkdir()
        write_fused_graph(from_hf(model, CTX), root / name, **VARIANTS[name])  # its layers are read once
    del model
    for name in args.variants.split(","):
        graphs[name] = QeffGraph(ort, root / name / FUSED_GRAPH, args.threads, str(root / f"prof-{name}"))
    if args.genai:
        graphs["genai"] = GenaiGraph(ort, Path(args.genai) / "model.onnx", args.threads, str(root / "prof-genai"))
    prompt = np.arange(100, 100 + PROMPT)[None]
    ms: dict[str, list[float]] = {n: [] for n in graphs}
    tokens: dict[str, list[int]] = {n: [] for n in graphs}
    for r in range(args.rounds):
        order = list(graphs.items())
        order = order[r % len(order):] + order[: r % len(order)]
        for name, g in order:
            tok = int(np.argmax(g.step(prompt, 0)))
            out = [tok]
            elapsed = 0.0
            for t in range(args.steps):
                start = time.perf_counter()
                logits = g.step(np.array([[tok]]), PROMPT + t)
                elapsed += time.perf_counter() - start
                tok = int(np.argmax(logits))
                out.append(tok)
            ms[name].append(elapsed / args.steps * 1000)
            tokens[name] = out
    first = next(iter(graphs))
    print(f"load average {os.getloadavg()}, {args.rounds} rounds x {args.steps} decode steps, ctx {CTX}, {args.threads} threads")
    for name in graphs:
        ratio = [b / a for a, b in zip(ms[first], ms[name])]
        print(f"{name}: {statistics.median(ms[name]):.2f} ms/step (median of rounds); time / {first} per round: "
              f"median {statistics.median(ratio):.3f}, faster in {sum(x < 1 for x in ratio)}/{len(ratio)}; "
              f"tokens = {first}'s: {tokens[name] == tokens[first]}")
    table: dict[str, dict[str, float]] = {}
    for name, g in graphs.items():
        kinds, nodes, run = summarise(g.session.end_profiling(), args.steps)
        table[name] = dict(kinds, **{"kernel sum": sum(kinds.values()), "model_run": run})
        top = sorted(nodes.items(), key=lambda kv: -kv[1])[: args.top]
        print(f"{name} slowest nodes (µs/step): " + "; ".join(f"{k} {v:.0f}" for k, v in top))
    keys = sorted({k for t in table.values() for k in t}, key=lambda k: (k in ("kernel sum", "model_run"), -max(t.get(k, 0) for t in table.values())))
    print("\n| kernel µs per decode step | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{t[k]:.0f}" if k in t else "—" for t in table.values()) + " |")
    for g in graphs.values():
        g.session = None
    for p in root.rglob("*"):
        if p.is_file():
            p.unlink()
    for p in sorted(root.rglob("*"), reverse=True):
        p.rmdir()
    root.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
