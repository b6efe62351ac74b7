"""The retained-state KV cache: a fixed-size cache written by a scatter at ``position_ids``.

Layout (one layer)::

    keys, values : (B, n_kv_heads, ctx_len, head_dim)   slot k holds the token at position k

A forward step receives the whole cache as graph inputs, writes the new tokens' keys and values
into the slots named by ``position_ids`` and returns the *whole* updated cache as outputs (the
``…_RetainedState`` tensors). Attention then reads all ``ctx_len`` slots through a mask built from
``position_ids`` (see :mod:`qeff.transforms.mask`), so slots that hold stale data are never seen.

Padding (``position_id == -1``) must never corrupt a valid slot, and no index may be out of range
(ONNX Runtime rejects out-of-range scatter indices; upstream designs write pads at INT32_MAX and
rely on the device ignoring them). Here a padded token writes back the value its slot already
holds (``where(valid, new, old)``), so the scatter is a no-op for it, and it is sent to a slot that
no valid token of the same step writes, so no two writes of a step meet. With right padding inside
a chunk and valid positions ``start, start+1, …`` the pad at column ``j`` goes to
``(start + j) % ctx_len``: the ``seq_len <= ctx_len`` residues are distinct. A row with no token in
a chunk (all pads; ``start`` clamps to 0) sends its pads to slots ``0 … seq_len-1``, over its own
*earlier* valid slots: only the write-back keeps those intact (the mutation suite's "pads write
their own values" fault shows it). All indices stay in ``[0, ctx_len)``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["RetainedStateCache", "RetainedStateLayer", "scatter_slots"]


def scatter_slots(position_ids: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """Slots each token of the step writes: its position, or a harmless free slot for padding.

    position_ids: (B, S) int64, ``-1`` marks padding.  Returns (B, S) int64 in ``[0, ctx_len)``.
    """
    seq_len = position_ids.shape[1]
    start = position_ids[:, :1].clamp(min=0)  # (B, 1)
    columns = torch.arange(seq_len, dtype=position_ids.dtype, device=position_ids.device)[None, :]
    raw = start + columns
    pad_slots = raw - (raw >= ctx_len).to(raw.dtype) * ctx_len  # (B, S); start + j < 2 * ctx_len
    return torch.where(position_ids >= 0, position_ids, pad_slots)


class RetainedStateLayer(CacheLayerMixin):
    """One layer's retained cache. ``update`` is functional: it returns new tensors (the scatter
    output) and keeps them as ``keys``/``values``, so the wrapper can return them as outputs."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor):
        super().__init__()
        self.keys = keys  # (B, H_kv, C, D)
        self.values = values
        self._slots = slots  # (B, S) in [0, C)
        self._valid = valid  # (B, S) bool
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # The retained cache is always initialised: its tensors are the graph's inputs.
        return None

    def _write(self, cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        b, h, _, d = cache.shape
        s = new.shape[2]
        index = self._slots[:, None, :, None].expand(b, h, s, d)  # (B, H_kv, S, D)
        # Pads write back what their (unused) slot already holds: a no-op, never a corruption.
        old = torch.gather(cache, 2, index)
        update = torch.where(self._valid[:, None, :, None], new.to(cache.dtype), old)
        return cache.scatter(2, index, update)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys = self._write(self.keys, key_states)
        self.values = self._write(self.values, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        # Only used by HF when position_ids are not given; the wrapper always gives them.
        return 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RetainedStateCache(Cache):
    """A :class:`transformers.Cache` over :class:`RetainedStateLayer` s, one per decoder layer.

    ``position_ids`` (B, S), ``-1`` = pad, are those of the step being run: an attention that must
    know where its queries sit (ALiBi's distance bias, see ``mpt.py``) reads them here, because HF
    does not hand positions to every attention module.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], position_ids: torch.Tensor):
        ctx_len = past[0][0].shape[2]
        slots = scatter_slots(position_ids, ctx_len)
        valid = position_ids >= 0
        super().__init__(layers=[RetainedStateLayer(k, v, slots, valid) for k, v in past])
        self.position_ids = position_ids

    def retained(self) -> list[torch.Tensor]:
        """The updated cache, flattened as ``[k0, v0, k1, v1, …]`` (the graph's output order)."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            out.extend((layer.keys, layer.values))
        return out
