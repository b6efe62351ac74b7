"""The one orchestrator: load → reference (untouched HF) → transform → export → verify → compile → session.

``qeff infer/export/compile/verify``, the Python API and the pytest plugin all drive a
:class:`Pipeline`, so they share one export cache, one manifest schema and one reference::

    pipe = Pipeline.open("smollm2-135m")                 # or Pipeline(name, model=..., identity=...)
    pipe.export()                                        # cached: <home>/<slug>/export-<hash>/
    ref = pipe.reference(prompt_ids, steps=16)           # HF eager on the model as loaded
    report = pipe.verify(prompt_ids, prompt_len=32, ctx_len=128, steps=16, session=...)
    built = pipe.compile("ort", batch_size=1, prompt_len=32, ctx_len=128)   # the portable graph
    built = pipe.compile(CompileTarget("ort", graph="auto", options=dict(batch_size=1, prompt_len=32, ctx_len=128)))
                                                         # what `qeff infer` runs: the fused graph where it covers the model
    session = pipe.open_session(built)

Each stage is an artifact directory (:mod:`qeff.store.layout` names them, :mod:`qeff.store.artifacts` builds
and reuses them). The export hash covers what determines the graph: the model's identity (a digest
of its weight files, or the config + seed of a random model), the transforms, the exporter and
library versions. When an export is reused the model itself is not even loaded (its tokenizer is
saved beside the graph); it is loaded only if a stage that needs it has no matching artifact.

The reference is always traced from the model as loaded: :func:`qeff.transforms.transform` works
on a weight-sharing copy and never changes the model it is given (issue 9).

A model larger than memory (a local safetensors directory) is verified layer-streamed
(:mod:`qeff.offload`, :meth:`Pipeline.streams_verification`): the untouched HF model and the
transformed one are built from the weight files with one decoder layer's weights in memory at a
time, and :attr:`Pipeline.model` is never loaded. Asked for with ``verify_layers=True``
(``--verify-layers``, ``QEFF_STREAMED_VERIFY=1``) or chosen by the memory preflight
(:func:`qeff.memory.choose_verification`); the report is the in-memory one's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qeff.store.artifacts import Built, build_artifact, manifest_hash, verify_mode
from qeff.errors import ArtifactError, UsageError
from qeff.store.home import mark
from qeff.store.layout import ONNX_DATA, ONNX_FILE, export_dir_name, qeff_home, slug, verify_dir_name
from qeff.intake import loading
from qeff.intake.loading import ModelSource, resolve
from qeff.meter import measured
from qeff.progress import layer_progress, stage

__all__ = [
    "Pipeline",
    "Reference",
    "Prepared",
    "prepare",
    "verify_cached",
    "export_manifest",
    "SMALL_MODEL_PARAMS",
    "streamed_model",
]

#: Verification runs by default for models up to this many parameters (it runs HF on the CPU).
SMALL_MODEL_PARAMS = 2_000_000_000


@dataclass
class Reference:
    """HF eager's own greedy continuation of each prompt (each alone, batch 1), the logits it chose
    from (``trace``) and the top-2 logit margin of every step (for the ambiguity rule)."""

    tokens: list[list[int]]
    margins: list[list[float]]
    trace: Any  # qeff.verification.Trace


def export_manifest(identity: dict, variant=None) -> dict:
    """The inputs of an export artifact: everything that determines the graph. One schema for
    every caller (CLI, API, plugin). A serving ``variant`` (:class:`qeff.serving.graph.GraphVariant`)
    is recorded only when it is not the base graph, so base exports keep their keys."""
    from qeff._system import OPSET, TRANSFORMS, library_versions  # no torch: a cached run compares manifests only

    manifest = {"stage": "export", "model": identity, "transforms": list(TRANSFORMS), "opset": OPSET,
                "versions": library_versions("export")}  # qeff's code that can shape the export (qeff.code_digest)
    if variant is not None and not variant.is_base:
        manifest["variant"] = variant.to_dict()
    return manifest


class Pipeline:
    """One model's chain of stages. The model, tokenizer and transformed model load lazily, when
    a stage that needs them has no cached artifact.

    ``model`` + ``identity`` (what identifies these weights, e.g. a card's config and seed) run a
    model object; :meth:`open` resolves a name, path or hub id instead.
    """

    def __init__(
        self,
        name: str,
        *,
        source: ModelSource | None = None,
        model=None,
        tokenizer=None,
        identity: dict | None = None,
        home: str | Path | None = None,
        progress: bool = True,
        verify_layers: bool | None = None,
    ):
        if source is None and model is None:
            raise UsageError("a Pipeline needs a model source or a model object")
        if identity is None:
            if source is None:
                raise UsageError("Pipeline(model=...) needs identity=: what identifies these weights (e.g. config + seed)")
            identity = source.identity(home=Path(home) if home else qeff_home(), rehash=verify_mode() == "full")
        self.name = name
        self.source = source
        self.identity = identity
        self.home = Path(home) if home else qeff_home()
        self.progress = progress
        self._model = model
        self._tokenizer = tokenizer
        self._qmodel = None
        self._export: Built | None = None
        self._variant_exports: dict = {}  # GraphVariant -> Built
        self._references: dict[str, Reference] = {}
        self.load_s = 0.0
        self.cache_dir: str | None = None  # the Hugging Face cache the source was resolved in
        #: Layer-streamed verification (qeff.offload): True asks for it, False never, None lets the
        #: memory preflight choose (qeff.memory.choose_verification; QEFF_STREAMED_VERIFY overrides None).
        self.verify_layers = verify_layers
        #: the qeff.memory.Mode the CLI's preflight chose for this run (its verify_layers, ort_layers)
        self.verify_mode = None
        self._offloaded = None  # (hf_model, qmodel) streamed from the weight files
        #: :meth:`check_graph`'s results, by the fused artifact's path
        self.graph_checks: dict[str, dict] = {}

    @classmethod
    def open(cls, name: str, *, revision: str | None = None, cache_dir: str | None = None, **kwargs) -> Pipeline:
        """A pipeline for a model name, path, ``.gguf`` file or hub repo id (nothing is loaded yet)."""
        if not name or not name.strip():
            raise UsageError("no model name given")
        pipe = cls(name, source=resolve(name, revision=revision, cache_dir=cache_dir), **kwargs)
        pipe.cache_dir = cache_dir
        return pipe

    # --- the model ---------------------------------------------------------------------------

    @property
    def model(self):
        """The model as loaded: the untouched reference of every comparison."""
        if self._model is None:
            if self.source is None:
                raise UsageError(f"{self.name}: the model object was not kept and has no source to reload it from")
            start = time.perf_counter()
            with measured("load"):
                where = {"cache_dir": self.cache_dir} if self.cache_dir else {}
                self._model, tokenizer = loading.load_source(self.source, **where)  # looked up at call time (tests patch it)
            self._tokenizer = self._tokenizer or tokenizer
            self.load_s += time.perf_counter() - start
        return self._model

    @property
    def model_loaded(self) -> bool:
        """Whether the model is in memory (given, or loaded by a stage that needed it)."""
        return self._model is not None

    @property
    def qmodel(self):
        """The retained-state wrapper (a weight-sharing copy; :attr:`model` is left as it was)."""
        if self._qmodel is None:
            from qeff.transforms import transform

            model = self.model
            with measured("transform"):
                self._qmodel = transform(model)
        return self._qmodel

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._export is not None and (self._export.path / "tokenizer_config.json").is_file():
                from qeff.intake.tokenizer import open_saved_tokenizer

                self._tokenizer = open_saved_tokenizer(self._export.path)  # the tokenizers library, no transformers
            elif self.source is not None:
                from qeff.intake.loading import load_tokenizer

                self._tokenizer = load_tokenizer(self.source, cache_dir=self.cache_dir)  # seconds, not the model's load
        return self._tokenizer

    # --- export ------------------------------------------------------------------------------

    @property
    def export_built(self) -> Built:
        if self._export is None:
            self.export()
        assert self._export is not None
        return self._export

    @property
    def export_dir(self) -> Path:
        return self.export_built.path

    @property
    def onnx_path(self) -> Path:
        return self.export_dir / ONNX_FILE

    @property
    def num_parameters(self) -> int:
        return int(self.export_built.manifest.get("outputs", {}).get("num_parameters", 0))

    def export(self, *, force: bool = False, validate: Callable[[Any], None] | None = None, variant=None) -> Built:
        """The exported graph, reused while its manifest matches.

        ``validate(tokenizer)`` runs before any slow work (it may raise, e.g. for a prompt that
        cannot fit): before loading the model when the export must be built, right after a reuse
        otherwise. ``variant`` (:class:`qeff.serving.graph.GraphVariant`): a serving graph, cached
        beside the base one; :attr:`export_built` and :attr:`onnx_path` stay the base graph's."""
        serving = variant is not None and not variant.is_base
        done = self._variant_exports.get(variant) if serving else self._export
        if done is not None and not force:
            if validate is not None and self.tokenizer is not None:
                validate(self.tokenizer)
            return done
        manifest = export_manifest(self.identity, variant)
        target = self.home / slug(self.name) / export_dir_name(manifest_hash(manifest))

        def build(tmp: Path) -> dict:
            from qeff.exporter import export

            if self.source is not None and self._model is None:
                from qeff.intake.support import require_supported

                # Refuse an unsupported architecture or a corrupt weights file from the config and
                # the file headers, before the tokenizer and long before the weights load (issue 11).
                # A reused export needs no gate: the same qeff exported these same files before.
                require_supported(self.source, cache_dir=self.cache_dir)
            if validate is not None and self.tokenizer is not None:
                validate(self.tokenizer)
            streamed = None
            if self._streamable(variant):
                with measured("export"):
                    streamed = self._export_streamed(tmp, variant)
            if streamed is None:
                model = self.model  # loads when not given
                qmodel = self.qmodel
                with measured("export"), stage(f"Exporting {self.name} to ONNX", enabled=self.progress), \
                        layer_progress("Export: tracing", qmodel, enabled=self.progress):
                    result = export(qmodel, tmp, model_id=self.name, variant=variant)
            else:
                result, qmodel = streamed
                model = qmodel.model
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            config = model.config
            return {
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "model_type": config.model_type,
                "config": config.to_dict(),
                "weights_digest": qmodel.weights_digest,
                "fp16_clipped_values": result.clipped_values,
                "tied_embedding_bytes": result.tied_embedding_bytes,
                "trace_warnings": list(result.trace_warnings),
                "onnx_bytes": sum(p.stat().st_size for p in tmp.glob(ONNX_FILE + "*")),
            }

        def size_hint() -> int | None:
            """For the message if the disk fills up: the fp32 tensors dominate. The state dict names a
            tied embedding twice, as TorchScript's raw file (the build's peak) holds it; the final
            graph stores it once."""
            if self._model is None:
                if self.source is None or self.files_dir is None:
                    return None
                from qeff.intake.preflight import model_shape

                shape = model_shape(self.source, cache_dir=self.cache_dir)  # the files' headers: their fp32 bytes
                return shape.weight_bytes if shape is not None else None
            return sum(t.numel() * 4 for t in self._model.state_dict().values())

        mark(self.home)  # `qeff doctor` / `qeff clean` look only inside directories qeff marked (issue 19)
        built = build_artifact(target, manifest, build, required=(ONNX_FILE, ONNX_DATA), force=force,
                               size_hint=size_hint)
        if not built.reused and self.progress:
            from qeff.store.doctor import superseded_hint

            hint = superseded_hint(target.parent)  # what an upgrade left behind: never reused, never freed
            if hint:
                print(f"note: {hint}", file=sys.stderr, flush=True)
        if serving:
            self._variant_exports[variant] = built
        else:
            self._export = built
        if built.reused and validate is not None and self.tokenizer is not None:
            validate(self.tokenizer)
        return built

    @property
    def files_dir(self) -> Path | None:
        """The directory of the source's checkpoint files on this machine: a local directory, or a
        hub repo's snapshot in the local Hugging Face cache (:func:`qeff.intake.loading.files_dir`); None
        for a GGUF file, a model object or a hub repo that is not cached."""
        if self.source is None:
            return None
        return loading.files_dir(self.source, cache_dir=self.cache_dir)

    def _streamable(self, variant) -> bool:
        """Export from the weight files, never holding the model (issue 18)? For a directory of
        safetensors (local, or a hub repo's cached snapshot) whose model is not loaded yet, and the
        base graph: its files are byte for byte the in-memory export's
        (tests/test_streamed_export.py), so it is always taken there."""
        from qeff.weights import safetensors_dir

        return (self._model is None and (variant is None or variant.is_base)
                and safetensors_dir(self.files_dir))

    def _export_streamed(self, tmp: Path, variant):
        """``(ExportResult, skeleton qmodel)``, or None when the streamed export cannot write this
        model (then it is exported in memory, as before)."""
        from qeff.errors import NotStreamableError
        from qeff.exporter import export

        try:
            with stage(f"Exporting {self.name} to ONNX from its weight files", enabled=self.progress):
                qmodel, weights, placeholders = streamed_model(self.files_dir)
                return export(qmodel, tmp, model_id=self.name, variant=variant, weights=weights,
                              placeholders=placeholders), qmodel
        except NotStreamableError as exc:
            if self.progress:
                print(f"note: exporting {self.name} in memory: {exc}", file=sys.stderr, flush=True)
            for leftover in tmp.iterdir():
                if leftover.is_file():
                    leftover.unlink()
            return None

    # --- reference and verification ----------------------------------------------------------

    def reference(self, prompt_token_ids: Sequence[Sequence[int]], steps: int) -> Reference:
        """HF eager's trace of these prompts (memoized: HF eager is the slow part of verification)."""
        from qeff.verification import hf_trace, top2_margin

        key = repr(([list(map(int, p)) for p in prompt_token_ids], steps))
        if key not in self._references:
            model = self.offloaded[0] if self.streams_verification() else self.model
            with measured("reference"), layer_progress("Verify: HF reference", model, passes=len(prompt_token_ids) * steps,
                                                       enabled=self.progress):
                trace, tokens = hf_trace(model, prompt_token_ids, steps)
            margins = [[top2_margin(step) for step in row] for row in trace.logits]
            self._references[key] = Reference(tokens, margins, trace)
        return self._references[key]

    def verify(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        *,
        prompt_len: int,
        ctx_len: int,
        steps: int,
        tolerances=None,
        session=None,
        check_tables: bool = True,
    ):
        """HF eager (this pipeline's untouched model) vs the transformed model, and vs ``session``
        when given: a :class:`qeff.verification.VerifyReport`. Layer-streamed, the shared tables
        are checked untouched afterwards (:meth:`_check_tables`; ``check_tables=False``: the caller
        does it once it has run more on them)."""
        from qeff.verification import verify

        ref = self.reference(prompt_token_ids, steps)
        streamed = self.streams_verification()
        hf, qmodel = self.offloaded if streamed else (self.model, self.qmodel)
        report = verify(
            hf, qmodel=qmodel, session=session, prompt_token_ids=prompt_token_ids, prompt_len=prompt_len,
            ctx_len=ctx_len, steps=steps, tolerances=tolerances, reference=(ref.trace, ref.tokens),
        )
        if streamed and check_tables:
            self._check_tables()
        return report

    def verify_cached(
        self,
        prompt_token_ids: list[list[int]],
        *,
        prompt_len: int,
        ctx_len: int,
        steps: int,
        tolerances=None,
        force: bool = False,
    ):
        """HF vs transformed PyTorch vs ONNX Runtime on these prompts, cached beside the export:
        ``(Built, VerifyReport)``."""
        from qeff._system import library_versions
        from qeff.runtime.ort import OrtSession
        from qeff.verification import Tolerances, VerifyReport

        tol = tolerances or Tolerances()
        manifest = {
            "stage": "verify",
            "versions": library_versions("verify"),  # the verification's own code: the export's key no longer covers it
            "export": self.export_built.manifest.get("inputs"),
            "prompt_token_ids": prompt_token_ids,
            "prompt_len": prompt_len,
            "ctx_len": ctx_len,
            "steps": steps,
            "tolerances": asdict(tol),
        }

        def build(tmp: Path) -> dict:
            streamed = self.streams_verification()
            qmodel = self.offloaded[1] if streamed else self.qmodel  # loading has its own progress bars
            self.reference(prompt_token_ids, steps)  # a stage of its own: HF eager is most of verification's time
            longest = max(len(p) for p in prompt_token_ids)
            passes = -(-longest // prompt_len) + steps - 1  # prefill chunks, then one pass per fed token
            per_layer = streamed and self._verification_mode().ort_layers
            how = "" if not streamed else " (layer-streamed; ONNX Runtime per layer)" if per_layer else " (layer-streamed)"
            with measured("verify"), stage(f"Verifying HF vs PyTorch vs ONNX Runtime{how}", enabled=self.progress), \
                    layer_progress("Verify: transformed PyTorch", qmodel, passes=passes * (2 if per_layer else 1),
                                   enabled=self.progress):
                if per_layer:
                    report = self.verify_per_layer(prompt_token_ids, prompt_len=prompt_len, ctx_len=ctx_len, steps=steps,
                                                    tolerances=tol)
                else:
                    session = OrtSession(self.onnx_path, batch_size=len(prompt_token_ids), ctx_len=ctx_len)
                    report = self.verify(prompt_token_ids, prompt_len=prompt_len, ctx_len=ctx_len, steps=steps,
                                         tolerances=tol, session=session)
            if streamed:
                self._offloaded = None  # their tables are freed before a later stage loads what it needs
            return {"report": report.to_dict(), "ort_check": "per-layer" if per_layer else "whole-graph"}

        target = self.export_dir / verify_dir_name(manifest_hash(manifest))
        built = build_artifact(target, manifest, build, force=force)
        # Either check passes on a sound graph, but they are not the same proof: a report whose
        # ONNX Runtime comparison ran per layer (on PyTorch's inputs) is not reused by a run whose
        # whole-graph session fits; the stronger check runs and replaces it.
        cached = built.manifest.get("outputs", {}).get("ort_check")
        if built.reused and cached == "per-layer" and not self._verification_mode().ort_layers:
            built = build_artifact(target, manifest, build, force=True)
        return built, VerifyReport.from_dict(built.manifest["outputs"]["report"])

    def verify_per_layer(self, prompt_token_ids, *, prompt_len: int, ctx_len: int, steps: int, tolerances=None):
        """HF vs transformed PyTorch (layer-streamed when verification streams), then PyTorch vs
        ONNX Runtime one decoder layer's sub-graph at a time (:func:`qeff.layer_check.check_layers`):
        for a graph whose whole ONNX Runtime session does not fit in memory. The same
        :class:`qeff.verification.VerifyReport` as :meth:`verify` with a session."""
        from qeff.layer_check import check_layers

        report = self.verify(prompt_token_ids, prompt_len=prompt_len, ctx_len=ctx_len, steps=steps, tolerances=tolerances,
                             check_tables=False)
        ref = self.reference(prompt_token_ids, steps)
        streamed = self.streams_verification()
        qmodel = self.offloaded[1] if streamed else self.qmodel
        report.comparisons.append(check_layers(
            self.onnx_path, qmodel, report.prompt_token_ids, ref.tokens, prompt_len=prompt_len,
            ctx_len=ctx_len, batch_size=len(prompt_token_ids), tolerances=tolerances, progress=self.progress))
        if streamed:  # ONNX Runtime computed on the shared tables too (qeff.layer_check: resident tensors)
            self._check_tables()
        return report

    # --- layer-streamed verification (issue 18) -----------------------------------------------

    def _can_stream_verification(self) -> bool:
        """A directory of safetensors (local, or a cached hub snapshot) whose model is not loaded (a loaded one is verified as it is)."""
        return self._streamable(None)

    def _verification_mode(self):
        """The :class:`qeff.memory.Mode` verification runs in: the CLI's preflight's choice when it
        made one, else :func:`qeff.memory.choose_verification` from the weight files' headers."""
        if self.verify_mode is None:
            from qeff import memory
            from qeff.intake.preflight import model_shape
            from qeff.validation import available_memory

            streamable = self._can_stream_verification()
            want = memory.streamed_verify_setting(self.verify_layers) if self.verify_layers is not False else False
            mode = memory.Mode(command="verify", verify=True, graph="portable", streamed=streamable)
            shape = model_shape(self.source, cache_dir=self.cache_dir) if streamable else None
            if shape is not None:
                mode = memory.choose_verification(shape, mode, available=available_memory(), want=want)
            self.verify_mode = mode
            if want and not streamable and self.progress:
                print(f"note: {self.name} is verified in memory: only a directory of safetensors (local, or a cached hub snapshot) streams its layers",
                      file=sys.stderr, flush=True)
        return self.verify_mode

    def streams_verification(self) -> bool:
        """Whether :meth:`reference`, :meth:`verify` and :meth:`verify_cached` run the layer-streamed
        models (:mod:`qeff.offload`) instead of :attr:`model` and :attr:`qmodel`."""
        if not (self._verification_mode().verify_layers and (self._offloaded is not None or self._can_stream_verification())):
            return False
        if self._offloaded is None:
            from dataclasses import replace

            from qeff.errors import NotStreamableError

            try:
                _ = self.offloaded
            except NotStreamableError as exc:  # names transformers converts on load: the in-memory path
                if self.progress:
                    print(f"note: verifying {self.name} in memory: {exc}", file=sys.stderr, flush=True)
                self.verify_mode = replace(self.verify_mode, verify_layers=False, ort_layers=False)
                return False
        return True

    def _check_tables(self) -> None:
        """The layer-streamed reference and candidate share the tensors outside their layers
        (:class:`qeff.offload.SharedTables`): raise :class:`~qeff.errors.WeightsChangedError` if
        anything wrote into them since they were read, so no verdict rests on a changed reference."""
        if self._offloaded is not None and self._offloaded[0].offload.tables is not None:
            self._offloaded[0].offload.tables.check()

    @property
    def offloaded(self):
        """``(hf_model, qmodel)`` built from the weight files with one decoder layer's weights in
        memory at a time; :attr:`model` is never loaded for them."""
        if self._offloaded is None:
            from qeff.offload import offloaded_pair

            with stage(f"Building {self.name}'s layer-streamed models from its weight files", enabled=self.progress):
                self._offloaded = offloaded_pair(self.files_dir, resident=self._verification_mode().resident)
        return self._offloaded

    # --- compile and run ---------------------------------------------------------------------

    def compile(self, target, *, force: bool = False, progress: bool | None = None, variant=None, check: bool = True,
                say: Callable[[str], None] = print, **options) -> Built:
        """The exported graph (or its serving ``variant``) compiled for ``target``, reused while its
        manifest matches: the one place that decides which graph runs.

        ``target`` is a :class:`qeff.cpu_graph.CompileTarget` (what ``qeff infer``/``compile`` and
        the pytest plugin pass): on ort, the emulated precision tier for ``mxfp6``/``mxint8``, else
        the fused CPU graph where ``graph`` allows it and covers the model (and no serving variant
        is asked for), checked against the portable graph by :meth:`check_graph` unless ``check``
        is False; otherwise the portable graph, with the target's compute-context ladder
        (:meth:`~qeff.cpu_graph.CompileTarget.ladder`: by default on ort when ``ctx_len`` > 256;
        lengths listed with graph ``auto`` pick the portable graph). A backend name with
        ``qeff.compile``'s ``options`` compiles the plain portable graph, as it always did."""
        from qeff.backends import compile as compile_graph
        from qeff.cpu_graph import CompileTarget, build_fused

        if isinstance(target, str):  # the plain portable graph, as this form always gave
            target = CompileTarget(target, graph="portable", options=options, comp_ctx_lengths="off")
        elif options:
            raise UsageError(f"Pipeline.compile(target): put {', '.join(sorted(options))} in the target's options")
        progress = self.progress if progress is None else progress
        serving = variant is not None and not variant.is_base
        if target.emulated:
            if serving:
                raise UsageError("--mxfp6/--mxint8 on the ort backend emulate the accelerator formats on the base graph only")
            from qeff.precision.commands import emulated_graph

            onnx_path = emulated_graph(self.onnx_path, mxfp6=target.mxfp6, mxint8=target.mxint8, force=force)
            return compile_graph(onnx_path, "ort", force=force, progress=progress, **target.options)
        if not serving and target.tries_fused:
            fused = build_fused(self, target, force=force, say=say)
            if fused is not None:
                if check:
                    self.check_graph(fused, target, force=force, say=say)
                return fused
        elif target.backend == "ort":
            from qeff.compilers.ort_fused_artifact import check_cpu_options

            check_cpu_options(self.source, graph=target.graph, weights=target.weights,
                              int8_activations=target.int8_activations)
        options, ladder = dict(target.options), target.ladder()
        if ladder:  # the portable graph with the compute-context input (qeff.serving.ctx_ladder)
            from dataclasses import replace

            from qeff.serving.variant import GraphVariant

            variant, serving = replace(variant or GraphVariant(), comp_ctx=True), True
            if target.backend == "qaic":  # one specialization per length; ONNX Runtime takes the ladder when a session opens
                options["comp_ctx_lengths"] = list(ladder)
        onnx_path = self.onnx_path if not serving else self.export(variant=variant).path / ONNX_FILE
        return compile_graph(onnx_path, target.backend, force=force, progress=progress, **options)

    def check_graph(self, built: Built, target, *, force: bool = False, say: Callable[[str], None] = print) -> dict | None:
        """The stage after a fused build: the fused graph against the portable graph of this export
        (:func:`qeff.cpu_graph.check_fused`; cached beside the graph). Its result is kept in
        :attr:`graph_checks` by artifact path; None for an artifact that is not the fused graph."""
        from qeff.store.layout import ORT_FUSED

        if (built.manifest.get("outputs") or {}).get("model") != ORT_FUSED:
            return None
        from qeff.cpu_graph import check_fused

        result = check_fused(self, built, target, force=force, say=say)
        self.graph_checks[str(built.path)] = result
        return result

    def open_session(
        self,
        built: Built,
        *,
        rebuild: Callable[[], Built] | None = None,
        **options,
    ):
        """A fresh session on a compiled artifact. A cached artifact that cannot be opened is
        deleted and rebuilt once with ``rebuild`` (when given); returns ``(session, rebuilt)``."""
        import shutil

        from qeff.backends import open_session

        try:
            return open_session(built.path, **options), False
        except ArtifactError:
            if rebuild is None:
                raise
            shutil.rmtree(built.path, ignore_errors=True)
            return open_session(rebuild().path, **options), True


def streamed_model(path: Path):
    """``(qmodel, weights, placeholders)`` for the streamed export of the safetensors checkpoint
    at ``path``: the retained-state wrapper of a :func:`qeff.weights.skeleton` (no weight memory;
    never run it) whose ``weights_digest`` is the loaded model's, read a tensor at a time."""
    from transformers import AutoConfig

    from qeff.transforms import transform
    from qeff.weights import SafetensorsWeights, fingerprint, skeleton

    weights = SafetensorsWeights(path)
    model, placeholders = skeleton(AutoConfig.from_pretrained(str(path)), weights)
    qmodel = transform(model, check_weights=False)
    qmodel.weights_digest = fingerprint(qmodel.model, weights, placeholders)
    return qmodel, weights, placeholders


# --- compatibility: the function forms used before the Pipeline class -------------------------

Prepared = Pipeline


def prepare(
    name: str | None = None,
    *,
    model=None,
    tokenizer=None,
    identity: dict | None = None,
    home: str | Path | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    force: bool = False,
    validate=None,
) -> Pipeline:
    """A :class:`Pipeline` whose export is done (``.export_built``), for a name or a model object."""
    if model is None:
        if name is None:
            raise UsageError("prepare() needs a model name or a model object")
        pipe = Pipeline.open(name, revision=revision, cache_dir=cache_dir, home=home, progress=progress)
    else:
        display = name or (identity or {}).get("name", "model")
        pipe = Pipeline(display, model=model, tokenizer=tokenizer, identity=identity, home=home, progress=progress)
    pipe.export(force=force, validate=validate)
    return pipe


def verify_cached(pipe: Pipeline, **kwargs) -> tuple[Built, dict]:
    """:meth:`Pipeline.verify_cached` with the report as a dict."""
    built, report = pipe.verify_cached(**kwargs)
    return built, report.to_dict()
