"""End to end on the one real model here: SmolLM2-135M-Instruct (dequantized from its GGUF)."""

from __future__ import annotations

import pytest
import torch

import qeff
from qeff.runtime.ort import OrtSession

# One worker builds this module's SmolLM2 artifacts once (not one copy per xdist worker).
pytestmark = pytest.mark.xdist_group("real_model")

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Three reasons to learn Python are",
]


@pytest.fixture(scope="module")
def pipeline(smollm2, module_tmp):
    model, tokenizer = smollm2
    qmodel = qeff.transform(model)
    onnx = qeff.export(qmodel, module_tmp("smollm2"), model_id="smollm2-135m")
    built = qeff.compile(onnx.path, batch_size=len(PROMPTS), prompt_len=16, ctx_len=128)
    return model, tokenizer, qmodel, built


def test_capital_of_france(pipeline):
    _, tokenizer, _, built = pipeline
    session = OrtSession(built.path / "model.opt.onnx", batch_size=1, ctx_len=128)
    result = qeff.generate(session, ["The capital of France is"], tokenizer=tokenizer, prompt_len=16, generation_len=8)
    assert result.texts[0].startswith(" Paris"), result.texts[0]


def test_ort_greedy_equals_hf_generate_for_64_tokens(pipeline):
    model, tokenizer, _, built = pipeline
    session = qeff.open_session(built.path)  # batch of 4 prompts of different lengths, padded
    result = qeff.generate(session, PROMPTS, tokenizer=tokenizer, generation_len=64, eos_token_id=[])
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            # eos_token_id=None: run through EOS like our loop does (min_new_tokens would instead
            # ban EOS and pick the runner-up, which is a different greedy sequence).
            ref = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert result.token_ids[row] == ref[0, ids.shape[1]:].tolist(), prompt


def test_three_way_verification_on_real_weights(pipeline):
    model, tokenizer, qmodel, built = pipeline
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    session = OrtSession(built.path / "model.opt.onnx", batch_size=2, ctx_len=128)
    # Measured on this model (30 layers, fp32, 2 prompts x 32 steps): HF vs PyTorch max-abs 5.3e-5,
    # MSE 7.9e-11; PyTorch vs ORT max-abs 5.5e-5, MSE 1.0e-10. The bounds leave ~4x of room.
    tol = qeff.Tolerances(logits_mse=1e-9, logits_max_abs=2e-4, cache_mse=1e-10, cache_max_abs=2e-4, ambiguity_margin=1e-3)
    report = qeff.verify(model, qmodel=qmodel, session=session, prompt_token_ids=prompts, prompt_len=16, ctx_len=128, steps=32, tolerances=tol)
    print(report.describe())
    for comparison in report.comparisons:
        assert comparison.passed, comparison.describe()
        assert comparison.tokens_matched + comparison.ambiguous == comparison.tokens_total == 64
