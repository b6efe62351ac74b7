"""Falcon: multi-query attention and its variants; the ALiBi variant is refused.

What the cache holds follows ``FalconAttention`` exactly:

- ``new_decoder_architecture`` (Falcon-40B/180B): transformers up to 5.24 broadcasts the
  ``num_kv_heads`` key/value groups to all ``num_attention_heads`` *before* ``cache.update`` (one
  cache row per query head); from 5.25 the cache holds the ``num_kv_heads`` groups and attention
  widens them (:func:`qeff.compat.falcon_cache_per_query_head` says which the installed one does);
- ``multi_query`` (Falcon-7B): one key/value head;
- neither: ``num_kv_heads`` (= the number of heads).

``alibi=True`` (falcon-rw) is refused: ``FalconModel.forward`` builds its ALiBi tensor from a 2D
padding mask (it unpacks ``attention_mask.shape`` into two values), which the retained-state
graph's 4D mask cannot feed; supporting it means replacing ``FalconModel.forward`` itself.
"""

from __future__ import annotations

from qeff.compat import falcon_cache_per_query_head
from qeff.transforms.registry import ArchSpec, register


def _kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    if config.new_decoder_architecture:
        kv = heads if falcon_cache_per_query_head() else config.num_kv_heads
    elif config.multi_query:
        kv = 1
    else:
        kv = config.num_kv_heads
    return kv, config.hidden_size // heads


def _refuse(config) -> str | None:
    if config.alibi:
        return "alibi=True: FalconModel builds its ALiBi bias from a 2D padding mask, not a position-based 4D mask"
    return None


FALCON = register(
    ArchSpec(
        name="falcon",
        model_types=("falcon",),
        modules=frozenset(
            {
                "FalconForCausalLM", "FalconModel", "FalconDecoderLayer", "FalconAttention", "FalconMLP",
                "FalconLinear", "FalconRotaryEmbedding",
            }
        ),
        kv_shape=_kv_shape,
        refuse=_refuse,
    )
)
