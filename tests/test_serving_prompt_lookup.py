"""Prompt-lookup decoding (qeff.generation.ngram + the speculative verify loop): the drafter's own
rules, and greedy output equal to the untouched HF model's greedy output (token ids) on tiny
models and on SmolLM2, for the portable speculative target and the fused CPU graph, batches of
rows with different lengths, EOS, the end of the cache and drafts that are always wrong. Two seeded
faults in the acceptance (one token too many; drafts kept without verification) are caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qeff
import qeff.generation.speculative as speculative
from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
from qeff.compilers.ort_fused_weights import from_hf
from qeff.errors import UsageError
from qeff.runtime.ort_fused import FusedOrtSession
from qeff.generation.ngram import NgramDrafter, lookup
from qeff.runtime.ort_serving import ServingOrtSession
from qeff.generation.speculative import generate_speculative
from tests.serving_helpers import TLM, serving_model

CTX, PL = 96, 8


# -- the drafter ---------------------------------------------------------------------------


def test_lookup_takes_the_longest_suffix_that_recurs():
    # Suffix [7, 8, 9] occurs at 0 (followed by 1, 2); [8, 9] alone also occurs at 5 (followed by 5).
    tokens = [7, 8, 9, 1, 2, 8, 9, 5, 7, 8, 9]
    assert lookup(tokens, 2, ngram_max=3) == [1, 2]
    assert lookup(tokens, 2, ngram_max=2) == [5, 7]  # only 2-grams: the most recent [8, 9] is at 5


def test_lookup_takes_the_most_recent_occurrence_and_at_most_k():
    tokens = [4, 1, 2, 3, 4, 5, 6, 4]
    assert lookup(tokens, 3, ngram_max=1) == [5, 6, 4]  # [4] at 4 (not at 0), then up to the end
    assert lookup(tokens, 1, ngram_max=1) == [5]
    assert lookup(tokens, 10, ngram_max=1) == [5, 6, 4]  # what there is


def test_lookup_without_a_match_proposes_nothing():
    assert lookup([1, 2, 3, 4], 3) == []
    assert lookup([5], 3) == [] and lookup([], 3) == []
    assert lookup([1, 1, 1], 0) == []
    # The suffix itself is no match: [2, 3] recurs nowhere, so a 1-gram [3] must recur — it does not.
    assert lookup([1, 2, 3, 9, 2, 3], 2, ngram_max=2) == [9, 2]
    assert NgramDrafter(3, ngram_min=2).propose([1, 2, 3, 1], 2) == []  # only [1] recurs, shorter than 2
    with pytest.raises(ValueError):
        NgramDrafter(0)


# -- tiny models -----------------------------------------------------------------------------


def copy_prompts(lengths, seed: int, vocab: int = 256) -> list[list[int]]:
    """Copy-heavy prompts: a random passage, a few other tokens, the passage's start again."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        passage = rng.integers(3, vocab, n).tolist()
        out.append(passage + rng.integers(3, vocab, 3).tolist() + passage[: max(2, n // 2)])
    return out


PROMPTS = copy_prompts([6, 14, 22], seed=5)  # 11, 24 and 36 tokens: 2, 3 and 5 prefill chunks


@pytest.fixture(scope="module")
def tiny(module_tmp):
    out = module_tmp("lookup")
    model = serving_model("llama", seed=1)
    qmodel = qeff.transform(model)
    fused_dir = out / "fused"
    fused_dir.mkdir()
    write_fused_graph(from_hf(model, CTX), fused_dir)
    return {"hf": model, "tlm": qeff.export(qmodel, out / "tlm", variant=TLM).path, "fused": fused_dir / FUSED_GRAPH}


def hf_greedy(model, prompts, steps: int, eos=None) -> list[list[int]]:
    """The untouched HF model's greedy continuation of each prompt alone (no qeff in the loop)."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=0)
        row = y[0, len(ids):].tolist()
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        out.append(row)
    return out


def target(tiny, kind: str, batch: int, ctx: int = CTX):
    if kind == "fused":
        return FusedOrtSession(tiny["fused"], batch_size=batch, ctx_len=ctx, prompt_len=PL)
    return ServingOrtSession(tiny["tlm"], batch_size=batch, ctx_len=ctx, prompt_len=PL)


@pytest.fixture(scope="module")
def reference(tiny):
    return hf_greedy(tiny["hf"], PROMPTS, 40)


@pytest.mark.parametrize("kind", ["portable", "fused"])
@pytest.mark.parametrize("k", [1, 4])
def test_output_is_exactly_hf_greedy(tiny, reference, kind, k):
    out = qeff.generate(target(tiny, kind, 3), prompt_token_ids=PROMPTS, generation_len=40, eos_token_id=[], prompt_lookup=k)
    assert out.token_ids == reference and out.stop_reasons == ["length"] * 3
    # The tiny model's text repeats itself: lookup drafts are accepted, so fewer steps than tokens.
    assert 1.0 < out.mean_accepted_tokens <= k + 1 and out.steps < 39, (out.mean_accepted_tokens, out.steps)
    assert out.proposed_tokens > 0 and 0 < out.accepted_drafts <= out.proposed_tokens


def test_batch_one_and_padded_batch_rows(tiny, reference):
    # One prompt at batch 1, and two prompts in a batch of 4 (two idle rows).
    one = qeff.generate(target(tiny, "fused", 1), prompt_token_ids=PROMPTS[2:], generation_len=40, eos_token_id=[], prompt_lookup=3)
    assert one.token_ids == reference[2:]
    two = qeff.generate(target(tiny, "portable", 4), prompt_token_ids=PROMPTS[:2], generation_len=40, eos_token_id=[], prompt_lookup=3)
    assert two.token_ids == reference[:2]


def test_rows_stop_at_eos_and_at_the_end_of_the_cache(tiny, reference):
    tokens = [t for row in reference for t in row]
    eos = max(set(tokens), key=tokens.count)  # a token every row is likely to reach
    want = hf_greedy(tiny["hf"], PROMPTS, 40, eos=eos)
    for kind in ("portable", "fused"):
        out = qeff.generate(target(tiny, kind, 3), prompt_token_ids=PROMPTS, generation_len=40, eos_token_id=[eos], prompt_lookup=4)
        assert out.token_ids == want and "eos" in out.stop_reasons, kind
    ctx = 48  # room for 37, 24 and 12 new tokens: each row runs into the end of its cache
    full = [row[: ctx - len(p) + 1] for p, row in zip(PROMPTS, hf_greedy(tiny["hf"], PROMPTS, ctx))]
    for kind in ("portable", "fused"):
        out = qeff.generate(target(tiny, kind, 3, ctx=ctx), prompt_token_ids=PROMPTS, eos_token_id=[], prompt_lookup=4)
        assert out.token_ids == full and out.stop_reasons == ["ctx_len"] * 3, kind


class Oracle:
    """A drafter that knows the reference continuation; ``wrong`` proposes each token plus one."""

    def __init__(self, prompts, reference, wrong: bool):
        self.rows = {tuple(p): r for p, r in zip(prompts, reference)}
        self.wrong = wrong

    def propose(self, tokens, k):
        for prompt, ref in self.rows.items():
            if tuple(tokens[: len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                nxt = ref[done: done + k]
                return [(t + 1) % 256 for t in nxt] if self.wrong else nxt
        raise AssertionError("unknown row")


def test_a_draft_that_is_always_wrong_changes_nothing_but_the_speed(tiny, reference):
    out = generate_speculative(target(tiny, "fused", 3), Oracle(PROMPTS, reference, wrong=True), prompt_token_ids=PROMPTS,
                               prompt_len=PL, generation_len=40, eos_token_id=[], num_speculative_tokens=4)
    assert out.token_ids == reference
    assert out.mean_accepted_tokens == 1.0 and out.accepted_drafts == 0 and out.proposed_tokens > 0
    right = generate_speculative(target(tiny, "fused", 3), Oracle(PROMPTS, reference, wrong=False), prompt_token_ids=PROMPTS,
                                 prompt_len=PL, generation_len=40, eos_token_id=[], num_speculative_tokens=4)
    assert right.token_ids == reference and right.mean_accepted_tokens > 4.5  # 5 per step but the last


@pytest.mark.parametrize("fault", ["one_too_many", "unverified"])
def test_seeded_acceptance_faults_are_caught(tiny, reference, monkeypatch, fault):
    honest = speculative.accepted_count

    def one_too_many(proposal, choices):
        return min(honest(proposal, choices) + 1, len(proposal) + 1)

    def unverified(proposal, choices):  # every draft kept, as if the lookup's text were the target's
        return len(proposal) + 1

    monkeypatch.setattr(speculative, "accepted_count", {"one_too_many": one_too_many, "unverified": unverified}[fault])
    out = qeff.generate(target(tiny, "fused", 3), prompt_token_ids=PROMPTS, generation_len=40, eos_token_id=[], prompt_lookup=4)
    assert out.token_ids != reference


def test_the_fused_graphs_verify_logits_equal_the_portable_targets(tiny):
    ids = np.array([PROMPTS[0][:5], PROMPTS[1][:5]])
    pos = np.array([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]])
    ids[1, 3:] = 0
    fused, portable = target(tiny, "fused", 2), target(tiny, "portable", 2)
    a, b = fused.run(ids, pos, keep=5), portable.run(ids, pos, keep=5)
    assert a.shape == b.shape == (2, 5, 256)
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)
    np.testing.assert_allclose(a[1, :3], b[1, :3], atol=1e-4)  # the padded columns are never read
    # Fewer kept positions than a row's tokens: each row's own last ones (row 1: columns 1 and 2).
    a, b = target(tiny, "fused", 2).run(ids, pos, keep=2), target(tiny, "portable", 2).run(ids, pos, keep=2)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_bad_uses(tiny):
    session = target(tiny, "fused", 1)
    with pytest.raises(UsageError, match="prompt_lookup"):
        qeff.generate(session, prompt_token_ids=PROMPTS[:1], prompt_lookup=0)
    with pytest.raises(UsageError, match="ngram_max"):
        qeff.generate(session, prompt_token_ids=PROMPTS[:1], prompt_lookup=2, ngram_max=0)
    from qeff.generation.sampling import SamplingParams

    with pytest.raises(UsageError, match="greedy only"):
        qeff.generate(session, prompt_token_ids=PROMPTS[:1], prompt_lookup=2, sampling=SamplingParams(temperature=0.7))


# -- the real model --------------------------------------------------------------------------

PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
           "cloth for the lens. He polished the glass until it shone, trimmed the wick, and lit the lamp, "
           "and the beam swept across the dark water toward the ships that passed the rocky point.")
REAL_PROMPTS = [f"Repeat the following text exactly:\n\n{PASSAGE}\n\nRepeated text:\n",
                "Copy this line: the quick brown fox jumps over the lazy dog. Copy:"]
REAL_STEPS, REAL_CTX = 72, 160


def test_smollm2_copy_prompt_equals_hf_greedy_with_several_tokens_per_step(smollm2, tmp_path):
    model, tokenizer = smollm2
    ids = [tokenizer(p)["input_ids"] for p in REAL_PROMPTS]
    want = hf_greedy(model, ids, REAL_STEPS, eos=tokenizer.eos_token_id)
    write_fused_graph(from_hf(model, REAL_CTX), tmp_path)
    session = FusedOrtSession(tmp_path / FUSED_GRAPH, batch_size=2, ctx_len=REAL_CTX, prompt_len=32)
    out = qeff.generate(session, prompt_token_ids=ids, generation_len=REAL_STEPS, eos_token_id=tokenizer.eos_token_id, prompt_lookup=5)
    assert out.token_ids == want
    assert out.mean_accepted_tokens > 1.5, out.mean_accepted_tokens  # the copy is drafted from the prompt (1.77 seen)
