"""Generation: one engine under every loop that turns prompts into tokens.

    static.py       generate(), run_prompts(): a static batch, greedy or sampled   ┐
    continuous.py   generate_continuous(): prompts admitted into cache slots       ├ strategies
    speculative.py  generate_speculative(): a draft proposes, the target verifies  ┘
    engine.py       intake, prefill chunks, retirement (Ledger), timings (Clock)   ─ the engine
    result.py       GenerationResult, ServingResult, RunSummary and their figures
    sampling.py     temperature / top-k / top-p / repetition penalty, per-prompt streams
    ngram.py        prompt lookup: a drafter made of the text's own n-grams

Each module imports only those listed below it (``tests/test_layers.py``), so no loop reaches up
into another's; the loops never import :mod:`qeff.serving`, which builds on them. The public
names are imported on first use, so ``import qeff.generation.sampling`` does not load the loops.
"""

from __future__ import annotations

from qeff._lazy import lazy_attributes

_LAZY = {
    "generate": "qeff.generation.static",
    "run_prompts": "qeff.generation.static",
    "TextStreamer": "qeff.generation.static",
    "TokenCallback": "qeff.generation.static",
    "generate_continuous": "qeff.generation.continuous",
    "generate_speculative": "qeff.generation.speculative",
    "Engine": "qeff.generation.engine",
    "EosSuppressed": "qeff.generation.engine",
    "EOS_MODES": "qeff.generation.engine",
    "eos_ids": "qeff.generation.engine",
    "prefill_chunks": "qeff.generation.engine",
    "GenerationResult": "qeff.generation.result",
    "ServingResult": "qeff.generation.result",
    "RunSummary": "qeff.generation.result",
    "SamplingParams": "qeff.generation.sampling",
    "NgramDrafter": "qeff.generation.ngram",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
