"""Serving features over the retained-state graph, each proved on CPU by equality to a simpler path.

- :mod:`qeff.serving.graph`: the graph variants (``batch_index`` slots, ``num_logits_to_keep``);
- :mod:`qeff.serving.session`: an ONNX Runtime session for them, and slot views of it;
- :mod:`qeff.serving.continuous`: continuous batching, with prefix caching;
- :mod:`qeff.serving.sampling`: temperature / top-k / top-p / repetition penalty, per-prompt seeds;
- :mod:`qeff.serving.speculative`: a draft proposes, the target verifies K+1 positions per step;
- :mod:`qeff.serving.ngram`: prompt lookup, a drafter made of the text's own n-grams.

The modules sit in different layers of qeff (the graph below the exporter, the session beside the
runtime, the loops beside the generation loop), so this package imports none of them eagerly.
"""

from __future__ import annotations

from qeff._lazy import lazy_attributes

_LAZY = {
    "GraphVariant": "qeff.serving.variant",
    "SamplingParams": "qeff.serving.sampling",
    "ServingOrtSession": "qeff.serving.session",
    "SlotView": "qeff.serving.session",
    "ServingResult": "qeff.serving.result",
    "generate_continuous": "qeff.serving.continuous",
    "generate_speculative": "qeff.serving.speculative",
    "NgramDrafter": "qeff.serving.ngram",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
