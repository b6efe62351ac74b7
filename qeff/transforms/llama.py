"""Llama family: Llama, Mistral, Qwen2 (RMSNorm, RoPE, grouped-query attention).

Nothing differs from the generic mechanism: their attention calls ``cache.update`` and adds the
4D mask. Mistral's ``sliding_window`` and Qwen2's per-layer ``layer_types`` are read by the
generic window rule in :mod:`qeff.transforms.registry`.
"""

from __future__ import annotations

from qeff.transforms.registry import ArchSpec, register


def _modules(prefix: str) -> frozenset[str]:
    parts = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")
    return frozenset(prefix + p for p in parts)


LLAMA = register(
    ArchSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        modules=_modules("Llama") | _modules("Mistral") | _modules("Qwen2"),
    )
)
