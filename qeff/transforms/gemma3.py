"""Gemma 3 (text): windowed and global layers interleaved, each type with its own RoPE base.

All of it happens in HF's modules on the positions and masks the wrapper hands them:

- ``config.layer_types`` (5 ``sliding_attention`` layers per ``full_attention`` one in the real
  models) → one mask per type through the generic window rule (window ``sliding_window``, 512 in
  Gemma 3 270M);
- ``rope_parameters`` per layer type (base 10 000 local, 1 000 000 global):
  ``Gemma3RotaryEmbedding`` computes both from ``position_ids``;
- per-head RMS norms of queries and keys (``q_norm``/``k_norm``) and the query scale
  ``query_pre_attn_scalar ** -0.5`` are inside ``Gemma3Attention``.

The final logit soft-capping (None in the released checkpoints, but a config key) is applied by
``Gemma3ForCausalLM.forward``, which the wrapper does not call: Gemma 2's head does it.
``use_bidirectional_attention`` (EmbeddingGemma) is refused: the retained-state graph is causal.
"""

from __future__ import annotations

from qeff.transforms.gemma2 import _softcapped_head
from qeff.transforms.registry import ArchSpec, register


def _refuse(config) -> str | None:
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention=True: an encoder (EmbeddingGemma), not a causal LM with a KV cache"
    return None


GEMMA3 = register(
    ArchSpec(
        name="gemma3_text",
        model_types=("gemma3_text",),
        modules=frozenset(
            {
                "Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3DecoderLayer", "Gemma3Attention", "Gemma3MLP",
                "Gemma3RMSNorm", "Gemma3RotaryEmbedding", "Gemma3TextScaledWordEmbedding",
            }
        ),
        head=_softcapped_head,
        refuse=_refuse,
    )
)
