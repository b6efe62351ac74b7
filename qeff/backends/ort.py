"""ONNX Runtime on the CPU, portable graph: the exported graph after ORT's offline optimizer.

``compile``: ``<export>/ort_1BS_32PL_128CL/model.opt.onnx`` (:mod:`qeff.compilers.ort`); a serving
variant's graph (``batch_index`` slots, ``num_logits_to_keep``) records ``full_batch_size`` /
``num_speculative_tokens`` in the manifest and its directory name. ``open``: the plain session
(:class:`~qeff.runtime.ort.OrtSession`) or, for a serving variant, the serving session
(:class:`~qeff.runtime.ort_serving.ServingOrtSession`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qeff._system import library_versions
from qeff.store.artifacts import Built, build_artifact
from qeff.backends.base import Shape, existing_onnx, positive_or_none, with_progress
from qeff.compilers import graph_bytes, onnx_identity
from qeff.compilers.ort import OPTIMIZED, build_ort
from qeff.store.layout import ort_dir_name
from qeff.runtime.base import Session
from qeff.runtime.ort import OrtSession
from qeff.runtime.ort_serving import ServingOrtSession

__all__ = ["OrtOptions", "compile", "open", "RUN_OPTIONS", "SPECIALIZE_DECODE_MAX_BYTES"]

#: What :func:`open` takes from a caller's run options.
RUN_OPTIONS = ("threads", "binding", "specialize_decode", "comp_ctx_lengths")

#: Below this many bytes of weights, an artifact opens with a pinned decode session by default.
SPECIALIZE_DECODE_MAX_BYTES = 2 * 2**30


@dataclass(frozen=True)
class OrtOptions:
    """``threads`` for the offline optimizer; the serving variant's sizes, when the graph is one."""

    threads: int | None = None
    full_batch_size: int | None = None
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        positive_or_none(full_batch_size=self.full_batch_size, num_speculative_tokens=self.num_speculative_tokens)

    def serving(self) -> dict:
        """The serving sizes that are set (recorded in the manifest; none for a plain graph)."""
        return {k: v for k, v in (("full_batch_size", self.full_batch_size), ("num_speculative_tokens", self.num_speculative_tokens))
                if v is not None}


def compile(
    onnx_path: str | os.PathLike,
    shape: Shape,
    options: OrtOptions = OrtOptions(),
    *,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> Built:
    """Optimize ``onnx_path`` into ``out_dir`` (default ``ort_{B}BS_{P}PL_{C}CL`` beside it), reused
    while its manifest matches. The compute-context ladder is not compiled in: a session takes it."""
    onnx_path = existing_onnx(onnx_path)
    recorded = {**shape.as_dict(), **options.serving()}
    manifest = {"backend": "ort", "options": recorded, "onnx": onnx_identity(onnx_path), "versions": library_versions()}
    target = Path(out_dir) if out_dir else onnx_path.parent / ort_dir_name(**recorded)
    build = with_progress(lambda tmp: build_ort(onnx_path, tmp, threads=options.threads), "Compiling for ONNX Runtime", progress)
    return build_artifact(target, manifest, build, required=(OPTIMIZED,), force=force, size_hint=lambda: graph_bytes(onnx_path))


def open(
    built: Built,
    *,
    threads: int | None = None,
    binding: str = "inplace",
    specialize_decode: bool | None = None,
    comp_ctx_lengths=None,
) -> Session:
    """A session on the artifact, sized from its manifest (``binding``: the plain session's, see
    :mod:`qeff.runtime.ort`; a serving session binds its cache in place).

    ``specialize_decode`` (plain graphs): a second session with every dim pinned for decode steps,
    ~12% more decode tokens/s for a second copy of the weights in memory; None (default) turns it
    on when the weights are under :data:`SPECIALIZE_DECODE_MAX_BYTES`. ``comp_ctx_lengths`` (a
    graph with the ladder input): the ladder, a list or a ``--comp_ctx_lengths`` string; None =
    the default ladder (:mod:`qeff.serving.ctx_ladder`)."""
    options = built.manifest["inputs"]["options"]
    model = Path(built.path) / OPTIMIZED
    if "full_batch_size" in options or "num_speculative_tokens" in options:
        return ServingOrtSession(
            model,
            batch_size=options.get("full_batch_size") or options["batch_size"],
            full_batch_size=options.get("full_batch_size"),
            ctx_len=options["ctx_len"],
            threads=threads,
            prompt_len=options["prompt_len"],
            num_speculative_tokens=options.get("num_speculative_tokens"),
            comp_ctx_lengths=comp_ctx_lengths,
        )
    if specialize_decode is None:
        weights = sum(p.stat().st_size for p in Path(built.path).glob(OPTIMIZED + "*"))
        specialize_decode = weights < SPECIALIZE_DECODE_MAX_BYTES
    return OrtSession(model, batch_size=options["batch_size"], ctx_len=options["ctx_len"], threads=threads, binding=binding,
                      prompt_len=options["prompt_len"], specialize_decode=specialize_decode, comp_ctx_lengths=comp_ctx_lengths)
