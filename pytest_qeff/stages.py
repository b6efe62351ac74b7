"""The bodies of the stage tests, on the library's one orchestrator (:class:`qeff.pipeline.Pipeline`).

    transform   HF eager vs transformed PyTorch (logits, cache, greedy tokens); full tier: the
                loaded config equals the card's
    export      transformed PyTorch vs the exported graph in ONNX Runtime
    compile     the backend's artifact builds, and opens with the case's shapes; the fused CPU graph
                (``ort-fused``, --qeff-graph) is also judged here against HF eager: logits and
                cache teacher-forced over HF's greedy tokens, with the card's tolerances; with
                compressed weights (``ort-fused-<mode>``) against HF fp32 over the card's corpus,
                within the card's ``[cpu_weights]`` budget (KL divergence, top-1, perplexity)
    generation  qeff.generate on the backend: greedy tokens equal HF's own greedy tokens
    benchmark   decode tokens/s, total tokens/s, time to first token (median of the card's
                repeats, timed by qeff.generate) against the committed baseline
    serving     one declared serving feature (continuous batching, prefix caching, sampling,
                speculative decoding) against HF eager, prompt by prompt (pytest_qeff/serving.py)

Which graph a stage compiles is decided by the library, not here: :meth:`Workspace.target` makes
the :class:`qeff.cpu_graph.CompileTarget` ``qeff infer``/``compile`` make from the same options, and
:meth:`qeff.pipeline.Pipeline.compile` builds it (tests/test_graph_policy.py checks that the three
give one artifact). The compile, generation and benchmark stages run once per ``qeff_backend``
value: ``ort`` (ONNX Runtime's portable graph), ``ort-fused`` (its fused CPU graph, with its own
verdicts against HF eager and its own benchmark baseline), ``ort-fused-<mode>`` (the fused graph
with the compressed weights ``qeff infer --weights native|int8|int4 [--int8-activations]`` builds:
a budget verdict and a benchmark, no greedy-generation stage) and ``qaic``.

Each stage hands a typed record (:mod:`pytest_qeff.records`) to ``record`` before it judges, so a
failing stage still brings its numbers to the report. What stages build is kept in a
:class:`Workspace` per worker: one card's stages share its pipeline (model, reference, exported
graph and compiled artifacts).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_qeff import baseline, remote, weights
from pytest_qeff.cards import WEIGHT_MODES, Card, Case, config_value_matches
from pytest_qeff.collect import Target, split_backend, weight_mode
from pytest_qeff.precision import corpus_for
from pytest_qeff.probe import Probe
from pytest_qeff.records import (
    ArtifactFacts,
    BenchmarkRecord,
    CompileRecord,
    ExportRecord,
    GenerationRecord,
    GenerationRow,
    ModelFacts,
    OnnxFacts,
    StageRecord,
    TransformRecord,
    WeightsVerdict,
)

__all__ = ["Workspace", "Record", "transform", "export", "compile", "generation", "benchmark", "serving"]

Record = Callable[[StageRecord], None]


@dataclass
class Workspace:
    """What one worker has built: one :class:`qeff.pipeline.Pipeline` per card (the library's
    orchestrator: one export cache, one manifest schema, one reference traced from the untouched
    model). Artifacts live under ``root`` (one directory per worker, so workers never collide)."""

    root: Path
    tier: str
    device_group: tuple[int, ...]
    baseline_dir: Path
    default_baseline_dir: Path
    update_baseline: bool = False
    trust_remote_code: bool = False  # --qeff-trust-remote-code
    _pipelines: dict[str, Any] = field(default_factory=dict)  # card id -> Pipeline | the exception loading raised

    # --- models ----------------------------------------------------------------------------------

    def pipeline(self, card: Card):
        """The card's pipeline (seeded random model in the tiny tier, real weights in the full
        tier); the full tier skips when the weights are not on this machine."""
        found = self._pipelines.get(card.id)
        if found is None:
            if self.tier == "full":  # real models are big: keep one at a time
                self._pipelines.clear()
            try:
                found = self._open(card)
            except pytest.skip.Exception:
                raise
            except Exception as exc:  # remembered: every stage of the card reports it, none retries
                found = exc
            self._pipelines[card.id] = found
        if isinstance(found, BaseException):
            from qeff.errors import QEffError

            if isinstance(found, QEffError):
                pytest.fail(f"{card.id}: {found}", pytrace=False)
            raise found
        return found

    def _open(self, card: Card):
        import qeff
        from qeff.pipeline import Pipeline

        reason = remote.skip_reason(card, self.trust_remote_code)
        if reason:
            pytest.skip(reason)
        trusted = card.weights.trust_remote_code  # only here when --qeff-trust-remote-code is given
        if self.tier == "tiny":
            config = card.tiny_config().hf_config()
            if trusted:
                model = remote.tiny_model(card, config, card.tiny.seed, self.trust_remote_code)
            else:
                model = qeff.from_config(card.architecture, config, seed=card.tiny.seed)
            tokenizer = None
            identity = {"card": card.id, "tier": "tiny", "architecture": card.architecture, "config": config, "seed": card.tiny.seed}
        else:
            source, reason = weights.locate(card)
            if source is None:
                pytest.skip(reason)
            identity = {"card": card.id, "tier": "full", "source": source.identity(home=self.root / self.tier)}
            if not trusted:
                from qeff.intake.support import require_supported

                # Nothing is loaded here: the pipeline loads the model only for a stage that needs
                # it, and exports a safetensors checkpoint (a local directory or a cached hub repo)
                # from its files. An architecture qeff cannot run is refused from its config, for
                # every stage alike, as the transform's refusal was when the model loaded first.
                require_supported(source)
                return Pipeline(card.id, source=source, identity=identity, home=self.root / self.tier, progress=False)
            model, tokenizer = remote.full_model(card, self.trust_remote_code)
        pipe = Pipeline(card.id, model=model, tokenizer=tokenizer, identity=identity, home=self.root / self.tier, progress=False)
        _ = pipe.qmodel  # an architecture the transform refuses fails every stage the same way
        return pipe

    def facts(self, card: Card) -> tuple[Any, ModelFacts]:
        """The model's config and shape: from the model when it is in memory, else from its files
        (config.json and the weight files' headers, :mod:`qeff.intake.preflight`), so that a model larger
        than memory is never loaded for them."""
        pipe = self.pipeline(card)
        shape = None
        if not pipe.model_loaded and pipe.files_dir is not None:
            from qeff.intake.preflight import model_shape

            shape = model_shape(pipe.source, cache_dir=pipe.cache_dir)
        if shape is None or shape.weight_bytes is None:
            cache = pipe.qmodel.shape
            return pipe.model.config, ModelFacts(cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.vocab_size,
                                                 sum(p.numel() for p in pipe.model.parameters()))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(pipe.files_dir))
        return config, ModelFacts(shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.vocab_size,
                                  shape.weight_bytes // 4)

    def require_memory(self, card: Card, case: Case, what: str, command: str, *flags: str, graph: str = "portable") -> None:
        """Skip ``what`` (a stage) when the memory preflight refuses the qeff command that does the
        same work (``qeff verify`` for the comparisons, ``qeff compile``/``infer`` on the portable
        graph), with its one sentence: the stage cannot run on this machine. The full tier only,
        and only while the model is not in memory (the preflight prices a fresh process; one that
        loaded the model has shown it fits). Whatever mode the command would take (a streamed
        export; streamed verification where the pipeline has it) the stage takes too."""
        refused = self.memory_refusal(card, case, command, *flags, graph=graph)
        if refused:
            pytest.skip(f"{card.id}: {what} cannot run in the memory available here: {refused}")

    def memory_refusal(self, card: Card, case: Case, command: str, *flags: str, graph: str = "portable") -> str | None:
        """The memory preflight's sentence refusing ``qeff COMMAND`` on this card and case, or None
        when it fits (or is not asked: the tiny tier, a model already in memory)."""
        pipe = self.pipeline(card)
        if self.tier != "full" or pipe.source is None or pipe.model_loaded:
            return None
        from qeff.cli import memory_preflight
        from qeff.errors import UsageError

        src = pipe.source
        argv = [command, "-m", src.repo_id if src.kind == "hub" else str(src.path), "--home", str(self.root / self.tier),
                "--prompt_len", str(case.prompt_len), "--ctx_len", str(case.ctx_len)]
        if command != "verify":
            argv += ["--batch_size", str(case.batch_size), "--backend", "ort", "--ort-graph", graph]
        if src.revision:
            argv += ["--revision", src.revision]
        if pipe.cache_dir:
            argv += ["--cache_dir", pipe.cache_dir]
        try:
            memory_preflight([*argv, *flags])
        except UsageError as exc:
            return str(exc)
        return None

    def prompts(self, card: Card, case: Case) -> list[list[int]]:
        """One prompt per batch row: seeded random ids (tiny) or the card's texts, tokenized (full)."""
        rows = range(case.batch_size)
        if self.tier == "tiny":
            vocab = card.tiny_config().vocab_size
            lengths = card.prompts.tiny_lengths
            out = []
            for r in rows:
                rng = random.Random(f"{card.id}/{card.tiny.seed}/{r}")  # str seeds are stable across runs
                out.append([rng.randrange(vocab) for _ in range(lengths[r % len(lengths)])])
            return out
        tokenizer = self.pipeline(card).tokenizer
        return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in self.prompt_texts(card, case)]

    def prompt_texts(self, card: Card, case: Case) -> list[str | None]:
        if self.tier == "tiny":
            return [None] * case.batch_size
        texts = card.prompts.text
        return [texts[r % len(texts)] for r in range(case.batch_size)]

    def decode(self, card: Card, ids: list[int]) -> str | None:
        tokenizer = self.pipeline(card).tokenizer
        return tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else None

    def reference(self, card: Card, case: Case):
        """HF eager's greedy continuation of the case's prompts (the pipeline memoizes it)."""
        return self.pipeline(card).reference(self.prompts(card, case), card.prompts.generation_len)

    # --- artifacts -------------------------------------------------------------------------------

    def target(self, card: Card, case: Case, backend: str):
        """The :class:`qeff.cpu_graph.CompileTarget` of a stage on ``backend`` (a ``qeff_backend``
        value): the one ``qeff infer``/``compile`` make from the same options."""
        from qeff.cpu_graph import CompileTarget

        name, graph = split_backend(backend)
        shape = {"batch_size": case.batch_size, "prompt_len": case.prompt_len, "ctx_len": case.ctx_len}
        if name == "ort":  # a compressed mode is `--weights W [--int8-activations]`, as the CLI takes it
            weights, int8_activations = WEIGHT_MODES.get(weight_mode(backend) or "", ("fp32", False))
            return CompileTarget("ort", graph=graph, weights=weights, int8_activations=int8_activations, options=shape)
        # Cloud AI: the card's compile options, tensor-sliced over the worker's device group.
        options = card.compile.model_dump(exclude={"batch_size", "prompt_len", "ctx_len"})
        return CompileTarget(name, graph="portable", options={**shape, **options, "num_devices": len(self.device_group)})

    def compiled(self, card: Card, case: Case, backend: str):
        """The case's artifact on ``backend``: :meth:`qeff.pipeline.Pipeline.compile` decides and
        builds it (the fused graph with its check against the portable one)."""
        return self.pipeline(card).compile(self.target(card, case, backend), say=lambda line: None)

    def graph_check(self, card: Card, built) -> dict | None:
        """The pipeline's check of a fused artifact against the portable graph (None otherwise)."""
        return self.pipeline(card).graph_checks.get(str(built.path))

    def fused_unfit(self, card: Card) -> str | None:
        """Why ONNX Runtime's fused graph does not cover this card's architecture (from the export's
        config), or None: its users get the portable graph, which the ``ort`` stages certify."""
        from types import SimpleNamespace

        from qeff.compilers.ort_fused import unsupported_reason

        config = (self.pipeline(card).export_built.manifest.get("outputs") or {}).get("config") or {}
        return unsupported_reason(SimpleNamespace(**config)) if config else "the export recorded no model config"

    def session(self, card: Card, case: Case, backend: str, threads: int | None = None):
        """A fresh session (empty cache) on the case's compiled artifact."""
        built = self.compiled(card, case, backend)
        pipe = self.pipeline(card)
        if split_backend(backend)[0] == "ort":
            session, _ = pipe.open_session(built, threads=threads)
        else:
            session, _ = pipe.open_session(built, device_ids=list(self.device_group))
        return session


def _failure(what: str, comparison, extra: list[str] = ()) -> str:
    """``what: failure; failure; first divergence at …`` — the measures, then where the traces part."""
    where = [comparison.first_divergence.describe()] if comparison.first_divergence else []
    return f"{what}: " + "; ".join([*comparison.failures, *extra, *where])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _require(backend: str) -> None:
    """Skip a stage whose backend cannot run on this machine."""
    if split_backend(backend)[0] == "ort":
        return
    from qeff import sdk

    status = sdk.status()
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")


def _require_graph(ws: Workspace, card: Card, backend: str) -> str:
    """The stage's graph (portable | fused); skip a fused stage whose architecture the fused graph
    does not cover (``qeff infer`` runs the portable graph there, certified by the ``ort`` stages),
    and a compressed mode the card does not budget in this tier (one line: why)."""
    graph = split_backend(backend)[1]
    if graph == "fused":
        reason = ws.fused_unfit(card)
        if reason:
            pytest.skip(f"{card.id}: no fused ONNX Runtime graph: {reason}; `qeff infer` runs the portable graph, "
                        "which the ort stages certify")
    mode = weight_mode(backend)
    if mode and card.cpu_weights.budget(ws.tier, mode) is None:
        if mode == "native":
            what = "seeded random weights" if ws.tier == "tiny" else f"{card.weights.source!r} weights"
            pytest.skip(f"{card.id}: native weights apply to a GGUF's own blocks; the {ws.tier} tier runs {what}")
        pytest.skip(f"{card.id}: {mode} weights are not certified in the {ws.tier} tier: the card has no "
                    f"[cpu_weights.{ws.tier}.{mode}] budget")
    return graph


def _weights_flags(backend: str) -> tuple[str, ...]:
    """The CLI flags of a compressed mode (for the memory preflight's command line)."""
    mode = weight_mode(backend)
    if mode is None:
        return ()
    weights, int8_activations = WEIGHT_MODES[mode]
    return ("--weights", weights, *(("--int8-activations",) if int8_activations else ()))


def _tolerances(target: Target):
    import qeff

    tol = getattr(target.card.tolerances, target.tier)
    return qeff.Tolerances(**tol.model_dump())


def _base(ws: Workspace, target: Target) -> dict:
    card, case = target.card, target.case
    return {
        "prompts": ws.prompts(card, case),
        "prompt_texts": ws.prompt_texts(card, case),
        "batch_size": case.batch_size,
        "prompt_len": case.prompt_len,
        "ctx_len": case.ctx_len,
        "device_group": list(ws.device_group),
    }


_MISSING = object()


def _config_mismatches(card: Card, loaded_config: Any) -> list[str]:
    """Keys where the real model's loaded config differs from the card's ``[config]``. Keys the
    loaded architecture does not define (GPT-2 has no ``num_key_value_heads``; the card records
    the equivalent for its own schema) are not compared."""
    problems = []
    for key, expected in card.config.hf_config().items():
        actual = getattr(loaded_config, key, _MISSING)
        if key == "rope_theta" and actual in (None, _MISSING):  # transformers 5 keeps it in rope_parameters
            actual = (getattr(loaded_config, "rope_parameters", None) or {}).get("rope_theta", _MISSING)
        if actual is _MISSING:
            continue
        if not config_value_matches(expected, actual):
            problems.append(f"config.{key} is {expected!r} in the card but {actual!r} in the loaded model")
    return problems


# --- the stages ----------------------------------------------------------------------------------


def _verify(ws: Workspace, target: Target, session=None):
    card, case = target.card, target.case
    return ws.pipeline(card).verify(
        ws.prompts(card, case), prompt_len=case.prompt_len, ctx_len=case.ctx_len,
        steps=card.prompts.generation_len, tolerances=_tolerances(target), session=session,
    )


def transform(ws: Workspace, target: Target, record: Record) -> None:
    card = target.card
    mismatches = _config_mismatches(card, ws.facts(card)[0]) if target.tier == "full" else []
    try:
        ws.require_memory(card, target.case, "HF vs transformed PyTorch", "verify")
    except pytest.skip.Exception:
        if mismatches:  # read from the files: judged even where the comparison cannot run
            pytest.fail(f"{target.id}: " + "; ".join(mismatches), pytrace=False)
        raise
    report = _verify(ws, target)
    comparison = report["hf_vs_pytorch"]
    facts = ws.facts(card)[1]
    record(TransformRecord(
        **_base(ws, target), comparison=comparison, reference_tokens=report.reference_tokens, model=facts,
        config_mismatches=mismatches,
    ))
    if comparison.failures or mismatches:
        pytest.fail(f"{target.id}: " + _failure("HF vs transformed PyTorch", comparison, mismatches), pytrace=False)


def export(ws: Workspace, target: Target, record: Record) -> None:
    card, case = target.card, target.case
    pipe = ws.pipeline(card)
    exported = pipe.export()
    what = f"the exported graph ({exported.path}) against transformed PyTorch in ONNX Runtime"
    ws.require_memory(card, case, what, "verify")
    if ws.memory_refusal(card, case, "compile") is None:  # the session opens the portable graph's ORT artifact
        report = _verify(ws, target, session=ws.session(card, case, "ort"))
    else:  # the whole graph's session does not fit: ONNX Runtime checked one decoder layer's sub-graph at a time
        report = pipe.verify_per_layer(ws.prompts(card, case), prompt_len=case.prompt_len, ctx_len=case.ctx_len,
                                       steps=card.prompts.generation_len, tolerances=_tolerances(target))
    comparison = report["pytorch_vs_ort"]
    # ORT is judged against the untouched HF model through the chain: a fault in the transform is
    # traced into the graph too, so ORT agreeing with the transformed PyTorch alone proves nothing.
    upstream = report["hf_vs_pytorch"]
    outputs = exported.manifest.get("outputs", {})
    record(ExportRecord(
        **_base(ws, target), comparison=comparison, hf_vs_pytorch=upstream if upstream.failures else None,
        onnx=OnnxFacts(path=str(pipe.onnx_path), bytes=outputs.get("onnx_bytes"), reused=exported.reused,
                       build_s=exported.build_seconds, fp16_clipped_values=outputs.get("fp16_clipped_values")),
    ))
    problems = [_failure("transformed PyTorch vs ONNX Runtime", c) for c in (comparison,) if c.failures]
    problems += [_failure("HF vs the transformed PyTorch that ONNX Runtime matches", c) for c in (upstream,) if c.failures]
    if problems:
        pytest.fail(f"{target.id}: " + " | ".join(problems), pytrace=False)


def compile(ws: Workspace, target: Target, backend: str, record: Record) -> None:
    card, case = target.card, target.case
    if split_backend(backend)[0] != "ort" and ws.tier == "full":
        _dry_run_without_sdk(ws, card, case, backend)
    _require(backend)
    graph = _require_graph(ws, card, backend)
    flags = _weights_flags(backend)
    if split_backend(backend)[0] == "ort":
        ws.require_memory(card, case, f"compiling the {graph} graph for ONNX Runtime", "compile", *flags, graph=graph)
    if graph == "fused":  # its verdict runs HF eager beside it
        ws.require_memory(card, case, "the fused graph against HF's reference", "infer", "--verify", *flags, graph=graph)
    built = ws.compiled(card, case, backend)
    session = ws.session(card, case, backend)
    want = {"batch_size": case.batch_size, "ctx_len": case.ctx_len, "num_layers": ws.facts(card)[1].num_layers}
    got = {k: getattr(session, k, None) for k in want}
    mode = weight_mode(backend)
    verdict = _hf_vs_graph(ws, target, session, backend) if graph == "fused" and mode is None else None
    session.close()
    budget = _within_budget(ws, target, backend, built) if mode else None
    record(CompileRecord(
        **_base(ws, target),
        artifact=ArtifactFacts(path=str(built.path), name=built.path.name, reused=built.reused, build_s=built.build_seconds,
                               bytes=_dir_bytes(built.path)),
        compile_options=card.compile.model_dump(), session=got, graph=graph, hf_vs_graph=verdict,
        graph_check=ws.graph_check(card, built), weights=mode or "fp32", budget=budget,
    ))
    wrong = [f"{k} is {got[k]} (expected {v})" for k, v in want.items() if got[k] != v]
    if wrong:
        pytest.fail(f"{target.id}: the {backend} artifact {built.path} opens with " + ", ".join(wrong), pytrace=False)
    if verdict is not None and verdict.failures:
        pytest.fail(f"{target.id}: " + _failure("HF vs the fused ONNX Runtime graph", verdict), pytrace=False)
    if budget is not None and budget.result.failures:
        pytest.fail(f"{target.id}: the fused graph with {mode} weights vs HF fp32, outside the card's budget: "
                    + "; ".join(budget.result.failures), pytrace=False)


def _reference(ws: Workspace, target: Target, backend: str, windows, session=None):
    """HF fp32 on the untouched model (the pipeline's ``model``, never a qeff graph): its logits at
    every position of each window, ``(rows, window, vocab)``. (``backend`` and ``session`` are the
    candidate's, unused: the signature is :func:`_teacher_forced`'s.)"""
    import numpy as np
    from qeff.precision.ladder import reference_logits

    model = ws.pipeline(target.card).model
    out = np.empty((*windows.shape, int(model.config.vocab_size)), np.float32)
    reference_logits(model, windows, out)
    return out


def _teacher_forced(ws: Workspace, target: Target, backend: str, windows, session=None):
    """The compiled graph of ``backend`` fed ``windows`` one token per step (one window per batch
    row from position 0, as the precision ladder feeds a tier): its logits ``(rows, window, vocab)``.
    ``session``: one to reuse (the fused graph's cache is only read up to the step's position, so a
    window restarting at 0 sees none of the last one); else a fresh one, closed after."""
    import numpy as np

    card, case = target.card, target.case
    own = session is None
    session = ws.session(card, case, backend, threads=card.benchmark.threads) if own else session
    try:
        rows, window = windows.shape
        out = np.empty((rows, window, session.vocab_size), np.float32)
        ids = np.zeros((session.batch_size, 1), np.int64)
        pos = np.full((session.batch_size, 1), -1, np.int64)
        for t in range(window):
            ids[:rows, 0], pos[:rows, 0] = windows[:, t], t
            out[:, t] = session.run(ids, pos)[:rows]
        return out
    finally:
        if own:
            session.close()


def _within_budget(ws: Workspace, target: Target, backend: str, built) -> WeightsVerdict:
    """A compressed fused graph against HF fp32 on the untouched model, as the precision ladder
    measures a tier (:mod:`qeff.precision.ladder`): teacher-forced over the card's ``[precision]``
    corpus, or its ``[cpu_weights.corpus]`` (the same number of tokens, in windows the case's
    ``ctx_len`` holds, ``batch_size`` at a time, on one session), KL divergence, top-1 agreement and perplexity at every position; greedy tokens on the
    case's prompts (teacher-forced over HF's, reported). Held to the card's ``[cpu_weights]``
    budget — and failed if the two sides are bit-identical, which only a self-comparison gives."""
    from dataclasses import asdict

    import numpy as np
    from qeff.metrics import DistributionStats
    from qeff.precision.ladder import Budget, TierResult, windows_of
    from qeff.verification import Tolerances, compare, session_trace

    card, case, tier = target.card, target.case, target.tier
    mode = weight_mode(backend)
    budget = Budget(**card.cpu_weights.budget(tier, mode).model_dump())
    size = card.cpu_weights.windows(tier, card.precision)
    window = min(size.window, case.ctx_len)
    rows = math.ceil(size.rows * size.window / window)
    corpus, what = corpus_for(ws, card, rows * window)
    windows = windows_of(corpus, rows, window)
    stats, worst = DistributionStats(), 0.0
    session = ws.session(card, case, backend, threads=card.benchmark.threads)
    try:
        for start in range(0, rows, case.batch_size):
            chunk = windows[start:start + case.batch_size]
            ref = _reference(ws, target, backend, chunk, session=session)
            cand = _teacher_forced(ws, target, backend, chunk, session=session)
            targets = np.concatenate([chunk[:, 1:], np.full((len(chunk), 1), -1)], axis=1)
            stats.add(ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1]), targets.reshape(-1))
            worst = max(worst, float(np.max(np.abs(ref - cand))))
    finally:
        session.close()
    summary = stats.summary()
    reference = ws.reference(card, case)  # HF's greedy tokens on the case's prompts
    session = ws.session(card, case, backend, threads=card.benchmark.threads)
    try:
        trace = session_trace(session, backend, ws.prompts(card, case), reference.tokens, case.prompt_len)
    finally:
        session.close()
    greedy = compare(reference.trace, trace, Tolerances())
    weights, int8_activations = WEIGHT_MODES[mode]
    result = TierResult(
        tier=mode, kld_mean=summary.kld_mean, kld_p99=summary.kld_p99, kld_max=summary.kld_max,
        top1_agree=summary.top1_agree, top5_overlap=summary.top5_overlap, ppl_ref=summary.ppl_ref, ppl=summary.ppl,
        tokens_matched=greedy.tokens_matched, tokens_total=greedy.tokens_total, tokens_ambiguous=greedy.ambiguous,
        positions=summary.positions, budget=asdict(budget),
        emulation={"weights": weights, "int8_activations": int8_activations, "artifact": built.path.name},
    )
    result.failures = budget.check(result)
    if not worst > 0:
        result.failures.append("the graph's logits equal HF fp32's bit for bit at every position: the verdict compared "
                               "the candidate with itself (compressed weights never reproduce fp32 exactly)")
    return WeightsVerdict(result=result, corpus=what, rows=rows, window=window, logits_max_abs=worst)


def _hf_vs_graph(ws: Workspace, target: Target, session, backend: str):
    """HF eager (the untouched model) vs ``session`` — not vs another qeff graph: both traced over
    HF's own greedy tokens from the case's prompts (teacher-forced), compared with the card's
    tolerances (:func:`qeff.verification.compare`)."""
    from qeff.verification import compare, session_trace

    card, case = target.card, target.case
    ref = ws.reference(card, case)
    trace = session_trace(session, backend, ws.prompts(card, case), ref.tokens, case.prompt_len)
    return compare(ref.trace, trace, _tolerances(target))


def _dry_run_without_sdk(ws: Workspace, card: Card, case: Case, backend: str) -> None:
    """Full tier, no Cloud AI SDK: write the compiler's files for the card's options over the
    worker's device group (:func:`qeff.compile` with ``dry_run``: the export, streamed where it can
    be, then the command, specializations, custom IO and partition files), then skip — nothing was
    compiled, so nothing passes. With the SDK the stage compiles and opens the QPC as before."""
    from qeff import sdk

    status = sdk.status()
    if status.available:
        return
    options = card.compile.model_dump(exclude={"batch_size", "prompt_len", "ctx_len"})
    result = ws.pipeline(card).compile(backend, batch_size=case.batch_size, prompt_len=case.prompt_len,
                                       ctx_len=case.ctx_len, **options, num_devices=len(ws.device_group), dry_run=True)
    pytest.skip(f"{backend}: {status.reason}; dry run: the compiler's files are in {result.out_dir} "
                f"(run its compile.sh where the SDK is installed)")


def generation(ws: Workspace, target: Target, backend: str, record: Record) -> None:
    """Free-running greedy generation on the backend against HF's greedy tokens. The first
    divergence of a row ends its comparison (what follows is another continuation); it fails
    unless HF's own top-2 logits there are closer than the ambiguity margin."""
    import qeff
    from qeff.verification import greedy_divergence

    _require(backend)
    card, case = target.card, target.case
    graph = _require_graph(ws, card, backend)
    if split_backend(backend)[0] == "ort":
        ws.require_memory(card, case, f"greedy generation on the {graph} graph beside HF's reference", "infer", "--verify",
                          graph=graph)
    ref = ws.reference(card, case)
    session = ws.session(card, case, backend)
    result = qeff.generate(session, prompt_token_ids=ws.prompts(card, case), generation_len=card.prompts.generation_len, eos_token_id=[])
    margin = getattr(card.tolerances, target.tier).ambiguity_margin
    rows, problems, matched, total = [], [], 0, 0
    for r, (want, got) in enumerate(zip(ref.tokens, result.token_ids)):
        d = greedy_divergence(want, got, ref.margins[r], margin)
        matched += d.matched
        total += len(want)
        rows.append(GenerationRow(
            row=r, reference=want, generated=got, first_divergence=d.first, margin=d.margin, ambiguous=d.ambiguous,
            reference_text=ws.decode(card, want), generated_text=ws.decode(card, got),
        ))
        if d.first is not None and not d.ambiguous:
            problems.append(
                f"row {r} diverges at step {d.first}: HF chose {want[d.first] if d.first < len(want) else 'nothing'}, "
                f"{backend} chose {got[d.first] if d.first < len(got) else 'nothing'} (HF's top-2 margin "
                f"{d.margin if d.margin is not None else float('nan'):.3g} >= {margin:.3g})"
            )
    stats = {k: float(getattr(result, k)) for k in ("ttft_s", "decode_tok_s", "total_tok_s", "e2e_s", "new_tokens")}
    record(GenerationRecord(**_base(ws, target), rows=rows, tokens_matched=matched, tokens_total=total, stats=stats))
    if problems:
        pytest.fail(f"{target.id}: greedy tokens on {backend} differ from HF's: " + "; ".join(problems), pytrace=False)


def benchmark(ws: Workspace, target: Target, backend: str, record: Record, timer=None) -> None:
    """Median decode tokens/s, total tokens/s and time to first token over the card's repeats.

    ``timer()`` returns pytest-benchmark's ``benchmark`` fixture when that plugin is installed and active
    (it switches itself off under xdist): it then runs the repeats (``pedantic``: warm-up and
    rounds as the card says), keeps its own statistics of whole runs and stores them with
    ``--benchmark-save``/``--benchmark-json``, with qeff's per-phase medians and the probe in
    ``extra_info``. Without it, the same loop runs here. The verdict is the same either way:
    the medians against the probe-scaled baseline."""
    import qeff

    _require(backend)
    card, case, bench = target.card, target.case, target.card.benchmark
    graph = _require_graph(ws, card, backend)
    if split_backend(backend)[0] == "ort":
        ws.require_memory(card, case, f"the benchmark on the {graph} graph", "infer", "--no-verify", *_weights_flags(backend),
                          graph=graph)
    prompts = ws.prompts(card, case)
    gen_len = min(bench.generation_len, case.ctx_len - max(len(p) for p in prompts))
    session = ws.session(card, case, backend, threads=bench.threads)
    machine = Probe(threads=bench.threads)  # the machine's speed, measured between the repeats
    results = []

    def once():
        results.append(qeff.generate(session, prompt_token_ids=prompts, generation_len=gen_len, eos_token_id=[]))

    def between():  # after each round, outside the timed call; warm-up rounds do not count
        if len(results) > bench.warmup:
            machine.rate()

    def loop():
        for _ in range(bench.warmup + bench.repeats):
            once()
            between()

    timer = timer() if timer is not None else None
    if timer is not None and getattr(timer, "enabled", False):
        timer.pedantic(once, teardown=between, rounds=bench.repeats, warmup_rounds=bench.warmup, iterations=1)
    elif timer is not None:  # switched off (xdist, --benchmark-disable): it calls its target once
        timer.pedantic(loop)
    else:
        loop()
    runs = [{m: float(getattr(r, m)) for m in ("decode_tok_s", "total_tok_s", "ttft_s", "e2e_s")} for r in results[bench.warmup:]]
    figures = {m: statistics.median(run[m] for run in runs) for m in baseline.METRICS}
    probe = machine.median()
    if timer is not None and getattr(timer, "enabled", False):
        timer.extra_info.update({**figures, "probe": probe, "generation_len": gen_len, "backend": backend})
    path = baseline.path_for(ws.baseline_dir, backend, card.id)
    command = baseline.update_command(card.id, target.tier, backend, ws.baseline_dir, ws.default_baseline_dir)
    allowed = getattr(bench.max_regression, target.tier)
    try:
        against = baseline.check(path, baseline.entry_key(target.tier, case.id), figures, allowed, command, probe=probe)
    except ValueError as exc:
        against = {"file": str(path), "found": False, "changes": {}, "regressions": [str(exc)], "command": command}
    record(BenchmarkRecord(
        **_base(ws, target), figures=figures, runs=runs, generation_len=gen_len, repeats=bench.repeats,
        threads=bench.threads, probe=probe, baseline=against, update_baseline=ws.update_baseline,
    ))
    if against["regressions"] and not ws.update_baseline:
        pytest.fail(f"{target.id} on {backend}: " + "\n".join(against["regressions"]), pytrace=False)


def serving(ws: Workspace, target: Target, record: Record) -> None:
    """One serving feature of the card (``target.feature``): see :mod:`pytest_qeff.serving`."""
    from pytest_qeff import serving as serving_stage

    serving_stage.run(ws, target, record)
