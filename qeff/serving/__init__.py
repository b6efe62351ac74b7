"""Serving features over the retained-state graph, each proved on CPU by equality to a simpler path.

- :mod:`qeff.serving.graph`: the graph variants (``batch_index`` slots, ``num_logits_to_keep``);
- :mod:`qeff.serving.session`: an ONNX Runtime session for them;
- :mod:`qeff.serving.continuous`: continuous batching, with prefix caching;
- :mod:`qeff.serving.sampling`: temperature / top-k / top-p / repetition penalty, per-prompt seeds;
- :mod:`qeff.serving.speculative`: a draft proposes, the target verifies K+1 positions per step.
"""

from __future__ import annotations

from qeff.serving.continuous import generate_continuous
from qeff.serving.graph import GraphVariant
from qeff.serving.result import ServingResult
from qeff.serving.sampling import SamplingParams
from qeff.serving.session import ServingOrtSession

__all__ = ["GraphVariant", "SamplingParams", "ServingOrtSession", "ServingResult", "generate_continuous"]
