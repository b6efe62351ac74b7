"""The full chain on tiny random Llama, Mistral (sliding window) and Qwen2: HF eager vs
transformed PyTorch vs ONNX Runtime, and free-running greedy tokens against HF ``generate``.

Tolerances: measured max-abs is ~3e-7 on logits and cache slots for every case here (fp32, 2
layers); the bounds below leave ~30x of room and still catch any real bug (a wrong slot, mask or
position shifts logits by >1e-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import qeff
from qeff.runtime.ort import OrtSession
from tests.tiny import TINY_CONFIGS, random_prompts, tiny_model

TIGHT = qeff.Tolerances(logits_mse=1e-12, logits_max_abs=1e-5, cache_mse=1e-12, cache_max_abs=1e-5, ambiguity_margin=1e-5)


@dataclass(frozen=True)
class Case:
    id: str
    lengths: tuple[int, ...]  # one prompt per row
    prompt_len: int
    ctx_len: int
    steps: int


CASES = [
    Case("bs1", (9,), prompt_len=16, ctx_len=64, steps=40),
    Case("bs4-padded", (13, 3, 8, 1), prompt_len=8, ctx_len=64, steps=40),  # 13 > prompt_len: 2 chunks
    Case("long-prompt", (37,), prompt_len=8, ctx_len=96, steps=32),  # 5 prefill chunks
    Case("pl1", (5, 2), prompt_len=1, ctx_len=48, steps=32),
    Case("fill-cache", (10, 4), prompt_len=4, ctx_len=42, steps=33),  # last step writes slot 41
]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def exported(request, module_tmp):
    model = tiny_model(request.param)
    qmodel = qeff.transform(model)
    result = qeff.export(qmodel, module_tmp(request.param))
    return request.param, model, qmodel, result.path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_three_way_verification(exported, case):
    name, model, qmodel, onnx_path = exported
    prompts = random_prompts(case.lengths, seed=len(case.lengths))
    session = OrtSession(onnx_path, batch_size=len(prompts), ctx_len=case.ctx_len)
    report = qeff.verify(
        model, qmodel=qmodel, session=session, prompt_token_ids=prompts,
        prompt_len=case.prompt_len, ctx_len=case.ctx_len, steps=case.steps, tolerances=TIGHT,
    )
    assert [c.name for c in report.comparisons] == ["hf_vs_pytorch", "pytorch_vs_ort"]
    for comparison in report.comparisons:
        assert comparison.passed, comparison.describe()
        assert comparison.tokens_total == len(prompts) * case.steps >= 32
        assert comparison.tokens_matched == comparison.tokens_total, comparison.mismatches


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ort_generation_equals_hf_generate(exported, case):
    """Free-running greedy decoding on the ORT backend gives HF's tokens, row for row."""
    name, model, _, onnx_path = exported
    prompts = random_prompts(case.lengths, seed=len(case.lengths))
    session = OrtSession(onnx_path, batch_size=len(prompts), ctx_len=case.ctx_len)
    result = qeff.generate(session, prompt_token_ids=prompts, prompt_len=case.prompt_len, generation_len=case.steps, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]), max_new_tokens=case.steps, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt):].tolist()
        assert result.token_ids[row] == ref, f"{name} row {row}"
    assert result.new_tokens == len(prompts) * case.steps


def test_mismatch_is_reported_not_hidden(exported):
    """A broken candidate (a perturbed weight) must fail verification with its numbers."""
    name, model, qmodel, onnx_path = exported
    prompts = random_prompts((6,))
    clone = tiny_model(name)
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(1.01)
    report = qeff.verify(model, qmodel=qeff.transform(clone), prompt_token_ids=prompts, prompt_len=4, ctx_len=32, steps=8, tolerances=TIGHT)
    comparison = report["hf_vs_pytorch"]
    assert not comparison.passed
    assert any("logits max-abs" in f for f in comparison.failures)
    with pytest.raises(qeff.errors.VerificationError, match="logits max-abs"):
        report.raise_for_failure()


def test_a_reused_reference_gives_the_same_report(exported):
    from qeff.verification import hf_trace

    name, model, qmodel, _ = exported
    prompts = random_prompts((7, 3))
    fresh = qeff.verify(model, qmodel=qmodel, prompt_token_ids=prompts, prompt_len=4, ctx_len=32, steps=8, tolerances=TIGHT)
    reference = hf_trace(model, prompts, 8)
    reused = qeff.verify(model, qmodel=qmodel, prompt_token_ids=prompts, prompt_len=4, ctx_len=32, steps=8, tolerances=TIGHT, reference=reference)
    assert reused.to_dict() == fresh.to_dict()
    with pytest.raises(qeff.UsageError, match="other prompts or another number of steps"):
        qeff.verify(model, qmodel=qmodel, prompt_token_ids=prompts, prompt_len=4, ctx_len=32, steps=9, reference=reference)
