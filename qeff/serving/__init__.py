"""Serving features over the retained-state graph, each proved on CPU by equality to a simpler path.

- :mod:`qeff.serving.graph`: the graph variants (``batch_index`` slots, ``num_logits_to_keep``);
- :mod:`qeff.serving.session`: an ONNX Runtime session for them, and slot views of it;
- :mod:`qeff.serving.continuous`: continuous batching, with prefix caching;
- :mod:`qeff.serving.sampling`: temperature / top-k / top-p / repetition penalty, per-prompt seeds;
- :mod:`qeff.serving.speculative`: a draft proposes, the target verifies K+1 positions per step.

The modules sit in different layers of qeff (the graph below the exporter, the session beside the
runtime, the loops beside the generation loop), so this package imports none of them eagerly.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "GraphVariant": "qeff.serving.graph",
    "SamplingParams": "qeff.serving.sampling",
    "ServingOrtSession": "qeff.serving.session",
    "SlotView": "qeff.serving.session",
    "ServingResult": "qeff.serving.result",
    "generate_continuous": "qeff.serving.continuous",
    "generate_speculative": "qeff.serving.speculative",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qeff.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)
