"""Architecture coverage: every supported model type, as a seeded tiny model, through the chain

    HF eager ──transform──▶ retained-state PyTorch ──export──▶ ONNX Runtime

(1) HF vs PyTorch and (2) PyTorch vs ORT logits at the prefill and every decode step, (3) greedy
tokens equal to HF ``generate`` on both backends, at batch 1 and in a padded batch, with prompts
longer than ``prompt_len``; plus a static graph and sliding windows that the sequences outrun.

Tolerances are relative to the largest reference logit (the tiny models' logits reach ~5): fp32
noise measured here is below 2e-6 of it for the max-abs difference; a real bug (a missed window,
soft-cap or scale, a stale slot) moves logits by 1e-3 or more.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qeff.transforms.model as model_module
from tests.arch_configs import TINY
from tests.arch_harness import (
    CTX_LEN, GEN_LEN, PROMPT_LEN, PROMPTS, Built, build, compare, hf_greedy, teacher_forced_logits,
)
from qeff.errors import UnsupportedModelError
from qeff.exporter import export
from qeff.generation import generate
from qeff.intake.loading import from_config
from qeff.runtime.ort import OrtSession
from qeff.runtime.torch import TorchSession
from qeff.transforms import supported_model_types, transform

REL_MAX_ABS = 5e-6
REL_MSE = 1e-11
#: Architectures whose experts the transform makes dense.
MOE_TYPES = frozenset({"mixtral", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss"})
#: Ops whose output shape or control flow depends on the data: a static-shape compiler rejects them.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "Loop", "If", "Scan", "Unique", "Compress"})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _param(case_id: str):
    reason = TINY[case_id].known_failure
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case_id, id=case_id, marks=marks)


@pytest.fixture(scope="module", params=[_param(c) for c in sorted(TINY)])
def built(request) -> Built:
    return build(TINY[request.param])


@pytest.fixture(scope="module")
def onnx_path(built: Built, module_tmp):
    return export(built.qmodel, module_tmp("onnx")).path


def _session(backend: str, built: Built, onnx_path, batch_size: int):
    if backend == "torch":
        return TorchSession(built.qmodel, batch_size=batch_size, ctx_len=CTX_LEN)
    return OrtSession(onnx_path, batch_size=batch_size, ctx_len=CTX_LEN, threads=1)


def _generate(session, prompts: list[list[int]]):
    return generate(session, prompt_token_ids=prompts, prompt_len=PROMPT_LEN, generation_len=GEN_LEN, eos_token_id=[])


def test_every_supported_type_has_a_tiny_config():
    tiny_types = {case.model_type for case in TINY.values()}
    assert tiny_types == set(supported_model_types()), (
        f"supported without a tiny config: {sorted(set(supported_model_types()) - tiny_types)}; "
        f"tiny config for an unsupported type: {sorted(tiny_types - set(supported_model_types()))}"
    )


def test_hf_vs_pytorch(built: Built, request):
    ref = built.reference[0]
    got = teacher_forced_logits(TorchSession(built.qmodel, batch_size=1, ctx_len=CTX_LEN), PROMPTS[0], ref.tokens)
    diff = compare(ref.logits, got)
    request.node.user_properties.append(("hf_vs_pytorch", str(diff)))  # record_property warns under xunit2
    assert diff.within(REL_MAX_ABS, REL_MSE), f"HF vs PyTorch over {len(ref.tokens)} steps: {diff}"


def test_pytorch_vs_ort(built: Built, onnx_path, request):
    tokens = built.reference[0].tokens
    torch_logits = teacher_forced_logits(_session("torch", built, onnx_path, 1), PROMPTS[0], tokens)
    ort_logits = teacher_forced_logits(_session("ort", built, onnx_path, 1), PROMPTS[0], tokens)
    diff = compare(torch_logits, ort_logits)
    request.node.user_properties.append(("pytorch_vs_ort", str(diff)))
    assert diff.within(REL_MAX_ABS, REL_MSE), f"PyTorch vs ORT over {len(tokens)} steps: {diff}"


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_greedy_matches_hf_generate(built: Built, onnx_path, backend: str):
    expected = [ref.tokens for ref in built.reference]
    for i in (0, 1):  # alone at batch 1; prompt 0 is longer than prompt_len
        session = _session(backend, built, onnx_path, 1)
        out = _generate(session, [PROMPTS[i]])
        assert out.token_ids == [expected[i]], f"prompt {i} at batch 1"
    # All four together, right-padded, 1 to 3 prefill chunks each: every row as if alone.
    out = _generate(_session(backend, built, onnx_path, len(PROMPTS)), PROMPTS)
    for row, (got, want) in enumerate(zip(out.token_ids, expected)):
        assert got == want, f"row {row} (prompt of {len(PROMPTS[row])} tokens) differs in the padded batch"


def test_graph_is_static(onnx_path):
    ops = {node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    assert not ops & DATA_DEPENDENT_OPS, f"data-dependent ops in the graph: {sorted(ops & DATA_DEPENDENT_OPS)}"


@pytest.mark.parametrize("built", [_param(c) for c in sorted(TINY) if TINY[c].window], indirect=True)
def test_window_matters(built: Built, monkeypatch):
    """The window is really exercised: with it dropped from the mask, the logits leave HF's."""
    full = model_module.additive_mask
    monkeypatch.setattr(model_module, "additive_mask", lambda pos, ctx, window=None, **kw: full(pos, ctx, **kw))
    ref = built.reference[0]
    got = teacher_forced_logits(TorchSession(built.qmodel, batch_size=1, ctx_len=CTX_LEN), PROMPTS[0], ref.tokens)
    assert compare(ref.logits, got).max_abs > 1e-3


@pytest.mark.parametrize("built", [_param(c) for c in sorted(TINY) if TINY[c].model_type in MOE_TYPES], indirect=True)
def test_moe_routes_densely(built: Built, onnx_path):
    assert "DenseExperts" in built.qmodel.transforms
    ops = {node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    assert "TopK" in ops  # the router stays: top-k with a constant k is static


def test_falcon_alibi_is_refused():
    model = from_config("falcon", {**TINY["falcon-7b"].config, "alibi": True})
    with pytest.raises(UnsupportedModelError, match="alibi"):
        transform(model)


def test_replaced_module_falls_back_to_hf_outside_the_transform():
    """MPT's replaced attention behaves as HF's with HF's own cache: generate still works on it."""
    case = TINY["mpt-7b"]
    reference = from_config(case.model_type, case.config)
    transformed = transform(from_config(case.model_type, case.config)).model
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        got = transformed.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(want, got)


def test_mpt_alibi_stays_exact_at_long_context():
    """HF's ALiBi slice, used on a ctx_len-slot cache, biases every visible slot by about
    -slope * ctx_len, and that constant's rounding reaches the logits: measured max-abs 2.8e-5 at
    4096 slots (tolerance here 2.1e-5). The replaced attention's bias, slope * (slot - position),
    measures 2.0e-6."""
    case = TINY["mpt-7b"]
    config = {**case.config, "max_seq_len": 4096}
    hf = from_config(case.model_type, config)
    qmodel = transform(from_config(case.model_type, config))
    ref = hf_greedy(hf, PROMPTS[0], 8)
    got = teacher_forced_logits(TorchSession(qmodel, batch_size=1, ctx_len=4096), PROMPTS[0], ref.tokens)
    diff = compare(ref.logits, got)
    assert diff.within(REL_MAX_ABS, REL_MSE), f"MPT at ctx_len=4096: {diff}"


def test_every_layer_output_is_seen_alike_by_hf_pytorch_and_ort(built: Built, onnx_path):
    """What the first divergence compares (qeff/divergence.py): HF's and the wrapper's decoder
    layers, hooked, and the tensors the exported graph's layer scopes (``layers.N``, ``h.N``,
    ``blocks.N``) hand to the next layer. For every architecture they must be the same hidden
    states: a prefill of 3 chunks in the padded batch, and a decode step."""
    from qeff.divergence import LAYER_RTOL, HfLayers, OrtStepper, ReplayLayers, TorchStepper

    tokens = [ref.tokens for ref in built.reference]
    shape = dict(batch_size=len(PROMPTS), prompt_len=PROMPT_LEN, ctx_len=CTX_LEN)
    probes = {
        "hf": HfLayers(built.hf, PROMPTS, tokens),
        "pytorch": ReplayLayers(TorchStepper(built.qmodel), PROMPTS, tokens, **shape),
        "ort": ReplayLayers(OrtStepper(onnx_path, threads=1), PROMPTS, tokens, **shape),
    }
    num_layers = built.hf.config.num_hidden_layers
    for row, step in ((2, 0), (1, 3)):
        seen = {name: probe.hidden(row, step) for name, probe in probes.items()}
        for name in ("pytorch", "ort"):
            assert len(seen[name]) == num_layers
            for layer, (a, b) in enumerate(zip(seen["hf"], seen[name])):
                assert a.shape == b.shape == ((len(PROMPTS[row]) if step == 0 else 1), built.hf.config.hidden_size)
                relative = float((np.abs(a - b).max(axis=-1) / np.abs(a).max(axis=-1)).max())
                assert relative <= LAYER_RTOL / 10, f"{name} layer {layer} at row {row} step {step}: {relative:.2e}"
