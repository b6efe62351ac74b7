"""The serving features on the one real model here (SmolLM2-135M-Instruct), against untouched HF
greedy generation. One export of a graph with both serving inputs keeps this to a minute: its
slots serve continuous batching, and two disjoint slot views of it serve as a speculative target
and its self-draft."""

from __future__ import annotations

import pytest
import torch

import qeff
from qeff.generation.continuous import generate_continuous
from qeff.serving.graph import GraphVariant
from qeff.generation.sampling import SamplingParams
from qeff.runtime.ort_serving import ServingOrtSession, SlotView
from qeff.generation.speculative import generate_speculative

# One worker builds this module's SmolLM2 artifacts once (not one copy per xdist worker).
pytestmark = pytest.mark.xdist_group("serving_real")

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Three reasons to learn Python are",
    "The capital of France is a city that",
]
GENS = [24, 10, 30, 16, 12]
CTX, PL = 128, 16


@pytest.fixture(scope="module")
def served(smollm2, module_tmp):
    model, tokenizer = smollm2
    path = qeff.export(qeff.transform(model), module_tmp("smollm2-serving"),
                       variant=GraphVariant(continuous_batching=True, speculative=True)).path
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    reference = []
    for prompt, gen in zip(ids, GENS):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=gen, do_sample=False, eos_token_id=None, pad_token_id=0)
        reference.append(out[0, len(prompt):].tolist())
    return ServingOrtSession(path, batch_size=4, full_batch_size=4, ctx_len=CTX), ids, reference, tokenizer


def test_continuous_batching_equals_hf_greedy_per_prompt(served):
    session, ids, reference, _ = served
    result = generate_continuous(session, prompt_token_ids=ids, prompt_len=PL, generation_len=GENS, eos_token_id=[],
                                 arrival_steps=[0, 0, 5, 9, 9])
    assert result.token_ids == reference
    hit = generate_continuous(session, prompt_token_ids=ids, prompt_len=PL, generation_len=GENS, eos_token_id=[], prefix_caching=True,
                              arrival_steps=[0, 0, 0, 0, 26])  # the last prompt arrives once the first has finished
    assert hit.token_ids == reference and hit.prefix_hit_tokens[-1] >= 5  # the last prompt extends the first


def test_self_speculation_equals_hf_greedy_and_keeps_k_plus_1(served):
    session, ids, reference, _ = served
    target, draft = SlotView(session, [0, 1]), SlotView(session, [2, 3])
    out = generate_speculative(target, draft, prompt_token_ids=ids[2:4], prompt_len=PL, generation_len=GENS[2],
                               eos_token_id=[], num_speculative_tokens=3)
    assert out.token_ids[0] == reference[2]
    assert out.token_ids[1] == reference[3] + out.token_ids[1][GENS[3]:]  # row 1 ran past its reference length
    assert out.mean_accepted_tokens == 4.0


def test_sampling_is_reproducible_across_slots_and_batches(served):
    session, ids, _, _ = served
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=7)
    first = generate_continuous(session, prompt_token_ids=ids, prompt_len=PL, generation_len=12, eos_token_id=[], sampling=params)
    alone = [qeff.generate(SlotView(session, [3]), prompt_token_ids=[p], prompt_len=PL, generation_len=12, eos_token_id=[],
                           sampling=params, sample_keys=[i]).token_ids[0] for i, p in enumerate(ids)]
    assert first.token_ids == alone
