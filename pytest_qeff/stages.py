"""The bodies of the stage tests, on qeff's public API.

    transform   HF eager vs transformed PyTorch (logits, cache, greedy tokens); full tier: the
                loaded config equals the card's
    export      transformed PyTorch vs the exported graph in ONNX Runtime
    compile     the backend's artifact builds, and opens with the case's shapes
    generation  qeff.generate on the backend: greedy tokens equal HF's own greedy tokens
    benchmark   decode tokens/s, total tokens/s, time to first token (median of the card's
                repeats, timed by qeff.generate) against the committed baseline

Each stage hands a builtin-typed record to ``record`` before it judges, so a failing stage still
brings its numbers to the report. What stages build is kept in a :class:`Pipeline` per worker: one
card's stages share its model, exported graph and compiled artifacts.
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
from pytest_qeff.cards import Card, Case
from pytest_qeff.probe import Probe
from pytest_qeff.collect import Target
from pytest_qeff.sdk import find_sdk

__all__ = ["Pipeline", "Record", "transform", "export", "compile", "generation", "benchmark"]

Record = Callable[[dict], None]


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    qmodel: Any
    identity: dict


@dataclass
class Reference:
    """HF eager's own greedy continuation of each prompt, and the top-2 logit margin of each step."""

    tokens: list[list[int]]
    margins: list[list[float]]
    trace: Any = None  # the qeff.verification.Trace the tokens came from, reused by both comparisons


@dataclass
class Pipeline:
    """What one worker has built, keyed by card (and case, backend). Artifacts live under
    ``root`` (one directory per worker, so workers never collide)."""

    root: Path
    tier: str
    device_group: tuple[int, ...]
    baseline_dir: Path
    default_baseline_dir: Path
    update_baseline: bool = False
    trust_remote_code: bool = False  # --qeff-trust-remote-code
    _loaded: dict[str, Loaded | BaseException] = field(default_factory=dict)
    _references: dict[str, Reference] = field(default_factory=dict)

    # --- models ----------------------------------------------------------------------------------

    def load(self, card: Card) -> Loaded:
        """The card's model (seeded random in the tiny tier, real weights in the full tier) and its
        transformed twin; the full tier skips when the weights are not on this machine."""
        found = self._loaded.get(card.id)
        if found is None:
            if self.tier == "full":  # real models are big: keep one at a time
                self._loaded.clear()
                self._references.clear()
            try:
                found = self._load(card)
            except pytest.skip.Exception:
                raise
            except Exception as exc:  # remembered: every stage of the card reports it, none retries
                found = exc
            self._loaded[card.id] = found
        if isinstance(found, BaseException):
            from qeff.errors import QEffError

            if isinstance(found, QEffError):
                pytest.fail(f"{card.id}: {found}", pytrace=False)
            raise found
        return found

    def _load(self, card: Card) -> Loaded:
        import qeff
        from qeff.loading import load_source

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
            model, tokenizer = remote.full_model(card, self.trust_remote_code) if trusted else load_source(source)
            identity = {"card": card.id, "tier": "full", "source": source.identity()}
        return Loaded(model, tokenizer, qeff.transform(model), identity)

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
        tokenizer = self.load(card).tokenizer
        return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in self.prompt_texts(card, case)]

    def prompt_texts(self, card: Card, case: Case) -> list[str | None]:
        if self.tier == "tiny":
            return [None] * case.batch_size
        texts = card.prompts.text
        return [texts[r % len(texts)] for r in range(case.batch_size)]

    def decode(self, card: Card, ids: list[int]) -> str | None:
        tokenizer = self.load(card).tokenizer
        return tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else None

    def reference(self, card: Card, case: Case) -> Reference:
        key = f"{card.id}/{case.id}"
        if key not in self._references:
            import numpy as np
            from qeff.verification import hf_trace

            trace, tokens = hf_trace(self.load(card).model, self.prompts(card, case), card.prompts.generation_len)
            margins = [[float(np.diff(np.sort(step)[-2:])[0]) for step in row] for row in trace.logits]
            self._references[key] = Reference(tokens, margins, trace)
        return self._references[key]

    # --- artifacts -------------------------------------------------------------------------------

    def export(self, card: Card):
        """The exported graph (``Built``; ``.path / "model.onnx"``), reused while its manifest matches."""
        from qeff.artifacts import build_artifact
        from qeff.exporter import library_versions

        loaded = self.load(card)
        manifest = {"model": loaded.identity, "versions": library_versions()}

        def build(tmp: Path) -> dict:
            import qeff

            result = qeff.export(loaded.qmodel, tmp, model_id=card.id)
            return {"clipped_values": result.clipped_values, "bytes": _dir_bytes(tmp)}

        return build_artifact(self.root / card.id / self.tier / "export", manifest, build, required=("model.onnx",))

    def compiled(self, card: Card, case: Case, backend: str):
        import qeff

        onnx = self.export(card).path / "model.onnx"
        shape = {"batch_size": case.batch_size, "prompt_len": case.prompt_len, "ctx_len": case.ctx_len}
        if backend == "ort":
            return qeff.compile(onnx, backend="ort", **shape)
        # Cloud AI: the card's compile options, tensor-sliced over the worker's device group.
        options = card.compile.model_dump(exclude={"batch_size", "prompt_len", "ctx_len"})
        return qeff.compile(onnx, backend=backend, **shape, **options, num_devices=len(self.device_group))

    def session(self, card: Card, case: Case, backend: str, threads: int | None = None):
        """A fresh session (empty cache) on the case's compiled artifact."""
        import qeff

        built = self.compiled(card, case, backend)
        if backend == "ort":
            return qeff.open_session(built.path, threads=threads)
        return qeff.open_session(built.path, device_ids=list(self.device_group))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _require(backend: str) -> None:
    """Skip a stage whose backend cannot run on this machine."""
    if backend == "ort":
        return
    sdk = find_sdk()
    if not sdk.available:
        pytest.skip(f"{backend}: {sdk.reason}")


def _tolerances(target: Target):
    import qeff

    tol = getattr(target.card.tolerances, target.tier)
    return qeff.Tolerances(**tol.model_dump())


def _base(pipe: Pipeline, target: Target) -> dict:
    card, case = target.card, target.case
    return {
        "prompts": pipe.prompts(card, case),
        "prompt_texts": pipe.prompt_texts(card, case),
        "batch_size": case.batch_size,
        "prompt_len": case.prompt_len,
        "ctx_len": case.ctx_len,
        "device_group": list(pipe.device_group),
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
        same = (
            math.isclose(float(actual), float(expected), rel_tol=1e-6)
            if isinstance(expected, float) and isinstance(actual, (int, float))
            else actual == expected
        )
        if not same:
            problems.append(f"config.{key} is {expected!r} in the card but {actual!r} in the loaded model")
    return problems


# --- the stages ----------------------------------------------------------------------------------


def transform(pipe: Pipeline, target: Target, record: Record) -> None:
    import qeff

    card, case = target.card, target.case
    loaded = pipe.load(card)
    ref = pipe.reference(card, case)
    report = qeff.verify(
        loaded.model,
        qmodel=loaded.qmodel,
        prompt_token_ids=pipe.prompts(card, case),
        prompt_len=case.prompt_len,
        ctx_len=case.ctx_len,
        steps=card.prompts.generation_len,
        tolerances=_tolerances(target),
        reference=(ref.trace, ref.tokens),
    )
    comparison = report["hf_vs_pytorch"]
    mismatches = _config_mismatches(card, loaded.model.config) if target.tier == "full" else []
    shape = loaded.qmodel.shape
    record({
        **_base(pipe, target),
        "comparison": comparison.to_dict(),
        "reference_tokens": report.reference_tokens,
        "model": {"num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                  "vocab_size": shape.vocab_size, "parameters": sum(p.numel() for p in loaded.model.parameters())},
        "config_mismatches": mismatches,
    })
    problems = comparison.failures + mismatches
    if problems:
        pytest.fail(f"{target.id}: HF vs transformed PyTorch: " + "; ".join(problems), pytrace=False)


def export(pipe: Pipeline, target: Target, record: Record) -> None:
    import qeff

    card, case = target.card, target.case
    loaded = pipe.load(card)
    ref = pipe.reference(card, case)
    exported = pipe.export(card)
    session = pipe.session(card, case, "ort")
    report = qeff.verify(
        loaded.model,
        qmodel=loaded.qmodel,
        session=session,
        prompt_token_ids=pipe.prompts(card, case),
        prompt_len=case.prompt_len,
        ctx_len=case.ctx_len,
        steps=card.prompts.generation_len,
        tolerances=_tolerances(target),
        reference=(ref.trace, ref.tokens),
    )
    comparison = report["pytorch_vs_ort"]
    outputs = exported.manifest.get("outputs", {})
    record({
        **_base(pipe, target),
        "comparison": comparison.to_dict(),
        "onnx": {"path": str(exported.path / "model.onnx"), "bytes": outputs.get("bytes"), "reused": exported.reused,
                 "build_s": exported.build_seconds, "fp16_clipped_values": outputs.get("clipped_values")},
    })
    if comparison.failures:
        pytest.fail(f"{target.id}: transformed PyTorch vs ONNX Runtime: " + "; ".join(comparison.failures), pytrace=False)


def compile(pipe: Pipeline, target: Target, backend: str, record: Record) -> None:
    _require(backend)
    card, case = target.card, target.case
    built = pipe.compiled(card, case, backend)
    session = pipe.session(card, case, backend)
    want = {"batch_size": case.batch_size, "ctx_len": case.ctx_len, "num_layers": pipe.load(card).qmodel.shape.num_layers}
    got = {k: getattr(session, k, None) for k in want}
    record({
        **_base(pipe, target),
        "artifact": {"path": str(built.path), "name": built.path.name, "reused": built.reused, "build_s": built.build_seconds,
                     "bytes": _dir_bytes(built.path)},
        "compile_options": card.compile.model_dump(),
        "session": got,
    })
    wrong = [f"{k} is {got[k]} (expected {v})" for k, v in want.items() if got[k] != v]
    if wrong:
        pytest.fail(f"{target.id}: the {backend} artifact {built.path} opens with " + ", ".join(wrong), pytrace=False)


def generation(pipe: Pipeline, target: Target, backend: str, record: Record) -> None:
    """Free-running greedy generation on the backend against HF's greedy tokens. The first
    divergence of a row ends its comparison (what follows is another continuation); it fails
    unless HF's own top-2 logits there are closer than the ambiguity margin."""
    import qeff

    _require(backend)
    card, case = target.card, target.case
    ref = pipe.reference(card, case)
    session = pipe.session(card, case, backend)
    result = qeff.generate(session, prompt_token_ids=pipe.prompts(card, case), generation_len=card.prompts.generation_len, eos_token_id=[])
    margin = getattr(card.tolerances, target.tier).ambiguity_margin
    rows, problems, matched, total = [], [], 0, 0
    for r, (want, got) in enumerate(zip(ref.tokens, result.token_ids)):
        diverged = next((t for t, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if diverged is None and len(got) != len(want):
            diverged = min(len(got), len(want))
        step_margin = ref.margins[r][diverged] if diverged is not None and diverged < len(ref.margins[r]) else None
        ambiguous = step_margin is not None and step_margin < margin
        matched += len(want) if diverged is None else diverged
        total += len(want)
        rows.append({
            "row": r, "reference": want, "generated": got, "first_divergence": diverged,
            "margin": step_margin, "ambiguous": ambiguous,
            "reference_text": pipe.decode(card, want), "generated_text": pipe.decode(card, got),
        })
        if diverged is not None and not ambiguous:
            problems.append(
                f"row {r} diverges at step {diverged}: HF chose {want[diverged] if diverged < len(want) else 'nothing'}, "
                f"{backend} chose {got[diverged] if diverged < len(got) else 'nothing'} (HF's top-2 margin "
                f"{step_margin if step_margin is not None else float('nan'):.3g} >= {margin:.3g})"
            )
    stats = {k: getattr(result, k) for k in ("ttft_s", "decode_tok_s", "total_tok_s", "e2e_s", "new_tokens")}
    record({**_base(pipe, target), "rows": rows, "tokens_matched": matched, "tokens_total": total, "stats": stats})
    if problems:
        pytest.fail(f"{target.id}: greedy tokens on {backend} differ from HF's: " + "; ".join(problems), pytrace=False)


def benchmark(pipe: Pipeline, target: Target, backend: str, record: Record) -> None:
    """Median decode tokens/s, total tokens/s and time to first token over the card's repeats."""
    import qeff

    _require(backend)
    card, case, bench = target.card, target.case, target.card.benchmark
    prompts = pipe.prompts(card, case)
    gen_len = min(bench.generation_len, case.ctx_len - max(len(p) for p in prompts))
    session = pipe.session(card, case, backend, threads=bench.threads)
    machine = Probe(threads=bench.threads)  # the machine's speed, measured between the repeats
    runs = []
    for i in range(bench.warmup + bench.repeats):
        result = qeff.generate(session, prompt_token_ids=prompts, generation_len=gen_len, eos_token_id=[])
        if i >= bench.warmup:
            runs.append({m: getattr(result, m) for m in ("decode_tok_s", "total_tok_s", "ttft_s", "e2e_s")})
            machine.rate()
    figures = {m: statistics.median(run[m] for run in runs) for m in baseline.METRICS}
    probe = machine.median()
    path = baseline.path_for(pipe.baseline_dir, backend, card.id)
    command = baseline.update_command(card.id, target.tier, backend, pipe.baseline_dir, pipe.default_baseline_dir)
    allowed = getattr(bench.max_regression, target.tier)
    try:
        against = baseline.check(path, baseline.entry_key(target.tier, case.id), figures, allowed, command, probe=probe)
    except ValueError as exc:
        against = {"file": str(path), "found": False, "changes": {}, "regressions": [str(exc)], "command": command}
    record({
        **_base(pipe, target),
        "figures": figures, "runs": runs, "generation_len": gen_len, "repeats": bench.repeats,
        "threads": bench.threads, "probe": probe, "baseline": against, "update_baseline": pipe.update_baseline,
    })
    if against["regressions"] and not pipe.update_baseline:
        pytest.fail(f"{target.id} on {backend}: " + "\n".join(against["regressions"]), pytrace=False)
