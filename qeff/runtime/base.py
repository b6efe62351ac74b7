"""The one interface every backend's session offers to the generation loop.

A session owns a fixed-size retained cache for ``batch_size`` rows and ``ctx_len`` slots. Each
``run`` feeds one step — a prefill chunk (``seq_len = prompt_len``) or a decode step
(``seq_len = 1``) — and returns the logits of each row's last valid token. The cache never leaves
the backend between steps; ``read_cache`` copies it out for verification only.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Session"]


@runtime_checkable
class Session(Protocol):
    backend: str
    batch_size: int
    ctx_len: int
    #: The seq_len a prefill step must have, or None if any length works (then the loop uses
    #: the caller's prompt_len).
    prompt_len: int | None
    num_layers: int

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """(B, S) int64 ids and positions (-1 = pad) → (B, vocab) float32 logits.

        The returned array may be a view of a buffer the next ``run`` overwrites: consume or copy it.
        """
        ...

    def read_cache(self) -> list[np.ndarray]:
        """A copy of the whole cache as ``[k0, v0, k1, v1, …]`` (verification only)."""
        ...

    def close(self) -> None: ...
