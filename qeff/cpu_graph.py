"""Which ONNX Runtime graph a pipeline runs on the CPU, and the check that lets the fused one in.

``qeff infer --backend ort`` asks :func:`compile_cpu`: the fused graph
(:mod:`qeff.compilers.ort_fused`) when ``--ort-graph`` allows it and the architecture is covered,
else None — the caller then compiles the portable graph (``auto`` says why in one line; ``fused``
insists and refuses). Every fused build is checked by :func:`check_against_portable`: the new
graph and the portable graph of the same export, teacher-forced side by side over the portable
graph's greedy tokens on seeded prompts (one spans two prefill chunks), compared with the
project's fp32 tolerances. With fp32 or native weights a difference fails the build; with
re-quantized weights (int8/int4, or int8 activations) it is measured and reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qeff.errors import UsageError, VerificationError

__all__ = ["compile_cpu", "check_against_portable", "CHECK_TOLERANCES", "weights_files", "check_unfit_reason"]

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


def compile_cpu(pipe, *, graph: str = "auto", weights: str = "fp32", int8_activations: bool = False,
                batch_size: int, prompt_len: int, ctx_len: int, threads: int | None = None,
                force: bool = False, say: Callable[[str], None] = print):
    """The fused artifact for ``pipe`` (a :class:`qeff.pipeline.Pipeline` whose export is done)
    when ``graph`` allows it and the architecture is covered; None for the portable graph."""
    from types import SimpleNamespace

    from qeff.compilers.ort_fused import unsupported_reason
    from qeff.compilers.ort_fused_artifact import check_cpu_options, compile_fused

    check_cpu_options(pipe.source, graph=graph, weights=weights, int8_activations=int8_activations)
    if graph == "portable":
        return None
    config = (pipe.export_built.manifest.get("outputs") or {}).get("config") or {}
    reason = unsupported_reason(SimpleNamespace(**config)) if config else "the export recorded no model config"
    if reason:
        if graph == "fused" or weights != "fp32":
            raise UsageError(f"the fused ONNX Runtime graph cannot run this model: {reason}")
        say(f"[qeff] {reason}: running the portable ONNX graph")
        return None
    source = pipe.source
    gguf = source.path if source is not None and source.kind == "gguf" else None
    files = weights_files(pipe, weights)
    onnx_path = pipe.onnx_path

    def check(session, gate: bool) -> dict:
        from qeff.progress import stage

        with stage("Checking the fused graph against the portable graph", enabled=pipe.progress):
            return check_against_portable(session, onnx_path, prompt_len=prompt_len, gate=gate)

    unchecked = check_unfit_reason(pipe, config, weights=weights, from_files=files is not None, batch_size=batch_size,
                                   ctx_len=ctx_len)
    built = compile_fused(pipe.export_dir, batch_size=batch_size, prompt_len=prompt_len, ctx_len=ctx_len, weights=weights,
                          load_model=lambda: pipe.model, gguf_path=gguf, weights_dir=files,
                          int8_activations=int8_activations, threads=threads, check=None if unchecked else check,
                          unchecked=unchecked, force=force, progress=pipe.progress)
    result = (built.manifest.get("outputs") or {}).get("check")
    if result and result.get("ran") is False:
        # Not silent: one line on stderr whatever --json says (the JSON line carries it too).
        print(f"[qeff] the fused graph was not checked against the portable graph: {result['reason']}"
              + (" (cached)" if built.reused else ""), file=sys.stderr, flush=True)
    elif result:
        say(f"[qeff] fused graph vs portable graph: logits max-abs {result['logits_max_abs']:.2e}, MSE {result['logits_mse']:.2e}, "
            f"KL mean {result.get('kld_mean', 0.0):.2e}, top-1 {result.get('top1_agree', 1.0):.0%}, "
            f"tokens {result['tokens_matched']}/{result['tokens_total']}"
            + ("" if result["gated"] else " (weights re-quantized: reported, not gated)") + (" (cached)" if built.reused else ""))
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
    from qeff.atomic import human_bytes

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
