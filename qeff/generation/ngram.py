"""Prompt-lookup decoding's drafter: propose what followed the latest earlier occurrence of the
text's own ending.

Copy-heavy work (editing a given text or code, summarising with quotes, answering from a long
prompt) repeats spans of the prompt. For each row, the drafter takes the row's tokens so far
(prompt + generated), looks for the longest suffix of ``n`` tokens (``n`` from ``ngram_max`` down
to ``ngram_min``) that also occurs earlier, and proposes the (up to ``K``) tokens that followed that
earlier occurrence, the most recent one when several match. No match: no proposal, and the
target's step is a plain one-token step. No draft model is run, so a proposal costs a scan of the
row's tokens and nothing else; whether it is right is decided only by the target's verify step
(:mod:`qeff.generation.speculative`), which is what keeps the output the target's greedy output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_NGRAM_MAX", "NgramDrafter", "lookup"]

#: Longest suffix looked up (llama.cpp's and vLLM's prompt lookup default to a few tokens too:
#: long enough to pin the place in a copied text, short enough to match after an edit).
DEFAULT_NGRAM_MAX = 3


def lookup(tokens: Sequence[int], k: int, *, ngram_max: int = DEFAULT_NGRAM_MAX, ngram_min: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix of
    ``tokens`` (``ngram_max`` … ``ngram_min`` tokens long); ``[]`` when no suffix recurs."""
    arr = np.asarray(tokens, dtype=np.int64)
    size = len(arr)
    if k < 1 or size < 2:
        return []
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        suffix = arr[size - n:]
        # Windows starting at 0 … size-n-1: each ends before the suffix's own place, so at least
        # one token follows it.
        windows = np.lib.stride_tricks.sliding_window_view(arr[: size - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # the most recent occurrence's continuation
            return [int(t) for t in arr[start: start + k]]
    return []


class NgramDrafter:
    """The drafter :func:`qeff.generation.speculative.generate_speculative` takes in place of a draft
    model: ``propose`` sees each row's tokens so far, and needs no cache of its own."""

    name = "prompt lookup"

    def __init__(self, ngram_max: int = DEFAULT_NGRAM_MAX, ngram_min: int = 1):
        if ngram_min < 1 or ngram_max < ngram_min:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max (got {ngram_min}, {ngram_max})")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        return lookup(tokens, k, ngram_max=self.ngram_max, ngram_min=self.ngram_min)
