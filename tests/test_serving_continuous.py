"""Continuous batching: every prompt's tokens equal its batch-1 run, whatever the arrival order,
the mix of lengths, the slot it lands in or what that slot held before; prefix-cache hits give
exactly the tokens of misses. Each check is shown failing on a seeded fault."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qeff
from qeff.errors import UsageError
from qeff.generation import prefill_chunks
from qeff.runtime.ort import OrtSession
from qeff.generation import continuous
from qeff.generation.continuous import generate_continuous
from qeff.runtime.ort_serving import ServingOrtSession
from tests.serving_helpers import CB, SERVING_CONFIGS, batch1_reference, export_variants, random_workload
from tests.tiny import random_prompts

CTX, PL = 48, 8


@pytest.fixture(scope="module", params=["llama", "mistral-sliding"])
def graphs(request, module_tmp):
    return export_variants(module_tmp(f"cb-{request.param}"), request.param)


@pytest.fixture(scope="module")
def llama(module_tmp):
    return export_variants(module_tmp("cb-llama"), "llama")


def cb_session(graphs, slots: int, **kw) -> ServingOrtSession:
    return ServingOrtSession(graphs["cb"], batch_size=slots, full_batch_size=slots, ctx_len=CTX, **kw)


def run_cb(session, prompts, gens, **kw):
    return generate_continuous(session, prompt_token_ids=prompts, prompt_len=PL, generation_len=gens, eos_token_id=kw.pop("eos", []), **kw)


@pytest.mark.parametrize("arch", sorted(SERVING_CONFIGS))
def test_the_tiny_models_read_their_context(arch, tmp_path):
    """Prompts that share their last token must continue differently, or the token equalities of
    these tests could not fail (the cards' tied-embedding tiny models repeat the last token)."""
    path = export_variants(tmp_path, arch, variants=("base",))["base"]
    session = OrtSession(path, batch_size=1, ctx_len=CTX)
    prompts = [p[:-1] + [77] for p in random_prompts([10] * 6, seed=5)]
    outs = {tuple(qeff.generate(session, prompt_token_ids=[p], prompt_len=PL, generation_len=8, eos_token_id=[]).token_ids[0]) for p in prompts}
    assert len(outs) >= 5, outs


def test_the_graph_has_batch_index_and_full_batch_size_slots(llama):
    model = onnx.load(str(llama["cb"]), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["batch_index"] == ["batch_size", 1]
    assert dims["input_ids"] == ["batch_size", "seq_len"]
    assert dims["past_key.0"][0] == "full_batch_size" and dims["past_key.0"][2] == "ctx_len"
    assert "ScatterND" in {n.op_type for n in model.graph.node}
    base = onnx.load(str(llama["base"]), load_external_data=False)
    assert "batch_index" not in {i.name for i in base.graph.input}  # the base contract is unchanged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_prompt_equals_its_batch1_run(graphs, seed):
    prompts, gens, arrivals = random_workload(seed)
    ref = batch1_reference(graphs["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    result = run_cb(cb_session(graphs, 3), prompts, gens, arrival_steps=arrivals)
    assert [t for t, _ in ref] == result.token_ids
    assert [r for _, r in ref] == result.stop_reasons
    assert sorted(set(result.slots)) == [0, 1, 2] and result.steps > 0


def test_eos_frees_a_slot_early_and_the_cache_end_stops_a_row(llama):
    prompts, gens, _ = random_workload(7, n=8, max_gen=40)
    gens[0] = None  # runs to the end of its cache
    free = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    tokens = [t for seq, _ in free for t in seq]
    eos = max(set(tokens), key=tokens.count)  # a token several prompts produce
    ref = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens, eos=[eos])
    result = run_cb(cb_session(llama, 2), prompts, gens, eos=[eos])
    assert [t for t, _ in ref] == result.token_ids and [r for _, r in ref] == result.stop_reasons
    assert "eos" in result.stop_reasons
    assert len(result.messages) == result.stop_reasons.count("ctx_len")


def test_arrival_order_does_not_change_any_prompt(llama):
    prompts, gens, _ = random_workload(3, n=9)
    ref = run_cb(cb_session(llama, 3), prompts, gens).token_ids
    rng = np.random.default_rng(0)
    for _ in range(3):
        arrivals = rng.permutation(len(prompts)).tolist()  # a different order and spacing each time
        out = run_cb(cb_session(llama, 3), prompts, gens, arrival_steps=[3 * a for a in arrivals])
        assert out.token_ids == ref


def test_inplace_binding_is_bit_exact_against_numpy(llama):
    prompts, gens, arrivals = random_workload(4)
    a, b = cb_session(llama, 3), cb_session(llama, 3, binding="numpy")
    ra, rb = run_cb(a, prompts, gens, arrival_steps=arrivals), run_cb(b, prompts, gens, arrival_steps=arrivals)
    assert ra.token_ids == rb.token_ids
    for x, y in zip(a.read_cache(), b.read_cache()):
        np.testing.assert_array_equal(x, y)


class Poisoning:
    """Wraps a session: fills a slot's whole cache row with large random values when a new prompt
    is admitted into it (``when="before"`` its first prefill chunk: whatever a freed slot holds),
    or — the seeded fault — right after that prompt's prefill, where the prompt reads it."""

    def __init__(self, session, when: str):
        self.session, self.when = session, when
        self.full_batch_size, self.ctx_len, self.prompt_len = session.full_batch_size, session.ctx_len, None
        self.rng = np.random.default_rng(0)
        self.poisoned = 0
        self._pending: int | None = None

    def _poison(self, slot: int) -> None:
        cache = self.session.read_cache()
        for tensor in cache:
            tensor[slot] = self.rng.normal(size=tensor[slot].shape) * 1e3  # finite: see the docs on NaN
        self.session.write_cache(cache)
        self.poisoned += 1

    def run(self, ids, pos, *, batch_index):
        index = np.asarray(batch_index).reshape(-1)
        if self._pending is not None:  # "after": the prefill chunk(s) of the new prompt are done
            self._poison(self._pending)
            self._pending = None
        if ids.shape[0] == 1 and pos[0, 0] == 0:  # the first chunk of a newly admitted prompt
            if self.when == "before":
                self._poison(int(index[0]))
            else:
                self._pending = int(index[0])
        return self.session.run(ids, pos, batch_index=batch_index)


def test_a_reused_slot_never_reads_its_previous_occupant(llama):
    prompts, gens, _ = random_workload(5, n=12, max_prompt=6)  # one-chunk prompts, 2 slots: each reused ~6 times
    ref = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    session = Poisoning(cb_session(llama, 2), "before")
    result = run_cb(session, prompts, gens)
    assert session.poisoned == len(prompts)
    assert result.token_ids == [t for t, _ in ref]


def test_seeded_fault_poison_where_the_prompt_reads_is_caught(llama):
    prompts, gens, _ = random_workload(5, n=12, max_prompt=6)
    ref = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    result = run_cb(Poisoning(cb_session(llama, 2), "after"), prompts, gens)
    differ = sum(a != b for a, (b, _) in zip(result.token_ids, ref))
    assert differ >= len(prompts) // 2, differ


class WrongSlot:
    """Seeded fault: prefill writes into the next slot (an off-by-one batch_index)."""

    def __init__(self, session):
        self.session, self.full_batch_size, self.ctx_len, self.prompt_len = session, session.full_batch_size, session.ctx_len, None

    def run(self, ids, pos, *, batch_index):
        index = np.asarray(batch_index).reshape(-1)
        if ids.shape[0] == 1:
            index = (index + 1) % self.full_batch_size
        return self.session.run(ids, pos, batch_index=index)


def test_seeded_fault_wrong_batch_index_is_caught(llama):
    prompts, gens, arrivals = random_workload(0)
    ref = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    result = run_cb(WrongSlot(cb_session(llama, 3)), prompts, gens, arrival_steps=arrivals)
    assert sum(a != b for a, (b, _) in zip(result.token_ids, ref)) >= len(prompts) // 2


# -- prefix caching -----------------------------------------------------------------------------


def shared_prefix_workload(seed: int):
    """A 19-token "system prompt" shared by most prompts, with suffixes of 0 … 6 tokens."""
    rng = np.random.default_rng(seed)
    system = random_prompts([19], seed=seed + 50)[0]
    prompts = []
    for i in range(10):
        if i % 4 == 3:
            prompts.append(random_prompts([int(rng.integers(3, 12))], seed=seed + i)[0])  # no shared prefix
        else:
            prompts.append(system + random_prompts([int(rng.integers(0, 7))], seed=seed + i)[0] if i % 5 else list(system))
    gens = rng.integers(2, 12, len(prompts)).tolist()
    return prompts, gens


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_cache_hits_give_exactly_the_tokens_of_misses(llama, seed):
    prompts, gens = shared_prefix_workload(seed)
    ref = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    miss = run_cb(cb_session(llama, 2), prompts, gens)
    hit = run_cb(cb_session(llama, 2), prompts, gens, prefix_caching=True)
    assert sum(miss.prefix_hit_tokens) == 0
    assert sum(hit.prefix_hit_tokens) >= 4 * 18, hit.prefix_hit_tokens  # most prompts skip the system prompt
    assert hit.prefill_runs < miss.prefill_runs
    assert hit.token_ids == miss.token_ids == [t for t, _ in ref]


def test_a_hit_can_cover_generated_tokens_of_the_previous_occupant(llama):
    first = random_prompts([9], seed=11)[0]
    done = run_cb(cb_session(llama, 1), [first], [8])
    follow_up = first + done.token_ids[0][:5] + [7, 8]  # a chat turn: the reply so far, then more
    prompts, gens = [first, follow_up], [8, 6]
    hit = run_cb(cb_session(llama, 1), prompts, gens, prefix_caching=True)
    assert hit.prefix_hit_tokens == [0, 9 + 5]
    ref = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    assert hit.token_ids == [t for t, _ in ref]


def test_seeded_fault_an_overlong_prefix_match_is_caught(llama, monkeypatch):
    prompts, gens = shared_prefix_workload(0)
    ref = batch1_reference(llama["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=gens)
    real = continuous.common_prefix
    monkeypatch.setattr(continuous, "common_prefix", lambda a, b: min(real(a, b) + 2, len(a), len(b)))
    hit = run_cb(cb_session(llama, 2), prompts, gens, prefix_caching=True)
    assert hit.token_ids != [t for t, _ in ref]


# -- inputs -------------------------------------------------------------------------------------


def test_bad_inputs_are_usage_errors(llama):
    prompts, gens, _ = random_workload(0, n=3)
    with pytest.raises(UsageError, match="batch_index"):
        generate_continuous(OrtSession(llama["base"], batch_size=2, ctx_len=CTX), prompt_token_ids=prompts, prompt_len=PL)
    with pytest.raises(UsageError, match="arrival_steps"):
        run_cb(cb_session(llama, 2), prompts, gens, arrival_steps=[0, 1])
    with pytest.raises(UsageError, match="generation_len has 2"):
        run_cb(cb_session(llama, 2), prompts, gens[:2])
    with pytest.raises(UsageError, match="distinct slots"):
        cb_session(llama, 2).run(np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64), batch_index=[1, 1])
    with pytest.raises(UsageError, match="full_batch_size"):
        ServingOrtSession(llama["cb"], batch_size=2, ctx_len=CTX)


def test_generate_continuous_from_text(smollm2_tokenizer, tmp_path):
    from tests.serving_helpers import serving_model

    tokenizer = smollm2_tokenizer
    qmodel = qeff.transform(serving_model("llama", vocab_size=len(tokenizer)))
    graphs = {"cb": qeff.export(qmodel, tmp_path / "cb", variant=CB).path, "base": qeff.export(qmodel, tmp_path / "base").path}
    texts = ["Hello there", "The capital of France is", "Once upon a time, in a land far away,"]
    result = generate_continuous(cb_session(graphs, 2), texts, tokenizer=tokenizer, prompt_len=PL, generation_len=6)
    static = qeff.generate(OrtSession(graphs["base"], batch_size=3, ctx_len=CTX), texts, tokenizer=tokenizer, prompt_len=PL, generation_len=6)
    assert result.token_ids == static.token_ids and result.texts == static.texts and result.prompts == texts


def test_returned_logits_are_those_the_tokens_were_chosen_from(llama):
    """``return_logits`` (what the conformance stage compares with HF) holds, per prompt and token,
    the logits of the batch-1 run's same step."""
    prompts, gens, arrivals = random_workload(6, n=6)
    result = run_cb(cb_session(llama, 2), prompts, gens, arrival_steps=arrivals, return_logits=True)
    alone = OrtSession(llama["base"], batch_size=1, ctx_len=CTX)
    for prompt, tokens, logits in zip(prompts, result.token_ids, result.logits):
        assert logits.shape == (len(tokens), 256) and logits.argmax(-1).tolist() == tokens
        steps = []
        for ids, pos, ends in prefill_chunks([prompt], 1, PL):
            out = alone.run(ids, pos)
        steps.append(out[0].copy())
        for i, token in enumerate(tokens[:-1]):
            steps.append(alone.run(np.array([[token]]), np.array([[len(prompt) + i]]))[0].copy())
        np.testing.assert_allclose(logits, np.stack(steps), atol=1e-5)
