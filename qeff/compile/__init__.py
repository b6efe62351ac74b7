"""Turn an exported ONNX graph into a runnable artifact directory (with a manifest) per backend."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qeff.artifacts import Built, build_artifact, read_manifest
from qeff.errors import UsageError

__all__ = ["compile", "BACKENDS", "onnx_identity"]

BACKENDS = ("ort",)


def onnx_identity(onnx_path: Path) -> dict:
    """What identifies an exported graph: its export manifest if it has one, else file stats."""
    manifest = read_manifest(onnx_path.parent)
    if manifest is not None:
        return {"export": manifest.get("inputs"), "file": onnx_path.name}
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(onnx_path.parent.glob(onnx_path.name + "*"))}
    return {"path": str(onnx_path.resolve()), "stats": stats}


def compile(
    onnx_path: str | os.PathLike,
    backend: str = "ort",
    *,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    prompt_len: int = 32,
    ctx_len: int = 128,
    threads: int | None = None,
) -> Built:
    """Compile ``onnx_path`` for ``backend`` into ``out_dir`` (default: a readable directory name
    beside the graph, e.g. ``ort_1BS_32PL_128CL``). Reused when its manifest matches."""
    from qeff.export import library_versions

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {str(onnx_path)!r} does not exist; run `qeff export` first")
    if min(batch_size, prompt_len, ctx_len) < 1 or prompt_len > ctx_len:
        raise UsageError(
            f"need batch_size, prompt_len, ctx_len >= 1 and prompt_len <= ctx_len (got {batch_size}, {prompt_len}, {ctx_len})"
        )
    options = {"batch_size": batch_size, "prompt_len": prompt_len, "ctx_len": ctx_len}
    if backend == "ort":
        from qeff.compile.ort import OPTIMIZED, build_ort, ort_dir_name

        name = ort_dir_name(**options)
        manifest = {"backend": "ort", "options": options, "onnx": onnx_identity(onnx_path), "versions": library_versions()}
        target = Path(out_dir) if out_dir else onnx_path.parent / name
        return build_artifact(target, manifest, lambda tmp: build_ort(onnx_path, tmp, threads=threads), required=(OPTIMIZED,))
    raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def describe(built: Built) -> str:
    return json.dumps(built.manifest.get("inputs", {}).get("options", {}))
