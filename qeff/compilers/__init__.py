"""The builders that turn an exported ONNX graph into a backend's files: ONNX Runtime's offline
optimizer (:mod:`~qeff.compilers.ort`), the fused CPU graph (:mod:`~qeff.compilers.ort_fused`,
its weights and its cached artifact) and the Cloud AI compile directory (:mod:`~qeff.compilers.qaic`).

Which builder runs, and what its artifact's manifest records, is each backend's ``compile`` verb
(:mod:`qeff.backends`); this package holds the helpers the builders share and nothing that
chooses between them."""

from __future__ import annotations

from pathlib import Path

from qeff.store.artifacts import read_manifest
from qeff.errors import UsageError

__all__ = ["check_shape", "onnx_identity", "graph_bytes"]


def onnx_identity(onnx_path: Path) -> dict:
    """What identifies an exported graph: its export manifest if it has one, else file stats."""
    manifest = read_manifest(onnx_path.parent)
    if manifest is not None:
        return {"export": manifest.get("inputs"), "file": onnx_path.name}
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(onnx_path.parent.glob(onnx_path.name + "*"))}
    return {"path": str(onnx_path.resolve()), "stats": stats}


def graph_bytes(onnx_path: Path) -> int:
    """The exported graph and its external data: about what a compiled copy of it takes."""
    return sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*") if p.is_file())


def check_shape(batch_size: int, prompt_len: int, ctx_len: int) -> None:
    """The compiled shape every backend needs: positive sizes, a prefill chunk that fits the context."""
    if min(batch_size, prompt_len, ctx_len) < 1 or prompt_len > ctx_len:
        raise UsageError(
            f"need batch_size, prompt_len, ctx_len >= 1 and prompt_len <= ctx_len (got {batch_size}, {prompt_len}, {ctx_len})"
        )
