"""The fused CPU graph on the real model: SmolLM2-135M-Instruct, fp32 and with the GGUF file's own
Q4_1 / Q8_0 blocks (``--weights native``), against untouched HF eager ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qeff
from qeff.compilers.ort_fused import FUSED_GRAPH, write_fused_graph
from qeff.compilers.ort_fused_artifact import fused_lowering
from qeff.compilers.ort_fused_weights import from_hf
from qeff.intake.loading import embedded_gguf
from qeff.quant.blocks import NBitsWeight
from qeff.compilers.ort_fused_weights import from_gguf
from qeff.runtime.ort_fused import FusedOrtSession

PROMPTS = ["The capital of France is", "Write a haiku about the sea."]
STEPS = 128
CTX = 160


@pytest.fixture(scope="module")
def hf_reference(smollm2):
    """HF eager greedy continuations, each prompt alone, EOS ignored."""
    model, tokenizer = smollm2
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ref[0, ids.shape[1]:].tolist())
    return out


def generate(path, tokenizer) -> list[list[int]]:
    session = FusedOrtSession(path, batch_size=len(PROMPTS), ctx_len=CTX, prompt_len=16)
    return qeff.generate(session, PROMPTS, tokenizer=tokenizer, generation_len=STEPS, ignore_eos=True).token_ids


def test_fp32_fused_greedy_equals_hf_for_128_tokens(smollm2, hf_reference, tmp_path):
    model, tokenizer = smollm2
    write_fused_graph(from_hf(model, CTX), tmp_path, **fused_lowering(len(PROMPTS), "fp32"))  # as compiled artifacts are
    assert generate(tmp_path / FUSED_GRAPH, tokenizer) == hf_reference


def test_native_weights_are_the_very_numbers_hf_loaded(smollm2):
    # HF de-quantized every block of the file; the native decoder kept them as blocks. Every
    # matrix they represent is the same, bit for bit (q/k rows permuted as HF permutes them).
    model, _ = smollm2
    native = from_gguf(embedded_gguf(), model.config, 8)
    state = model.state_dict()
    checked = 0
    for i, layer in enumerate(native.layers):
        for ours, theirs in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                             ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj")):
            weight = getattr(layer, ours)
            assert isinstance(weight, NBitsWeight) and weight.source == "Q4_1"
            assert np.array_equal(weight.dequantize(), state[f"model.layers.{i}.{theirs}.weight"].numpy()), (i, ours)
            # The lowering runs it with the default zero point (no zero-point input): the same numbers.
            centred = weight.recentred()
            assert centred is not None and np.array_equal(centred.dequantize(), state[f"model.layers.{i}.{theirs}.weight"].numpy())
            checked += 1
        assert np.array_equal(layer.input_norm, state[f"model.layers.{i}.input_layernorm.weight"].numpy())
    assert native.lm_head.source == "Q8_0"  # tied to the embedding table, kept as the file's blocks
    assert np.array_equal(native.lm_head.dequantize(), state["lm_head.weight"].numpy())
    assert np.array_equal(native.embed, state["model.embed_tokens.weight"].numpy())
    assert checked == 7 * model.config.num_hidden_layers


def test_native_fused_greedy_equals_hf_for_128_tokens(smollm2, hf_reference, tmp_path):
    model, tokenizer = smollm2
    facts = write_fused_graph(from_gguf(embedded_gguf(), model.config, CTX), tmp_path)
    assert facts["ops"]["MatMulNBits"] > 0 and "gguf_types" in facts
    import onnx

    nodes = [n for n in onnx.load(str(tmp_path / FUSED_GRAPH), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    # Every Q4_1 linear runs without a zero-point input (recentred); only the Q8_0 head's low half keeps one.
    assert sum(len(n.input) == 4 for n in nodes) == 1 and len(nodes) == 4 * model.config.num_hidden_layers + 2
    assert generate(tmp_path / FUSED_GRAPH, tokenizer) == hf_reference
