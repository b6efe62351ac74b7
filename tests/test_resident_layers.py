"""Cheaper layer streaming (issue 18, item 3: the cost of streaming) — :mod:`qeff.offload`.

A layer-streamed forward used to read every layer from the files into fresh float32 tensors and
free them after; most of its extra CPU time was the kernel first-touching those pages and
unmapping them. Two remedies, neither of which may change a value:

- **spares**: a dropped layer's float32 tensors are the next layer's buffers. A spare is reused
  only when nothing else holds it (a hook that kept the weight, a view of it): writing into it
  would change what that holder sees. A seeded reuse without that guard overwrites the held weight;
- **resident layers** (``offloaded_pair(..., resident=bytes)``, sized by
  :func:`qeff.memory.choose_verification`): tensors read once and kept for later forwards, shared by
  the reference and the candidate; bit for bit ``from_pretrained``'s computation, each tensor read
  once, digested, and a write into one fails :meth:`~qeff.offload.SharedTables.check`.
"""

from __future__ import annotations

import pytest
import torch

import qeff.offload
from qeff.errors import WeightsChangedError
from qeff.offload import SharedTables, offloaded_pair
from qeff.runtime.torch import TorchSession
from qeff.transforms import transform
from qeff.verification import hf_trace, session_trace
from tests.test_offload import PROMPTS, STEPS, _checkpoint, _loaded, _same

torch.set_num_threads(1)
EVERYTHING = 1 << 40


def _layer_tensors(model) -> int:
    return sum(len({slot.source for slot in slots}) for slots in model.offload.slots)


def _run(path, resident: int):
    loaded = _loaded(path)
    hf, qmodel = offloaded_pair(path, resident=resident)
    ref, tokens = hf_trace(loaded, PROMPTS, STEPS)
    off, _ = hf_trace(hf, PROMPTS, STEPS)
    memory = session_trace(TorchSession(transform(loaded), batch_size=2, ctx_len=32), "pytorch", PROMPTS, tokens, 4)
    streamed = session_trace(TorchSession(qmodel, batch_size=2, ctx_len=32), "pytorch", PROMPTS, tokens, 4)
    return ref, off, memory, streamed, hf, qmodel


@pytest.mark.parametrize("name", ["llama-untied", "tiny-qwen2"])
def test_resident_layers_are_read_once_and_compute_what_from_pretrained_computes(tmp_path, name):
    ref, off, memory, streamed, hf, qmodel = _run(_checkpoint(tmp_path, name), EVERYTHING)
    assert _same(ref, off), "the offloaded HF model with resident layers differs from from_pretrained(dtype=float32)"
    assert _same(memory, streamed), "the offloaded transformed model with resident layers differs from the in-memory one"
    tensors = _layer_tensors(hf)
    # Each layer tensor was read once, by the reference; the candidate found every one kept.
    assert hf.offload.reads == tensors and qmodel.offload.reads == 0
    assert len(hf.offload.tables.layers) == tensors and qmodel.offload.tables is hf.offload.tables
    layers = hf.config.num_hidden_layers
    assert hf.offload.loads == [len(PROMPTS) * STEPS] * layers  # every forward still filled every layer
    assert all(p.device.type == "meta" for n, p in hf.named_parameters() if ".layers." in n)
    hf.offload.tables.check()  # nothing wrote into them


def test_a_budget_keeps_the_first_layers_only_and_still_computes_the_same(tmp_path):
    """A budget of about one and a half layers keeps the first layer's tensors (and what else fits
    of the second's): the rest are read on every forward, into spares."""
    path = _checkpoint(tmp_path, "llama-untied")
    hf_all, _ = offloaded_pair(path, resident=EVERYTHING)
    hf_trace(hf_all, PROMPTS[:1], 1)
    per_layer = hf_all.offload.tables.resident_bytes // hf_all.config.num_hidden_layers
    ref, off, memory, streamed, hf, qmodel = _run(path, per_layer * 3 // 2)
    assert _same(ref, off) and _same(memory, streamed)
    kept = hf.offload.tables.layers
    assert per_layer <= hf.offload.tables.resident_bytes <= per_layer * 3 // 2
    assert all(".layers.0." in n or ".layers.1." in n for n in kept)
    assert all(n in kept for slots in hf.offload.slots[:1] for n in {s.source for s in slots})
    assert hf.offload.reused > 0  # the layers not kept were read into the pages of the last one


def _neighbour(monkeypatch):
    """Seeded: a kept tensor is looked up under the next layer's name (a cache keyed wrongly)."""
    lookup = SharedTables.resident_layer

    def wrong(self, source):
        for i in range(64):
            if f".layers.{i}." in source:
                other = source.replace(f".layers.{i}.", f".layers.{i + 1}.")
                return lookup(self, other) if other in self.layers else lookup(self, source)
        return lookup(self, source)

    monkeypatch.setattr(SharedTables, "resident_layer", wrong)


def test_a_wrongly_keyed_resident_layer_breaks_bit_identity(tmp_path, monkeypatch):
    _neighbour(monkeypatch)
    ref, off, memory, streamed, _, _ = _run(_checkpoint(tmp_path, "llama-untied"), EVERYTHING)
    assert not _same(ref, off) and not _same(memory, streamed)


def test_a_write_into_a_resident_layer_fails_the_check(tmp_path):
    hf, _ = offloaded_pair(_checkpoint(tmp_path, "llama-tied"), resident=EVERYTHING)
    hf_trace(hf, PROMPTS, 2)
    tables = hf.offload.tables
    tables.check()
    name, kept = next((n, p) for n, p in tables.layers.items() if n.endswith("mlp.up_proj.weight"))
    with torch.no_grad():  # one ULP of one element: no comparison would see it
        kept.view(-1)[7] = torch.nextafter(kept.view(-1)[7], torch.tensor(1.0))
    with pytest.raises(WeightsChangedError, match="kept resident in its decoder layers") as err:
        tables.check()
    assert name in str(err.value)


def _held(kind: str):
    """A forward hook on layer 0's down projection that keeps its weight (or a view of it)."""
    held = []

    def hook(module, args, output):
        if not held:
            held.append(module.weight if kind == "parameter" else module.weight.T)

    return held, hook


def _unguarded(spares, shape):
    """Seeded: any spare of the shape is reused, whoever still holds it."""
    pool = spares.get(tuple(shape))
    return pool.pop() if pool else None


@pytest.mark.parametrize("kind", ["parameter", "view"])
@pytest.mark.parametrize("guard", ["guarded", "seeded-unguarded"])
def test_spares_are_reused_but_never_one_that_something_still_holds(tmp_path, monkeypatch, kind, guard):
    if guard == "seeded-unguarded":
        monkeypatch.setattr(qeff.offload, "_take_spare", _unguarded)
    hf, _ = offloaded_pair(_checkpoint(tmp_path, "llama-tied"))
    held, hook = _held(kind)
    hf.offload.layers[0].mlp.down_proj.register_forward_hook(hook)
    hf_trace(hf, PROMPTS, STEPS)
    assert hf.offload.reused > 0  # the dropped layers' pages were written again
    expected = hf.offload.weights.float32("model.layers.0.mlp.down_proj.weight")
    value = held[0] if kind == "parameter" else held[0].T
    if guard == "guarded":
        assert torch.equal(value, expected), "a weight a hook kept was overwritten by a later layer's fill"
    else:
        assert not torch.equal(value, expected), "the seeded unguarded reuse did not overwrite the held weight"
