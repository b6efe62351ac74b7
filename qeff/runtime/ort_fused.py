"""The session of the fused CPU graph (:mod:`qeff.compilers.ort_fused`), behind the same
interface as every other: ``run(input_ids, position_ids) → (B, vocab)`` and ``read_cache()``.

``GroupQueryAttention`` wants, per row, how many tokens its cache holds after the step and how
many of this chunk's tokens are real; the generation loop speaks in ``position_ids`` with ``-1``
for padding. This session translates, per step, in a few numpy operations:

- a row's valid tokens are its leading non-negative positions ``p0, p0+1, …`` (right padding);
  ``query_seqlens = Q`` (their count), ``seqlens_k = p0 + Q - 1``;
- a row with no valid token is idle: ``Q = 0``, nothing is written to its cache, its logits are
  garbage the loop never reads (``seqlens_k = 0`` keeps the kernel's bounds satisfied);
- trailing columns where every row is padding are cut off before the run (a 33-token prompt in a
  64-token chunk computes 33 columns), and only each row's last valid token goes through the
  vocabulary projection (``last_index``).

``run(..., keep=N)`` returns ``(B, N, vocab)``: as the portable graph's ``num_logits_to_keep``,
the logits of each row's last N valid columns (from column 0 when it has fewer: the verify step of
speculative and prompt-lookup decoding), gathered through ``last_index`` from B·N positions
instead of B. A column a row pads gives logits the loop never reads.

Positions that are not of this shape (gaps, padding before a token) are refused: the fused
kernels cannot express them, and nothing in qeff produces them.

The cache is one OrtValue per tensor, bound as both ``past_*`` input and ``…_RetainedState``
output: GroupQueryAttention appends into it in place (its past/present buffer sharing).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import qeff.runtime.ort as ort_runtime  # its functions looked up at call time (tests spy on session_options)
from qeff._system import physical_cores
from qeff.errors import UsageError
from qeff.store.layout import LOGITS_ROWS
from qeff.runtime.ort import CacheInputs, RetainedCache

__all__ = ["FusedOrtSession", "step_inputs"]


def step_inputs(position_ids: np.ndarray, ctx_len: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(B, S)`` positions → ``(columns, seqlens_k, total_sequence_length, query_seqlens, last_index)``.

    ``columns`` is how many leading columns carry a valid token in some row."""
    batch, seq = position_ids.shape
    valid = position_ids >= 0
    q = valid.sum(axis=1)  # (B,)
    start = position_ids[:, 0]
    expected = np.where(np.arange(seq)[None, :] < q[:, None], start[:, None] + np.arange(seq)[None, :], -1)
    if not np.array_equal(position_ids, expected):
        raise UsageError(
            "the fused ONNX Runtime graph needs each row's positions to be consecutive and right-padded "
            "(p, p+1, …, then -1); open the portable graph for other layouts"
        )
    columns = max(int(q.max()), 1)
    active = q > 0
    total = np.where(active, start + q, 1)  # tokens in each row's cache after the step (idle rows: a placeholder)
    if (active & (start + columns > ctx_len)).any() or columns + 1 > ctx_len and (~active).any():
        raise UsageError(f"a chunk of {columns} tokens at these positions does not fit ctx_len={ctx_len}")
    seqlens_k = (total - 1).astype(np.int32)
    total_len = np.array(max(int(total.max()), columns), dtype=np.int32)
    last_index = np.arange(batch, dtype=np.int64) * columns + np.maximum(q - 1, 0)
    return columns, seqlens_k, total_len, q.astype(np.int32), last_index


class FusedOrtSession:
    backend = "ort"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        batch_size: int,
        ctx_len: int,
        prompt_len: int | None = None,
        threads: int | None = None,
    ):
        if batch_size < 1 or ctx_len < 1:
            raise UsageError(f"batch_size and ctx_len must be positive (got {batch_size}, {ctx_len})")
        ort = ort_runtime.onnxruntime_module()
        self.model_path = Path(model_path)
        self.threads = threads or physical_cores()
        opts = ort_runtime.session_options(self.threads)
        # Every dim but seq_len is fixed for the artifact's life: let ORT plan with them.
        opts.add_free_dimension_override_by_name("batch_size", batch_size)
        opts.add_free_dimension_override_by_name("ctx_len", ctx_len)
        self.session = ort_runtime.open_inference_session(self.model_path, opts)
        cache = CacheInputs(self.session)
        self.past_names, self.num_layers = cache.past_names, cache.num_layers
        self.num_kv_heads, self.head_dim = cache.num_kv_heads, cache.head_dim
        self.vocab_size = int(self.session.get_outputs()[0].shape[1])
        self.batch_size, self.ctx_len, self.prompt_len = batch_size, ctx_len, prompt_len
        self.decode_session = self.session  # the interface of OrtSession, for callers that report it
        self._logits = ort.OrtValue.ortvalue_from_shape_and_type((batch_size, self.vocab_size), np.float32, "cpu")
        self._io = self.session.io_binding()
        self._cache = RetainedCache(cache, batch_size, ctx_len)  # GroupQueryAttention appends in place
        self._cache.bind(self._io)
        self._io.bind_ortvalue_output("logits", self._logits)
        self._kept: dict[int, object] = {}  # keep → its (B·keep, vocab) logits buffer
        last = next(i for i in self.session.get_inputs() if i.name == "last_index")
        #: Whether ``run(..., keep=N)`` works: graphs built before ``last_index`` had its own dim cannot.
        self.keeps_logits = last.shape[0] == LOGITS_ROWS
        #: A step's columns must fit after every active row's position (see :func:`step_inputs`).
        self.chunk_fits_every_row = True

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, *, keep: int | None = None) -> np.ndarray:
        position_ids = np.asarray(position_ids, dtype=np.int64)
        if position_ids.shape[0] != self.batch_size:
            raise UsageError(f"this session runs batch_size={self.batch_size} rows, got {position_ids.shape[0]}")
        columns, seqlens_k, total, query_seqlens, last_index = step_inputs(position_ids, self.ctx_len)
        io = self._io
        io.bind_cpu_input("input_ids", np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64)[:, :columns]))
        io.bind_cpu_input("seqlens_k", seqlens_k)
        io.bind_cpu_input("total_sequence_length", total)
        io.bind_cpu_input("query_seqlens", query_seqlens)
        if keep is None:
            io.bind_cpu_input("last_index", last_index)
            self.session.run_with_iobinding(io)
            return self._logits.numpy()
        if not self.keeps_logits or keep < 1:
            raise UsageError("this fused graph returns one position's logits per row; rebuild it (--force) for keep=N")
        # As the portable graph's num_logits_to_keep: columns last-N+1 … last of each row (from 0
        # when fewer precede), clamped to the columns run.
        start = np.maximum(query_seqlens.astype(np.int64) - keep, 0)
        cols = np.minimum(start[:, None] + np.arange(keep)[None, :], columns - 1)
        index = (np.arange(self.batch_size, dtype=np.int64)[:, None] * columns + cols).reshape(-1)
        buffer = self._kept.get(keep)
        if buffer is None:
            buffer = self._kept[keep] = ort_runtime.onnxruntime_module().OrtValue.ortvalue_from_shape_and_type(
                (self.batch_size * keep, self.vocab_size), np.float32, "cpu")
        io.bind_cpu_input("last_index", index)
        io.bind_ortvalue_output("logits", buffer)
        try:
            self.session.run_with_iobinding(io)
        finally:
            io.bind_ortvalue_output("logits", self._logits)
        return buffer.numpy().reshape(self.batch_size, keep, self.vocab_size)

    def read_cache(self) -> list[np.ndarray]:
        return self._cache.read()

    def close(self) -> None:
        self.session = self.decode_session = None
