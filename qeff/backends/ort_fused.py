"""ONNX Runtime on the CPU, fused graph: a llama-family decoder written from the model's weights
with ORT's fused kernels (:mod:`qeff.compilers.ort_fused`), cached as
``<export>/ort-fused[-weights]_1BS_32PL_128CL/`` (:mod:`qeff.compilers.ort_fused_artifact`).

``compile`` needs more than the exported graph: the weights (the loaded model, its safetensors
files or a GGUF file) and, optionally, a check to run on the new graph before it is cached;
:class:`FusedOptions` carries them. Whether a model gets this graph is the pipeline's decision
(:meth:`qeff.pipeline.Pipeline.compile`, :mod:`qeff.cpu_graph`), not this module's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qeff.store.artifacts import Built
from qeff.backends.base import Shape, existing_onnx
from qeff.compilers.ort_fused_artifact import compile_fused
from qeff.store.layout import ORT_FUSED
from qeff.runtime.base import Session
from qeff.runtime.ort_fused import FusedOrtSession

__all__ = ["FusedOptions", "compile", "open", "RUN_OPTIONS"]

RUN_OPTIONS = ("threads",)


@dataclass(frozen=True)
class FusedOptions:
    """What the fused build reads besides the graph (see :func:`qeff.compilers.ort_fused_artifact.compile_fused`)."""

    weights: str = "fp32"  #: fp32, native (a GGUF file's blocks), int8, int4
    load_model: Callable[[], object] | None = None
    gguf_path: str | os.PathLike | None = None
    weights_dir: str | os.PathLike | None = None
    int8_activations: bool = False
    threads: int | None = None
    check: Callable[[object, bool], dict] | None = None
    unchecked: str | None = None
    checked: bool | None = None


def compile(
    onnx_path: str | os.PathLike,
    shape: Shape,
    options: FusedOptions = FusedOptions(),
    *,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> Built:
    """Build (or reuse) the fused graph of the export holding ``onnx_path``."""
    onnx_path = existing_onnx(onnx_path)
    o = options
    return compile_fused(onnx_path.parent, batch_size=shape.batch_size, prompt_len=shape.prompt_len, ctx_len=shape.ctx_len,
                         weights=o.weights, load_model=o.load_model, gguf_path=o.gguf_path, weights_dir=o.weights_dir,
                         int8_activations=o.int8_activations, threads=o.threads, check=o.check, unchecked=o.unchecked,
                         checked=o.checked, out_dir=out_dir, force=force, progress=progress)


def open(built: Built, *, threads: int | None = None) -> Session:
    """A session on the fused graph, sized from the manifest."""
    options = built.manifest["inputs"]["options"]
    return FusedOrtSession(Path(built.path) / ORT_FUSED, batch_size=options["batch_size"], ctx_len=options["ctx_len"],
                           prompt_len=options["prompt_len"], threads=threads)
