"""The build steps ``qeff infer`` and ``qeff compile`` share: the pipeline of the model, the
compile options and target from the typed records, and the usage errors of the CPU graph flags
(before anything is loaded or exported)."""

from __future__ import annotations

from pathlib import Path

from qeff.cli.options import Invocation
from qeff.cli.output import Out, reuse_note
from qeff.errors import UsageError

__all__ = ["pipeline", "compile_options", "check_cpu_graph", "target", "compile_graph", "check_no_emulated_serving", "is_fused",
           "open_draft"]


def pipeline(inv: Invocation):
    """The model's :class:`qeff.pipeline.Pipeline`, verifying as the memory preflight priced it."""
    from qeff.pipeline import Pipeline

    model = inv.model
    pipe = Pipeline.open(model.model_name, revision=model.revision, cache_dir=model.cache_dir, home=inv.home,
                         verify_layers=True if model.verify_layers else None)
    pipe.verify_mode = inv.verify_mode  # the memory preflight's choice, when it made one
    return pipe


def compile_options(inv: Invocation, backend: str, out: Out, serving=None) -> dict:
    """``qeff.compile``'s options from the command line (Cloud AI's only for the qaic backend;
    ``serving``: the continuous-batching / speculative-target options of the graph variant)."""
    shape, options = inv.shape, inv.compile
    compiled = dict(shape.as_dict(), threads=inv.run.threads if inv.run else None, dry_run=options.dry_run)
    if serving is not None:
        compiled.update(full_batch_size=serving.full_batch_size, num_speculative_tokens=serving.num_speculative_tokens)
    if backend == "qaic":
        compiled.update(num_cores=options.num_cores, num_devices=len(inv.device_group or [0]), mxfp6=options.mxfp6,
                        mxint8=options.mxint8, mos=options.mos if options.mos > 0 else None,
                        aic_enable_depth_first=options.aic_enable_depth_first, aic_hw_version=options.aic_hw_version,
                        extra_options=options.compiler_options)
    elif options.mos > 0 or options.aic_enable_depth_first or options.compiler_options:
        out.say("[qeff] note: --mos/--aic_enable_depth_first/--compiler_option apply to Cloud AI only")
    return compiled


def check_cpu_graph(inv: Invocation, backend: str) -> None:
    """Usage errors of the CPU graph options, before anything is loaded or exported (the sizes were
    checked by :func:`qeff.cli.options.resolve`)."""
    o = inv.compile
    if backend == "ort" and (o.weights != "fp32" or o.int8_activations or o.ort_graph == "fused" or o.mxfp6 or o.mxint8):
        if inv.serving.ladder_asked:
            raise UsageError("--comp_ctx_lengths applies to the portable graph (the fused CPU graph attends the valid length "
                             "already, and the emulated tiers keep the plain graph); drop it, or --ort-graph/--weights/--mxfp6/--mxint8")
    if backend == "ort" and (o.weights != "fp32" or o.int8_activations or o.ort_graph == "fused"):
        if inv.serving_flags:  # the flags as given
            raise UsageError("continuous batching and speculative targets run the portable graph; drop --ort-graph fused, "
                             "--weights and --int8-activations, or the serving flags")
    if backend == "ort" and (o.weights != "fp32" or o.int8_activations or o.ort_graph != "auto"):
        if o.mxfp6 or o.mxint8:
            raise UsageError("--mxfp6/--mxint8 on the ort backend run the emulated portable graph; drop --weights, "
                             "--int8-activations and --ort-graph, or the MX flags")
        from qeff.compilers.ort_fused_artifact import check_cpu_options
        from qeff.intake.loading import resolve

        model = inv.model
        check_cpu_options(resolve(model.model_name, revision=model.revision, cache_dir=model.cache_dir),
                          graph=o.ort_graph, weights=o.weights, int8_activations=o.int8_activations)


def target(inv: Invocation, backend: str, options: dict):
    """The run's :class:`qeff.cpu_graph.CompileTarget`: which graph :meth:`Pipeline.compile` builds."""
    from qeff.cpu_graph import CompileTarget

    o, ort = inv.compile, backend == "ort"
    return CompileTarget(backend, graph=o.ort_graph, weights=o.weights, int8_activations=o.int8_activations,
                         mxfp6=ort and o.mxfp6, mxint8=ort and o.mxint8, options=options,
                         comp_ctx_lengths=inv.serving.comp_ctx_lengths if inv.serving else None)


def compile_graph(pipe, backend: str, inv: Invocation, options: dict, *, onnx_path: Path | None = None, force: bool = False,
                  variant=None, out: Out | None = None):
    """Compile the exported graph (or its serving ``variant``): :meth:`Pipeline.compile` decides
    which graph from the run's target (the fused CPU graph, the emulated tier of --mxfp6/--mxint8
    on ort, or the portable graph). ``onnx_path`` (``qeff compile --onnx_path``, no pipeline): that
    graph as given, or its emulated tier."""
    import qeff

    o = inv.compile
    if backend == "ort" and (o.mxfp6 or o.mxint8):
        check_no_emulated_serving(inv, variant)
    if onnx_path is None:
        return pipe.compile(target(inv, backend, options), force=force, variant=variant, say=out.say if out else print)
    if backend == "ort" and (o.mxfp6 or o.mxint8):
        from qeff.precision.commands import emulated_graph

        onnx_path = emulated_graph(onnx_path, mxfp6=o.mxfp6, mxint8=o.mxint8, force=force)
    return qeff.compile(onnx_path, backend, force=force, progress=True, **options)


def check_no_emulated_serving(inv: Invocation, variant) -> None:
    """On ort, --mxfp6/--mxint8 emulate the formats on the base graph (qeff.precision); the
    serving graph variants are not emulated."""
    emulated = inv.compile.mxfp6 or inv.compile.mxint8
    if emulated and variant is not None and not variant.is_base:
        raise UsageError(
            "--mxfp6/--mxint8 on the ort backend emulate the accelerator formats on the base graph only; "
            "drop them, or --full_batch_size / the draft model"
        )


def is_fused(built) -> bool:
    from qeff.store.layout import ORT_FUSED

    return (built.manifest.get("outputs") or {}).get("model") == ORT_FUSED


def open_draft(inv: Invocation, serving, out: Out, backend: str, session_options: dict):
    """The draft of speculative decoding: its base graph, compiled with the target's shapes."""
    from qeff.pipeline import Pipeline

    force = inv.model.force
    pipe = Pipeline.open(serving.draft_model_name, cache_dir=inv.model.cache_dir, home=inv.home)
    reuse_note(out, "draft export", pipe.export(force=force))
    built = pipe.compile(backend, force=force, **compile_options(inv, backend, out))
    reuse_note(out, f"draft {backend} artifact", built)
    return pipe.open_session(built, **session_options)[0]

