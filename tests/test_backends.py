"""The backends table (qeff.backends): every (backend, graph) row compiles and opens through its two
verbs, an artifact opens with the session its manifest names, each backend gets only its own run
options, and the one cache binding (qeff.runtime.ort.RetainedCache) carries the cache of all
three ONNX Runtime sessions — a fault in it changes the tokens of each. The Cloud AI rows run on
the stand-in runtime in tests/test_qaic_session.py and tests/test_qaic_serving_session.py."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

import qeff
from qeff.backends import BACKENDS, NAMES, Shape, backend_for, open_session
from qeff.backends.ort_fused import FusedOptions
from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
from qeff.compilers.ort_fused_weights import from_hf
from qeff.errors import ArtifactError, UsageError
from qeff.runtime.ort import OrtSession, RetainedCache
from qeff.runtime.ort_fused import FusedOrtSession
from qeff.runtime.ort_serving import ServingOrtSession
from tests.serving_helpers import CB, serving_model
from tests.tiny import random_prompts

CTX, PL = 24, 4


@pytest.fixture(scope="module")
def model():
    return serving_model("llama", seed=1)  # untied: its tokens depend on the context


@pytest.fixture(scope="module")
def graphs(model, module_tmp):
    out = module_tmp("backends")
    qmodel = qeff.transform(model)
    fused = out / "fused"
    fused.mkdir()
    write_fused_graph(from_hf(model, CTX), fused)
    return {"base": qeff.export(qmodel, out / "base").path, "cb": qeff.export(qmodel, out / "cb", variant=CB).path,
            "fused": fused / FUSED_GRAPH}


def test_the_table_names_every_backend_and_graph():
    assert set(BACKENDS) == {("ort", "portable"), ("ort", "fused"), ("qaic", "portable")}
    assert NAMES == ("ort", "qaic")
    for (name, graph), row in BACKENDS.items():
        assert (row.name, row.graph) == (name, graph) and callable(row.compile) and callable(row.open)
    assert backend_for({"backend": "ort"}) is BACKENDS[("ort", "portable")]  # artifacts from before the fused graph
    assert backend_for({"backend": "ort", "graph": "fused"}) is BACKENDS[("ort", "fused")]


@pytest.mark.parametrize("inputs, named", [({"backend": "tpu"}, "'tpu'"), ({"backend": "ort", "graph": "sparse"}, "'ort (sparse graph)'")])
def test_an_artifact_no_row_opens_is_refused_in_one_sentence(inputs, named):
    with pytest.raises(ArtifactError, match=re.escape(f"somewhere was compiled for backend {named}, which this qeff cannot open")):
        backend_for(inputs, "somewhere")


def test_each_row_compiles_and_opens_its_session(model, graphs):
    shape = Shape(batch_size=2, prompt_len=PL, ctx_len=CTX)
    portable = BACKENDS[("ort", "portable")].compile(graphs["base"], shape)
    fused = BACKENDS[("ort", "fused")].compile(graphs["base"], shape, FusedOptions(load_model=lambda: model))
    assert fused.manifest["inputs"]["graph"] == "fused" and "graph" not in portable.manifest["inputs"]
    sessions = [open_session(portable.path), open_session(fused.path)]
    assert [type(s) for s in sessions] == [OrtSession, FusedOrtSession]
    prompts = random_prompts([6, 9], seed=2)
    tokens = [qeff.generate(s, prompt_token_ids=prompts, generation_len=6, eos_token_id=[]).token_ids for s in sessions]
    assert tokens[0] == tokens[1]
    # The same compile through the keyword entry point (qeff.compile) is the same cached artifact.
    again = qeff.compile(graphs["base"], "ort", batch_size=2, prompt_len=PL, ctx_len=CTX)
    assert again.path == portable.path and again.reused


def test_a_bad_shape_or_backend_is_a_usage_error(graphs):
    with pytest.raises(UsageError, match="larger than --ctx_len"):
        Shape(batch_size=1, prompt_len=64, ctx_len=32)
    with pytest.raises(UsageError, match="unknown backend 'tpu'; choose one of ort, qaic"):
        qeff.compile(graphs["base"], "tpu")


def test_each_backend_gets_only_its_own_run_options(graphs, monkeypatch):
    built = qeff.compile(graphs["base"], "ort", batch_size=1, prompt_len=PL, ctx_len=CTX)
    seen = {}
    row = BACKENDS[("ort", "portable")]
    monkeypatch.setitem(BACKENDS, ("ort", "portable"), replace(row, open=lambda b, **run: seen.update(run) or "opened"))
    assert open_session(built.path, threads=2, binding="swap", device_ids=[0, 1], comp_ctx_lengths=None) == "opened"
    assert seen == {"threads": 2, "binding": "swap"}  # device_ids is Cloud AI's; None means the default


# -- the one cache binding -------------------------------------------------------------------


def _greedy(session, prompt: list[int], steps: int, **run) -> list[int]:
    """Prefill one row in chunks of PL, then decode ``steps`` tokens: the loop every session serves."""
    logits = None
    for start in range(0, len(prompt), PL):
        piece = prompt[start:start + PL]
        ids = np.zeros((1, PL), np.int64)
        pos = np.full((1, PL), -1, np.int64)
        ids[0, :len(piece)], pos[0, :len(piece)] = piece, np.arange(start, start + len(piece))
        logits = session.run(ids, pos, **run)
    tokens = [int(logits[0].argmax())]
    for step in range(steps - 1):
        at = len(prompt) + step
        logits = session.run(np.array([[tokens[-1]]], np.int64), np.array([[at]], np.int64), **run)
        tokens.append(int(logits[0].argmax()))
    return tokens


def _three_sessions(graphs):
    return [
        (OrtSession(graphs["base"], batch_size=1, ctx_len=CTX, threads=1, specialize_decode=True), {}),
        (FusedOrtSession(graphs["fused"], batch_size=1, ctx_len=CTX, threads=1), {}),
        (ServingOrtSession(graphs["cb"], batch_size=2, full_batch_size=2, ctx_len=CTX, threads=1), {"batch_index": [1]}),
    ]


def test_every_ort_session_binds_its_cache_through_the_one_helper(graphs, monkeypatch):
    prompt = random_prompts([9], seed=4)[0]
    want = [_greedy(s, prompt, 8, **run) for s, run in _three_sessions(graphs)]
    real_bind = RetainedCache.bind

    def bind_elsewhere(self, *ios):
        """The seeded fault: each step writes its cache into scratch buffers the next never reads."""
        kept = self.outputs
        self.outputs = [type(v).ortvalue_from_numpy(np.zeros(v.shape(), np.float32), "cpu") for v in self.inputs]
        real_bind(self, *ios)
        self.outputs = kept

    monkeypatch.setattr(RetainedCache, "bind", bind_elsewhere)
    broken = [_greedy(s, prompt, 8, **run) for s, run in _three_sessions(graphs)]
    assert all(b != w for b, w in zip(broken, want)), (broken, want)


def test_the_cache_is_one_buffer_in_place_or_two_swapped(graphs):
    inplace = OrtSession(graphs["base"], batch_size=1, ctx_len=CTX, threads=1)
    assert inplace._cache.outputs is inplace._cache.inputs
    swap = OrtSession(graphs["base"], batch_size=1, ctx_len=CTX, threads=1, binding="swap")
    written = list(swap._cache.outputs)
    assert all(a is not b for a, b in zip(swap._cache.inputs, written))
    swap.run(np.array([[5, 6]], np.int64), np.array([[0, 1]], np.int64))
    assert all(a is b for a, b in zip(swap._cache.inputs, written))  # what a step wrote, the next one reads
    prompt = random_prompts([7], seed=6)[0]
    fresh = OrtSession(graphs["base"], batch_size=1, ctx_len=CTX, threads=1, binding="swap")
    assert _greedy(fresh, prompt, 4) == _greedy(inplace, prompt, 4)
    with pytest.raises(UsageError, match="expected 4 cache tensors, got 1"):
        inplace._cache.write([np.zeros(1)])
