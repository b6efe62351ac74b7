"""Sampling: equal to a plain reference sampler written here (given the same random numbers),
frequencies that follow the filtered distribution (chi-square), reproducible per seed and prompt,
independent of batch composition. The chi-square check is shown failing on seeded faults."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import qeff
from qeff.errors import UsageError
from qeff.runtime.ort import OrtSession
from qeff.generation.continuous import generate_continuous
from qeff.generation.sampling import RowSampler, SamplingParams, row_stream, sample_token
from qeff.runtime.ort_serving import ServingOrtSession
from tests.serving_helpers import batch1_reference, export_variants, random_workload


# -- an independent reference: plain Python over lists, written from the rule in the docstring --


def ref_distribution(logits, temperature, top_k, top_p, penalty, seen) -> dict[int, float]:
    scores = [float(x) for x in logits]
    for t in set(seen):
        scores[t] = scores[t] / penalty if scores[t] > 0 else scores[t] * penalty
    if temperature == 0:
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return {best: 1.0}
    scores = [s / temperature for s in scores]
    kept = list(range(len(scores)))
    if 0 < top_k < len(scores):
        threshold = sorted(scores, reverse=True)[top_k - 1]
        kept = [i for i in kept if scores[i] >= threshold]
    top = max(scores[i] for i in kept)
    weights = {i: math.exp(scores[i] - top) for i in kept}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if top_p < 1:
        chosen, mass = [], 0.0
        for i in sorted(probs, key=lambda i: (-probs[i], i)):
            if mass >= top_p:
                break
            chosen.append(i)
            mass += probs[i]
        total = sum(probs[i] for i in chosen)
        probs = {i: probs[i] / total for i in chosen}
    return probs


def ref_sample(logits, temperature, top_k, top_p, penalty, seen, u) -> int:
    probs = ref_distribution(logits, temperature, top_k, top_p, penalty, seen)
    mass = 0.0
    for i in sorted(probs):
        mass += probs[i]
        if mass > u:
            return i
    return max(probs)


PARAMS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=0.5, top_p=0.01),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}")
def test_sample_token_equals_the_reference_given_the_same_uniforms(params):
    rng = np.random.default_rng(0)
    for _ in range(300):
        logits = (rng.normal(size=64) * rng.uniform(0.5, 4)).astype(np.float32)
        seen = rng.integers(0, 64, rng.integers(0, 10)).tolist()
        u = float(rng.random())
        expected = ref_sample(logits, params.temperature, params.top_k, params.top_p, params.repetition_penalty, seen, u)
        assert sample_token(logits, params, seen, u) == expected


# -- chi-square: sampled frequencies follow the filtered distribution --------------------------

CHI_PARAMS = SamplingParams(temperature=0.7, top_k=25, top_p=0.9, repetition_penalty=1.3, seed=11)
CHI_N = 40_000


def chi_square_critical(df: int, z: float = 3.0902) -> float:
    """The chi-square quantile at 1 - 1e-3 (z = 3.09), Wilson-Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(sampler) -> tuple[float, float, int]:
    """(statistic, critical value, samples outside the kept set) for CHI_N draws of ``sampler``."""
    logits = (np.random.default_rng(5).normal(size=40) * 1.5).astype(np.float32)
    seen = [0, 1, 2, 3, 4]
    p = CHI_PARAMS
    expected = ref_distribution(logits, p.temperature, p.top_k, p.top_p, p.repetition_penalty, seen)
    stream = row_stream(p.seed, 0)
    counts = np.bincount([sampler(logits, seen, float(stream.random())) for _ in range(CHI_N)], minlength=40)
    outside = int(sum(counts[i] for i in range(40) if i not in expected))
    assert min(expected.values()) * CHI_N >= 5  # every bin large enough for the test to hold
    stat = sum((counts[i] - CHI_N * q) ** 2 / (CHI_N * q) for i, q in expected.items())
    return stat, chi_square_critical(len(expected) - 1), outside


def test_sampled_frequencies_follow_the_filtered_distribution():
    stat, critical, outside = chi_square(lambda logits, seen, u: sample_token(logits, CHI_PARAMS, seen, u))
    assert outside == 0
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(lambda l, s, u: sample_token(l, replace(CHI_PARAMS, temperature=1.0), s, u), id="temperature-ignored"),
        pytest.param(lambda l, s, u: sample_token(l, replace(CHI_PARAMS, repetition_penalty=1.0), s, u), id="penalty-ignored"),
        pytest.param(lambda l, s, u: sample_token(l, CHI_PARAMS, s, u ** 1.1), id="biased-uniforms"),
        pytest.param(lambda l, s, u: sample_token(l, replace(CHI_PARAMS, top_p=1.0), s, u), id="top-p-ignored"),
    ],
)
def test_seeded_fault_the_chi_square_check_catches(fault):
    stat, critical, outside = chi_square(fault)
    assert outside > 0 or stat > critical, (stat, critical)


# -- through the loops ------------------------------------------------------------------------

CTX, PL = 48, 8
HOT = SamplingParams(temperature=1.5, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=3)


@pytest.fixture(scope="module")
def graphs(module_tmp):
    return export_variants(module_tmp("sampling"), "qwen2")


class Recording:
    """Records the logits of every step of a batch-1 session."""

    def __init__(self, session):
        self.session, self.batch_size, self.ctx_len, self.prompt_len = session, 1, session.ctx_len, None
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def run(self, ids, pos):
        logits = self.session.run(ids, pos).copy()
        self.steps.append((pos.copy(), logits))
        return logits


def test_the_loop_samples_what_the_reference_samples_from_its_logits(graphs):
    prompt = random_workload(0, n=1, max_prompt=12)[0][0]
    session = Recording(OrtSession(graphs["base"], batch_size=1, ctx_len=CTX))
    out = qeff.generate(session, prompt_token_ids=[prompt], prompt_len=PL, generation_len=20, eos_token_id=[], sampling=HOT, sample_keys=[4])
    # The logits that produced tokens: the prefill chunk holding the last prompt token, then each decode step.
    producing = [logits[0] for pos, logits in session.steps if pos[0].max() >= len(prompt) - 1]
    stream, seen, expected = row_stream(HOT.seed, 4), list(prompt), []
    for logits in producing:
        token = ref_sample(logits, HOT.temperature, HOT.top_k, HOT.top_p, HOT.repetition_penalty, seen, float(stream.random()))
        expected.append(token)
        seen.append(token)
    assert out.token_ids[0] == expected and len(expected) == 20


def test_greedy_is_the_default(graphs):
    prompts, gens, _ = random_workload(1, n=3)
    session = OrtSession(graphs["base"], batch_size=3, ctx_len=CTX)
    plain = qeff.generate(session, prompt_token_ids=prompts, prompt_len=PL, generation_len=10, eos_token_id=[])
    default = qeff.generate(session, prompt_token_ids=prompts, prompt_len=PL, generation_len=10, eos_token_id=[], sampling=SamplingParams(seed=9))
    assert plain.token_ids == default.token_ids


def test_reproducible_per_seed_and_prompt_whatever_the_batch(graphs):
    prompts, gens, arrivals = random_workload(2, n=6)
    alone = [t for t, _ in batch1_reference(graphs["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens, sampling=HOT)]
    static = OrtSession(graphs["base"], batch_size=3, ctx_len=CTX)
    batched = []
    for start in (0, 3):
        r = qeff.generate(static, prompt_token_ids=prompts[start : start + 3], prompt_len=PL, generation_len=max(gens),
                          eos_token_id=[], sampling=HOT, sample_keys=range(start, start + 3))
        batched += [t[:g] for t, g in zip(r.token_ids, gens[start : start + 3])]
    slots = ServingOrtSession(graphs["cb"], batch_size=2, full_batch_size=2, ctx_len=CTX)
    cb = generate_continuous(slots, prompt_token_ids=prompts, prompt_len=PL, generation_len=gens, eos_token_id=[],
                             sampling=HOT, arrival_steps=arrivals)
    assert alone == batched == cb.token_ids
    other_seed = batch1_reference(graphs["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens, sampling=replace(HOT, seed=4))
    assert [t for t, _ in other_seed] != alone
    greedy = batch1_reference(graphs["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    assert [t for t, _ in greedy] != alone


def test_row_sampler_streams_are_per_prompt():
    logits = np.zeros(1000, dtype=np.float32)  # uniform: the token is the uniform draw itself
    a = [RowSampler(HOT, 0, [])(logits) for _ in range(1)]
    b = RowSampler(HOT, 0, [])
    c = RowSampler(HOT, 1, [])
    assert a[0] == b(logits) and [b(logits) for _ in range(5)] != [c(logits) for _ in range(6)][1:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"top_p": 0.0}, r"--top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"--top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "--top_k"),
        ({"repetition_penalty": 0.0}, "--repetition_penalty"),
        ({"seed": -3}, "--seed"),
        ({"temperature": float("nan")}, "--temperature"),
    ],
)
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(UsageError, match=message):
        SamplingParams(**kwargs)
