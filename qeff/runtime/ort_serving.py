"""ONNX Runtime session for the serving graph variants (:mod:`qeff.serving.graph`).

Like :class:`qeff.runtime.ort.OrtSession` the cache lives in OrtValues bound between steps
(:class:`qeff.runtime.ort.RetainedCache`), by default ONE OrtValue per tensor bound as both
``past_*`` and ``…_RetainedState`` (``binding = "inplace"``; ``"numpy"`` round-trips the cache through numpy, the slow reference the in-place
binding is checked against in ``tests/test_serving_continuous.py``). What differs:

- with continuous batching the cache has ``full_batch_size`` rows (slots) and each ``run`` names
  the slots it runs in ``batch_index``; a step's batch may be 1 (prefill one slot) or every slot;
- with a speculative target ``run(..., keep=N)`` returns the logits of the last N positions.

``logits`` is bound per run, because its shape varies with the step.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qeff.errors import UsageError
from qeff.runtime.ort import CacheInputs, RetainedCache, comp_ctx_feed, ladder_of, open_inference_session, session_options
from qeff.serving.variant import GraphVariant

__all__ = ["ServingOrtSession", "SlotView"]


class ServingOrtSession:
    backend = "ort"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        batch_size: int,
        ctx_len: int,
        full_batch_size: int | None = None,
        threads: int | None = None,
        prompt_len: int | None = None,
        binding: str = "inplace",
        num_speculative_tokens: int | None = None,
        comp_ctx_lengths=None,
    ):
        if binding not in ("inplace", "numpy"):
            raise UsageError(f"unknown binding {binding!r} for a serving session; choose inplace or numpy")
        if batch_size < 1 or ctx_len < 1 or (full_batch_size is not None and full_batch_size < 1):
            raise UsageError(f"batch_size, full_batch_size and ctx_len must be positive (got {batch_size}, {full_batch_size}, {ctx_len})")
        self.model_path = Path(model_path)
        self.session = open_inference_session(self.model_path, session_options(threads))
        cache = CacheInputs(self.session)
        self.variant = GraphVariant(continuous_batching="batch_index" in cache.input_names,
                                    speculative="num_logits_to_keep" in cache.input_names,
                                    comp_ctx="comp_ctx_lengths" in cache.input_names)
        if self.variant.continuous_batching != (full_batch_size is not None):
            have = "has" if self.variant.continuous_batching else "has no"
            raise UsageError(f"{self.model_path} {have} a batch_index input: open it {'with' if self.variant.continuous_batching else 'without'} full_batch_size")
        self.past_names, self.num_layers = cache.past_names, cache.num_layers
        self.num_kv_heads, self.head_dim = cache.num_kv_heads, cache.head_dim
        self.batch_size, self.ctx_len, self.prompt_len = batch_size, ctx_len, prompt_len
        self.full_batch_size = full_batch_size
        #: K the artifact was compiled for (speculative targets; informational).
        self.num_speculative_tokens = num_speculative_tokens
        #: Cache rows: the slots of continuous batching, else the batch.
        self.cache_rows = full_batch_size or batch_size
        self.binding = binding
        #: The compute-context ladder and the length each step attended (see OrtSession).
        self.ladder = ladder_of(cache, comp_ctx_lengths, ctx_len)
        self.attended: list[int] = []
        if binding == "numpy":
            self._np_cache = [np.zeros(cache.shape(self.cache_rows, ctx_len), np.float32) for _ in self.past_names]
            return
        self._io = self.session.io_binding()
        self._io.bind_output("logits", "cpu")  # first, so get_outputs()[0] is the logits; rebound per run
        self._cache = RetainedCache(cache, self.cache_rows, ctx_len)
        self._cache.bind(self._io)

    def run(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        *,
        batch_index: np.ndarray | None = None,
        keep: int | None = None,
    ) -> np.ndarray:
        """(B, S) ids and positions (-1 = pad) → (B, vocab) logits, or (B, keep, vocab) with ``keep``.

        ``batch_index`` (B,) or (B, 1): the slots the rows run in (continuous batching; required
        then). ``keep``: speculative targets only.
        """
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        rows = feeds["input_ids"].shape[0]
        if self.variant.continuous_batching:
            if batch_index is None:
                raise UsageError("this continuous-batching graph needs batch_index: the slot of each row")
            index = np.ascontiguousarray(np.asarray(batch_index, dtype=np.int64).reshape(rows, 1))
            if index.min() < 0 or index.max() >= self.cache_rows or len(set(index[:, 0].tolist())) != rows:
                raise UsageError(f"batch_index {index[:, 0].tolist()} must name distinct slots in [0, {self.cache_rows})")
            feeds["batch_index"] = index
        elif batch_index is not None:
            raise UsageError("batch_index given to a graph without continuous batching")
        elif rows != self.batch_size:
            raise UsageError(f"this session runs {self.batch_size} rows per step (got {rows})")
        if self.variant.speculative:
            feeds["num_logits_to_keep"] = np.zeros((keep or 1, 1), dtype=np.int64)
        elif keep not in (None, 1):
            raise UsageError("keep= needs a speculative-target graph (export with num_logits_to_keep)")
        comp = comp_ctx_feed(self.ladder, feeds["position_ids"], self.attended)
        if comp is not None:
            feeds["comp_ctx_lengths"] = comp
        if self.binding == "numpy":
            outs = self.session.run(None, {**feeds, **dict(zip(self.past_names, self._np_cache))})
            self._np_cache = outs[1:]
            logits = outs[0]
        else:
            for name, value in feeds.items():
                self._io.bind_cpu_input(name, value)
            self._io.bind_output("logits", "cpu")
            self.session.run_with_iobinding(self._io)
            logits = self._io.get_outputs()[0].numpy()
        return logits if keep is not None else logits[:, -1, :]

    def read_cache(self) -> list[np.ndarray]:
        """A copy of the whole cache, ``[k0, v0, …]``, each (cache_rows, n_kv, ctx_len, head_dim)."""
        if self.binding == "numpy":
            return [c.copy() for c in self._np_cache]
        return self._cache.read()

    def write_cache(self, tensors: list[np.ndarray]) -> None:
        """Overwrite the whole cache (tests poison freed slots with it)."""
        if len(tensors) != len(self.past_names):
            raise UsageError(f"expected {len(self.past_names)} cache tensors, got {len(tensors)}")
        if self.binding == "numpy":
            self._np_cache = [np.array(t, dtype=np.float32) for t in tensors]
            return
        self._cache.write(tensors)

    def close(self) -> None:
        self.session = None


class SlotView:
    """A fixed set of a continuous-batching session's slots, seen as a plain batch session.

    ``run(ids, pos)`` runs row ``b`` in slot ``slots[b]``; other slots are untouched. Two views of
    one session over disjoint slots are two independent sessions sharing one copy of the weights:
    e.g. a speculative target and its self-draft (``tests/test_serving_real.py``)."""

    backend = "ort"

    def __init__(self, session: ServingOrtSession, slots: list[int]):
        if not session.variant.continuous_batching:
            raise UsageError("a slot view needs a continuous-batching session")
        if len(set(slots)) != len(slots) or not all(0 <= s < session.cache_rows for s in slots):
            raise UsageError(f"slots {slots} must be distinct slots in [0, {session.cache_rows})")
        self.session, self.slots = session, np.asarray(slots, dtype=np.int64)
        self.variant = GraphVariant(speculative=session.variant.speculative, comp_ctx=session.variant.comp_ctx)
        self.batch_size, self.ctx_len, self.prompt_len = len(slots), session.ctx_len, session.prompt_len
        self.num_layers = session.num_layers

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, *, keep: int | None = None) -> np.ndarray:
        return self.session.run(input_ids, position_ids, batch_index=self.slots, keep=keep)

    def read_cache(self) -> list[np.ndarray]:
        return [c[self.slots] for c in self.session.read_cache()]

    def close(self) -> None:
        return None
