"""Serving features over the retained-state graph, each proved on CPU by equality to a simpler path.

- :mod:`qeff.serving.graph`: the graph variants (``batch_index`` slots, ``num_logits_to_keep``);
- the ONNX Runtime session for them, and slot views of it, is :mod:`qeff.runtime.ort_serving` (beside
  the other ORT sessions; the Cloud AI one is :mod:`qeff.runtime.qaic`);
- :mod:`qeff.serving.options`, :mod:`qeff.serving.dispatch`: the command line's serving options,
  and the run that picks the loop for them.

The loops themselves — continuous batching with prefix caching, speculative and prompt-lookup
decoding — and sampling are strategies on the generation engine, in :mod:`qeff.generation`
(``qeff.serving.continuous``, ``.speculative``, ``.sampling``, ``.ngram`` and ``.result`` stay as
names for them). The modules sit in different layers of qeff (the graph below the exporter, the
dispatch above the loops), so this package imports none of them
eagerly.
"""

from __future__ import annotations

from qeff._lazy import lazy_attributes

_LAZY = {
    "GraphVariant": "qeff.serving.variant",
    "SamplingParams": "qeff.generation.sampling",
    "ServingOrtSession": "qeff.runtime.ort_serving",
    "SlotView": "qeff.runtime.ort_serving",
    "ServingResult": "qeff.generation.result",
    "generate_continuous": "qeff.generation.continuous",
    "generate_speculative": "qeff.generation.speculative",
    "NgramDrafter": "qeff.generation.ngram",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
