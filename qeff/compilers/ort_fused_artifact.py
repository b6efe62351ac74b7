"""The fused CPU graph as a cached artifact, checked against the portable graph when it is built.

    <export dir>/ort-fused_1BS_32PL_128CL/            fp32 weights
    <export dir>/ort-fused-native_1BS_32PL_128CL/     the GGUF file's own blocks (MatMulNBits)
    <export dir>/ort-fused-int4_1BS_32PL_128CL/       round-to-nearest int4 / int8 blocks

The build writes the graph, then runs it and the portable graph of the same export side by side
(teacher-forced over the portable graph's greedy tokens, on seeded prompts) and stores the
comparison in the manifest. For ``fp32`` and ``native`` weights the two graphs compute the same
numbers up to float rounding, so a comparison outside tolerance fails the build: the fast graph
is never trusted unchecked. ``int8`` / ``int4`` change the weights; their comparison (token
agreement, logits MSE / max-abs) is recorded and reported, not gated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qeff.artifacts import Built, build_artifact, read_manifest
from qeff.errors import QEffError, UsageError, VerificationError

__all__ = ["WEIGHTS", "compile_fused", "fused_dir_name", "check_against_portable", "CHECK_TOLERANCES"]

WEIGHTS = ("fp32", "native", "int8", "int4")
#: fp32 / native fused vs portable graph: the same weights, different kernels and summation order —
#: the project's default fp32 tolerances (``qeff.verification.Tolerances``).
CHECK_TOLERANCES = {"logits_max_abs": 1e-3, "logits_mse": 1e-8, "cache_max_abs": 1e-3, "cache_mse": 1e-9, "ambiguity_margin": 1e-3}


def fused_dir_name(*, batch_size: int, prompt_len: int, ctx_len: int, weights: str = "fp32", int8_activations: bool = False) -> str:
    tag = "" if weights == "fp32" else f"-{weights}"
    tag += "-a8" if int8_activations else ""
    return f"ort-fused{tag}_{batch_size}BS_{prompt_len}PL_{ctx_len}CL"


def _check_prompts(batch_size: int, prompt_len: int, ctx_len: int, vocab: int, steps: int) -> list[list[int]]:
    """Seeded prompts of varied lengths: one spans two prefill chunks when ctx_len allows."""
    rng = np.random.default_rng(1234)
    room = ctx_len - steps
    lengths = [max(1, min(room, n)) for n in (prompt_len + 3, 5, prompt_len, 2)]
    return [rng.integers(1, vocab, lengths[r % len(lengths)]).tolist() for r in range(batch_size)]


def check_against_portable(fused_session, portable_onnx: Path, *, prompt_len: int, steps: int = 16, gate: bool = True) -> dict:
    """Teacher-force ``fused_session`` and the portable graph over the portable graph's greedy
    tokens; return the comparison as a dict (raise :class:`VerificationError` if ``gate`` and it fails)."""
    import qeff
    from qeff.runtime.ort import OrtSession
    from qeff.verification import Tolerances, compare, session_trace

    batch, ctx_len = fused_session.batch_size, fused_session.ctx_len
    steps = max(1, min(steps, ctx_len // 2))
    prompts = _check_prompts(batch, prompt_len, ctx_len, fused_session.vocab_size, steps)
    portable = OrtSession(portable_onnx, batch_size=batch, ctx_len=ctx_len, prompt_len=prompt_len)
    greedy = qeff.generate(portable, prompt_token_ids=prompts, prompt_len=prompt_len, generation_len=steps, ignore_eos=True)
    ref = session_trace(portable, "portable", prompts, greedy.token_ids, prompt_len)
    portable.close()
    cand = session_trace(fused_session, "fused", prompts, greedy.token_ids, prompt_len)
    tol = Tolerances(**CHECK_TOLERANCES)
    result = compare(ref, cand, tol)
    report = {
        "reference": "portable ONNX graph", "candidate": "fused ONNX graph", "steps": steps, "rows": batch,
        "logits_mse": result.logits_mse, "logits_max_abs": result.logits_max_abs,
        "cache_max_abs": result.cache_max_abs, "tokens_matched": result.tokens_matched,
        "tokens_total": result.tokens_total, "passed": result.passed, "gated": gate, "failures": result.failures,
        "tolerances": CHECK_TOLERANCES,
    }
    if gate and not result.passed:
        raise VerificationError(f"the fused graph differs from the portable graph: {'; '.join(result.failures)}", report)
    return report


def compile_fused(
    export_dir: str | os.PathLike,
    *,
    batch_size: int = 1,
    prompt_len: int = 32,
    ctx_len: int = 128,
    weights: str = "fp32",
    load_model: Callable[[], object] | None = None,
    gguf_path: str | os.PathLike | None = None,
    int8_activations: bool = False,
    threads: int | None = None,
    check: bool = True,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> Built:
    """Build (or reuse) the fused graph of the export in ``export_dir``.

    ``load_model()`` returns the HF model (needed for ``fp32``/``int8``/``int4``, called only when
    the artifact must be built); ``gguf_path`` is the source file for ``native``.
    ``int8_activations`` lets MatMulNBits quantize activations to int8 (faster, no longer exact).
    """
    from qeff.compilers import onnx_identity
    from qeff.compilers.ort_fused import FUSED_GRAPH
    from qeff._system import library_versions

    if weights not in WEIGHTS:
        raise UsageError(f"unknown weights format {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if min(batch_size, prompt_len, ctx_len) < 1 or prompt_len > ctx_len:
        raise UsageError(f"need batch_size, prompt_len, ctx_len >= 1 and prompt_len <= ctx_len (got {batch_size}, {prompt_len}, {ctx_len})")
    export_dir = Path(export_dir)
    onnx_path = export_dir / "model.onnx"
    if not onnx_path.is_file():
        raise UsageError(f"{export_dir} holds no exported model.onnx; run `qeff export` first")
    if weights == "native":
        if gguf_path is None or Path(gguf_path).suffix != ".gguf":
            raise UsageError("--weights native re-encodes a GGUF file's own blocks; this model does not come from a .gguf file")
    elif load_model is None:
        raise UsageError(f"--weights {weights} needs the model's weights (load_model)")
    options = {"batch_size": batch_size, "prompt_len": prompt_len, "ctx_len": ctx_len}
    accuracy_level = 4 if int8_activations else 0
    manifest = {"backend": "ort", "graph": "fused", "weights": weights, "accuracy_level": accuracy_level, "options": options,
                "onnx": onnx_identity(onnx_path), "versions": library_versions(), "check": check}
    if weights == "native":
        from qeff.loading import ModelSource

        manifest["gguf"] = ModelSource(str(gguf_path), "gguf", path=Path(gguf_path)).identity()
    target = Path(out_dir) if out_dir else export_dir / fused_dir_name(**options, weights=weights, int8_activations=int8_activations)

    def build(tmp: Path) -> dict:
        from qeff.compilers.ort_fused import write_fused_graph
        from qeff.pipeline import stage
        from qeff.runtime.ort_fused import FusedOrtSession

        with stage(f"Building the fused ONNX Runtime graph ({weights} weights)", enabled=progress):
            if weights == "native":
                from qeff.quant.gguf import from_gguf

                decoder = from_gguf(Path(gguf_path), _export_config(export_dir), ctx_len)
            else:
                from qeff.compilers.ort_fused_weights import from_hf

                decoder = from_hf(load_model(), ctx_len, weights=weights)
            facts = write_fused_graph(decoder, tmp, accuracy_level=accuracy_level)
            del decoder
        if check:
            with stage("Checking the fused graph against the portable graph", enabled=progress):
                session = FusedOrtSession(tmp / FUSED_GRAPH, batch_size=batch_size, ctx_len=ctx_len, prompt_len=prompt_len, threads=threads)
                exact = weights in ("fp32", "native") and not int8_activations
                facts["check"] = check_against_portable(session, onnx_path, prompt_len=prompt_len, gate=exact)
                session.close()
        return facts

    return build_artifact(target, manifest, build, required=(FUSED_GRAPH,), force=force)


def _export_config(export_dir: Path):
    """The HF config the export recorded (a ``PretrainedConfig``)."""
    from transformers import AutoConfig

    record = read_manifest(export_dir) or {}
    config = dict(record.get("outputs", {}).get("config") or {})
    if not config.get("model_type"):
        raise QEffError(f"{export_dir}/manifest.json records no model config; re-export the model")
    return AutoConfig.for_model(config.pop("model_type"), **config)


GRAPHS = ("auto", "fused", "portable")


def check_cpu_options(source, *, graph: str, weights: str, int8_activations: bool) -> None:
    """Refuse option combinations that cannot work, before anything is loaded or exported
    (``source``: the resolved ``qeff.loading.ModelSource``)."""
    if graph == "portable" and (weights != "fp32" or int8_activations):
        raise UsageError("--weights and --int8-activations apply to the fused graph; drop --ort-graph portable")
    if weights == "native" and source.kind != "gguf":
        raise UsageError(f"--weights native re-encodes a GGUF file's own blocks, and {source.name!r} is not a .gguf model; "
                         f"use --weights int8 or int4 to quantize its float weights")
    if int8_activations and weights == "fp32":
        raise UsageError("--int8-activations applies to quantized weights (--weights native, int8 or int4)")


def compile_for_cpu(prepared, *, graph: str = "auto", weights: str = "fp32", int8_activations: bool = False,
                    batch_size: int, prompt_len: int, ctx_len: int, threads: int | None = None,
                    force: bool = False, say: Callable[[str], None] = print) -> Built | None:
    """The CLI's choice of ONNX Runtime graph for a prepared export (``qeff.pipeline.Prepared``):
    the fused graph when ``graph`` allows it and the architecture is covered, else None (the
    caller compiles the portable graph). ``auto`` falls back with a note; ``fused`` insists."""
    from types import SimpleNamespace

    from qeff.compilers.ort_fused import unsupported_reason

    if graph not in GRAPHS:
        raise UsageError(f"unknown ONNX Runtime graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    if prepared.source is not None:
        check_cpu_options(prepared.source, graph=graph, weights=weights, int8_activations=int8_activations)
    if graph == "portable":
        return None
    config = (prepared.export.manifest.get("outputs") or {}).get("config") or {}
    reason = unsupported_reason(SimpleNamespace(**config)) if config else "the export recorded no model config"
    if reason:
        if graph == "fused" or weights != "fp32":
            raise UsageError(f"the fused ONNX Runtime graph cannot run this model: {reason}")
        say(f"[qeff] {reason}: running the portable ONNX graph")
        return None
    source = prepared.source
    gguf = source.path if source is not None and source.kind == "gguf" else None
    built = compile_fused(prepared.export_dir, batch_size=batch_size, prompt_len=prompt_len, ctx_len=ctx_len, weights=weights,
                          load_model=lambda: prepared.model, gguf_path=gguf, int8_activations=int8_activations,
                          threads=threads, force=force, progress=True)
    check = (built.manifest.get("outputs") or {}).get("check")
    if check:
        say(f"[qeff] fused graph vs portable graph: logits max-abs {check['logits_max_abs']:.2e}, MSE {check['logits_mse']:.2e}, "
            f"tokens {check['tokens_matched']}/{check['tokens_total']}" + ("" if check["gated"] else " (weights re-quantized: reported, not gated)")
            + (" (cached)" if built.reused else ""))
    return built
