"""Qualcomm Cloud AI 100: a QPC compiled by the SDK's compiler (:mod:`qeff.compilers.qaic`), run
through its Python runtime (:class:`qeff.runtime.qaic.QaicSession`).

``compile`` writes the compile directory users know (``qpc_16cores_1BS_32PL_128CL_1devices_mxfp6``)
with its manifest, or only the compiler's files and command (``dry_run``, no SDK needed). A
continuous-batching or speculative-target QPC (``full_batch_size`` / ``num_speculative_tokens``)
opens as the same session class, which then drives ``batch_index`` / ``num_logits_to_keep``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from qeff import sdk

from qeff.store import atomic
from qeff._system import library_versions
from qeff.store.artifacts import FAILED_LOG_SUFFIX, Built, build_artifact
from qeff.backends.base import Shape, existing_onnx, with_progress
from qeff.compilers import graph_bytes, onnx_identity
from qeff.compilers import qaic as qpc
from qeff.compilers.qaic import QaicCompileOptions, QaicCompileResult
from qeff.errors import CompileError
from qeff.runtime.base import Session
from qeff.runtime.qaic import QaicSession

__all__ = ["QaicCompileOptions", "compile", "open", "RUN_OPTIONS"]

RUN_OPTIONS = ("device_ids",)


def _build(onnx_path: Path, tmp: Path, options: QaicCompileOptions, compiler, target: Path) -> dict:
    """Run the Cloud AI compiler in the build directory; when it fails, keep its log beside the
    target (``<name>.failed.log``), since the build directory is removed (issue 14: the error
    pointed at a log inside the directory just deleted)."""
    try:
        return qpc.compile(onnx_path, tmp, options, compiler=compiler).manifest
    except CompileError as exc:
        log_file = tmp / qpc.LOG_FILE
        if not log_file.is_file():
            raise
        kept = target.parent / (target.name + FAILED_LOG_SUFFIX)
        atomic.write_bytes(kept, log_file.read_bytes())
        message = str(exc).replace(str(log_file.resolve()), str(kept)).replace(str(log_file), str(kept))
        raise CompileError(message, command=exc.command, returncode=exc.returncode, stderr=exc.stderr) from exc


def compile(
    onnx_path: str | os.PathLike,
    shape: Shape,
    options: QaicCompileOptions = QaicCompileOptions(),
    *,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    dry_run: bool = False,
) -> Built | QaicCompileResult:
    """Compile ``onnx_path`` at ``shape`` (which overrides the shape fields of ``options``) into
    ``out_dir`` (default: the QPC directory name beside the graph), reused while its manifest
    matches. ``dry_run``: write the compiler's files and command without running it and return a
    :class:`~qeff.compilers.qaic.QaicCompileResult` — not a cache entry (no ``manifest.json``)."""
    onnx_path = existing_onnx(onnx_path)
    options = replace(options, **shape.as_dict())
    target = Path(out_dir) if out_dir else onnx_path.parent / qpc.qpc_dir_name(options)
    if dry_run:
        return qpc.compile(onnx_path, target, options, dry_run=True)
    compiler = sdk.require_compiler()  # fail before touching the cache when there is no SDK
    manifest = {"backend": "qaic", "options": options.to_dict(), "onnx": onnx_identity(onnx_path),
                "compiler": str(compiler), "versions": library_versions()}
    build = with_progress(lambda tmp: _build(onnx_path, tmp, options, compiler, target), "Compiling for Cloud AI 100", progress)
    return build_artifact(target, manifest, build, required=(f"{qpc.QPC_SUBDIR}/{qpc.QPC_FILE}",), force=force,
                          size_hint=lambda: graph_bytes(onnx_path))


def open(built: Built, *, device_ids: Sequence[int] | None = None) -> Session:
    """The QPC loaded and activated on the device group ``device_ids`` (default ``0 … n-1``)."""
    return QaicSession(built.path, device_ids=device_ids)
