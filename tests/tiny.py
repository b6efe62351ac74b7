"""Seeded tiny models of the core architectures, from the model cards' tiny tier (one source of
tiny configs: see ``tests/arch_configs.py``)."""

from __future__ import annotations

import numpy as np

import qeff
from pytest_qeff.cards import default_cards_dir, load_cards

#: Short names the core tests use → the card whose tiny tier they run.
_CARDS = {
    "llama": "smollm2-135m",  # grouped-query attention, 2 key/value heads of 16 dims, vocab 256
    "mistral-sliding": "mistral-7b-instruct-v0.1",  # a 16-slot sliding window the prompts outrun
    "qwen2": "tiny-qwen2",  # per-layer windows (layer_types): one full, one sliding
}


def _configs() -> dict[str, tuple[str, dict]]:
    cards = load_cards(default_cards_dir())
    return {name: (cards[cid].architecture, cards[cid].tiny_config().hf_config()) for name, cid in _CARDS.items()}


TINY_CONFIGS: dict[str, tuple[str, dict]] = _configs()
#: Every tiny vocabulary holds at least this many ids.
VOCAB = min(config["vocab_size"] for _, config in TINY_CONFIGS.values())


def tiny_model(name: str, seed: int = 0):
    model_type, config = TINY_CONFIGS[name]
    return qeff.from_config(model_type, config, seed=seed)


def random_prompts(lengths, vocab: int = VOCAB, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]
