"""Distribution metrics between a reference's and a candidate's next-token logits.

Logit MSE and max-abs say how far two models' numbers are apart, not what the difference does to
the text. These do, per position (every row of every step, teacher-forced over the same tokens):

- ``kl``: KL(reference ‖ candidate) = Σ_v p_ref(v) · (log p_ref(v) − log p_cand(v)), in nats, from
  float64 log-softmax of the logits. The reference's distribution weighs the sum: it measures the
  information lost by serving the candidate where the reference was meant (the direction
  llama.cpp's KL-divergence statistics use too). Summarised as mean, p99 (linear interpolation
  between order statistics, ``numpy.percentile``'s default) and max.
- ``top1``: the two argmaxes agree.
- ``top5``: |top-5(reference) ∩ top-5(candidate)| / 5.
- ``nll``: −log p(next token) of a known text, for each model; perplexity = exp(mean NLL).

A NaN anywhere in the candidate's logits makes its KL NaN, so every summary of it is NaN (and
every budget comparison with it fails): a broken candidate can never look good.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "log_softmax",
    "kl_divergence",
    "top1_agreement",
    "topk_overlap",
    "nll",
    "perplexity",
    "DistributionStats",
    "DistributionSummary",
]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(N, V) logits → (N, V) float64 log-probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """(N, V), (N, V) logits → (N,) KL(reference ‖ candidate) in nats. Mathematically ≥ 0; float
    rounding can leave −1e-17 on identical inputs' neighbours, which is clipped to 0."""
    lp, lq = log_softmax(reference), log_softmax(candidate)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return np.where(np.isnan(kl), kl, np.maximum(kl, 0.0))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """(N,) bool: the argmax tokens agree."""
    return np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-np.asarray(x), k - 1, axis=-1)[..., :k]


def topk_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> np.ndarray:
    """(N,) fraction of the reference's top-k tokens that are in the candidate's top-k (k is
    capped at the vocabulary size)."""
    k = min(k, np.shape(reference)[-1])
    a, b = _topk(reference, k), _topk(candidate, k)
    return np.array([len(set(r.tolist()) & set(c.tolist())) / k for r, c in zip(a, b)], dtype=np.float64)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, V) logits, (N,) next tokens → (N,) negative log-likelihood in nats."""
    lp = log_softmax(logits)
    return -lp[np.arange(lp.shape[0]), np.asarray(targets, dtype=np.int64)]


def perplexity(nll_values: np.ndarray) -> float:
    """exp(mean NLL) of the given positions."""
    values = np.asarray(nll_values, dtype=np.float64)
    return float(np.exp(values.mean())) if values.size else float("nan")


@dataclass
class DistributionSummary:
    """What a comparison reports. ``ppl_ref``/``ppl`` are None when no position had a known next token."""

    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agree: float
    top5_overlap: float
    ppl_ref: float | None
    ppl: float | None
    positions: int
    scored_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DistributionStats:
    """Accumulates per-position metrics over many steps (the logits themselves are not kept: a
    4,096-position SmolLM2 run would otherwise hold 800 MB of them per model)."""

    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    top5: list[np.ndarray] = field(default_factory=list)
    nll_ref: list[np.ndarray] = field(default_factory=list)
    nll_cand: list[np.ndarray] = field(default_factory=list)

    def add(self, reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray | None = None) -> None:
        """(N, V) logits of both models at the same N positions; ``targets`` (N,) are the tokens
        that follow each position in the text (−1 where unknown: not scored for perplexity)."""
        reference, candidate = np.atleast_2d(reference), np.atleast_2d(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"logits of different shapes: {reference.shape} vs {candidate.shape}")
        self.kl.append(kl_divergence(reference, candidate))
        self.top1.append(top1_agreement(reference, candidate))
        self.top5.append(topk_overlap(reference, candidate))
        if targets is not None:
            targets = np.asarray(targets, dtype=np.int64)
            known = targets >= 0
            if known.any():
                self.nll_ref.append(nll(reference[known], targets[known]))
                self.nll_cand.append(nll(candidate[known], targets[known]))

    def summary(self) -> DistributionSummary:
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        scored = sum(len(a) for a in self.nll_ref)
        if not kl.size:
            raise ValueError("no positions were added")
        return DistributionSummary(
            kld_mean=float(np.mean(kl)),
            kld_p99=float(np.percentile(kl, 99)),
            kld_max=float(np.max(kl)) if not np.isnan(kl).any() else float("nan"),
            top1_agree=float(np.mean(np.concatenate(self.top1))),
            top5_overlap=float(np.mean(np.concatenate(self.top5))),
            ppl_ref=perplexity(np.concatenate(self.nll_ref)) if scored else None,
            ppl=perplexity(np.concatenate(self.nll_cand)) if scored else None,
            positions=int(kl.size),
            scored_tokens=scored,
        )
