"""Memory and wall time of each part of the per-layer ONNX Runtime check (qeff/layer_check.py).

    python benchmarks/bench_layer_check.py write --out /tmp/qeff-layer-check   # a 7B-wide Llama of 2 layers
    python benchmarks/bench_layer_check.py run --onnx /tmp/qeff-layer-check/home/*/export-*/model.onnx

``write`` makes a synthetic checkpoint of Llama-2-7B's widths (hidden 4096, 32 heads, intermediate
11008) with 2 layers and an untied 49152-row vocabulary (SmolLM2's tokenizer), and exports it with
the pipeline (streamed). ``run`` builds each part's session in turn (prefix, every layer, suffix),
runs one 32-token prefill through it (each part fed the previous part's outputs and an empty cache
of 128 slots), and prints per part a JSON line: its weights, the growth of anonymous and of
file-backed resident memory above the part's start (sampled every 2 ms), the session's build time
and the part's wall time. The ONNX Runtime session of a part maps its weights from the data file:
they show as file-backed pages (reclaimable page cache), not anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def write(out: Path) -> None:
    from qeff.pipeline import Pipeline
    from qeff.synthetic import LlamaShape, write_llama

    shape = LlamaShape(hidden=4096, layers=2, heads=32, kv_heads=32, intermediate=11008, vocab=49152, tied=False)
    write_llama(out / "ckpt", shape, seed=0)
    start = time.perf_counter()
    built = Pipeline.open(str(out / "ckpt"), home=out / "home", progress=False).export()
    print(json.dumps({"export": str(built.path / "model.onnx"), "seconds": round(time.perf_counter() - start, 1)}))


def run(onnx_path: Path, threads: int, tokens: int, ctx_len: int) -> None:
    from qeff.layer_check import partition

    start = time.perf_counter()
    part = partition(onnx_path)
    print(json.dumps({"partition_s": round(time.perf_counter() - start, 2), "layers": part.num_layers}), flush=True)
    top: dict[str, int] = {}

    def sample():
        while True:
            for key, value in _status().items():
                top[key] = max(top.get(key, 0), value)
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    ids = np.arange(3, 3 + tokens, dtype=np.int64)[None]
    pos = np.arange(tokens, dtype=np.int64)[None]
    known: dict[str, np.ndarray] = {}
    for piece in (part.prefix, *part.layers, part.suffix):
        base = _status()
        top.clear()
        top.update(base)
        start = time.perf_counter()
        session = part.session(piece, threads=threads)
        built = time.perf_counter() - start
        feeds = {}
        for name in piece.inputs:
            if name in known:
                feeds[name] = known[name]
            elif name == "input_ids":
                feeds[name] = ids
            elif name == "position_ids":
                feeds[name] = pos
            elif name.startswith("past_"):
                shape = [d.dim_value or {0: 1, 2: ctx_len}.get(i, 0) for i, d in
                         enumerate(next(v for v in part.model.graph.input if v.name == name).type.tensor_type.shape.dim)]
                feeds[name] = np.zeros(shape, np.float32)
        names = [o.name for o in session.get_outputs()]
        known.update(zip(names, session.run(names, feeds)))
        wall = time.perf_counter() - start
        del session
        time.sleep(0.01)
        print(json.dumps({
            "part": piece.name, "weights_mb": round(part.weight_bytes(piece) / 2**20),
            "anon_mb": round((top["RssAnon"] - base["RssAnon"]) / 2**20),
            "file_mb": round((top["RssFile"] - base["RssFile"]) / 2**20),
            "build_s": round(built, 2), "wall_s": round(wall, 2),
        }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--onnx", type=Path, required=True)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--ctx-len", type=int, default=128)
    args = parser.parse_args()
    if args.command == "write":
        write(args.out)
    else:
        run(args.onnx, args.threads, args.tokens, args.ctx_len)


if __name__ == "__main__":
    main()
