"""The generation loop: stopping rules, streaming, figures, and input errors."""

from __future__ import annotations

import io

import numpy as np
import pytest

import qeff
from qeff.errors import UsageError
from qeff.generation import TextStreamer, prefill_chunks
from qeff.runtime.ort import OrtSession
from tests.tiny import random_prompts, tiny_model


@pytest.fixture(scope="module")
def onnx_path(module_tmp):
    return qeff.export(qeff.transform(tiny_model("qwen2", seed=5)), module_tmp("gen")).path


def test_prefill_chunks_right_pad_and_mark_row_ends():
    chunks = list(prefill_chunks([[1, 2, 3, 4, 5], [6, 7]], batch_size=3, prompt_len=3))
    assert len(chunks) == 2
    (ids0, pos0, ends0), (ids1, pos1, ends1) = chunks
    assert ids0.tolist() == [[1, 2, 3], [6, 7, 0], [0, 0, 0]]
    assert pos0.tolist() == [[0, 1, 2], [0, 1, -1], [-1, -1, -1]]
    assert pos1.tolist() == [[3, 4, -1], [-1, -1, -1], [-1, -1, -1]]
    assert ends0.tolist() == [False, True, False] and ends1.tolist() == [True, False, False]


def test_stops_when_the_cache_is_full_with_a_message(onnx_path):
    session = OrtSession(onnx_path, batch_size=2, ctx_len=16)
    result = qeff.generate(session, prompt_token_ids=random_prompts((10, 4)), prompt_len=4, eos_token_id=[])
    # Row 0: 10 prompt tokens → positions 10..15 can be decoded → 7 new tokens (the last one is
    # produced by the step at position 15 and has no slot of its own).
    assert [len(t) for t in result.token_ids] == [7, 13]
    assert result.stop_reasons == ["ctx_len", "ctx_len"]
    assert len(result.messages) == 2 and "ctx_len=16" in result.messages[0] and "larger ctx_len" in result.messages[0]


def test_per_row_eos(onnx_path):
    prompts = random_prompts((5, 8))
    session = OrtSession(onnx_path, batch_size=2, ctx_len=64)
    free = qeff.generate(session, prompt_token_ids=prompts, prompt_len=4, generation_len=20, eos_token_id=[])
    eos = free.token_ids[0][3]  # make row 0's 4th token its EOS
    stopped = qeff.generate(session, prompt_token_ids=prompts, prompt_len=4, generation_len=20, eos_token_id=eos)
    first = free.token_ids[0].index(eos)
    assert stopped.token_ids[0] == free.token_ids[0][: first + 1] and stopped.stop_reasons[0] == "eos"
    row1 = free.token_ids[1]
    expected = row1[: row1.index(eos) + 1] if eos in row1 else row1
    assert stopped.token_ids[1] == expected


def test_ignore_eos_runs_every_row_to_its_length(onnx_path):
    prompts = random_prompts((5, 8))
    session = OrtSession(onnx_path, batch_size=2, ctx_len=64)
    free = qeff.generate(session, prompt_token_ids=prompts, prompt_len=4, generation_len=20, eos_token_id=[])
    eos = free.token_ids[0][3]
    stopped = qeff.generate(session, prompt_token_ids=prompts, prompt_len=4, generation_len=20, eos_token_id=eos)
    assert stopped.token_ids[0] == free.token_ids[0][: free.token_ids[0].index(eos) + 1]  # EOS stops it without the flag
    ignored = qeff.generate(session, prompt_token_ids=prompts, prompt_len=4, generation_len=20, eos_token_id=eos, ignore_eos=True)
    assert ignored.token_ids == free.token_ids and ignored.stop_reasons == ["length", "length"]


def test_streaming_callback_sees_every_token(onnx_path):
    seen: list[list[int]] = [[], []]

    def on_token(tokens, produced):
        for r in np.flatnonzero(produced):
            seen[r].append(int(tokens[r]))

    session = OrtSession(onnx_path, batch_size=2, ctx_len=64)
    result = qeff.generate(session, prompt_token_ids=random_prompts((3, 6)), prompt_len=4, generation_len=12, eos_token_id=[], on_token=on_token)
    assert seen == result.token_ids


def test_figures_are_consistent(onnx_path):
    session = OrtSession(onnx_path, batch_size=2, ctx_len=64)
    r = qeff.generate(session, prompt_token_ids=random_prompts((3, 6)), prompt_len=4, generation_len=12, eos_token_id=[])
    assert r.new_tokens == 24 and r.decode_tokens == 22
    assert 0 < r.ttft_s <= r.e2e_s and r.decode_s > 0
    assert r.decode_tok_s == pytest.approx(r.decode_tokens / r.decode_s)
    assert r.total_tok_s == pytest.approx(r.new_tokens / r.e2e_s)
    assert r.e2e_s == pytest.approx(r.prefill_s + r.decode_s)


def test_text_streamer_prints_incrementally(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer("Hello wonderful world, café ☕!")["input_ids"]
    out = io.StringIO()
    streamer = TextStreamer(tokenizer, out=out)
    for t in ids:
        streamer(np.array([t]), np.array([True]))
    assert out.getvalue() == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "prompts,kwargs,message",
    [
        ([[]], {}, "prompt 0 is empty"),
        ([list(range(1, 40))], {}, "has 39 tokens but ctx_len=32"),
        ([[1], [2], [3]], {}, "3 prompts do not fit batch_size=2"),
        ([[1]], {"prompt_len": 64}, "prompt_len=64 is larger than ctx_len=32"),
        ([[1]], {"generation_len": 0}, "generation_len must be at least 1"),
    ],
)
def test_bad_inputs_are_usage_errors(onnx_path, prompts, kwargs, message):
    session = OrtSession(onnx_path, batch_size=2, ctx_len=32)
    with pytest.raises(UsageError, match=message):
        qeff.generate(session, prompt_token_ids=prompts, **{"prompt_len": 4, **kwargs})
