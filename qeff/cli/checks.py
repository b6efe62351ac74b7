"""The checks of a command line that look at the model and the cache (after :func:`qeff.cli.options.resolve`
checked the arguments): what killed runs of the model left behind is reclaimed, and each stage's peak
memory is estimated from the weight files' headers, so that a run that cannot fit is refused now,
in one sentence (docs/memory.md).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from qeff.cli.building import target
from qeff.cli.options import Invocation
from qeff.errors import ArtifactError, QEffError

__all__ = ["MODEL_COMMANDS", "check_model", "check_memory", "resolve_backend", "home_of"]

#: The subcommands that load (or export) a model: their runs are preflighted.
MODEL_COMMANDS = ("infer", "export", "compile", "verify")


def home_of(inv: Invocation):
    """``--home``, else $QEFF_HOME or ./qeff_models."""
    from qeff.store.layout import qeff_home

    return inv.home or qeff_home()


def resolve_backend(name: str) -> str:
    """``auto`` is qaic when the Cloud AI SDK is installed (compiler and runtime), else ort."""
    if name != "auto":
        return name
    from qeff import sdk

    return "qaic" if sdk.status().available else "ort"


def check_model(inv: Invocation) -> None:
    """The cache's leftovers of this model reclaimed, then the memory preflight (not for
    ``qeff compile --onnx_path``: no model is loaded)."""
    if inv.command not in MODEL_COMMANDS or not inv.model.model_name:
        return
    _reclaim(inv)
    if not (inv.compile and inv.compile.onnx_path):
        check_memory(inv)


def _reclaim(inv: Invocation) -> None:
    """Free what killed runs of this model left in the cache, before this run is even checked:
    a run the memory preflight refuses must not leave a killed one's 12 GB behind (issue 18)."""
    from qeff.store.atomic import human_bytes
    from qeff.store.doctor import reclaim
    from qeff.store.layout import slug

    done = reclaim(home_of(inv) / slug(inv.model.model_name))
    if done.removed:
        print(f"[qeff] reclaimed {human_bytes(done.freed)} that killed runs left: "
              + ", ".join(str(x.path) for x in done.removed), file=sys.stderr, flush=True)


def check_memory(inv: Invocation) -> None:
    """Each stage's peak estimated from the weight files' headers and the mode (:mod:`qeff.memory`);
    a run with a stage that cannot fit is refused now, in one sentence, not killed by the kernel
    mid-export (issue 18: a 3B model's export was, at 23.4 GB, after 6 minutes). Sets the
    invocation's estimates and, when the preflight priced a verification, its mode."""
    from qeff import memory, validation
    from qeff.intake.loading import resolve
    from qeff.intake.preflight import model_shape

    model, serving = inv.model, inv.serving
    cache_dir = model.cache_dir
    source = resolve(model.model_name, revision=model.revision, cache_dir=cache_dir)
    shape = model_shape(source, cache_dir=cache_dir)
    if serving is not None and serving.draft_model_name:
        from qeff.intake.preflight import check_draft

        check_draft(resolve(serving.draft_model_name, cache_dir=cache_dir), cache_dir=cache_dir)
    if shape is None:
        return
    rows = (serving.full_batch_size if serving else None) or (inv.shape.batch_size if inv.shape else 1)
    ctx_len = inv.shape.ctx_len if inv.shape else 1
    if memory.skip_requested(model.skip_memory_check):
        return
    available = validation.available_memory()
    if inv.shape is not None:
        # The KV cache alone, with its own arithmetic in the sentence (a typo'd --ctx_len is the
        # common case). The weights are left to the staged estimates below, which say which stage
        # cannot fit them: this sentence would blame --ctx_len for a model too large at any context.
        # The run's buffers too (logits, attention, activations: issue 19's --batch_size 100000).
        verifying = inv.command == "verify" or (inv.command == "infer" and inv.verify.want is not False)
        kv_only = replace(shape, weight_bytes=None) if shape.weight_bytes is not None else shape
        k = (serving.num_speculative_tokens or serving.prompt_lookup) if serving is not None else None
        chunk = max(inv.shape.prompt_len, (k or 0) + 1)  # a speculative target's verify step runs K + 1 tokens
        validation.check_memory(kv_only, batch_size=rows, ctx_len=ctx_len, prompt_len=chunk,
                                copies=2 if verifying else 1, available=available)
    if shape.weight_bytes is None:  # headers that do not say
        return
    mode = _memory_mode(inv, source, shape, rows, ctx_len)
    mode = memory.choose_verification(shape, mode, available=available,
                                      want=memory.streamed_verify_setting(model.verify_layers))
    if mode.verify:
        inv.verify_mode = mode  # the pipeline verifies as the preflight priced it
    if mode.graph == "fused":  # the build's check runs where its two sessions fit (qeff.cpu_graph says so when not)
        mode = replace(mode, fused_check=memory.fused_check_fits(memory.sizes(shape, mode), mode, available))
    estimates = memory.check(shape, mode, available=available, what=f"qeff {inv.command} of {model.model_name}")
    inv.estimates = {e.stage: e.bytes for e in estimates}


def _memory_mode(inv: Invocation, source, shape, rows: int, ctx_len: int):
    """The :class:`qeff.memory.Mode` these options run: which stages, which graph, which weights."""
    from qeff.memory import Mode

    command = inv.command
    if command == "infer":
        verify = inv.verify.want if inv.verify.want is not None else (shape.weight_bytes or 0) // 4 <= _small_model_params()
    else:
        verify = command == "verify"
    graph = "portable"
    options = inv.compile
    if command in ("infer", "compile"):
        backend = resolve_backend(options.backend)
        if backend == "qaic":
            graph = "qaic"
        elif not inv.serving_flags and target(inv, backend, {}).tries_fused and _fused_covers(source):  # Pipeline.compile's rule
            graph = "fused"
    return Mode(command=command, verify=verify, graph=graph, weights=options.weights if options else "fp32", batch_size=rows,
                ctx_len=ctx_len, export_cached=_export_cached(inv, source), streamed=_streamed(inv, source))


def _streamed(inv: Invocation, source) -> bool:
    """Whether the export will be written from the weight files (qeff.pipeline's rule: a
    safetensors directory, local or a hub repo's cached snapshot, and the base graph; the serving
    flags export another graph)."""
    from qeff.intake.loading import files_dir
    from qeff.weights import safetensors_dir

    return not inv.serving_flags and bool(safetensors_dir(files_dir(source, cache_dir=inv.model.cache_dir)))


def _small_model_params() -> int:
    from qeff.pipeline import SMALL_MODEL_PARAMS

    return SMALL_MODEL_PARAMS


def _fused_covers(source) -> bool:
    """Whether ``--ort-graph auto`` will pick the fused graph for this model (from its config)."""
    from types import SimpleNamespace

    from qeff.compilers.ort_fused import unsupported_reason
    from qeff.intake.configs import read_config

    try:
        values = read_config(source).values
    except QEffError:
        return False
    return unsupported_reason(SimpleNamespace(**values)) is None


def _export_cached(inv: Invocation, source) -> bool:
    """Whether the export this run needs is in the cache already (then the export stage, and the
    load when nothing else needs the model, do not run). Manifests only: no file is digested."""
    from qeff.store.artifacts import _canonical, manifest_hash, read_manifest
    from qeff.store.layout import export_dir_name, slug
    from qeff.pipeline import export_manifest

    if inv.model.force:
        return False
    manifest = export_manifest(source.identity())
    target = home_of(inv) / slug(inv.model.model_name) / export_dir_name(manifest_hash(manifest))
    try:
        record = read_manifest(target)
    except ArtifactError:
        return False
    return record is not None and _canonical(record.get("inputs")) == _canonical(manifest)
