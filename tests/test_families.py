"""The families of issue 11 beyond the shared conformance matrix (``test_architectures.py`` runs
them through HF vs PyTorch vs ORT, batch 1, padded batch, chunked prompts, windows crossed).

Each quirk a family brings is shown to matter: a seeded fault that removes it from the wrapper's
copy of the model (never from HF's reference, which shares only the weight tensors) must move the
logits away from HF's. If a quirk were not exercised by the tiny config, or not reached by the
comparison, its fault would pass unnoticed and the test would fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from qeff.runtime.torch import TorchSession
from qeff.transforms.experts import experts_modules
from qeff.transforms.registry import _default_head
from tests.arch_configs import TINY
from tests.arch_harness import CTX_LEN, PROMPTS, Built, build, compare, teacher_forced_logits

#: Architectures whose experts the transform makes dense (the new ones and Mixtral).
MOE_TYPES = frozenset({"mixtral", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss"})
#: A fault must move some logit by more than this; fp32 noise here is below 2e-5 (see test_architectures).
FAULT = 1e-3

_BUILT: dict[str, Built] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield
    _BUILT.clear()  # the built models hold ORT sessions and weights: free them with the module


def _built(case_id: str) -> Built:
    if case_id not in _BUILT:
        _BUILT[case_id] = build(TINY[case_id])
    return _BUILT[case_id]


def _max_abs_vs_hf(built: Built) -> float:
    ref = built.reference[0]
    got = teacher_forced_logits(TorchSession(built.qmodel, batch_size=1, ctx_len=CTX_LEN), PROMPTS[0], ref.tokens)
    return compare(ref.logits, got).max_abs


def _layers(built: Built):
    return built.qmodel.model.model.layers


class _Patch:
    """Attribute patches undone in reverse order. pytest's monkeypatch deletes an attribute it did
    not find in the instance ``__dict__`` on undo, which drops an ``nn.Module``'s buffer."""

    def __init__(self):
        self._undo: list[tuple[object, str, object]] = []

    def setattr(self, obj, name: str, value) -> None:
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def setitem(self, mapping, key, value) -> None:
        self._undo.append((mapping, key, mapping[key]))
        mapping[key] = value

    def undo(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if isinstance(name, str) and not isinstance(obj, dict):
                setattr(obj, name, old)
            else:
                obj[name] = old


# --- one function per seeded fault: (patch, built) → None, applied to the wrapper's copy ----------------


def _rope_on_nope_layers(mp, built):
    nope = [layer.self_attn for layer in _layers(built) if not layer.self_attn.use_rope]
    assert nope, "the tiny SmolLM3 config has no NoPE layer"
    for attn in nope:
        mp.setattr(attn, "use_rope", 1)


def _global_rope_base_on_local_layers(mp, built):
    rotary = built.qmodel.model.model.rotary_emb
    assert not torch.equal(rotary.sliding_attention_inv_freq, rotary.full_attention_inv_freq)
    mp.setattr(rotary, "sliding_attention_inv_freq", rotary.full_attention_inv_freq)


def _head_dim_query_scale(mp, built):
    for layer in _layers(built):
        assert layer.self_attn.scaling != layer.self_attn.head_dim**-0.5
        mp.setattr(layer.self_attn, "scaling", layer.self_attn.head_dim**-0.5)


def _no_qk_norm(mp, built):
    for layer in _layers(built):
        mp.setattr(layer.self_attn, "q_norm", nn.Identity())
        mp.setattr(layer.self_attn, "k_norm", nn.Identity())


def _dropped_sinks(mp, built):
    for layer in _layers(built):
        sinks = layer.self_attn.sinks
        mp.setattr(layer.self_attn, "sinks", nn.Parameter(torch.full_like(sinks, float("-inf")), requires_grad=False))


def _unclamped_swiglu(mp, built):
    for experts in experts_modules(built.qmodel.model):
        def gate(gate_up, alpha=experts.alpha):
            g, u = gate_up[..., ::2], gate_up[..., 1::2]
            return (u + 1) * (g * torch.sigmoid(g * alpha))

        mp.setattr(experts, "_apply_gate", gate)


def _dropped_expert_biases(mp, built):
    for experts in experts_modules(built.qmodel.model):
        mp.setattr(experts, "has_bias", False)


def _unweighted_experts(mp, built):
    """Every chosen expert counted with weight 1: the router's weights dropped from the dense sum."""
    import qeff.transforms.experts as dense

    real = dense.dense_experts_forward
    mp.setattr(dense, "dense_experts_forward", lambda self, h, idx, w: real(self, h, idx, torch.ones_like(w)))
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    mp.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, dense.DENSE_EXPERTS, dense.dense_experts_forward)


def _unscaled_logits(mp, built):
    mp.setattr(built.qmodel, "spec", dataclasses.replace(built.qmodel.spec, head=_default_head))


def _plain_rope_for_scaled(mp, built):
    rotary = built.qmodel.model.model.rotary_emb
    dim = rotary.inv_freq.shape[0] * 2
    plain = 1.0 / (built.qmodel.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    assert not torch.allclose(plain, rotary.inv_freq)
    mp.setattr(rotary, "inv_freq", plain)


FAULTS = {
    "smollm3-3b-base": [_rope_on_nope_layers],
    "gemma3-270m": [_global_rope_base_on_local_layers, _head_dim_query_scale, _no_qk_norm],
    "qwen3-0.6b": [_no_qk_norm],
    "qwen3-30b-a3b": [_no_qk_norm, _unweighted_experts],
    "olmoe-1b-7b-0924": [_unweighted_experts],
    "granite-3.0-1b-a400m-instruct": [_unscaled_logits, _unweighted_experts],
    "gpt-oss-20b": [_dropped_sinks, _unclamped_swiglu, _dropped_expert_biases, _unweighted_experts],
    "llama-3.1-8b-instruct": [_plain_rope_for_scaled],
}
CASES = [pytest.param(case, fault, id=f"{case}-{fault.__name__.lstrip('_')}") for case, faults in FAULTS.items() for fault in faults]


@pytest.mark.parametrize("case_id,fault", CASES)
def test_seeded_fault_is_caught(case_id, fault):
    built = _built(case_id)
    clean = _max_abs_vs_hf(built)
    assert clean < FAULT  # the untouched wrapper agrees (test_architectures holds the tight bound)
    patch = _Patch()
    try:
        fault(patch, built)
        faulty = _max_abs_vs_hf(built)
    finally:
        patch.undo()
    assert faulty > FAULT, f"{fault.__name__} left the logits within {faulty:.2e} of HF's: the quirk is not exercised"
    assert _max_abs_vs_hf(built) == clean  # the fault is undone; HF's reference was never touched


def test_every_experts_module_is_made_dense():
    """Every module of the tiny models whose class is an HF experts module goes through
    transformers' experts interface, so the transform swaps in the static dense form."""
    for case_id, case in sorted(TINY.items()):
        if case.model_type not in MOE_TYPES:
            continue
        built = _built(case_id)
        named = [m for m in built.qmodel.model.modules() if type(m).__name__.endswith("Experts")]
        assert named and all(m in experts_modules(built.qmodel.model) for m in named), case_id
        assert "DenseExperts" in built.qmodel.transforms, case_id
        assert all(m.config._experts_implementation == "qeff_dense" for m in named), case_id
        # The reference keeps HF's own per-expert loop (the harness sets it on the untouched model).
        assert all(m.config._experts_implementation == "eager" for m in built.hf.modules() if type(m).__name__.endswith("Experts"))


def test_gemma3_bidirectional_is_refused():
    from qeff.errors import UnsupportedModelError
    from qeff.intake.loading import from_config
    from qeff.transforms import transform

    model = from_config("gemma3_text", {**TINY["gemma3-270m"].config, "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        transform(model)


def test_qwen3_moe_mixes_dense_and_expert_layers():
    built = _built("qwen3-30b-a3b")
    kinds = [type(layer.mlp).__name__ for layer in _layers(built)]
    assert kinds == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"]
