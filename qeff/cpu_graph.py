"""Which graph a pipeline compiles, and the check that lets the fused CPU graph in.

:class:`CompileTarget` is the one record of that choice — backend, ONNX Runtime graph
(``portable``/``fused``/``auto``), fused weights (fp32/native/int8/int4, int8 activations) and the
emulated precision tier (``--mxfp6``/``--mxint8`` on ort). ``qeff infer``/``compile``, the Python
API and the pytest plugin all hand one to :meth:`qeff.pipeline.Pipeline.compile`, so the same
target gives the same artifact whoever asks (tests/test_graph_policy.py).

For ``auto``/``fused`` on ort, :func:`build_fused` builds the fused graph
(:mod:`qeff.compilers.ort_fused`) when the architecture is covered, else returns None — the caller
then compiles the portable graph (``auto`` says why in one line; ``fused`` insists and refuses).
The fused graph is then checked by its own pipeline stage, :func:`check_fused`: the new graph and
the portable graph of the same export, teacher-forced side by side over the portable graph's greedy
tokens on seeded prompts (one spans two prefill chunks), compared with the project's fp32
tolerances. Its result is an artifact of its own nested in the fused graph's directory
(``check-<hash>/manifest.json``), so a reuse knows the graph was checked. With fp32 or native
weights a difference fails the stage and the fused graph is deleted (qeff built it; it is never
served); with re-quantized weights (int8/int4, or int8 activations) it is measured and reported.
This check compares qeff with itself: it is the build's guard, not a verdict — the conformance
suite judges the fused graph against the untouched HF model (``--qeff-graph``, docs/plugin.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qeff.errors import UsageError, VerificationError
from qeff.serving.ctx_ladder import OFF_WORDS, parse_ladder

__all__ = ["CompileTarget", "GRAPHS", "build_fused", "check_fused", "compile_cpu", "check_against_portable", "CHECK_TOLERANCES",
           "CHECK_STEPS", "weights_files", "check_unfit_reason"]

#: The ONNX Runtime graphs a target may ask for (``auto``: fused where it covers the model).
GRAPHS = ("auto", "fused", "portable")
#: Greedy steps of the fused graph's check against the portable graph.
CHECK_STEPS = 16


@dataclass
class CompileTarget:
    """What an export is compiled into: the one record :meth:`qeff.pipeline.Pipeline.compile`
    decides the graph from, so that the CLI, the Python API and the plugin get the same artifact
    for the same target.

    ``graph``, ``weights`` and ``int8_activations`` choose the ONNX Runtime graph (the fused one's
    weights); ``mxfp6``/``mxint8`` on ort compile the emulated precision tier of the portable graph
    (:mod:`qeff.precision`; on qaic they are compile options and belong in ``options``).
    ``options`` are :func:`qeff.compile`'s: the shape (``batch_size``, ``prompt_len``, ``ctx_len``),
    ``threads``, Cloud AI's options, the serving variant's sizes."""

    backend: str = "ort"
    graph: str = "auto"
    weights: str = "fp32"
    int8_activations: bool = False
    mxfp6: bool = False
    mxint8: bool = False
    options: dict = field(default_factory=dict)
    #: The compute-context ladder of the portable graph (``--comp_ctx_lengths``; qeff.serving.ctx_ladder),
    #: as the user gave it: None = the default (on ort the default ladder when it has more than one
    #: rung; none on qaic unless lengths are listed), an off word = none, else lengths.
    comp_ctx_lengths: str | tuple[int, ...] | None = None

    @property
    def ladder_asked(self) -> bool:
        """Lengths listed by the user: on ort with graph ``auto`` they pick the portable graph."""
        c = self.comp_ctx_lengths
        return c is not None and not (isinstance(c, str) and c.strip().lower() in OFF_WORDS)

    def ladder(self) -> tuple[int, ...] | None:
        """The ladder the portable graph is built with, or None for the plain graph (an off word, a
        default ladder of one rung, an emulated tier, or qaic without listed lengths)."""
        if self.emulated or (self.comp_ctx_lengths is None and self.backend != "ort"):
            return None
        ladder = parse_ladder(self.comp_ctx_lengths, self.shape()[2])
        return ladder if ladder and (self.ladder_asked or len(ladder) > 1) else None

    @property
    def tries_fused(self) -> bool:
        """Whether :meth:`qeff.pipeline.Pipeline.compile` tries the fused CPU graph for the base
        graph: ort, not an emulated tier, and ``fused`` — or ``auto`` without listed ladder lengths
        (those keep the portable graph). The memory preflight asks the same question."""
        return (self.backend == "ort" and not self.emulated and self.graph != "portable"
                and not (self.graph == "auto" and self.ladder_asked))

    @property
    def emulated(self) -> bool:
        """The emulated precision tier of the portable graph (ort with --mxfp6/--mxint8)."""
        return self.backend == "ort" and (self.mxfp6 or self.mxint8)

    @property
    def exact(self) -> bool:
        """Whether the fused graph keeps the weights' values (fp32, a GGUF's own blocks): then its
        check against the portable graph gates; re-quantized weights are measured, not gated."""
        return self.weights in ("fp32", "native") and not self.int8_activations

    def shape(self) -> tuple[int, int, int]:
        """``(batch_size, prompt_len, ctx_len)``, with :func:`qeff.compile`'s defaults."""
        o = self.options
        return int(o.get("batch_size", 1)), int(o.get("prompt_len", 32)), int(o.get("ctx_len", 128))


#: fp32 / native fused vs portable graph: the same weights, different kernels and summation order —
#: the project's default fp32 tolerances (``qeff.verification.Tolerances``).
CHECK_TOLERANCES = {"logits_max_abs": 1e-3, "logits_mse": 1e-8, "cache_max_abs": 1e-3, "cache_mse": 1e-9, "ambiguity_margin": 1e-3}


def _check_prompts(batch_size: int, prompt_len: int, ctx_len: int, vocab: int, steps: int) -> list[list[int]]:
    """Seeded prompts of varied lengths: one spans two prefill chunks when ctx_len allows."""
    rng = np.random.default_rng(1234)
    room = ctx_len - steps
    lengths = [max(1, min(room, n)) for n in (prompt_len + 3, 5, prompt_len, 2)]
    return [rng.integers(1, vocab, lengths[r % len(lengths)]).tolist() for r in range(batch_size)]


def check_against_portable(fused_session, portable_onnx: Path, *, prompt_len: int, steps: int = 16, gate: bool = True) -> dict:
    """Teacher-force ``fused_session`` and the portable graph over the portable graph's greedy
    tokens; the comparison as a dict (:class:`VerificationError` if ``gate`` and it fails)."""
    from qeff.generation import generate
    from qeff.runtime.ort import OrtSession
    from qeff.verification import Tolerances, compare, session_trace

    batch, ctx_len = fused_session.batch_size, fused_session.ctx_len
    steps = max(1, min(steps, ctx_len // 2))
    prompts = _check_prompts(batch, prompt_len, ctx_len, fused_session.vocab_size, steps)
    portable = OrtSession(portable_onnx, batch_size=batch, ctx_len=ctx_len, prompt_len=prompt_len)
    greedy = generate(portable, prompt_token_ids=prompts, prompt_len=prompt_len, generation_len=steps, ignore_eos=True)
    ref = session_trace(portable, "portable", prompts, greedy.token_ids, prompt_len)
    portable.close()
    cand = session_trace(fused_session, "fused", prompts, greedy.token_ids, prompt_len)
    result = compare(ref, cand, Tolerances(**CHECK_TOLERANCES))
    report = {
        "reference": "portable ONNX graph", "candidate": "fused ONNX graph", "steps": steps, "rows": batch,
        "logits_mse": result.logits_mse, "logits_max_abs": result.logits_max_abs,
        "cache_max_abs": result.cache_max_abs, "tokens_matched": result.tokens_matched,
        "tokens_total": result.tokens_total,
        # The precision metrics (qeff.metrics) of the fused graph's distribution against the portable one's.
        "kld_mean": result.kld_mean, "kld_max": result.kld_max, "top1_agree": result.top1_agree,
        "top5_overlap": result.top5_overlap,
        "passed": result.passed, "gated": gate, "failures": result.failures,
        "tolerances": CHECK_TOLERANCES,
    }
    if gate and not result.passed:
        raise VerificationError(f"the fused graph differs from the portable graph: {'; '.join(result.failures)}", report)
    return report


def build_fused(pipe, target: CompileTarget, *, force: bool = False, say: Callable[[str], None] = print):
    """The fused artifact for ``pipe`` (a :class:`qeff.pipeline.Pipeline`) when ``target`` allows
    it and the architecture is covered; None for the portable graph. Not checked yet:
    :func:`check_fused` is the stage that does (:meth:`qeff.pipeline.Pipeline.compile` runs both)."""
    from types import SimpleNamespace

    from qeff.backends import BACKENDS, Shape
    from qeff.backends.ort_fused import FusedOptions
    from qeff.compilers.ort_fused import unsupported_reason
    from qeff.compilers.ort_fused_artifact import check_cpu_options

    graph, weights = target.graph, target.weights
    check_cpu_options(pipe.source, graph=graph, weights=weights, int8_activations=target.int8_activations)
    if graph == "portable":
        return None
    config = (pipe.export_built.manifest.get("outputs") or {}).get("config") or {}
    reason = unsupported_reason(SimpleNamespace(**config)) if config else "the export recorded no model config"
    if reason:
        if graph == "fused" or weights != "fp32":
            raise UsageError(f"the fused ONNX Runtime graph cannot run this model: {reason}")
        say(f"[qeff] {reason}: running the portable ONNX graph")
        return None
    batch_size, prompt_len, ctx_len = target.shape()
    source = pipe.source
    gguf = source.path if source is not None and source.kind == "gguf" else None
    files = weights_files(pipe, weights)
    unchecked = check_unfit_reason(pipe, config, weights=weights, from_files=files is not None, batch_size=batch_size,
                                   ctx_len=ctx_len)
    options = FusedOptions(weights=weights, load_model=lambda: pipe.model, gguf_path=gguf, weights_dir=files,
                           int8_activations=target.int8_activations, threads=target.options.get("threads"),
                           checked=not unchecked, unchecked=unchecked)
    return BACKENDS[("ort", "fused")].compile(pipe.onnx_path, Shape(batch_size, prompt_len, ctx_len), options, force=force,
                                               progress=pipe.progress)


def check_fused(pipe, built, target: CompileTarget, *, force: bool = False, say: Callable[[str], None] = print) -> dict:
    """The fused graph ``built`` against the portable graph of ``pipe``'s export (a stage of its
    own, cached beside the graph): the comparison as a dict, ``{"ran": False, "reason": …}`` when
    the build found it could not fit. Gated (``target.exact``) and failed: the fused graph is
    deleted and :class:`VerificationError` raised, so it is never served."""
    from qeff.store.artifacts import build_artifact, discard, manifest_hash
    from qeff.store.layout import ORT_FUSED, check_dir_name
    from qeff.meter import measured
    from qeff.progress import stage
    from qeff.runtime.ort_fused import FusedOrtSession

    recorded = (built.manifest.get("outputs") or {}).get("check")
    cached = built.reused
    if isinstance(recorded, dict):  # the build's record: a check that could not fit (or one run inside an older build)
        result = recorded
    else:
        batch_size, prompt_len, ctx_len = target.shape()
        gate = target.exact
        manifest = {"stage": "fused-check", "graph": built.manifest.get("inputs"), "reference": "portable ONNX graph",
                    "export": pipe.export_built.manifest.get("inputs"), "steps": CHECK_STEPS, "gate": gate,
                    "tolerances": CHECK_TOLERANCES}

        def build(tmp: Path) -> dict:
            with measured("fused-check"), stage("Checking the fused graph against the portable graph", enabled=pipe.progress):
                session = FusedOrtSession(built.path / ORT_FUSED, batch_size=batch_size, ctx_len=ctx_len,
                                          prompt_len=prompt_len, threads=target.options.get("threads"))
                try:
                    return {"check": check_against_portable(session, pipe.onnx_path, prompt_len=prompt_len,
                                                            steps=CHECK_STEPS, gate=gate)}
                finally:
                    session.close()

        try:
            checked = build_artifact(built.path / check_dir_name(manifest_hash(manifest)), manifest, build, force=force)
        except VerificationError:
            discard(built)  # qeff built this graph; one that fails its check is never kept (under its builders' lock)
            raise
        result, cached = checked.manifest["outputs"]["check"], checked.reused
    if result.get("ran") is False:
        # Not silent: one line on stderr whatever --json says (the JSON line carries it too).
        print(f"[qeff] the fused graph was not checked against the portable graph: {result['reason']}"
              + (" (cached)" if cached else ""), file=sys.stderr, flush=True)
    else:
        say(f"[qeff] fused graph vs portable graph: logits max-abs {result['logits_max_abs']:.2e}, MSE {result['logits_mse']:.2e}, "
            f"KL mean {result.get('kld_mean', 0.0):.2e}, top-1 {result.get('top1_agree', 1.0):.0%}, "
            f"tokens {result['tokens_matched']}/{result['tokens_total']}"
            + ("" if result["gated"] else " (weights re-quantized: reported, not gated)") + (" (cached)" if cached else ""))
    return result


def compile_cpu(pipe, *, graph: str = "auto", weights: str = "fp32", int8_activations: bool = False,
                batch_size: int, prompt_len: int, ctx_len: int, threads: int | None = None,
                force: bool = False, say: Callable[[str], None] = print):
    """The checked fused artifact for ``pipe`` when ``graph`` allows it and the architecture is
    covered; None for the portable graph (:func:`build_fused`, then :func:`check_fused`)."""
    target = CompileTarget("ort", graph=graph, weights=weights, int8_activations=int8_activations,
                           options={"batch_size": batch_size, "prompt_len": prompt_len, "ctx_len": ctx_len, "threads": threads})
    built = build_fused(pipe, target, force=force, say=say)
    if built is not None:
        check_fused(pipe, built, target, force=force, say=say)
    return built


def weights_files(pipe, weights: str) -> Path | None:
    """The safetensors directory the fused graph is built from without loading the model
    (:func:`qeff.compilers.ort_fused_weights.from_safetensors`: the same bytes as from the loaded
    model), or None: a GGUF's native blocks, a model this process holds already (loaded for the
    verification, or handed over as an object), a source that is not a safetensors checkpoint on
    this machine (a local directory or a cached hub snapshot: :attr:`Pipeline.files_dir`), or files
    whose names/dtypes it does not read — those build from the model."""
    from qeff.weights import safetensors_dir

    if weights == "native" or pipe._model is not None or pipe.source is None:
        return None
    directory = pipe.files_dir
    if directory is None or not safetensors_dir(directory):
        return None
    from qeff.compilers.ort_fused_weights import streamable_reason

    return None if streamable_reason(directory) else directory


def check_unfit_reason(pipe, config: dict, *, weights: str, from_files: bool, batch_size: int, ctx_len: int) -> str | None:
    """Why the build's check (a portable fp32 session beside the fused one) will not run, or None
    when it fits the memory available (:func:`qeff.memory.fused_check_fits`, the preflight's own
    arithmetic). ``QEFF_SKIP_MEMORY_CHECK``/``--skip-memory-check`` runs it regardless."""
    from qeff import memory, validation
    from qeff.store.atomic import human_bytes

    if memory.skip_requested():
        return None
    weight_bytes = 4 * pipe.num_parameters
    if weight_bytes <= 0:
        return None
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or 0) // heads)
    table = int(config.get("vocab_size") or 0) * int(config.get("hidden_size") or 0) * 4
    kv = 2 * layers * batch_size * kv_heads * ctx_len * head_dim * 4
    sizes = memory.Sizes(weight_bytes, table, kv, tied=bool(config.get("tie_word_embeddings", False)))
    mode = memory.Mode(command="infer", verify=pipe._model is not None, graph="fused", weights=weights,
                       batch_size=batch_size, ctx_len=ctx_len, streamed=from_files)
    available = validation.available_memory()
    if memory.fused_check_fits(sizes, mode, available):
        return None
    need = memory.fused_check(sizes, mode)
    return (f"its portable float32 session beside the fused one would need about {human_bytes(need)}, "
            f"{human_bytes(available)} is available")
