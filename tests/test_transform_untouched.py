"""``qeff.transform(model)`` leaves ``model`` exactly as it was (issue 9).

The reference of every verdict is HF eager on the model the user passed in. Before this was
guaranteed, the transform switched Mixtral's experts to the dense form and swapped MPT's attention
class *in the input model*, so "HF vs transformed PyTorch" traced qeff's code on both sides. Here,
for every supported architecture: module classes, config (attention and experts implementation
included), training mode and logits are identical before and after, and the weights are shared
with the wrapper, never copied.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qeff.transforms import transform
from tests.arch_configs import TINY

torch.set_num_threads(1)


def _fresh(case) -> torch.nn.Module:
    """A model as a user would have it: the architecture's default attention (sdpa where
    supported), not the eager one qeff's own loaders pick."""
    cfg = AutoConfig.for_model(case.model_type, **case.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg)


def _state(model: torch.nn.Module) -> dict:
    config = model.config
    return {
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "config": config.to_dict(),
        "attn": config._attn_implementation,
        "experts": getattr(config, "_experts_implementation", None),
        "training": [m.training for m in model.modules()],
        "forwards": [(name, m.forward.__func__) for name, m in model.named_modules() if hasattr(m.forward, "__func__")],
    }


@pytest.mark.parametrize("name", sorted(TINY))
def test_input_model_is_untouched(name):
    case = TINY[name]
    model = _fresh(case).eval()
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 12]])
    with torch.no_grad():
        before_logits = model(ids).logits
    before = _state(model)

    qmodel = transform(model)

    assert _state(model) == before
    with torch.no_grad():
        after_logits = model(ids).logits
    assert torch.equal(before_logits, after_logits)
    # One copy of the weights: every parameter and buffer of the wrapper is the input's tensor.
    originals = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert {p.data_ptr() for p in qmodel.model.parameters()} <= originals
    assert qmodel.model is not model and qmodel.model.config is not model.config
    assert qmodel.model.config._attn_implementation == "eager"


def test_training_mode_is_left_alone():
    model = _fresh(TINY["gpt2"]).train()
    qmodel = transform(model)
    assert all(m.training for m in model.modules())
    assert not any(m.training for m in qmodel.modules())


def test_replacements_live_only_in_the_wrapper():
    """What the transform replaces (MPT's attention, Mixtral's experts) is in the wrapper's copy only."""
    mpt = _fresh(TINY["mpt-7b"]).eval()
    q = transform(mpt)
    assert type(mpt.transformer.blocks[0].attn).__name__ == "MptAttention"
    assert type(q.model.transformer.blocks[0].attn).__name__ == "QEffMptAttention"

    mixtral = _fresh(TINY["mixtral-8x7b"]).eval()
    q = transform(mixtral)
    assert mixtral.config._experts_implementation != "qeff_dense"
    assert q.model.config._experts_implementation == "qeff_dense"
