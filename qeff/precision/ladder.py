"""The precision ladder: each tier's emulated graph against HF fp32 on the untouched model.

Two teacher-forced measurements per tier:

- **corpus** (distribution metrics, perplexity): the corpus tokens are cut into ``rows`` windows of
  ``window`` tokens; the HF reference scores each window in one forward pass (its logits at every
  position), the tier's ONNX Runtime session is fed the same windows one token per step as a
  batch of ``rows`` (the graph returns logits for the step's token only). At every position:
  KL(HF ‖ tier), top-1 agreement, top-5 overlap; and the NLL of the window's next token for both,
  hence perplexity of reference and tier on the same text.
- **prompts** (greedy tokens): HF greedy decoding of each prompt, the tier teacher-forced over
  the prompt and HF's tokens; a mismatch where HF's top-2 logits are within the ambiguity margin
  counts as ambiguous (:func:`qeff.verification.compare`).

Each tier is then held to a :class:`Budget`.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qeff.errors import UsageError
from qeff.metrics import DistributionStats
from qeff.precision.tiers import Tier, check_backend, parse_tiers

__all__ = ["Budget", "DEFAULT_BUDGETS", "TierResult", "Ladder", "run_ladder", "reference_logits", "default_budget"]


@dataclass(frozen=True)
class Budget:
    """What a tier may cost against HF fp32: KL mean and p99 at most, top-1 agreement at least,
    perplexity at most ``ppl_delta`` (relative: 0.02 = +2%) above the reference's."""

    kld_mean: float
    kld_p99: float
    top1_agree: float
    ppl_delta: float

    def check(self, r: "TierResult") -> list[str]:
        failures = []
        if not r.kld_mean <= self.kld_mean:  # NaN fails
            failures.append(f"KLD mean {r.kld_mean:.3g} > budget {self.kld_mean:.3g}")
        if not r.kld_p99 <= self.kld_p99:
            failures.append(f"KLD p99 {r.kld_p99:.3g} > budget {self.kld_p99:.3g}")
        if not r.top1_agree >= self.top1_agree:
            failures.append(f"top-1 agreement {r.top1_agree:.4f} < budget {self.top1_agree:.4f}")
        delta = r.ppl_delta
        if delta is not None and not delta <= self.ppl_delta:
            failures.append(f"perplexity {r.ppl:.4g} vs reference {r.ppl_ref:.4g} (+{100 * delta:.2f}%) > budget +{100 * self.ppl_delta:.2f}%")
        return failures


#: Default budgets, measured (docs/precision.md, "Budgets"): SmolLM2-135M's ladder over 4,096
#: corpus tokens (8 windows of 512) and 4 prompts x 32 greedy steps (benchmarks/bench_precision.py;
#: reports/published/precision/smollm2-135m.json). Each bound is about 2x the measured cost, rounded
#: up: KLD mean and p99 x2, top-1 disagreement x2, perplexity increase x2 (0.2% at least). fp32's
#: are float-noise bounds (measured: KLD mean 1.1e-11, ppl equal to 7 digits). A port that behaves
#: like SmolLM2 passes; one that costs twice as much fails. The tiny cards' random models sit far inside.
DEFAULT_BUDGETS: dict[str, Budget] = {
    "fp32": Budget(kld_mean=1e-6, kld_p99=1e-5, top1_agree=0.999, ppl_delta=0.001),
    "fp16": Budget(kld_mean=5e-5, kld_p99=2e-4, top1_agree=0.98, ppl_delta=0.002),  # measured 1.9e-5, 9.3e-5, 99.39%, +0.00%
    "mxint8": Budget(kld_mean=5e-3, kld_p99=5e-2, top1_agree=0.95, ppl_delta=0.005),  # 1.1e-3, 0.012, 97.80%, +0.08%
    "mxfp6": Budget(kld_mean=0.1, kld_p99=0.5, top1_agree=0.69, ppl_delta=0.15),  # 0.047, 0.199, 84.55%, +6.15%
    "mxfp6+mxint8": Budget(kld_mean=0.1, kld_p99=0.5, top1_agree=0.68, ppl_delta=0.15),  # 0.048, 0.205, 84.01%, +6.28%
    "mxfp6-e3m2": Budget(kld_mean=0.5, kld_p99=2.0, top1_agree=0.38, ppl_delta=0.4),  # 0.192, 0.692, 69.34%, +18.57%
    "mxfp6-e3m2+mxint8": Budget(kld_mean=0.5, kld_p99=2.0, top1_agree=0.38, ppl_delta=0.4),
}


def default_budget(tier: Tier) -> Budget:
    return DEFAULT_BUDGETS.get(tier.name) or DEFAULT_BUDGETS["mxfp6+mxint8"]


@dataclass
class TierResult:
    """One rung of the ladder (all numbers against HF fp32)."""

    tier: str
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agree: float
    top5_overlap: float
    ppl_ref: float | None
    ppl: float | None
    tokens_matched: int
    tokens_total: int
    tokens_ambiguous: int
    positions: int
    budget: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    emulation: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def ppl_delta(self) -> float | None:
        if self.ppl is None or self.ppl_ref is None:
            return None
        return self.ppl / self.ppl_ref - 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_delta": self.ppl_delta, "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict) -> "TierResult":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        ppl = f"ppl {self.ppl:.3f} vs {self.ppl_ref:.3f} ({100 * self.ppl_delta:+.2f}%)" if self.ppl_delta is not None else "ppl n/a"
        return (f"{self.tier:<13} {'ok' if self.passed else 'FAILED':<6} KLD mean {self.kld_mean:.3g} p99 {self.kld_p99:.3g} "
                f"max {self.kld_max:.3g}; top-1 {100 * self.top1_agree:.2f}%, top-5 {100 * self.top5_overlap:.1f}%; {ppl}; "
                f"greedy {self.tokens_matched}/{self.tokens_total}" + (f" ({self.tokens_ambiguous} ambiguous)" if self.tokens_ambiguous else ""))


@dataclass
class Ladder:
    """Every tier's result and how they were measured."""

    tiers: list[TierResult]
    corpus_tokens: int
    rows: int
    window: int
    prompts: int
    steps: int
    reference: str = "hf-fp32"
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tiers)

    def __getitem__(self, name: str) -> TierResult:
        for t in self.tiers:
            if t.tier == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        """``{"tiers": {name: {...}}, …}``: the CLI's JSON line and the plugin's results.json record."""
        return {
            "tiers": {t.tier: t.to_dict() for t in self.tiers},
            "reference": self.reference,
            "corpus_tokens": self.corpus_tokens,
            "rows": self.rows,
            "window": self.window,
            "prompts": self.prompts,
            "steps": self.steps,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Ladder":
        return cls(tiers=[TierResult.from_dict({**v, "tier": k}) for k, v in data["tiers"].items()],
                   **{k: data[k] for k in ("corpus_tokens", "rows", "window", "prompts", "steps", "reference", "seconds") if k in data})

    def describe(self) -> str:
        head = (f"precision ladder vs {self.reference}: {self.rows} x {self.window} corpus tokens teacher-forced, "
                f"{self.prompts} prompt(s) x {self.steps} greedy steps")
        return "\n".join([head] + ["  " + t.describe() for t in self.tiers])


# -- the reference -------------------------------------------------------------------------------


def windows_of(corpus_ids: Sequence[int], rows: int, window: int) -> np.ndarray:
    """(rows, window) int64: consecutive windows of the corpus."""
    need = rows * window
    if len(corpus_ids) < need:
        raise UsageError(f"the corpus has {len(corpus_ids)} tokens; {rows} windows of {window} need {need}")
    return np.asarray(corpus_ids[:need], dtype=np.int64).reshape(rows, window)


def reference_logits(hf_model, windows: np.ndarray, out: np.ndarray) -> None:
    """HF eager on each window in one forward pass: ``out[r, t]`` = logits after token ``t``."""
    import torch  # here, not at import: reading a results file (TierResult) needs no torch

    with torch.no_grad():
        for r in range(windows.shape[0]):
            logits = hf_model(input_ids=torch.from_numpy(windows[r : r + 1]), use_cache=False).logits[0]
            out[r] = logits.float().numpy()


class _ReferenceStore:
    """The reference logits, (rows, window, vocab) float32: in memory when small, else in a
    temporary file (SmolLM2: 8 x 512 x 49,152 floats = 805 MB), deleted on close."""

    IN_MEMORY_MAX = 256 * 2**20

    def __init__(self, rows: int, window: int, vocab: int):
        shape = (rows, window, vocab)
        self._dir = None
        if rows * window * vocab * 4 <= self.IN_MEMORY_MAX:
            self.array = np.empty(shape, np.float32)
        else:
            from qeff.store.scratch import ScratchDir

            self._dir = ScratchDir("qeff-reference-")  # locked: a killed run's is reclaimed
            self.array = np.memmap(self._dir.path / "logits.f32", dtype=np.float32, mode="w+", shape=shape)

    def close(self) -> None:
        self.array = None
        if self._dir is not None:
            self._dir.close()


# -- one tier ------------------------------------------------------------------------------------------


def _corpus_pass(session, reference: np.ndarray, windows: np.ndarray) -> DistributionStats:
    rows, window = windows.shape
    if session.batch_size < rows or session.ctx_len < window:
        raise UsageError(f"the session (batch {session.batch_size}, ctx_len {session.ctx_len}) cannot hold {rows} windows of {window}")
    stats = DistributionStats()
    ids = np.zeros((session.batch_size, 1), np.int64)
    pos = np.full((session.batch_size, 1), -1, np.int64)
    for t in range(window):
        ids[:rows, 0] = windows[:, t]
        pos[:rows, 0] = t
        logits = session.run(ids, pos)[:rows]
        targets = windows[:, t + 1] if t + 1 < window else np.full(rows, -1)
        stats.add(np.asarray(reference[:, t, :]), logits, targets)
    return stats


def run_ladder(
    hf_model,
    onnx_path: str | Path,
    tiers: Sequence[Tier] | str,
    *,
    corpus_ids: Sequence[int],
    prompt_token_ids: Sequence[Sequence[int]] = (),
    rows: int = 8,
    window: int = 512,
    steps: int = 16,
    prompt_len: int = 32,
    budgets: dict[str, Budget] | None = None,
    threads: int | None = None,
    backend: str = "ort",
    progress: bool = True,
    force: bool = False,
    keep_tiers: bool = True,
    log: Callable[[str], None] | None = None,
) -> Ladder:
    """Measure each tier of ``tiers`` against HF fp32 (``hf_model``, untouched) on the exported
    graph ``onnx_path``: emulated graphs are built (and cached) beside it, compiled for ONNX
    Runtime, and run over ``rows`` windows of ``window`` corpus tokens and the prompts.

    Each emulated tier is a full copy of the weights, twice (graph and ORT-optimized graph: 1.3 GB
    for SmolLM2-135M). ``keep_tiers=False`` removes a tier's artifacts once it is measured, so a
    one-off ladder needs disk for one tier at a time and leaves no cache behind."""
    from qeff.backends import compile as compile_graph
    from qeff.precision.emulate import build_tier
    from qeff.backends import open_session
    from qeff.verification import Tolerances, compare, hf_trace, session_trace

    start = time.perf_counter()
    tiers = parse_tiers(tiers) if isinstance(tiers, str) else list(tiers)
    check_backend(tiers, backend)
    if backend != "ort":
        raise UsageError(f"the precision ladder runs emulated tiers on ort; {backend} is not supported here")
    say = log or (lambda m: print(m, file=sys.stderr, flush=True) if progress else None)
    windows = windows_of(corpus_ids, rows, window)
    prompts = [list(map(int, p)) for p in prompt_token_ids]
    if len(prompts) > rows:
        raise UsageError(f"{len(prompts)} prompts do not fit the ladder's batch of {rows} rows")
    if prompts and max(len(p) for p in prompts) + steps - 1 > window:
        raise UsageError(f"a prompt plus {steps} steps does not fit the window of {window} tokens")
    budgets = {**DEFAULT_BUDGETS, **(budgets or {})}

    vocab = int(hf_model.config.vocab_size)
    store = _ReferenceStore(rows, window, vocab)
    try:
        t0 = time.perf_counter()
        reference_logits(hf_model, windows, store.array)
        ref_trace, ref_tokens = hf_trace(hf_model, prompts, steps) if prompts else (None, [])
        say(f"[qeff] HF fp32 reference: {rows} x {window} corpus tokens, {len(prompts)} prompt(s) in {time.perf_counter() - t0:.1f} s")
        results = []
        for tier in tiers:
            t0 = time.perf_counter()
            built_graph = build_tier(onnx_path, tier, force=force, progress=progress)
            graph = built_graph.path / "model.onnx"
            compiled = compile_graph(graph, "ort", batch_size=rows, prompt_len=min(prompt_len, window), ctx_len=window,
                                    threads=threads, force=force, progress=progress)
            # One session at a time and no pinned decode twin: a real model's ladder holds the
            # reference logits too (SmolLM2: 805 MB), so weights are kept in memory once.
            session = open_session(compiled.path, threads=threads, specialize_decode=False)
            summary = _corpus_pass(session, store.array, windows).summary()
            matched = total = ambiguous = 0
            if prompts:
                session.close()
                session = open_session(compiled.path, threads=threads, specialize_decode=False)  # a fresh cache
                trace = session_trace(session, tier.name, prompts, ref_tokens, prompt_len)
                comparison = compare(ref_trace, trace, Tolerances())
                matched, total, ambiguous = comparison.tokens_matched, comparison.tokens_total, comparison.ambiguous
            session.close()
            del session
            if not keep_tiers and not tier.is_fp32:
                shutil.rmtree(built_graph.path, ignore_errors=True)
            budget = budgets.get(tier.name) or default_budget(tier)
            result = TierResult(
                tier=tier.name, kld_mean=summary.kld_mean, kld_p99=summary.kld_p99, kld_max=summary.kld_max,
                top1_agree=summary.top1_agree, top5_overlap=summary.top5_overlap, ppl_ref=summary.ppl_ref, ppl=summary.ppl,
                tokens_matched=matched, tokens_total=total, tokens_ambiguous=ambiguous, positions=summary.positions,
                budget=asdict(budget), emulation=built_graph.manifest.get("outputs", {}),
                seconds=round(time.perf_counter() - t0, 3),
            )
            result.failures = budget.check(result)
            say(f"[qeff] {result.describe()} ({result.seconds:.1f} s)")
            results.append(result)
    finally:
        store.close()
    return Ladder(results, corpus_tokens=rows * window, rows=rows, window=window, prompts=len(prompts), steps=steps,
                  seconds=time.perf_counter() - start)

