"""The fused CPU graph as a cached artifact (:func:`compile_fused`).

    <export dir>/ort-fused_1BS_32PL_128CL/            fp32 weights
    <export dir>/ort-fused-native_1BS_32PL_128CL/     the GGUF file's own blocks (MatMulNBits)
    <export dir>/ort-fused-int4_1BS_32PL_128CL/       round-to-nearest int4 / int8 blocks
    <export dir>/ort-fused-native-a8_…                … with int8 activations inside MatMulNBits

A build writes the graph and then runs the ``check`` it is given on a session of it, before the
artifact is moved into place: the pipeline (:mod:`qeff.cpu_graph`) passes a comparison with the
portable graph of the same export, which raises for fp32/native weights outside tolerance — so a
fast graph that was never checked is never cached. The comparison lands in the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from qeff._system import library_versions
from qeff.store.artifacts import Built, build_artifact, read_manifest, verify_mode
from qeff.compilers import check_shape, onnx_identity
from qeff.errors import ArtifactError, QEffError, UsageError
from qeff.store.home import find_home
from qeff.store.layout import ORT_FUSED, ort_fused_dir_name

__all__ = ["WEIGHTS", "GRAPHS", "LOWERING_VERSION", "compile_fused", "check_cpu_options", "export_config", "fused_lowering"]

WEIGHTS = ("fp32", "native", "int8", "int4")
GRAPHS = ("auto", "fused", "portable")


def check_cpu_options(source, *, graph: str, weights: str, int8_activations: bool) -> None:
    """Refuse option combinations that cannot work, before anything is loaded or exported
    (``source``: the resolved ``qeff.intake.loading.ModelSource``, or None for a model object)."""
    if graph not in GRAPHS:
        raise UsageError(f"unknown ONNX Runtime graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    if weights not in WEIGHTS:
        raise UsageError(f"unknown weights format {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if graph == "portable" and (weights != "fp32" or int8_activations):
        raise UsageError("--weights and --int8-activations apply to the fused graph; drop --ort-graph portable")
    if weights == "native" and (source is None or source.kind != "gguf"):
        name = source.name if source is not None else "this model"
        raise UsageError(f"--weights native re-encodes a GGUF file's own blocks, and {name!r} is not a .gguf model; "
                         f"use --weights int8 or int4 to quantize its float weights")
    if int8_activations and weights == "fp32":
        raise UsageError("--int8-activations applies to quantized weights (--weights native, int8 or int4)")


def compile_fused(
    export_dir: str | os.PathLike,
    *,
    batch_size: int = 1,
    prompt_len: int = 32,
    ctx_len: int = 128,
    weights: str = "fp32",
    load_model: Callable[[], object] | None = None,
    gguf_path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    int8_activations: bool = False,
    threads: int | None = None,
    check: Callable[[object, bool], dict] | None = None,
    unchecked: str | None = None,
    checked: bool | None = None,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> Built:
    """Build (or reuse) the fused graph of the export in ``export_dir``.

    ``load_model()`` returns the HF model (needed for ``fp32``/``int8``/``int4``, called only when
    the artifact must be built) unless ``weights_dir`` is given: a safetensors checkpoint the graph
    is built from one tensor at a time, without the model (``from_safetensors``: the same bytes);
    ``gguf_path`` is the source file for ``native``.
    ``int8_activations`` lets MatMulNBits quantize activations to int8 (faster, no longer exact).
    ``check(session, gate)`` runs on the new graph before it is cached (``gate``: whether the
    weights are exact, so that a difference must fail the build); its dict goes to the manifest.
    ``unchecked``: why there is no ``check`` (recorded in the manifest as the check that did not run).
    ``checked``: whether the graph is checked, when its caller runs the check as a stage of its own
    after the build (:func:`qeff.cpu_graph.check_fused`); default: whether ``check`` is given.
    """
    check_cpu_options(None if gguf_path is None else _gguf_source(gguf_path), graph="fused", weights=weights,
                      int8_activations=int8_activations)
    if weights != "native" and load_model is None and weights_dir is None:
        raise UsageError(f"--weights {weights} needs the model's weights (load_model)")
    check_shape(batch_size, prompt_len, ctx_len)
    export_dir = Path(export_dir)
    onnx_path = export_dir / "model.onnx"
    if not onnx_path.is_file():
        raise UsageError(f"{export_dir} holds no exported model.onnx; run `qeff export` first")
    options = {"batch_size": batch_size, "prompt_len": prompt_len, "ctx_len": ctx_len}
    accuracy_level = 4 if int8_activations else 0
    manifest = {"backend": "ort", "graph": "fused", "weights": weights, "accuracy_level": accuracy_level, "options": options,
                "onnx": onnx_identity(onnx_path), "versions": library_versions(),
                "checked": check is not None if checked is None else checked,
                "logits_rows": True}  # last_index has its own dim (verify steps); older artifacts are rebuilt
    if weights != "fp32":
        # Blocks with offsets run with the default zero point where exact (NBitsWeight.recentred):
        # artifacts built before are rebuilt, so a cached native graph is the faster lowering.
        manifest["nbits_zero_points"] = "recentred"
    if weights == "native":
        manifest["gguf"] = _gguf_source(gguf_path).identity(home=find_home(export_dir), rehash=verify_mode() == "full")
    lowering = fused_lowering(batch_size, weights)
    # The graph's structure is part of its identity: artifacts of an older lowering are rebuilt.
    manifest["lowering"] = {"version": LOWERING_VERSION, **lowering}
    target = Path(out_dir) if out_dir else export_dir / ort_fused_dir_name(**options, weights=weights, int8_activations=int8_activations)

    def build(tmp: Path) -> dict:
        from qeff.compilers.ort_fused import write_fused_graph
        from qeff.meter import measured
        from qeff.progress import stage
        from qeff.runtime.ort_fused import FusedOrtSession

        from_files = weights != "native" and weights_dir is not None
        model = load_model() if weights != "native" and not from_files else None  # its load is a stage of its own
        with measured("fused-build"), stage(f"Building the fused ONNX Runtime graph ({weights} weights)", enabled=progress):
            if weights == "native":
                from qeff.compilers.ort_fused_weights import from_gguf

                decoder = from_gguf(Path(gguf_path), export_config(export_dir), ctx_len)
            elif from_files:
                from qeff.compilers.ort_fused_weights import from_safetensors

                decoder = from_safetensors(Path(weights_dir), ctx_len, weights=weights)
            else:
                from qeff.compilers.ort_fused_weights import from_hf

                decoder = from_hf(model, ctx_len, weights=weights)
                del model
            facts = write_fused_graph(decoder, tmp, accuracy_level=accuracy_level, **lowering)
            del decoder
        if check is not None:
            with measured("fused-check"):
                session = FusedOrtSession(tmp / ORT_FUSED, batch_size=batch_size, ctx_len=ctx_len, prompt_len=prompt_len,
                                          threads=threads)
                facts["check"] = check(session, weights in ("fp32", "native") and not int8_activations)
                session.close()
        elif unchecked:
            facts["check"] = {"ran": False, "reason": unchecked}
        return facts

    def size_hint() -> int | None:
        """For the message if the disk fills up: fp32 weights take what the export's graph takes,
        plus the tied embedding's second copy (the fused graph's head has its own; the export
        shares one table); quantized ones a fraction of it (int8 ~1/4, 4-bit blocks ~1/7; the
        file's own for native)."""
        onnx_bytes = sum(p.stat().st_size for p in export_dir.glob("model.onnx*") if p.is_file())
        if weights == "native":
            return Path(gguf_path).stat().st_size
        try:
            tied = int(((read_manifest(export_dir) or {}).get("outputs") or {}).get("tied_embedding_bytes") or 0)
        except (ArtifactError, TypeError, ValueError):
            tied = 0
        return (onnx_bytes + tied) // {"fp32": 1, "int8": 4, "int4": 7}[weights]

    return build_artifact(target, manifest, build, required=(ORT_FUSED,), force=force, size_hint=size_hint)


#: Bumped whenever the fused graph's structure changes in a way ``fused_lowering`` does not name
#: (2: the norms' unused outputs left unnamed, one LM head MatMul and two gate/up MatMuls at batch 1).
LOWERING_VERSION = 2


def fused_lowering(batch_size: int, weights: str) -> dict[str, bool]:
    """How the fused graph is lowered for ``batch_size`` rows of ``weights`` (``write_fused_graph``'s
    keywords). fp32: the vocabulary projection in one MatMul and gate/up as two MatMuls, as
    onnxruntime-genai's graph has them: ONNX Runtime's profiler on SmolLM2 decode steps (docs/cpu.md,
    "fp32 against onnxruntime-genai at batch 1") put the 4 column slices of the head 25-37 % above
    one MatMul of the same weights and the Split after a packed gate|up at 1.2-1.6 % of a step, the
    packed MatMul itself costing what the two do; the price is ~80 MiB more peak when the session
    opens (ONNX Runtime prepacks the head into a copy). The norms' unused statistics outputs stay
    unnamed for every weight format. Compressed weights keep gate|up packed for
    one row (one MatMulNBits and one offset term for both; not re-measured) and have no float head
    to slice."""
    return {"pack_gate_up": batch_size == 1 and weights != "fp32", "slice_lm_head": False, "norm_stats": False}


def _gguf_source(path):
    from qeff.intake.loading import ModelSource

    path = Path(path)
    return ModelSource(str(path), "gguf" if path.suffix == ".gguf" else "local", path=path)


def export_config(export_dir: Path):
    """The HF config the export recorded (a ``PretrainedConfig``)."""
    from transformers import AutoConfig

    record = read_manifest(export_dir) or {}
    config = dict(record.get("outputs", {}).get("config") or {})
    if not config.get("model_type"):
        raise QEffError(f"{export_dir}/manifest.json records no model config; re-export the model")
    return AutoConfig.for_model(config.pop("model_type"), **config)
