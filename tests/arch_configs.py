"""The tiny configurations the architecture tests run: the model cards' tiny tier, one source.

``TINY``: card id → (HF ``model_type``, config). Every card whose architecture the transform
supports contributes its ``[tiny]`` config (cards with the same tiny config count once); adding an
architecture is one file under ``qeff/transforms/`` plus one card, and this table follows.

Two things are the tests' own, not the architecture's: the special token ids (pad 0, bos 1, eos 2,
so that random prompts of ids >= 3 never contain them) and ``initializer_range = 0.2``, which draws
random weights large enough that the logits reach ~5 and a real bug (a missed window, soft-cap or
scale, a stale slot) moves them by 1e-3 or more, far above fp32 noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pytest_qeff.cards import default_cards_dir, load_cards

__all__ = ["LONGROPE", "TinyArch", "TINY", "VOCAB", "card_tiny"]

#: Prompts of the harness draw ids from [3, VOCAB): every card's tiny vocabulary holds them.
VOCAB = 128
_TEST_ONLY = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2}


@dataclass(frozen=True)
class TinyArch:
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    #: A known failure, run as ``xfail(strict=True)`` with this reason; None when it must pass.
    known_failure: str | None = None
    #: Refill the biases HF initialises to zero with seeded random values, so that they count.
    random_biases: bool = False

    @property
    def window(self) -> int | None:
        return self.config.get("sliding_window")


#: Architectures whose HF init zeroes biases that the model computes with (GPT-OSS: the router's
#: and the experts'); a zero bias would hide a dropped one, so the tests draw them at random.
_ZERO_INIT_BIASES = frozenset({"gpt_oss"})


def card_tiny(card) -> TinyArch:
    return TinyArch(
        card.architecture, {**card.tiny_config().hf_config(), **_TEST_ONLY},
        random_biases=card.architecture in _ZERO_INIT_BIASES,
    )


def _table() -> dict[str, TinyArch]:
    from qeff.transforms import supported_model_types

    supported = set(supported_model_types())
    table: dict[str, TinyArch] = {}
    seen: set[str] = set()
    for card_id, card in load_cards(default_cards_dir()).items():
        if card.architecture not in supported:
            continue  # the remote-code cards: their transform is a known failure of the card
        arch = card_tiny(card)
        key = json.dumps([arch.model_type, arch.config], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        assert min(arch.config.get("vocab_size", VOCAB), VOCAB) == VOCAB, f"{card_id}: tiny vocab below {VOCAB}"
        table[card_id] = arch
    return table


TINY: dict[str, TinyArch] = _table()


#: Phi-3's LongRoPE, shrunk: short factors while a sequence is at most original_max_position_embeddings
#: (16) long, long factors beyond. A test configuration, not a card's tiny tier: the 19-token prompt
#: crosses 16 in a later prefill chunk, which HF's one-shot prefill does not (see
#: qeff/transforms/phi3.py); tests/test_longrope.py measures both sides of that.
LONGROPE = TinyArch(
    "phi3",
    {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 128, **_TEST_ONLY,
        "original_max_position_embeddings": 16,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.4], "long_factor": [1.1, 2.5, 6.0, 17.0]},
    },
)
