"""Attention masks built from ``position_ids`` alone (the graph has no attention-mask input).

A query at position ``p`` sees cache slot ``k`` when ``k <= p`` (and, for a sliding-window layer
of width ``w``, when ``k > p - w``). Padded queries (``p == -1``) see nothing; their outputs are
discarded, and the mask uses a large finite negative value instead of ``-inf`` so that an
all-masked row gives no NaNs: a uniform softmax in PyTorch. In the exported graph the fp16-clip
pass (:func:`qeff.exporter.fp16_clip`) turns that value into -65504, so there an all-masked row is
weighted by its scores instead; only padded queries have such rows, and their outputs are dropped.
"""

from __future__ import annotations

import torch

__all__ = ["additive_mask"]


def additive_mask(
    position_ids: torch.Tensor, ctx_len: int, *, window: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, S) positions → (B, 1, S, ctx_len) additive mask: 0 where visible, ``finfo.min`` elsewhere."""
    slots = torch.arange(ctx_len, dtype=position_ids.dtype, device=position_ids.device)[None, None, None, :]
    pos = position_ids[:, None, :, None]  # (B, 1, S, 1)
    visible = slots <= pos
    if window is not None:
        visible = visible & (slots > pos - window)
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=position_ids.device)
    return torch.where(visible, zero, blocked)
