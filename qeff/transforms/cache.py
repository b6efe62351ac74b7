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

Continuous batching (``batch_index`` given, :mod:`qeff.serving`): the cache holds
``full_batch_size`` independent rows ("slots") and a step runs ``B <= full_batch_size`` of them,
row ``b`` of the step being cache row ``batch_index[b, 0]``. The step gathers its rows, writes the
new tokens into them exactly as above, attends over them, and writes the new tokens (only those:
one ScatterND of ``B x n_kv x S`` vectors) back into the full cache at ``(batch_index, head,
slot)``. Rows not named by ``batch_index`` are neither read nor written. The gather reads the old
cache before the ScatterND writes it, so ONNX Runtime may bind one buffer as both the cache input
and its retained output.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["RetainedStateCache", "RetainedStateLayer", "scatter_slots", "scatter_rows"]


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


class _ScatterND(torch.autograd.Function):
    """``data[indices[..., 0], indices[..., 1], indices[..., 2]] = updates`` (out of place), exported
    as one standard ONNX ScatterND: what TorchScript makes of ``index_put`` is a long chain of
    broadcasts, and the accelerator compilers know ScatterND."""

    @staticmethod
    def forward(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        return data.index_put(tuple(indices.unbind(-1)), updates)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        return None

    @staticmethod
    def symbolic(g, data, indices, updates):
        return g.op("ScatterND", data, indices, updates)


def scatter_rows(cache: torch.Tensor, batch_index: torch.Tensor, slots: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Write ``update`` (B, H, S, D) into ``cache`` (F, H, C, D) at rows ``batch_index`` (B, 1) and
    slots ``slots`` (B, S); every other entry keeps its value. The (row, head, slot) triples must
    be distinct (rows of a step are distinct slots; see :func:`scatter_slots` for the slots)."""
    b, h, s, _ = update.shape
    rows = batch_index.reshape(b, 1, 1).expand(b, h, s)  # (B, H, S)
    heads = torch.arange(h, dtype=slots.dtype, device=slots.device).reshape(1, h, 1).expand(b, h, s)
    where = slots[:, None, :].expand(b, h, s)
    indices = torch.stack([rows.to(slots.dtype), heads, where], dim=-1)  # (B, H, S, 3)
    return _ScatterND.apply(cache, indices, update.to(cache.dtype))


class RetainedStateLayer(CacheLayerMixin):
    """One layer's retained cache. ``update`` is functional: it returns new tensors (the scatter
    output) and keeps them as ``keys``/``values``, so the wrapper can return them as outputs."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
        valid: torch.Tensor,
        batch_index: torch.Tensor | None = None,
    ):
        super().__init__()
        self.keys = keys  # (B, H_kv, C, D); with batch_index: (F, H_kv, C, D), all slots
        self.values = values
        self._slots = slots  # (B, S) in [0, C)
        self._valid = valid  # (B, S) bool
        self._batch_index = batch_index  # (B, 1) rows of the full cache this step runs, or None
        self._attend: int | None = None  # compute context length: attention reads slots [0, attend)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # The retained cache is always initialised: its tensors are the graph's inputs.
        return None

    def _merge(self, cache: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, update), both (B, H_kv, S, D): where each token goes, and what it writes."""
        b, h, _, d = cache.shape
        # The step's length from position_ids, not from ``new``: HF code that splits heads with
        # ``unflatten``/``unbind`` (Falcon since transformers 5.25) leaves ``new.shape[2]`` a
        # constant in the TorchScript trace, and the graph then only runs at the traced length.
        s = self._slots.shape[1]
        index = self._slots[:, None, :, None].expand(b, h, s, d)  # (B, H_kv, S, D)
        # Pads write back what their (unused) slot already holds: a no-op, never a corruption.
        old = torch.gather(cache, 2, index)
        return index, torch.where(self._valid[:, None, :, None], new.to(cache.dtype), old)

    def _write(self, cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        index, update = self._merge(cache, new)
        return cache.scatter(2, index, update)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._batch_index is None:
            self.keys = self._write(self.keys, key_states)
            self.values = self._write(self.values, value_states)
            return self._visible(self.keys), self._visible(self.values)
        # Continuous batching: attend over this step's rows, write only the new tokens back.
        seen = []
        for name, new in (("keys", key_states), ("values", value_states)):
            full = getattr(self, name)  # (F, H, C, D)
            rows = full.index_select(0, self._batch_index[:, 0])  # (B, H, C, D), read before the write
            index, update = self._merge(rows, new)
            setattr(self, name, scatter_rows(full, self._batch_index, self._slots, update))
            seen.append(self._visible(rows.scatter(2, index, update)))
        return seen[0], seen[1]

    def _visible(self, cache: torch.Tensor) -> torch.Tensor:
        """The slots attention reads: all of them, or the first ``attend`` (compute context
        length). The slice is taken after the full-size write, so the retained output and the
        in-place binding are those of the graph without it."""
        return cache if self._attend is None else cache[:, :, : self._attend]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self._attend is not None:
            return self._attend, 0  # the compute context length
        return self.keys.shape[2], 0  # ctx_len, with or without batch_index

    def get_seq_length(self) -> int:
        # Only used by HF when position_ids are not given; the wrapper always gives them.
        return 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_max_cache_shape(self) -> int:
        # Abstract in transformers 5.0's CacheLayerMixin (dropped later): the slots a row holds.
        return self.keys.shape[2]


class RetainedStateCache(Cache):
    """A :class:`transformers.Cache` over :class:`RetainedStateLayer` s, one per decoder layer.

    ``position_ids`` (B, S), ``-1`` = pad, are those of the step being run: an attention that must
    know where its queries sit (ALiBi's distance bias, see ``mpt.py``) reads them here, because HF
    does not hand positions to every attention module.
    """

    def __init__(
        self,
        past: list[tuple[torch.Tensor, torch.Tensor]],
        position_ids: torch.Tensor,
        batch_index: torch.Tensor | None = None,
    ):
        ctx_len = past[0][0].shape[2]
        slots = scatter_slots(position_ids, ctx_len)
        valid = position_ids >= 0
        super().__init__(layers=[RetainedStateLayer(k, v, slots, valid, batch_index) for k, v in past])
        self.position_ids = position_ids
        self.batch_index = batch_index

    def attend(self, length) -> None:
        """Let attention read only cache slots ``0 … length-1`` (every position of the step must
        be below ``length``); writes still go to the whole cache."""
        for layer in self.layers:
            layer._attend = length

    def retained(self) -> list[torch.Tensor]:
        """The updated cache, flattened as ``[k0, v0, k1, v1, …]`` (the graph's output order)."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            out.extend((layer.keys, layer.values))
        return out
