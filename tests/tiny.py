"""Seeded tiny configurations of the core architectures (random weights, built from config)."""

from __future__ import annotations

import numpy as np

import qeff

_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_BASE)),
    # A tiny window, so prompts and generations run well past it.
    "mistral-sliding": ("mistral", dict(_BASE, sliding_window=6)),
    "qwen2": ("qwen2", dict(_BASE)),
}


def tiny_model(name: str, seed: int = 0):
    model_type, config = TINY_CONFIGS[name]
    return qeff.from_config(model_type, config, seed=seed)


def random_prompts(lengths, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]
