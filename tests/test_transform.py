"""The transform's contract and its guards (weights unchanged, unknown modules refused)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qeff
from qeff.errors import UnsupportedModelError, WeightsChangedError
from qeff.transforms import check_parameters_unchanged, parameter_fingerprint, transform
from qeff.transforms.cache import scatter_slots
from tests.tiny import tiny_model


def test_contract_names_and_shapes():
    model = tiny_model("llama")
    q = transform(model)
    assert q.input_names[:4] == ["input_ids", "position_ids", "past_key.0", "past_value.0"]
    assert q.output_names[:3] == ["logits", "past_key.0_RetainedState", "past_value.0_RetainedState"]
    assert len(q.input_names) == 2 + 2 * model.config.num_hidden_layers
    past = q.empty_cache(3, 20)
    assert past[0].shape == (3, 2, 20, 16)  # (B, n_kv, ctx, head_dim)
    ids = torch.randint(0, 256, (3, 5))
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, -1, -1, -1], [-1] * 5])
    out = q(ids, pos, *past)
    assert out[0].shape == (3, 1, 256)
    assert all(o.shape == p.shape for o, p in zip(out[1:], past))


def test_padding_never_writes_a_valid_slot():
    q = transform(tiny_model("llama"))
    past = [torch.randn(1, 2, 16, 16) for _ in q.empty_cache(1, 16)]
    ids = torch.randint(0, 256, (1, 6))
    pos = torch.tensor([[5, 6, -1, -1, -1, -1]])  # two valid tokens at 5 and 6, then pads
    out = q(ids, pos, *past)
    for before, after in zip(past, out[1:]):
        changed = (before != after).any(dim=-1).any(dim=1)[0]  # (ctx,)
        assert changed.nonzero().flatten().tolist() == [5, 6]


@pytest.mark.parametrize("ctx_len", [1, 4, 9])
def test_scatter_slots_in_range_and_distinct(ctx_len):
    for seq_len in range(1, ctx_len + 1):
        for start in range(ctx_len):
            for n_valid in range(0, seq_len + 1):
                if start + n_valid > ctx_len:
                    continue
                pos = torch.full((1, seq_len), -1)
                pos[0, :n_valid] = torch.arange(start, start + n_valid)
                slots = scatter_slots(pos, ctx_len)[0]
                assert slots.min() >= 0 and slots.max() < ctx_len
                assert len(set(slots.tolist())) == seq_len  # no two writes share a slot
                assert slots[:n_valid].tolist() == list(range(start, start + n_valid))


def test_fingerprint_detects_every_kind_of_change():
    model = tiny_model("llama")
    before = parameter_fingerprint(model)
    check_parameters_unchanged(before, parameter_fingerprint(model))  # unchanged: no error
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(WeightsChangedError, match=r"model.layers.0.mlp.up_proj.weight: values changed"):
        check_parameters_unchanged(before, parameter_fingerprint(model))
    model = tiny_model("llama")
    model.model.norm.weight = nn.Parameter(torch.ones(65))
    with pytest.raises(WeightsChangedError, match="model.norm.weight: shape"):
        check_parameters_unchanged(before, parameter_fingerprint(model))
    model = tiny_model("llama")
    model.model.norm.register_parameter("extra", nn.Parameter(torch.ones(1)))
    with pytest.raises(WeightsChangedError, match="model.norm.extra: added"):
        check_parameters_unchanged(before, parameter_fingerprint(model))


def test_transform_refuses_a_weight_changing_step(monkeypatch):
    """If anything inside transform() changed a weight, transform() itself must raise."""
    from qeff.transforms import model as tm

    original = tm.QEffCausalLM.__init__

    def corrupting_init(self, model, spec):
        original(self, model, spec)
        with torch.no_grad():
            model.lm_head.weight.mul_(2)

    monkeypatch.setattr(tm.QEffCausalLM, "__init__", corrupting_init)
    with pytest.raises(WeightsChangedError, match="lm_head.weight: values changed"):
        transform(tiny_model("llama"))


def test_unsupported_model_type_is_named():
    model = qeff.from_config("bert", dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match=r"BertLMHeadModel \(model_type='bert'\).*supported model types: .*llama"):
        transform(model)


def test_unknown_module_type_is_named():
    model = tiny_model("llama")

    class FancyAttention(nn.Module):
        def forward(self, x):
            return x

    model.model.layers[1].self_attn = FancyAttention()
    with pytest.raises(UnsupportedModelError, match=r"FancyAttention"):
        transform(model)
