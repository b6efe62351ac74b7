"""Llama family: Llama, Mistral, Qwen2, Qwen3, SmolLM3 (RMSNorm, RoPE, grouped-query attention).

Nothing differs from the generic mechanism: their attention calls ``cache.update`` and adds the
4D mask. Mistral's ``sliding_window`` and the per-layer ``layer_types`` of Qwen2, Qwen3 and SmolLM3
are read by the generic window rule in :mod:`qeff.transforms.registry`. What is special about the
newer ones happens inside HF's own attention, on the positions the wrapper passes:

- Qwen3 normalises queries and keys per head (``q_norm``/``k_norm``) before RoPE;
- SmolLM3 skips RoPE on every ``no_rope_layer_interval``-th layer (``config.no_rope_layers[i] == 0``,
  "NoPE"), and with ``use_sliding_window`` those NoPE layers are its windowed ones.
"""

from __future__ import annotations

from qeff.transforms.registry import ArchSpec, register


def _modules(prefix: str) -> frozenset[str]:
    parts = ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")
    return frozenset(prefix + p for p in parts)


LLAMA = register(
    ArchSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        modules=_modules("Llama") | _modules("Mistral") | _modules("Qwen2") | _modules("Qwen3") | _modules("SmolLM3"),
    )
)
