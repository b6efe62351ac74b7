"""Phi-3: fused projections (nothing to do) and LongRoPE, whose frequencies depend on the length.

LongRoPE (``rope_scaling.type = "longrope"``, Phi-3 mini/medium 128k) rotates with the *short*
factors while a sequence is at most ``original_max_position_embeddings`` (``O``, 4096) long and
with the *long* factors beyond. HF's ``Phi3RotaryEmbedding`` picks the set once per forward call
from ``max(position_ids) + 1`` over the *whole batch*, and does so by copying into its ``inv_freq``
buffer in place: an ``aten::copy`` that ONNX cannot export, on a buffer the transform shares with
the untouched HF model, and a choice that makes one row's rotation depend on its batch-mates.

The rotary embedding below makes the same choice per row, from the row's own last position
(``max_s position_ids[r, s] + 1 > O``), with HF's arithmetic and without touching ``inv_freq``.
At batch 1 it is HF's forward exactly: keys keep the set they were rotated with, as in HF's cache.

What it does not do (and no retained-state graph can): ``Phi3ForCausalLM.prepare_inputs_for_generation``
discards the cache on the step a sequence first grows past ``O`` and recomputes every earlier
position, in every layer, with the long set. Re-rotating the cached keys is not enough (layer 1's
keys depend on layer 0's short-rotated attention outputs); it takes the earlier tokens, which a
decode step does not have. So HF ``generate`` and this graph agree while a sequence stays within
``O`` and when a prompt longer than ``O`` is prefilled in one chunk, and part after a row crosses
``O`` while decoding or in a later prefill chunk (``tests/test_longrope.py`` measures both).
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from qeff.transforms.registry import ArchSpec, register

__all__ = ["QEffPhi3RotaryEmbedding", "longrope_frequencies"]


def longrope_frequencies(config) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(short_inv_freq, long_inv_freq, O)`` of a LongRoPE config (each ``(rotary_dim / 2,)``
    float32), or None for any other RoPE type. Computed by HF's own init function, the way HF's
    rotary embedding does (the long set is what it computes for ``seq_len = O + 1``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type") != "longrope":
        return None
    original = int(params["original_max_position_embeddings"])
    init = ROPE_INIT_FUNCTIONS["longrope"]
    # The sets are constants of the graph. Computed while the exporter traces, HF's torch.tensor()
    # of the factor lists would be reported as a tracer warning (a value frozen into the graph),
    # which here is the intent: so they are computed with the tracer suspended.
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        short, _ = init(config, None)
        long, _ = init(config, None, seq_len=original + 1)
    finally:
        torch._C._set_tracing_state(state)
    return short.float(), long.float(), original


class QEffPhi3RotaryEmbedding(Phi3RotaryEmbedding):
    """LongRoPE with the short/long choice made per batch row, without touching ``inv_freq``."""

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs_sets = longrope_frequencies(self.config)
        if freqs_sets is None:
            return super().forward(x, position_ids)
        short, long, original = freqs_sets
        is_long = position_ids.max(dim=1, keepdim=True).values + 1 > original  # (B, 1)
        inv_freq = torch.where(is_long[:, :, None], long.to(x.device), short.to(x.device))  # (B, 1, R/2)
        freqs = position_ids[..., None].float() * inv_freq  # (B, S, R/2): HF's product, per row
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, R)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


PHI3 = register(
    ArchSpec(
        name="phi3",
        model_types=("phi3",),
        modules=frozenset(
            {
                "Phi3ForCausalLM", "Phi3Model", "Phi3DecoderLayer", "Phi3Attention", "Phi3MLP", "Phi3RMSNorm",
                "Phi3RotaryEmbedding",
            }
        ),
        replace={"Phi3RotaryEmbedding": QEffPhi3RotaryEmbedding},
    )
)
