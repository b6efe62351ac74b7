"""Serving features over the retained-state graph, each proved on CPU by equality to a simpler path.

- :mod:`qeff.serving.graph`: the graph variants (``batch_index`` slots, ``num_logits_to_keep``);
- :mod:`qeff.serving.continuous`: continuous batching, with prefix caching;
- :mod:`qeff.serving.sampling`: temperature / top-k / top-p / repetition penalty, per-prompt seeds;
- :mod:`qeff.serving.speculative`: a draft proposes, the target verifies K+1 positions per step;
- :mod:`qeff.serving.ngram`: prompt lookup, a drafter made of the text's own n-grams.

The ONNX Runtime session of those graphs is :mod:`qeff.runtime.ort_serving`, beside the other ORT
sessions (the Cloud AI one is :mod:`qeff.runtime.qaic`). The modules sit in different layers of qeff
(the graph below the exporter, the loops beside the generation loop), so this package imports none
of them eagerly.
"""

from __future__ import annotations

from qeff._lazy import lazy_attributes

_LAZY = {
    "GraphVariant": "qeff.serving.variant",
    "SamplingParams": "qeff.serving.sampling",
    # The ONNX Runtime session of the variants, named here too for the serving examples.
    "ServingOrtSession": "qeff.runtime.ort_serving",
    "SlotView": "qeff.runtime.ort_serving",
    "ServingResult": "qeff.serving.result",
    "generate_continuous": "qeff.serving.continuous",
    "generate_speculative": "qeff.serving.speculative",
    "NgramDrafter": "qeff.serving.ngram",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
