"""The ORT session keeps the cache in bound OrtValues. Binding ONE buffer as both the past input
and the ``_RetainedState`` output ("inplace", the default) must be exact: bit-identical logits,
tokens and cache to two swapped buffers and to plain numpy round-trips, over whole generations."""

from __future__ import annotations

import numpy as np
import pytest

import qeff
from qeff.runtime.ort import OrtSession
from tests.tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def onnx_path(module_tmp):
    return qeff.export(qeff.transform(tiny_model("llama", seed=3)), module_tmp("bind")).path


def _trace(session, prompts, prompt_len, steps):
    logits = []

    def record(tokens, produced):
        logits.append(session._last.copy())

    original = session.run

    def run(ids, pos):
        out = original(ids, pos)
        session._last = out
        return out

    session.run = run
    result = qeff.generate(session, prompt_token_ids=prompts, prompt_len=prompt_len, generation_len=steps, eos_token_id=[], on_token=record)
    return result.token_ids, np.stack(logits), session.read_cache()


@pytest.mark.parametrize("lengths,prompt_len", [((7,), 4), ((11, 2, 6, 1), 4), ((3, 5), 1)])
def test_inplace_binding_is_bit_exact(onnx_path, lengths, prompt_len):
    prompts = random_prompts(lengths, seed=7)
    traces = {b: _trace(OrtSession(onnx_path, batch_size=len(prompts), ctx_len=48, binding=b), prompts, prompt_len, 30) for b in ("inplace", "swap", "numpy")}
    ref_tokens, ref_logits, ref_cache = traces["numpy"]
    for binding in ("inplace", "swap"):
        tokens, logits, cache = traces[binding]
        assert tokens == ref_tokens, binding
        np.testing.assert_array_equal(logits, ref_logits, err_msg=binding)
        for a, b in zip(cache, ref_cache):
            np.testing.assert_array_equal(a, b, err_msg=binding)


def test_each_row_of_a_padded_batch_equals_its_prompt_alone(onnx_path):
    prompts = random_prompts((13, 2, 7, 4), seed=11)
    batched = qeff.generate(OrtSession(onnx_path, batch_size=4, ctx_len=64), prompt_token_ids=prompts, prompt_len=4, generation_len=32, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = qeff.generate(OrtSession(onnx_path, batch_size=1, ctx_len=64), prompt_token_ids=[prompt], prompt_len=4, generation_len=32, eos_token_id=[])
        assert batched.token_ids[row] == alone.token_ids[0], f"row {row}"


def test_reusing_a_session_ignores_stale_slots(onnx_path):
    """A second generation on the same session (stale cache contents) gives the same tokens."""
    session = OrtSession(onnx_path, batch_size=2, ctx_len=40)
    long = random_prompts((20, 9), seed=1)
    short = random_prompts((3, 5), seed=2)
    fresh = qeff.generate(OrtSession(onnx_path, batch_size=2, ctx_len=40), prompt_token_ids=short, prompt_len=4, generation_len=16, eos_token_id=[])
    qeff.generate(session, prompt_token_ids=long, prompt_len=4, generation_len=16, eos_token_id=[])
    again = qeff.generate(session, prompt_token_ids=short, prompt_len=4, generation_len=16, eos_token_id=[])
    assert again.token_ids == fresh.token_ids


def test_threads_default_to_physical_cores(onnx_path):
    from qeff._system import physical_cores

    session = OrtSession(onnx_path, batch_size=1, ctx_len=8)
    assert session.threads == physical_cores() >= 1
    assert OrtSession(onnx_path, batch_size=1, ctx_len=8, threads=1).threads == 1


@pytest.mark.parametrize("binding", ["inplace", "swap"])
def test_specialized_decode_session_gives_the_same_tokens(onnx_path, binding):
    prompts = random_prompts((9, 3), seed=13)
    plain = qeff.generate(OrtSession(onnx_path, batch_size=2, ctx_len=40), prompt_token_ids=prompts, prompt_len=4, generation_len=24, eos_token_id=[])
    special = OrtSession(onnx_path, batch_size=2, ctx_len=40, binding=binding, specialize_decode=True)
    assert special.decode_session is not special.session
    result = qeff.generate(special, prompt_token_ids=prompts, prompt_len=4, generation_len=24, eos_token_id=[])
    assert result.token_ids == plain.token_ids
