"""ONNX Runtime "compile": run ORT's graph optimizer once and keep the optimized graph.

The artifact is ``model.opt.onnx`` (+ ``model.opt.onnx.data``), optimized at the *extended* level:
fusions that are portable across CPUs (layer norms, GELU, MatMul+Add, …). Layout transforms that
depend on the CPU (the *all* level) are applied when a session opens it, on the machine that runs
it. The run-time shapes (batch size, context length) are fixed in the manifest, as on Cloud AI.
"""

from __future__ import annotations

import os
from pathlib import Path

from qeff.store.layout import ORT_OPTIMIZED as OPTIMIZED
from qeff.store.layout import ort_dir_name
from qeff.runtime.ort import onnxruntime_module, session_options

__all__ = ["ort_dir_name", "build_ort", "OPTIMIZED"]


def build_ort(onnx_path: str | os.PathLike, out_dir: Path, *, threads: int | None = None) -> dict:
    """Optimize ``onnx_path`` into ``out_dir``; return facts for the manifest."""
    ort = onnxruntime_module()
    target = out_dir / OPTIMIZED
    opts = session_options(threads, optimized_path=str(target))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    if not target.is_file():
        raise RuntimeError(f"ONNX Runtime did not write the optimized model {target}")
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return {"model": OPTIMIZED, "bytes": size}
