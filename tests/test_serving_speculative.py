"""Speculative decoding: the output is exactly the target's greedy output for drafts that never,
sometimes and always agree; self-speculation keeps K+1 tokens per verify step. A misaligned
verify step (a seeded fault) is caught."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import qeff
from qeff.errors import UsageError
from qeff.runtime.ort import OrtSession
from qeff.runtime.ort_serving import ServingOrtSession
from qeff.generation.speculative import check_same_tokenizer, generate_speculative
from tests.serving_helpers import TLM, serving_model
from tests.tiny import random_prompts

CTX, PL = 64, 8


@pytest.fixture(scope="module")
def graphs(module_tmp):
    out = module_tmp("spec")
    target = serving_model("llama", seed=1)
    qtarget = qeff.transform(target)
    # A draft that agrees often but not always: the target with its weights nudged.
    near = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.std())
    return {
        "target": qeff.export(qtarget, out / "target").path,
        "tlm": qeff.export(qtarget, out / "tlm", variant=TLM).path,
        "self": qeff.export(qtarget, out / "target").path,
        "near": qeff.export(qeff.transform(near), out / "near").path,
        "random": qeff.export(qeff.transform(serving_model("llama", seed=2)), out / "random").path,
    }


PROMPTS = random_prompts([5, 11, 17], seed=3)


def greedy(graphs, prompts, gen, ctx=CTX, eos=()):
    session = OrtSession(graphs["target"], batch_size=len(prompts), ctx_len=ctx)
    return qeff.generate(session, prompt_token_ids=prompts, prompt_len=PL, generation_len=gen, eos_token_id=list(eos))


def speculate(graphs, draft, prompts, gen, k, ctx=CTX, eos=(), target=None):
    target = target or ServingOrtSession(graphs["tlm"], batch_size=len(prompts), ctx_len=ctx)
    drafter = OrtSession(graphs[draft], batch_size=len(prompts), ctx_len=ctx)
    return generate_speculative(target, drafter, prompt_token_ids=prompts, prompt_len=PL, generation_len=gen,
                                eos_token_id=list(eos), num_speculative_tokens=k)


def test_the_target_graph_returns_num_logits_to_keep_rows(graphs):
    model = onnx.load(str(graphs["tlm"]), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in [*model.graph.input, *model.graph.output]}
    assert dims["num_logits_to_keep"] == ["num_logits_to_keep", 1]
    assert dims["logits"][:2] == ["batch_size", "num_logits_to_keep"]


@pytest.mark.parametrize("draft", ["random", "near", "self"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_output_is_exactly_the_targets_greedy_output(graphs, draft, k):
    ref = greedy(graphs, PROMPTS, 30)
    out = speculate(graphs, draft, PROMPTS, 30, k)
    assert out.token_ids == ref.token_ids and out.stop_reasons == ref.stop_reasons
    expected = {"random": (1.0, 1.3), "near": (1.3, k + 1 - 0.01), "self": (k + 1, k + 1)}[draft]
    assert expected[0] <= out.mean_accepted_tokens <= expected[1], out.mean_accepted_tokens
    assert out.steps < 30 or draft == "random"


def test_self_speculation_keeps_k_plus_1_tokens_per_step(graphs):
    out = speculate(graphs, "self", PROMPTS[:2], 24, 5)
    assert out.mean_accepted_tokens == 6.0 and out.acceptance_rate == 1.0
    assert out.steps == 4  # 1 token from the prefill, then 4 steps of 6 (the last one cut at 24)


def test_equal_up_to_eos_and_to_the_end_of_the_cache(graphs):
    free = greedy(graphs, PROMPTS, None, ctx=40)  # every row runs into the end of its cache
    assert free.stop_reasons == ["ctx_len"] * 3
    for draft in ("near", "self"):
        out = speculate(graphs, draft, PROMPTS, None, 4, ctx=40)
        assert out.token_ids == free.token_ids and out.stop_reasons == free.stop_reasons
    tokens = [t for row in free.token_ids for t in row]
    eos = max(set(tokens), key=tokens.count)
    ref = greedy(graphs, PROMPTS, None, ctx=40, eos=[eos])
    out = speculate(graphs, "near", PROMPTS, None, 4, ctx=40, eos=[eos])
    assert out.token_ids == ref.token_ids and "eos" in out.stop_reasons


class ShiftedVerify:
    """Seeded fault: the verify step's logits are read one column late (a misaligned window)."""

    def __init__(self, session):
        self.session, self.variant = session, session.variant
        self.batch_size, self.ctx_len, self.prompt_len = session.batch_size, session.ctx_len, None

    def run(self, ids, pos, *, keep):
        logits = self.session.run(ids, pos, keep=keep)
        return logits if keep == 1 else np.concatenate([logits[:, 1:], logits[:, -1:]], axis=1)


def test_seeded_fault_a_misaligned_verify_window_is_caught(graphs):
    ref = greedy(graphs, PROMPTS, 20)
    target = ShiftedVerify(ServingOrtSession(graphs["tlm"], batch_size=3, ctx_len=CTX))
    out = speculate(graphs, "near", PROMPTS, 20, 3, target=target)
    assert out.token_ids != ref.token_ids


def test_bad_inputs(graphs, smollm2_tokenizer):
    with pytest.raises(UsageError, match="num_speculative_tokens"):
        speculate(graphs, "self", PROMPTS, 5, 0)
    with pytest.raises(UsageError, match="num_logits_to_keep"):
        generate_speculative(OrtSession(graphs["target"], batch_size=3, ctx_len=CTX), OrtSession(graphs["self"], batch_size=3, ctx_len=CTX),
                             prompt_token_ids=PROMPTS, prompt_len=PL, num_speculative_tokens=2)
    with pytest.raises(UsageError, match="ctx_len"):
        generate_speculative(ServingOrtSession(graphs["tlm"], batch_size=3, ctx_len=CTX), OrtSession(graphs["self"], batch_size=3, ctx_len=32),
                             prompt_token_ids=PROMPTS, prompt_len=PL, num_speculative_tokens=2)
    other = copy.deepcopy(smollm2_tokenizer)
    other.add_tokens(["<qeff-extra-token>"])
    check_same_tokenizer(smollm2_tokenizer, copy.deepcopy(smollm2_tokenizer))
    with pytest.raises(UsageError, match="does not share the tokenizer"):
        check_same_tokenizer(smollm2_tokenizer, other)
