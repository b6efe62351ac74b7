"""Falcon: multi-query attention and its variants; the ALiBi variant is refused.

What the cache holds follows ``FalconAttention`` exactly:

- ``new_decoder_architecture`` (Falcon-40B/180B): the ``num_kv_heads`` key/value groups are
  broadcast to all ``num_attention_heads`` *before* ``cache.update``, so the cache has one slot row
  per query head (HF stores it that way too);
- ``multi_query`` (Falcon-7B): one key/value head;
- neither: ``num_kv_heads`` (= the number of heads).

``alibi=True`` (falcon-rw) is refused: ``FalconModel.forward`` builds its ALiBi tensor from a 2D
padding mask (it unpacks ``attention_mask.shape`` into two values), which the retained-state
graph's 4D mask cannot feed; supporting it means replacing ``FalconModel.forward`` itself.
"""

from __future__ import annotations

from qeff.transforms.registry import ArchSpec, register


def _kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    if config.new_decoder_architecture:
        kv = heads
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
