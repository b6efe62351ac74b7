"""Sampling on the host: temperature, top-k, top-p and a repetition penalty; greedy by default.

The rule, for one row's logits ``l`` (vocab,) and the tokens it has seen (prompt + generated):

1. repetition penalty ``r`` (the CTRL paper's, as Hugging Face applies it): for every distinct
   seen token ``t``, ``l[t] /= r`` if ``l[t] > 0`` else ``l[t] *= r``;
2. ``temperature == 0``: the token is ``argmax(l)`` (the lowest id on a tie). Otherwise
   ``l /= temperature``;
3. top-k: keep the tokens whose logit is at least the k-th largest (ties at the edge are kept);
4. softmax over the kept tokens (float64);
5. top-p: in order of decreasing probability (ties: lower id first), keep a token while the
   probability of the tokens before it is below ``top_p`` (the first is always kept); renormalize;
6. draw ``u`` uniform in [0, 1) and return the first token, in increasing id order, at which the
   cumulative probability exceeds ``u``.

Reproducibility: each prompt has its own random stream, ``PCG64(SeedSequence(seed,
spawn_key=(key,)))`` with ``key`` the prompt's index in the input, and draws one number per
generated token. So a prompt's tokens depend on the seed, its index and its own logits only: not
on its batch, its continuous-batching slot, or which prompts run beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from qeff.errors import UsageError

__all__ = ["SamplingParams", "filtered_distribution", "sample_token", "RowSampler", "BatchSampler", "row_stream", "batch_picker"]


@dataclass(frozen=True)
class SamplingParams:
    #: 0 = greedy (the default); otherwise logits are divided by it.
    temperature: float = 0.0
    #: Keep the k most likely tokens; 0 = no limit.
    top_k: int = 0
    #: Keep the smallest set of most likely tokens whose probability reaches top_p; 1 = no limit.
    top_p: float = 1.0
    #: > 1 discourages tokens already seen (prompt and generated); 1 = off.
    repetition_penalty: float = 1.0
    #: Seeds every prompt's own random stream.
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature must be 0 (greedy) or positive (got {self.temperature})")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"--top_k must be a whole number, 0 meaning no limit (got {self.top_k})")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"--top_p must be in (0, 1] (got {self.top_p})")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UsageError(f"--repetition_penalty must be positive, 1 meaning off (got {self.repetition_penalty})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed must be a non-negative whole number (got {self.seed})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a penalty: plain argmax, no history needed."""
        return self.greedy and self.repetition_penalty == 1

    def to_dict(self) -> dict:
        return asdict(self)


def _penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    out = logits.astype(np.float64, copy=True)
    if penalty != 1 and seen.size:
        picked = out[seen]
        out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filtered_distribution(logits: np.ndarray, params: SamplingParams, seen: Sequence[int] = ()) -> np.ndarray:
    """The probabilities (vocab,) float64 that :func:`sample_token` draws from: zero outside the
    kept set, summing to 1. Greedy gives a one-hot vector."""
    seen_ids = np.unique(np.asarray(seen, dtype=np.int64))
    scores = _penalize(np.asarray(logits), seen_ids, params.repetition_penalty)
    probs = np.zeros(scores.shape[0], dtype=np.float64)
    if params.greedy:
        probs[int(np.argmax(scores))] = 1.0
        return probs
    scores = scores / params.temperature
    keep = np.ones(scores.shape[0], dtype=bool)
    if 0 < params.top_k < scores.shape[0]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        keep = scores >= kth
    kept = np.flatnonzero(keep)
    z = scores[kept] - scores[kept].max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1:
        order = np.lexsort((kept, -p))  # decreasing probability, then increasing id
        before = np.cumsum(p[order]) - p[order]  # probability of the tokens ahead of each
        chosen = order[before < params.top_p]
        kept, p = kept[chosen], p[chosen]
        p = p / p.sum()
    probs[kept] = p
    return probs


def sample_token(logits: np.ndarray, params: SamplingParams, seen: Sequence[int], u: float) -> int:
    """One token from ``logits`` (vocab,) given the seen tokens and a uniform ``u`` in [0, 1)."""
    probs = filtered_distribution(logits, params, seen)
    if params.greedy:
        return int(np.argmax(probs))
    cdf = np.cumsum(probs)
    token = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    nonzero = np.flatnonzero(probs)
    return min(max(token, int(nonzero[0])), int(nonzero[-1]))  # rounding at either end of the CDF


def row_stream(seed: int, key: int) -> np.random.Generator:
    """The random stream of the prompt with index ``key``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(int(key),))))


class RowSampler:
    """One prompt's sampler: its own random stream and the tokens it has seen."""

    def __init__(self, params: SamplingParams, key: int, prompt: Sequence[int]):
        self.params = params
        self.rng = row_stream(params.seed, key)
        self.seen: list[int] = list(prompt) if params.repetition_penalty != 1 else []

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.plain_greedy:
            return int(np.argmax(logits))
        u = 0.0 if self.params.greedy else float(self.rng.random())
        token = sample_token(logits, self.params, self.seen, u)
        if self.params.repetition_penalty != 1:
            self.seen.append(token)
        return token


class BatchSampler:
    """Samplers for the rows of a static batch: ``pick(logits (B, V), rows mask) -> (B,)``."""

    def __init__(self, params: SamplingParams, keys: Sequence[int], prompts: Sequence[Sequence[int]], batch_size: int):
        self.rows = [RowSampler(params, k, p) for k, p in zip(keys, prompts)]
        self.batch_size = batch_size

    def pick(self, logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(self.batch_size, dtype=np.int64)
        for r in np.flatnonzero(rows):
            out[r] = self.rows[r](logits[r])
        return out


def batch_picker(params: SamplingParams | None, keys: Sequence[int] | None, prompts: Sequence[Sequence[int]],
                 batch_size: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``pick(logits (B, V), rows (B,) bool) -> (B,) tokens`` for a static batch; only the marked
    rows matter. Plain greedy (no ``params``, or no penalty) is an argmax over the batch; otherwise
    each prompt samples from the stream of its key (default its row: 0, 1, …)."""
    if params is None or params.plain_greedy:
        return lambda logits, rows: logits.argmax(-1)
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise UsageError(f"sample_keys has {len(keys)} entries for {len(prompts)} prompts")
    return BatchSampler(params, keys, prompts, batch_size).pick
