"""Sessions: one class per kind of graph, one interface (:class:`qeff.runtime.base.Session`).

- :mod:`qeff.runtime.ort`: the portable graph on ONNX Runtime, and the cache binding every ORT
  session shares (:class:`~qeff.runtime.ort.RetainedCache`);
- :mod:`qeff.runtime.ort_fused`: the fused CPU graph;
- :mod:`qeff.runtime.ort_serving`: the serving variants (continuous batching, speculative targets);
- :mod:`qeff.runtime.qaic`: a QPC on Cloud AI 100, plain or serving;
- :mod:`qeff.runtime.torch`: the transformed PyTorch model (verification).

Which session opens a compiled artifact is decided by :func:`qeff.backends.open_session` from the
artifact's manifest; this package imports nothing above it.
"""

from __future__ import annotations

from qeff.runtime.base import Session

__all__ = ["Session"]
