"""MPT: ALiBi instead of position embeddings; its attention is replaced by a drop-in subclass.

HF's ``MptAttention`` adds ``alibi[:, :, P - key_length:]`` (``alibi[h, 0, j] = slope_h * (j + 1 - P)``,
``P = max_seq_len``) to the scores. With a ``ctx_len``-slot retained cache that is a bias of
``slope_h * (k + 1 - ctx_len)`` on slot ``k`` for every query: equal to HF's softmax in exact
arithmetic (softmax ignores a constant per row), but the constant grows with ``ctx_len``: at
``ctx_len = 2048`` and slope 0.84 every visible score carries a bias near -1700, whose rounding
(ulp 1.2e-4 in fp32, 1.0 in fp16) swamps the scores themselves. The offset is also computed in
Python (``max(0, ...)``), which the tracer freezes to the example's shapes, and a cache longer than
``max_seq_len`` cannot be sliced at all.

The replacement adds the bias HF means, ``slope_h * (k - p)`` for a query at position ``p``: it is
bit-identical to HF's at every decode step (HF's key length is then ``p + 1``), differs at prefill
only by HF's per-row constant, is never large where a key is visible, and takes ``p`` from the
retained-state cache (:attr:`RetainedStateCache.position_ids`) since MPT passes no positions to its
attention. With any other cache it runs HF's forward unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mpt.modeling_mpt import MptAttention

from qeff.transforms.cache import RetainedStateCache
from qeff.transforms.registry import ArchSpec, register


class QEffMptAttention(MptAttention):
    def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        if not isinstance(cache, RetainedStateCache):
            return super().forward(hidden_states, position_bias, cache=cache, attention_mask=attention_mask, **kwargs)
        batch_size, seq_length = hidden_states.shape[:2]
        mixed_qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = mixed_qkv.chunk(3, dim=2)
        shape = (batch_size, seq_length, self.n_heads, self.head_dim)
        query, key, value = (t.reshape(shape).transpose(1, 2) for t in (query, key, value))  # (B, H, S, D)
        key, value = cache.update(key, value, self.layer_idx)  # (B, H, C, D)

        scores = torch.matmul(query, key.transpose(-1, -2)) * self.softmax_scale  # (B, H, S, C)
        # One step of HF's bias row is the head's slope (its last two columns are -slope and 0).
        slopes = (position_bias[:, 0, -1] - position_bias[:, 0, -2])[None, :, None, None]  # (1, H, 1, 1)
        slots = torch.arange(key.shape[2], device=key.device)  # (C,)
        distance = (slots[None, None, :] - cache.position_ids[:, :, None]).to(scores.dtype)  # (B, S, C)
        scores = scores + distance[:, None] * slopes
        if attention_mask is not None:  # MptModel hands a bool mask: True = blocked
            scores = scores.masked_fill(attention_mask, torch.finfo(query.dtype).min)

        weights = nn.functional.softmax(scores.float(), dim=-1).to(value.dtype)
        context = torch.matmul(weights, value)  # (B, H, S, D)
        context = context.permute(0, 2, 1, 3).contiguous().view(batch_size, seq_length, -1)
        return self.out_proj(context), weights


MPT = register(
    ArchSpec(
        name="mpt",
        model_types=("mpt",),
        modules=frozenset({"MptForCausalLM", "MptModel", "MptBlock", "MptAttention", "MptMLP"}),
        replace={"MptAttention": QEffMptAttention},
    )
)
