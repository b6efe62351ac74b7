"""Turn an exported ONNX graph into a runnable artifact directory (with a manifest) per backend."""

from __future__ import annotations

import os
from pathlib import Path

from qeff import atomic
from qeff.artifacts import FAILED_LOG_SUFFIX, build_artifact, read_manifest
from qeff.errors import CompileError, UsageError

__all__ = ["compile", "check_shape", "BACKENDS", "onnx_identity"]

BACKENDS = ("ort", "qaic")


def onnx_identity(onnx_path: Path) -> dict:
    """What identifies an exported graph: its export manifest if it has one, else file stats."""
    manifest = read_manifest(onnx_path.parent)
    if manifest is not None:
        return {"export": manifest.get("inputs"), "file": onnx_path.name}
    stats = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(onnx_path.parent.glob(onnx_path.name + "*"))}
    return {"path": str(onnx_path.resolve()), "stats": stats}


def _graph_bytes(onnx_path: Path) -> int:
    """The exported graph and its external data: about what a compiled copy of it takes."""
    return sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*") if p.is_file())


def _qaic_build(qaic, onnx_path: Path, tmp: Path, qopts, compiler, target: Path) -> dict:
    """Run the Cloud AI compiler in the build directory; when it fails, keep its log beside the
    target (``<name>.failed.log``), since the build directory is removed (issue 14: the error
    pointed at a log inside the directory just deleted)."""
    try:
        return qaic.compile(onnx_path, tmp, qopts, compiler=compiler).manifest
    except CompileError as exc:
        log_file = tmp / qaic.LOG_FILE
        if not log_file.is_file():
            raise
        kept = target.parent / (target.name + FAILED_LOG_SUFFIX)
        atomic.write_bytes(kept, log_file.read_bytes())
        message = str(exc).replace(str(log_file.resolve()), str(kept)).replace(str(log_file), str(kept))
        raise CompileError(message, command=exc.command, returncode=exc.returncode, stderr=exc.stderr) from exc


def _with_progress(builder, description: str, enabled: bool, stage_name: str = "compile"):
    from qeff.meter import measured
    from qeff.progress import stage

    def run(tmp: Path):
        with measured(stage_name), stage(description, enabled=enabled):
            return builder(tmp)

    return run


def check_shape(batch_size: int, prompt_len: int, ctx_len: int) -> None:
    """The compiled shape every backend needs: positive sizes, a prefill chunk that fits the context."""
    if min(batch_size, prompt_len, ctx_len) < 1 or prompt_len > ctx_len:
        raise UsageError(
            f"need batch_size, prompt_len, ctx_len >= 1 and prompt_len <= ctx_len (got {batch_size}, {prompt_len}, {ctx_len})"
        )


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
    """Compile ``onnx_path`` for ``backend`` into ``out_dir`` (default: a readable directory name
    beside the graph, e.g. ``ort_1BS_32PL_128CL`` or ``qpc_16cores_1BS_32PL_128CL_1devices``).
    Reused when its manifest matches. The ``num_cores`` … ``extra_options`` options are Cloud AI's;
    ``dry_run`` (qaic only) writes the compiler's files and command without running it and returns
    a :class:`qeff.compilers.qaic.QaicCompileResult`. ``full_batch_size`` / ``num_speculative_tokens``
    compile a serving graph variant (:mod:`qeff.serving.graph`) and are recorded in the manifest,
    from which :func:`qeff.open_session` opens the matching session. ``comp_ctx_lengths`` (qaic):
    the compute-context ladder's specializations (a graph with ``comp_ctx_lengths``); ONNX
    Runtime takes the ladder when a session opens, so the ort artifact does not record one."""
    from qeff._system import library_versions

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {str(onnx_path)!r} does not exist; run `qeff export` first")
    check_shape(batch_size, prompt_len, ctx_len)
    options = {"batch_size": batch_size, "prompt_len": prompt_len, "ctx_len": ctx_len}
    serving = {k: v for k, v in (("full_batch_size", full_batch_size), ("num_speculative_tokens", num_speculative_tokens)) if v is not None}
    if backend == "ort":
        from qeff.compilers.ort import OPTIMIZED, build_ort, ort_dir_name

        if comp_ctx_lengths is not None:
            raise UsageError("ONNX Runtime picks the compute-context ladder when a session opens: pass comp_ctx_lengths "
                             "to qeff.open_session, not to compile")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in serving.values()):
            raise UsageError(f"full_batch_size and num_speculative_tokens must be positive integers (got {serving})")
        options = {**options, **serving}
        name = ort_dir_name(**options)
        manifest = {"backend": "ort", "options": options, "onnx": onnx_identity(onnx_path), "versions": library_versions()}
        target = Path(out_dir) if out_dir else onnx_path.parent / name
        return build_artifact(target, manifest, _with_progress(lambda tmp: build_ort(onnx_path, tmp, threads=threads), "Compiling for ONNX Runtime", progress),
            required=(OPTIMIZED,), force=force, size_hint=lambda: _graph_bytes(onnx_path))
    if backend == "qaic":
        from qeff import sdk
        from qeff.compilers import qaic

        qopts = qaic.QaicCompileOptions(
            **options, **serving, num_cores=num_cores, comp_ctx_lengths=comp_ctx_lengths, num_devices=num_devices, mxfp6=mxfp6, mxint8=mxint8, mos=mos,
            aic_enable_depth_first=aic_enable_depth_first, aic_hw_version=aic_hw_version, extra_options=tuple(extra_options),
        )
        target = Path(out_dir) if out_dir else onnx_path.parent / qaic.qpc_dir_name(qopts)
        if dry_run:
            # Not a cache entry: no manifest.json, so nothing will ever reuse it as a QPC.
            return qaic.compile(onnx_path, target, qopts, dry_run=True)
        compiler = sdk.require_compiler()  # fail before touching the cache when there is no SDK
        manifest = {"backend": "qaic", "options": qopts.to_dict(), "onnx": onnx_identity(onnx_path),
                    "compiler": str(compiler), "versions": library_versions()}
        return build_artifact(
            target, manifest,
            _with_progress(lambda tmp: _qaic_build(qaic, onnx_path, tmp, qopts, compiler, target), "Compiling for Cloud AI 100", progress),
            required=(f"{qaic.QPC_SUBDIR}/{qaic.QPC_FILE}",), force=force, size_hint=lambda: _graph_bytes(onnx_path),
        )
    raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")

