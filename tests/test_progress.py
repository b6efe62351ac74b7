"""Issue 18: long work shows per-layer progress with an ETA (in logs: a line per tenth done)."""

from __future__ import annotations

import pytest

from qeff.progress import decoder_layers, layer_progress
from tests.tiny import tiny_model


def test_each_decoder_layer_forward_ticks_with_an_eta(capsys):
    import torch

    model = tiny_model("llama")
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    with layer_progress("Verify: HF reference", model, passes=5):
        with torch.no_grad():
            for _ in range(5):
                model(input_ids=torch.tensor([[1, 2, 3]]))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Verify: HF reference")]
    total = 5 * len(layers)
    assert lines[-1].startswith(f"Verify: HF reference: {total}/{total} layer passes") and lines[-1].endswith("about 0 s left")
    assert 1 < len(lines) <= 10  # at most one line per tenth: a log stays readable
    assert all("about" in line and "s left" in line for line in lines)
    # The hooks are gone: the model runs as it was given.
    assert not any(layer._forward_pre_hooks for layer in layers)


def test_disabled_progress_adds_no_hook(capsys):
    model = tiny_model("llama")
    with layer_progress("x", model, enabled=False):
        assert not any(layer._forward_pre_hooks for layer in decoder_layers(model))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("passes", [1, 3])
def test_more_passes_than_announced_do_not_fail(passes, capsys):
    import torch

    model = tiny_model("llama")
    with layer_progress("Export: tracing", model, passes=passes), torch.no_grad():
        for _ in range(passes + 2):
            model(input_ids=torch.tensor([[1, 2]]))
    assert "Export: tracing" in capsys.readouterr().err
