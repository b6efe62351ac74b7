"""Three-way verification: HF eager vs transformed PyTorch vs a compiled backend (ONNX Runtime).

Each model is driven step by step over the same token sequence (teacher forcing): the prompt, then
the HF reference's own greedy tokens, so a single divergent token does not cascade into a
meaningless comparison of everything after it. At every step we compare

- the logits of each row's last token (prefill and each decode step): MSE and max-abs;
- greedy tokens: the candidate's argmax against the reference's. A mismatch where the reference's
  top-2 logits are closer than ``ambiguity_margin`` is *ambiguous* (either token is a correct
  greedy choice within float noise), not a failure;
- at the end, every cache slot written so far: MSE and max-abs, and the cache's layout (heads and
  head size per layer, as the graph contract fixes them).

A comparison that fails also says where the two traces first part (:mod:`qeff.divergence`): the
first step, row and decoder layer. That search replays both sides and runs only on failure.

The HF reference runs each prompt alone at batch 1 with its own dynamic cache; the transformed
model and the backend run all prompts together as one right-padded batch, chunked by
``prompt_len``: the comparison therefore also proves that padding and chunking change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from typing import TYPE_CHECKING

import numpy as np

from qeff.divergence import FirstDivergence, HfLayers, ReplayLayers, TorchStepper, locate, session_stepper
from qeff.errors import UsageError, VerificationError
from qeff.generation import prefill_chunks
from qeff.metrics import DistributionStats
from qeff.runtime.base import Session
from qeff.store.serialization import from_dict, to_dict

if TYPE_CHECKING:  # torch is imported where a model runs: reading a report needs none of it
    import torch

    from qeff.transforms import QEffCausalLM

__all__ = [
    "Tolerances",
    "TINY_TOLERANCES",
    "Comparison",
    "VerifyReport",
    "Trace",
    "GreedyDivergence",
    "verify",
    "hf_trace",
    "session_trace",
    "compare",
    "top2_margin",
    "greedy_divergence",
]


@dataclass(frozen=True)
class Tolerances:
    """Bounds on the differences. The defaults suit real checkpoints in fp32: on SmolLM2-135M
    (30 layers) we measured logits max-abs 5.3e-5 (HF vs PyTorch) and 5.5e-5 (PyTorch vs ORT),
    MSE ~1e-10; tiny 2-layer random models stay near 3e-7. The defaults leave ~20x of room for
    deeper models and other machines' BLAS kernels; model cards set their own."""

    logits_mse: float = 1e-8
    logits_max_abs: float = 1e-3
    cache_mse: float = 1e-9
    cache_max_abs: float = 1e-3
    ambiguity_margin: float = 1e-3


#: Seeded random tiny models (2 layers, fp32): measured max-abs ~3e-7 and MSE ~1e-15 in both
#: comparisons; the model cards' tiny tier defaults to these.
TINY_TOLERANCES = Tolerances(logits_mse=1e-12, logits_max_abs=1e-5, cache_mse=1e-12, cache_max_abs=1e-5)


def top2_margin(logits: np.ndarray) -> float:
    """The gap between the two largest logits: below the ambiguity margin, either token is a
    correct greedy choice within float noise."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return float(top2[1] - top2[0])


@dataclass
class GreedyDivergence:
    """Where a free-running greedy continuation first leaves the reference's (None: never)."""

    first: int | None
    margin: float | None  # the reference's top-2 margin at that step
    ambiguous: bool  # the margin is below the ambiguity margin: not a failure
    matched: int  # tokens equal before the divergence (all of them when there is none)


def greedy_divergence(reference: Sequence[int], generated: Sequence[int], margins: Sequence[float], ambiguity_margin: float) -> GreedyDivergence:
    """Compare one row's free-running tokens with the reference's greedy tokens. What follows a
    divergence is another continuation, so only the first one is judged."""
    first = next((t for t, (a, b) in enumerate(zip(reference, generated)) if a != b), None)
    if first is None and len(generated) != len(reference):
        first = min(len(generated), len(reference))
    margin = margins[first] if first is not None and first < len(margins) else None
    return GreedyDivergence(
        first=first, margin=margin, ambiguous=margin is not None and margin < ambiguity_margin,
        matched=len(reference) if first is None else first,
    )


@dataclass
class Trace:
    """What one model produced: ``logits[row]`` is (steps, vocab); ``cache[row][i]`` is layer
    tensor ``i`` (keys and values interleaved) as (n_kv, written_slots, head_dim)."""

    name: str
    logits: list[np.ndarray]
    cache: list[list[np.ndarray]]


@dataclass
class Comparison:
    reference: str
    candidate: str
    steps: int
    logits_mse: float
    logits_max_abs: float
    prefill_logits_max_abs: float
    decode_logits_max_abs: float
    cache_mse: float
    cache_max_abs: float
    tokens_matched: int
    tokens_total: int
    ambiguous: int
    mismatches: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    tolerances: dict = field(default_factory=dict)
    #: Set only when the comparison failed: where the traces first part (step, row, layer).
    first_divergence: FirstDivergence | None = None
    # Distribution metrics over the same steps (qeff.metrics): KL(reference ‖ candidate) per
    # position, top-1 agreement, top-5 overlap. Perplexity needs a real text, so it is filled
    # only by comparisons over one (the precision ladder); None here.
    kld_mean: float = 0.0
    kld_p99: float = 0.0
    kld_max: float = 0.0
    top1_agree: float = 1.0
    top5_overlap: float = 1.0
    ppl_ref: float | None = None
    ppl: float | None = None

    @property
    def name(self) -> str:
        return f"{self.reference}_vs_{self.candidate}"

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """Builtin types; ``name`` and ``passed`` are added for readers (:meth:`from_dict` derives them)."""
        return {**to_dict(self), "name": self.name, "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict) -> Comparison:
        return from_dict(cls, data)

    def describe(self) -> str:
        status = "ok" if self.passed else "FAILED"
        return (
            f"{self.reference} vs {self.candidate}: {status}; logits MSE {self.logits_mse:.3g} "
            f"(tol {self.tolerances.get('logits_mse', float('nan')):.3g}), max-abs {self.logits_max_abs:.3g} "
            f"(tol {self.tolerances.get('logits_max_abs', float('nan')):.3g}); cache MSE {self.cache_mse:.3g}, "
            f"max-abs {self.cache_max_abs:.3g}; tokens {self.tokens_matched}/{self.tokens_total}"
            + (f" ({self.ambiguous} ambiguous)" if self.ambiguous else "")
            + f"; KLD mean {self.kld_mean:.3g} max {self.kld_max:.3g}, top-1 {100 * self.top1_agree:.1f}%"
        )


@dataclass
class VerifyReport:
    comparisons: list[Comparison]
    prompt_token_ids: list[list[int]]
    reference_tokens: list[list[int]]
    prompt_len: int
    ctx_len: int
    steps: int

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def __getitem__(self, name: str) -> Comparison:
        for c in self.comparisons:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        """Builtin types (``passed`` added for readers); :meth:`from_dict` reads it back."""
        return {"passed": self.passed, **to_dict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> VerifyReport:
        return from_dict(cls, data)

    def describe(self) -> str:
        return "\n".join(c.describe() for c in self.comparisons)

    def raise_for_failure(self) -> None:
        failed = [c for c in self.comparisons if not c.passed]
        if failed:
            lines = [
                f"{c.reference} vs {c.candidate}: " + "; ".join(c.failures)
                + (f"; {c.first_divergence.describe()}" if c.first_divergence else "")
                for c in failed
            ]
            raise VerificationError("verification failed: " + " | ".join(lines), report=self)


def hf_trace(model: torch.nn.Module, prompt_token_ids: Sequence[Sequence[int]], steps: int) -> tuple[Trace, list[list[int]]]:
    """HF eager, each prompt alone at batch 1; decodes ``steps - 1`` greedy tokens of its own.
    Returns the trace and, per row, the ``steps`` greedy tokens."""
    import torch

    with torch.no_grad():
        return _hf_trace(model, prompt_token_ids, steps)


def _hf_trace(model, prompt_token_ids, steps):
    import torch

    logits_rows, cache_rows, tokens_rows = [], [], []
    for prompt in prompt_token_ids:
        out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        step_logits = [out.logits[0, -1].float()]
        tokens = [int(step_logits[-1].argmax())]
        for _ in range(steps - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            step_logits.append(out.logits[0, -1].float())
            tokens.append(int(step_logits[-1].argmax()))
        logits_rows.append(torch.stack(step_logits).numpy())
        layers = []
        for layer in cache.layers:
            layers += [layer.keys[0].float().numpy(), layer.values[0].float().numpy()]
        cache_rows.append(layers)
        tokens_rows.append(tokens)
    return Trace("hf", logits_rows, cache_rows), tokens_rows


def session_trace(
    session: Session,
    name: str,
    prompt_token_ids: Sequence[Sequence[int]],
    fed_tokens: Sequence[Sequence[int]],
    prompt_len: int,
) -> Trace:
    """Drive ``session`` over the prompts (one padded batch, chunked) then feed ``fed_tokens[r][:-1]``."""
    n_rows = len(prompt_token_ids)
    steps = len(fed_tokens[0])
    batch = session.batch_size
    lengths = np.array([len(p) for p in prompt_token_ids])
    rows: list[list[np.ndarray]] = [[] for _ in range(n_rows)]
    for ids, pos, ends in prefill_chunks(prompt_token_ids, batch, session.prompt_len or prompt_len):
        out = session.run(ids, pos)
        for r in np.flatnonzero(ends[:n_rows]):
            rows[r].append(out[r].copy())
    for t in range(1, steps):
        ids = np.zeros((batch, 1), dtype=np.int64)
        pos = np.full((batch, 1), -1, dtype=np.int64)
        for r in range(n_rows):
            ids[r, 0] = fed_tokens[r][t - 1]
            pos[r, 0] = lengths[r] + t - 1
        out = session.run(ids, pos)
        for r in range(n_rows):
            rows[r].append(out[r].copy())
    logits = [np.stack(r) for r in rows]
    full = session.read_cache()
    written = lengths + steps - 1
    cache = [[layer[r, :, : written[r], :] for layer in full] for r in range(n_rows)]
    return Trace(name, logits, cache)


def _stats(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    if not pairs:
        return 0.0, 0.0
    sq, n, worst = 0.0, 0, 0.0
    for a, b in pairs:
        d = a.astype(np.float64) - b.astype(np.float64)
        sq += float((d * d).sum())
        n += d.size
        worst = max(worst, float(np.abs(d).max()) if d.size else 0.0)
    return sq / max(n, 1), worst


def compare(ref: Trace, cand: Trace, tol: Tolerances) -> Comparison:
    steps = ref.logits[0].shape[0]
    pairs = list(zip(ref.logits, cand.logits))
    mse, max_abs = _stats(pairs)
    _, prefill_max = _stats([(a[:1], b[:1]) for a, b in pairs])
    _, decode_max = _stats([(a[1:], b[1:]) for a, b in pairs])
    cache_pairs, layout = [], []
    for ref_layers, cand_layers in zip(ref.cache, cand.cache):
        for i, (a, b) in enumerate(zip(ref_layers, cand_layers)):
            if (a.shape[0], a.shape[2]) != (b.shape[0], b.shape[2]):
                # (heads, head_dim) differ: numpy would broadcast a 1-head cache against a 4-head one
                # and call them equal; a layout outside the graph contract is a failure of its own.
                layout.append(f"{'past_key' if i % 2 == 0 else 'past_value'}.{i // 2} holds (heads, head_dim) "
                              f"{(b.shape[0], b.shape[2])}, the reference {(a.shape[0], a.shape[2])}")
                continue
            # A sliding-window reference cache keeps only its last slots: compare those.
            cache_pairs.append((a, b[:, b.shape[1] - a.shape[1] :, :]))
    cache_mse, cache_max = _stats(cache_pairs)
    matched = total = ambiguous = 0
    mismatches = []
    for r, (a, b) in enumerate(pairs):
        for t in range(steps):
            total += 1
            ref_tok, cand_tok = int(a[t].argmax()), int(b[t].argmax())
            if ref_tok == cand_tok:
                matched += 1
                continue
            margin = top2_margin(a[t])
            is_ambiguous = margin < tol.ambiguity_margin
            ambiguous += is_ambiguous
            mismatches.append({"row": r, "step": t, "reference": ref_tok, "candidate": cand_tok, "margin": margin, "ambiguous": bool(is_ambiguous)})
    failures = []
    if layout:
        failures.append(f"cache shape: {len(set(layout))} cache tensor(s) differ in layout (first: {layout[0]})")
    for label, value, bound in (
        ("logits MSE", mse, tol.logits_mse),
        ("logits max-abs", max_abs, tol.logits_max_abs),
        ("cache MSE", cache_mse, tol.cache_mse),
        ("cache max-abs", cache_max, tol.cache_max_abs),
    ):
        if not value <= bound:  # NaN fails too
            failures.append(f"{label} {value:.3g} > tolerance {bound:.3g}")
    hard = [m for m in mismatches if not m["ambiguous"]]
    if hard:
        first = hard[0]
        failures.append(
            f"{len(hard)} greedy token(s) differ (first: row {first['row']} step {first['step']}: "
            f"{first['reference']} vs {first['candidate']}, reference top-2 margin {first['margin']:.3g})"
        )
    distribution = DistributionStats()
    for a, b in pairs:
        if a.shape == b.shape:  # a candidate of another shape has failed above already
            distribution.add(a, b)
    dist = distribution.summary() if distribution.kl else None
    nan = float("nan")
    return Comparison(
        reference=ref.name,
        candidate=cand.name,
        steps=steps,
        logits_mse=mse,
        logits_max_abs=max_abs,
        prefill_logits_max_abs=prefill_max,
        decode_logits_max_abs=decode_max,
        cache_mse=cache_mse,
        cache_max_abs=cache_max,
        tokens_matched=matched,
        tokens_total=total,
        ambiguous=ambiguous,
        mismatches=mismatches[:20],
        failures=failures,
        tolerances=asdict(tol),
        kld_mean=dist.kld_mean if dist else nan,
        kld_p99=dist.kld_p99 if dist else nan,
        kld_max=dist.kld_max if dist else nan,
        top1_agree=dist.top1_agree if dist else nan,
        top5_overlap=dist.top5_overlap if dist else nan,
    )


def verify(
    hf_model: torch.nn.Module,
    *,
    prompt_token_ids: Sequence[Sequence[int]],
    qmodel: QEffCausalLM | None = None,
    session: Session | None = None,
    prompt_len: int = 32,
    ctx_len: int = 128,
    steps: int = 32,
    tolerances: Tolerances | None = None,
    reference: tuple[Trace, list[list[int]]] | None = None,
) -> VerifyReport:
    """HF eager vs transformed PyTorch, and (given a backend ``session``) transformed PyTorch vs
    that backend. ``steps`` counts generated tokens per row (the prefill's first one included).

    The backend session must have ``batch_size >= len(prompt_token_ids)`` and ``ctx_len`` as
    given; a fresh session is best (stale slots are masked, but a fresh one is simplest to reason about).
    ``reference`` reuses a :func:`hf_trace` of these prompts and steps (HF eager is the slow part).
    """
    prompts = [list(map(int, p)) for p in prompt_token_ids]
    if not prompts or any(not p for p in prompts):
        raise UsageError("verify() needs at least one non-empty prompt")
    if steps < 1:
        raise UsageError(f"steps must be at least 1 (got {steps})")
    longest = max(len(p) for p in prompts)
    if longest + steps - 1 > ctx_len:
        raise UsageError(f"a {longest}-token prompt plus {steps} steps does not fit ctx_len={ctx_len}")
    tol = tolerances or Tolerances()
    from qeff.runtime.torch import TorchSession
    from qeff.transforms import transform

    qmodel = qmodel if qmodel is not None else transform(hf_model)
    batch = session.batch_size if session is not None else len(prompts)
    if batch < len(prompts):
        raise UsageError(f"{len(prompts)} prompts do not fit the session's batch_size={batch}")
    if session is not None and session.ctx_len != ctx_len:
        raise UsageError(f"the session's ctx_len={session.ctx_len} differs from ctx_len={ctx_len}")

    ref, tokens = reference if reference is not None else hf_trace(hf_model, prompts, steps)
    if len(tokens) != len(prompts) or any(len(t) != steps for t in tokens):
        raise UsageError("the given reference was traced for other prompts or another number of steps")
    torch_session = TorchSession(qmodel, batch_size=batch, ctx_len=ctx_len)
    pt = session_trace(torch_session, "pytorch", prompts, tokens, prompt_len)
    comparisons = [compare(ref, pt, tol)]
    lengths = [len(p) for p in prompts]

    def replay(stepper, chunk: int):
        return ReplayLayers(stepper, prompts, tokens, batch_size=batch, prompt_len=chunk, ctx_len=ctx_len)

    if not comparisons[0].passed:  # where HF and the transformed model part; nothing runs on success
        comparisons[0].first_divergence = locate(
            ref, pt, tol, prompt_lengths=lengths,
            ref_layers=lambda: HfLayers(hf_model, prompts, tokens),
            cand_layers=lambda: replay(TorchStepper(qmodel), prompt_len),
        )
    if session is not None:
        backend = session_trace(session, session.backend, prompts, tokens, prompt_len)
        comparisons.append(compare(pt, backend, tol))
        if not comparisons[-1].passed:
            stepper = session_stepper(session)
            comparisons[-1].first_divergence = locate(
                pt, backend, tol, prompt_lengths=lengths,
                ref_layers=lambda: replay(TorchStepper(qmodel), prompt_len),
                cand_layers=None if stepper is None else lambda: replay(stepper(), session.prompt_len or prompt_len),
            )
    return VerifyReport(comparisons, prompts, tokens, prompt_len, ctx_len, steps)
