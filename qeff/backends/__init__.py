"""Backends: one module per backend and kind of graph, two verbs each, chosen from one table.

    exported ONNX ──compile(onnx, shape, options)──▶ Built (directory + manifest) ──open(built, **run)──▶ Session
                         BACKENDS[(backend, graph)]            manifest: backend, graph      BACKENDS[key_of(manifest)]

==================  ===========================  ==============================================
key                 module                       session
==================  ===========================  ==============================================
ort, portable       :mod:`qeff.backends.ort`     OrtSession; ServingOrtSession for a serving graph
ort, fused          :mod:`qeff.backends.ort_fused`  FusedOrtSession
qaic, portable      :mod:`qeff.backends.qaic`    QaicSession (plain, continuous batching, speculative)
==================  ===========================  ==============================================

The builders each verb calls live in :mod:`qeff.compilers`, the sessions in :mod:`qeff.runtime`;
which graph a model gets is decided above, by :meth:`qeff.pipeline.Pipeline.compile`.
:func:`compile` (``qeff.compile``) and :func:`open_session` (``qeff.open_session``) are the
keyword entry points over the table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from qeff.store.artifacts import Built, check_holder
from qeff.backends import ort, ort_fused, qaic
from qeff.backends.base import Backend, Shape, key_of
from qeff.errors import ArtifactError, UsageError
from qeff.store.layout import MANIFEST, QPC_FILE, QPC_SUBDIR
from qeff.runtime.base import Session

__all__ = ["BACKENDS", "NAMES", "Backend", "Built", "Shape", "backend_for", "compile", "open_session", "key_of"]

#: Every (backend, graph) qeff can build and open.
BACKENDS: dict[tuple[str, str], Backend] = {
    ("ort", "portable"): Backend("ort", "portable", ort.compile, ort.open, ort.RUN_OPTIONS,
                                 "ONNX Runtime on the CPU: the exported graph, optimized offline"),
    ("ort", "fused"): Backend("ort", "fused", ort_fused.compile, ort_fused.open, ort_fused.RUN_OPTIONS,
                              "ONNX Runtime on the CPU: the fused llama-family graph built from the weights"),
    ("qaic", "portable"): Backend("qaic", "portable", qaic.compile, qaic.open, qaic.RUN_OPTIONS,
                                  "Cloud AI 100: a QPC of the exported graph"),
}
#: The names ``--backend`` takes.
NAMES = tuple(dict.fromkeys(name for name, _ in BACKENDS))


def backend_for(inputs: dict, where: object = "this artifact") -> Backend:
    """The table's row for an artifact's manifest inputs, or one sentence saying qeff cannot open it."""
    backend, graph = key_of(inputs)
    row = BACKENDS.get((backend, graph))
    if row is None:
        what = backend if graph == "portable" else f"{backend} ({graph} graph)"
        raise ArtifactError(f"{where} was compiled for backend {what!r}, which this qeff cannot open")
    return row


def compile(
    onnx_path: str | os.PathLike,
    backend: str = "ort",
    *,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    prompt_len: int = 32,
    ctx_len: int = 128,
    threads: int | None = None,
    num_cores: int = 16,
    num_devices: int = 1,
    mxfp6: bool = False,
    mxint8: bool = False,
    mos: int | None = None,
    aic_enable_depth_first: bool = False,
    aic_hw_version: str | None = None,
    extra_options: tuple[str, ...] = (),
    full_batch_size: int | None = None,
    num_speculative_tokens: int | None = None,
    comp_ctx_lengths=None,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = False,
):
    """Compile the portable graph ``onnx_path`` for ``backend`` into ``out_dir`` (default: a
    readable directory name beside the graph, e.g. ``ort_1BS_32PL_128CL`` or
    ``qpc_16cores_1BS_32PL_128CL_1devices``), reused when its manifest matches: ``qeff.compile``.

    The keywords are sorted into the :class:`Shape` and the backend's options: ``threads`` is ONNX
    Runtime's; ``num_cores`` … ``extra_options``, ``comp_ctx_lengths`` (the compute-context
    ladder's specializations) and ``dry_run`` (write the compiler's files and command, return a
    :class:`qeff.compilers.qaic.QaicCompileResult`) are Cloud AI's. ``full_batch_size`` /
    ``num_speculative_tokens`` compile a serving graph variant (:mod:`qeff.serving.graph`),
    recorded in the manifest, from which :func:`open_session` opens the matching session. ONNX
    Runtime takes the compute-context ladder when a session opens, so its artifact records none."""
    if backend not in NAMES:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(NAMES)}")
    shape = Shape(batch_size, prompt_len, ctx_len)
    row = BACKENDS[(backend, "portable")]
    if backend == "ort":
        if comp_ctx_lengths is not None:
            raise UsageError("ONNX Runtime picks the compute-context ladder when a session opens: pass comp_ctx_lengths "
                             "to qeff.open_session, not to compile")
        options = ort.OrtOptions(threads=threads, full_batch_size=full_batch_size, num_speculative_tokens=num_speculative_tokens)
        return row.compile(onnx_path, shape, options, out_dir=out_dir, force=force, progress=progress)
    options = qaic.QaicCompileOptions(
        **shape.as_dict(), full_batch_size=full_batch_size, num_speculative_tokens=num_speculative_tokens, num_cores=num_cores,
        comp_ctx_lengths=comp_ctx_lengths, num_devices=num_devices, mxfp6=mxfp6, mxint8=mxint8, mos=mos,
        aic_enable_depth_first=aic_enable_depth_first, aic_hw_version=aic_hw_version, extra_options=tuple(extra_options),
    )
    return row.compile(onnx_path, shape, options, out_dir=out_dir, force=force, progress=progress, dry_run=dry_run)


def _artifact(artifact_dir: Path) -> Built:
    """The artifact at ``artifact_dir`` with its manifest, its files checked against it: a QPC
    compiled elsewhere (no manifest) counts as a Cloud AI artifact; a ``qpcs/`` directory is
    checked through the compile directory above it."""
    checked = check_holder(artifact_dir)
    manifest = checked if (artifact_dir / MANIFEST).is_file() else None
    if manifest is None and ((artifact_dir / QPC_FILE).is_file() or (artifact_dir / QPC_SUBDIR).is_dir()):
        manifest = {"inputs": {"backend": "qaic"}}  # a QPC compiled elsewhere (or by hand)
    if manifest is None:
        raise ArtifactError(f"{artifact_dir} is not a compiled qeff artifact (no manifest.json); run `qeff compile`")
    return Built(path=artifact_dir, manifest=manifest, reused=True, seconds=0.0, build_seconds=0.0)


def open_session(
    artifact_dir: str | os.PathLike,
    *,
    threads: int | None = None,
    binding: str | None = None,
    device_ids: Sequence[int] | None = None,
    specialize_decode: bool | None = None,
    comp_ctx_lengths=None,
) -> Session:
    """Open a compiled artifact directory with the session its manifest names (``qeff.open_session``);
    its dimensions come from the manifest (ONNX Runtime) or the QPC itself (Cloud AI).

    Each backend takes its own run options and never sees the others': ``threads`` (ONNX
    Runtime), ``binding`` / ``specialize_decode`` / ``comp_ctx_lengths`` (the portable ORT graph,
    see :func:`qeff.backends.ort.open`), ``device_ids`` (the Cloud AI device group)."""
    built = _artifact(Path(artifact_dir))
    row = backend_for(built.manifest.get("inputs", {}), built.path)
    given = {"threads": threads, "binding": binding, "device_ids": device_ids, "specialize_decode": specialize_decode,
             "comp_ctx_lengths": comp_ctx_lengths}
    run = {k: v for k, v in given.items() if k in row.run_options and v is not None}
    return row.open(built, **run)
