"""Seeded tiny configurations, one per architecture variant the transform supports.

One table, ``TINY``: case id → (HF ``model_type``, config overrides). These are the "tiny" tier of
the model cards to come: a few layers, hidden 32, vocab 128, random weights from a fixed seed, so
the whole conformance chain runs in seconds per case. Token ids 0-2 are kept for pad/bos/eos;
configs whose defaults point special tokens outside the tiny vocabulary are moved inside it.

Sliding windows are tiny (4-6) so that prompts and generations in the tests run well past them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TinyArch", "TINY", "VOCAB"]

VOCAB = 128
_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2}
#: Llama-style decoders: RMSNorm, rotary, grouped-query attention (2 key/value heads for 4 query heads).
_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=128, **_SPECIAL,
)
#: GPT-2-style configs name the same dims differently.
_GPT = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, **_SPECIAL)


@dataclass(frozen=True)
class TinyArch:
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    #: A known failure, run as ``xfail(strict=True)`` with this reason; None when it must pass.
    known_failure: str | None = None

    @property
    def window(self) -> int | None:
        return self.config.get("sliding_window")


TINY: dict[str, TinyArch] = {
    "llama": TinyArch("llama", _DECODER),
    "mistral-window4": TinyArch("mistral", {**_DECODER, "sliding_window": 4}),
    # Layer 0 full attention, layer 1 sliding (layers >= max_window_layers slide): one mask per layer type.
    "qwen2-window4": TinyArch(
        "qwen2", {**_DECODER, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    ),
    "mixtral-moe": TinyArch("mixtral", {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gpt2": TinyArch("gpt2", _GPT),
    "gpt_bigcode-mqa": TinyArch("gpt_bigcode", {**_GPT, "multi_query": True}),
    "codegen": TinyArch("codegen", {**_GPT, "rotary_dim": 4}),
    "gptj": TinyArch("gptj", {**_GPT, "rotary_dim": 4}),
    "mpt-alibi": TinyArch(
        "mpt", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=VOCAB, **_SPECIAL)
    ),
    # Falcon-7B layout: one key/value head, attention and MLP in parallel off one layernorm.
    "falcon-mqa": TinyArch(
        "falcon",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, **_SPECIAL),
    ),
    # Falcon-40B layout: grouped key/value heads broadcast before the cache, two parallel layernorms.
    "falcon-new-decoder": TinyArch(
        "falcon",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
            vocab_size=VOCAB, **_SPECIAL,
        ),
    ),
    # Sequential attention then MLP, full multi-head attention.
    "falcon-sequential-mha": TinyArch(
        "falcon",
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=False, parallel_attn=False,
            vocab_size=VOCAB, **_SPECIAL,
        ),
    ),
    "starcoder2-window6": TinyArch("starcoder2", {**_DECODER, "sliding_window": 6}),
    "phi": TinyArch("phi", {**_DECODER, "num_key_value_heads": 4, "partial_rotary_factor": 0.5}),
    "phi3-window6": TinyArch("phi3", {**_DECODER, "sliding_window": 6}),
    "gemma": TinyArch("gemma", {**_DECODER, "num_key_value_heads": 1, "head_dim": 8}),
    # Small caps so that tanh is far from linear on these logits; windowed and full layers alternate.
    "gemma2-softcap-window4": TinyArch(
        "gemma2",
        {
            **_DECODER, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4,
            "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
        },
    ),
    "granite": TinyArch(
        "granite",
        {
            **_DECODER, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.25,
            "logits_scaling": 4.0,
        },
    ),
    "olmo2": TinyArch("olmo2", _DECODER),
}
