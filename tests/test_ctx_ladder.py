"""The compute-context-length ladder (issue 21 item 1): a graph with ``comp_ctx_lengths`` attends
only the first C cache slots, the runners pick C per step from a ladder, and the tokens and
logits are those of the full-length graph and of the untouched HF model — across ladder
boundaries, in a padded batch, with chunked prefill and under continuous batching. Each equality
is shown failing on a seeded fault (attending one slot too few; not moving up a rung).

Tolerances: ladder vs full-length graph, logits max-abs 1e-4 (the same fp32 arithmetic, only the
masked slots — which weigh exactly 0 — are left out); vs HF eager, 1e-3 (ORT vs PyTorch kernels)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qeff
from qeff.errors import UsageError
from qeff.pipeline import export_manifest
from qeff.runtime.ort import OrtSession
from qeff.serving import ctx_ladder
from qeff.generation.continuous import generate_continuous
from qeff.runtime.ort_serving import ServingOrtSession
from qeff.serving.variant import GraphVariant
from tests.serving_helpers import batch1_reference, serving_model
from tests.tiny import random_prompts

CTX, PL = 48, 8
LADDER = (8, 16, 24, CTX)
CC = GraphVariant(comp_ctx=True)
CB_CC = GraphVariant(continuous_batching=True, comp_ctx=True)
GRAPH_ATOL, HF_ATOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def hf():
    return serving_model("llama", seed=1)


@pytest.fixture(scope="module")
def graphs(module_tmp, hf):
    out = module_tmp("ctx-ladder")
    qmodel = qeff.transform(hf)
    return {name: qeff.export(qmodel, out / name, variant=v).path
            for name, v in (("base", None), ("cc", CC), ("cb_cc", CB_CC))}


class Recorder:
    """A session whose ``run`` also keeps every step's logits (NaN for a row with no token in the
    step: an all-pad row's logits are not defined by the contract)."""

    def __init__(self, session):
        self.session, self.logits = session, []
        self.batch_size, self.ctx_len, self.prompt_len = session.batch_size, session.ctx_len, session.prompt_len

    def run(self, ids, pos):
        out = self.session.run(ids, pos)
        kept = out.copy()
        kept[~(np.asarray(pos) >= 0).any(axis=1)] = np.nan
        self.logits.append(kept)
        return out


def run(path, prompts, gen, ladder=None, **kw):
    session = OrtSession(path, batch_size=len(prompts), ctx_len=CTX, **({"comp_ctx_lengths": ladder} if ladder else {}), **kw)
    rec = Recorder(session)
    result = qeff.generate(rec, prompt_token_ids=prompts, prompt_len=PL, generation_len=gen, eos_token_id=[])
    return result, rec.logits, session


def assert_same_as_full(graphs, prompts, gen, **kw):
    full, full_logits, _ = run(graphs["base"], prompts, gen)
    lad, lad_logits, session = run(graphs["cc"], prompts, gen, ladder=LADDER, **kw)
    assert lad.token_ids == full.token_ids
    assert len(lad_logits) == len(full_logits)
    for step, (a, b) in enumerate(zip(lad_logits, full_logits)):
        assert np.array_equal(np.isnan(a), np.isnan(b))
        diff = np.nanmax(np.abs(a - b))
        assert diff <= GRAPH_ATOL, f"step {step}: max-abs {diff}"
    return lad, session


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits of the untouched HF model over ``ids`` (len, vocab)."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


# --- the ladder itself -------------------------------------------------------------------------

def test_default_ladder_and_parsing():
    assert ctx_ladder.default_ladder(4096) == (256, 1024, 4096)
    assert ctx_ladder.default_ladder(8192) == (256, 1024, 4096, 8192)
    assert ctx_ladder.default_ladder(200) == (200,)
    assert ctx_ladder.parse_ladder("256,1024", 4096) == (256, 1024, 4096)
    assert ctx_ladder.parse_ladder([64, 128], 128) == (64, 128)
    assert ctx_ladder.parse_ladder(None, 1024) == (256, 1024)
    assert ctx_ladder.parse_ladder("off", 1024) is None
    for bad in ("1024,256", "abc", "256,8192", "0,5", ",", "256,256"):
        with pytest.raises(UsageError) as info:
            ctx_ladder.parse_ladder(bad, 4096)
        assert "\n" not in str(info.value) and "comp_ctx_lengths" in str(info.value)


def test_pick_is_the_smallest_rung_above_every_position():
    pos = np.array([[5], [-1]])
    assert ctx_ladder.pick(LADDER, pos) == 8
    assert ctx_ladder.pick(LADDER, np.array([[7]])) == 8
    assert ctx_ladder.pick(LADDER, np.array([[8]])) == 16  # position 8 needs 9 slots
    assert ctx_ladder.pick(LADDER, np.array([[-1, -1]])) == 8  # an all-pad step
    assert ctx_ladder.pick(LADDER, np.array([[3], [30]])) == CTX  # the largest row decides


# --- the graph -----------------------------------------------------------------------------------

def test_the_graph_has_a_symbolic_comp_ctx_lengths_and_full_outputs(graphs):
    model = onnx.load(str(graphs["cc"]), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["comp_ctx_lengths"] == ["comp_ctx_lengths"]
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outs["past_key.0_RetainedState"][2] == "ctx_len"
    base = onnx.load(str(graphs["base"]), load_external_data=False)
    assert "comp_ctx_lengths" not in {i.name for i in base.graph.input}  # the base contract is unchanged


def test_the_ladder_graph_is_another_artifact():
    identity = {"model": "x", "weights": "w"}
    assert export_manifest(identity, CC) != export_manifest(identity, None)
    assert export_manifest(identity, CB_CC) != export_manifest(identity, GraphVariant(continuous_batching=True))
    # Earlier variants keep their manifests (and cache keys).
    assert GraphVariant(continuous_batching=True).to_dict() == {"continuous_batching": True, "speculative": False}
    assert GraphVariant.from_dict(CB_CC.to_dict()) == CB_CC


def test_the_retained_cache_is_whole_and_equal(graphs):
    prompts = random_prompts([5], seed=3)
    _, _, full = run(graphs["base"], prompts, 6)
    _, _, lad = run(graphs["cc"], prompts, 6, ladder=LADDER)
    for a, b in zip(full.read_cache(), lad.read_cache()):
        assert a.shape == b.shape == (1, 2, CTX, 16)
        np.testing.assert_allclose(a, b, atol=GRAPH_ATOL)


# --- exactness -----------------------------------------------------------------------------------

def test_padded_batch_with_chunked_prefill_crosses_every_rung(graphs):
    """Batch 2, prompts of 3 and 13 tokens (13 > prompt_len: two prefill chunks), 30 new tokens:
    the long row crosses 16, 24 and reaches 48; the short one crosses 8 and 16 while the other
    row sets the rung."""
    prompts = random_prompts([3, 13], seed=11)
    result, session = assert_same_as_full(graphs, prompts, 30)
    decode = session.attended[2:]  # after the two prefill chunks
    assert session.attended[:2] == [8, 16]
    assert set(decode) == {16, 24, CTX} and decode == sorted(decode)
    # Every step's rung is the smallest that holds the longest row's position.
    for step, rung in enumerate(decode):
        assert rung == min(r for r in LADDER if r > 13 + step)


def test_the_pinned_decode_session_hands_longer_rungs_to_the_general_one(graphs):
    """specialize_decode pins comp_ctx_lengths to the first rung; steps above it must not run there."""
    _, session = assert_same_as_full(graphs, random_prompts([2, 5], seed=6), 30, specialize_decode=True)
    assert session.decode_session is not session.session and set(session.attended) == set(LADDER)


def test_one_row_crossing_a_boundary_matches_hf(graphs, hf):
    prompts = random_prompts([6], seed=4)
    lad, logits, session = run(graphs["cc"], prompts, 12, ladder=LADDER)
    assert 8 in session.attended and 16 in session.attended  # positions 6 … 16 cross 8 and 16
    seq = prompts[0] + lad.token_ids[0]
    ref = hf_logits(hf, seq[:-1])  # logits that chose each generated token
    ours = np.stack([step[0] for step in logits])  # prefill's last position, then each decode step
    np.testing.assert_allclose(ours, ref[len(prompts[0]) - 1 :], atol=HF_ATOL)
    assert lad.token_ids[0] == ref[len(prompts[0]) - 1 :].argmax(-1).tolist()


def test_padded_batch_matches_hf(graphs, hf):
    prompts = random_prompts([4, 11], seed=8)
    lad, logits, _ = run(graphs["cc"], prompts, 14, ladder=LADDER)
    for row, prompt in enumerate(prompts):
        ref = hf_logits(hf, prompt + lad.token_ids[row][:-1])[len(prompt) - 1 :]
        assert lad.token_ids[row] == ref.argmax(-1).tolist()
        # Row r's logits: the prefill chunk holding its last prompt token, then the decode steps.
        first = (len(prompt) - 1) // PL
        ours = np.stack([logits[first][row]] + [step[row] for step in logits[2:]])
        np.testing.assert_allclose(ours, ref, atol=HF_ATOL)


CB_PROMPTS = dict(lengths=[3, 14, 7, 1, 12], gens=[20, 9, 25, 30, 6], arrivals=[0, 0, 3, 5, 9])


def run_cb(graphs, ladder):
    prompts = random_prompts(CB_PROMPTS["lengths"], seed=21)
    session = ServingOrtSession(graphs["cb_cc"], batch_size=2, full_batch_size=2, ctx_len=CTX, comp_ctx_lengths=ladder)
    result = generate_continuous(session, prompt_token_ids=prompts, prompt_len=PL, generation_len=CB_PROMPTS["gens"],
                                 eos_token_id=[], arrival_steps=CB_PROMPTS["arrivals"], return_logits=True)
    return prompts, result, session


def assert_cb_logits_equal(a, b):
    for x, y in zip(a.logits, b.logits, strict=True):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= GRAPH_ATOL


def test_continuous_batching_with_the_ladder_equals_batch1_and_full_length(graphs):
    prompts, result, session = run_cb(graphs, LADDER)
    ref = batch1_reference(graphs["base"], prompts, ctx_len=CTX, prompt_len=PL, generation_len=CB_PROMPTS["gens"])
    assert result.token_ids == [t for t, _ in ref]
    _, full, full_session = run_cb(graphs, "off")
    assert set(full_session.attended) == {CTX}
    assert_cb_logits_equal(result, full)
    assert {8, 16, 24, CTX} <= set(session.attended)  # rows crossed every rung, and a refilled slot went back down
    assert any(b < a for a, b in zip(session.attended, session.attended[1:]))


def test_off_runs_the_ladder_graph_at_full_length(graphs):
    prompts = random_prompts([5], seed=2)
    full, _, _ = run(graphs["base"], prompts, 8)
    off, _, session = run(graphs["cc"], prompts, 8, ladder="off")
    assert off.token_ids == full.token_ids and set(session.attended) == {CTX}


def test_a_ladder_for_a_graph_without_one_is_refused(graphs):
    with pytest.raises(UsageError, match="no comp_ctx_lengths input"):
        OrtSession(graphs["base"], batch_size=1, ctx_len=CTX, comp_ctx_lengths=LADDER)
    OrtSession(graphs["base"], batch_size=1, ctx_len=CTX, comp_ctx_lengths="off")  # off is always fine


# --- seeded faults: each equality above fails when the thing it guards is broken ---------------

def test_fault_attending_one_slot_too_few_is_caught(graphs, monkeypatch):
    monkeypatch.setattr(ctx_ladder, "needed", lambda pos: max(int(pos.max()), 1))  # C may equal the position
    with pytest.raises(AssertionError):
        assert_same_as_full(graphs, random_prompts([3, 13], seed=11), 30)


def test_fault_not_moving_up_a_rung_is_caught(graphs, monkeypatch):
    real = ctx_ladder.pick
    first: list[int] = []

    def sticky(ladder, pos):  # keeps the first rung it chose
        if not first:
            first.append(real(ladder, pos))
        return first[0]

    monkeypatch.setattr(ctx_ladder, "pick", sticky)
    with pytest.raises(AssertionError):
        assert_same_as_full(graphs, random_prompts([6], seed=4), 12)


def test_fault_in_continuous_batching_is_caught(graphs, monkeypatch):
    _, full, _ = run_cb(graphs, "off")
    monkeypatch.setattr(ctx_ladder, "needed", lambda pos: max(int(pos.max()), 1))
    _, faulty, _ = run_cb(graphs, LADDER)
    with pytest.raises(AssertionError):
        assert_cb_logits_equal(faulty, full)
