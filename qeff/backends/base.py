"""What every backend shares: the compiled :class:`~qeff.shape.Shape`, the :class:`Backend` record of the
table (:data:`qeff.backends.BACKENDS`), and how a manifest names its backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qeff.store.artifacts import Built
from qeff.errors import UsageError
from qeff.meter import measured
from qeff.progress import stage
from qeff.runtime.base import Session
from qeff.shape import Shape  # one shape type for the CLI's edge and the backends

__all__ = ["Shape", "Backend", "Built", "key_of", "with_progress", "existing_onnx", "positive_or_none"]


@dataclass(frozen=True)
class Backend:
    """One row of the table: the two verbs of a backend for one kind of graph.

    ``compile(onnx_path, shape, options, *, out_dir, force, progress) -> Built`` builds (or reuses)
    the artifact; ``open(built, **run) -> Session`` opens it, taking the run options named in
    ``run_options`` (the others a caller passes belong to other backends and are not given)."""

    name: str  #: the manifest's ``backend`` (what ``--backend`` names)
    graph: str  #: the manifest's ``graph``: ``portable`` (the exported graph) or ``fused``
    compile: Callable[..., Built]
    open: Callable[..., Session]
    run_options: tuple[str, ...]
    summary: str


def key_of(inputs: dict) -> tuple[str | None, str]:
    """The table's key for an artifact's manifest inputs: ``(backend, graph)``; artifacts written
    before the fused graph existed record no graph and hold the portable one."""
    return inputs.get("backend"), inputs.get("graph", "portable")


def existing_onnx(onnx_path: str | os.PathLike) -> Path:
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {str(onnx_path)!r} does not exist; run `qeff export` first")
    return onnx_path


def positive_or_none(**values) -> None:
    """Serving sizes (``full_batch_size``, ``num_speculative_tokens``) are None or positive integers."""
    bad = {k: v for k, v in values.items() if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1)}
    if bad:
        raise UsageError(f"full_batch_size and num_speculative_tokens must be positive integers (got {bad})")


def with_progress(builder: Callable[[Path], dict], description: str, enabled: bool, stage_name: str = "compile"):
    """``builder`` timed as a stage of the run (:mod:`qeff.meter`) with a progress line."""

    def run(tmp: Path) -> dict:
        with measured(stage_name), stage(description, enabled=enabled):
            return builder(tmp)

    return run
