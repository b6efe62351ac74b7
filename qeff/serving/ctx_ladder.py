"""The compute-context-length ladder: how many cache slots attention reads on each step.

The portable graph's cache has ``ctx_len`` slots and, without a ladder, every step attends over
all of them through a mask, so a 30-token sequence in a 4096-slot cache pays for 4096 slots
(measured on SmolLM2-135M: the repeat of the KV heads and the two attention MatMuls grow with
``ctx_len``; the in-place cache scatter does not). A graph exported with the ``comp_ctx_lengths``
input (:class:`qeff.serving.variant.GraphVariant` ``comp_ctx=True``) attends over the first C
slots only, C being that input's length; the cache is still written at ``position_ids`` and
returned whole, so moving to a larger C copies nothing.

A step is exact with any C above every position it holds: a query at ``p`` sees slots ``<= p``,
and the slice is taken after the full-size write (pads may go to slots past C; they write back
what is there). :func:`pick` takes the smallest rung above the step's largest position; the runners call it on
every step, so every loop that drives them (greedy batches, continuous batching, speculative and
prompt-lookup decoding) moves up a rung exactly when a row would pass the current one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qeff.errors import UsageError

__all__ = ["Ladder", "default_ladder", "parse_ladder", "needed", "pick", "OFF_WORDS", "FIRST_RUNG", "RUNG_FACTOR"]

#: The default ladder: 256, then ×4 (1024, 4096, …), ending at ctx_len.
FIRST_RUNG = 256
RUNG_FACTOR = 4
#: Spellings of ``--comp_ctx_lengths`` that turn the ladder off (the graph attends over ctx_len).
OFF_WORDS = ("off", "none", "0")

#: A ladder: strictly increasing lengths, the last one ``ctx_len``.
Ladder = tuple[int, ...]


def default_ladder(ctx_len: int) -> Ladder:
    """256, 1024, 4096, … below ``ctx_len``, then ``ctx_len`` itself."""
    rungs, c = [], FIRST_RUNG
    while c < ctx_len:
        rungs.append(c)
        c *= RUNG_FACTOR
    return tuple(rungs) + (ctx_len,)


def parse_ladder(text: str | Sequence[int] | None, ctx_len: int) -> Ladder | None:
    """The ladder a user asked for: None = the default one, an off word = None (no ladder), else
    comma-separated lengths (ctx_len is appended when missing). One sentence for a bad list."""
    if text is None:
        return default_ladder(ctx_len)
    if isinstance(text, str):
        if text.strip().lower() in OFF_WORDS:
            return None
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--comp_ctx_lengths {text!r} must be comma-separated whole numbers (e.g. 256,1024) or 'off'") from None
    else:
        values = [int(v) for v in text]
    if not values:
        raise UsageError("--comp_ctx_lengths needs at least one length (e.g. 256,1024) or 'off'")
    if any(v < 1 for v in values):
        raise UsageError(f"--comp_ctx_lengths {values} must all be at least 1")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UsageError(f"--comp_ctx_lengths {values} must be strictly increasing")
    if values[-1] > ctx_len:
        raise UsageError(f"--comp_ctx_lengths {values} goes past ctx_len={ctx_len}: a length attends at most the cache")
    return tuple(values) + (() if values[-1] == ctx_len else (ctx_len,))


def needed(position_ids: np.ndarray) -> int:
    """The least C a step may attend over: one above its largest position (1 for an all-pad step)."""
    return max(int(position_ids.max()) + 1, 1)


def pick(ladder: Ladder, position_ids: np.ndarray) -> int:
    """The smallest rung of ``ladder`` that the step ``position_ids`` (B, S; -1 = pad) fits."""
    need = needed(position_ids)
    for rung in ladder:
        if rung >= need:
            return rung
    raise UsageError(f"position {need - 1} does not fit the cache ({ladder[-1]} slots)")
