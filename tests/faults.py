"""Seeded faults: one realistic bug in each kind of code the transform adds (issue 9, item 2).

Each :class:`Fault` is injected with ``monkeypatch`` into qeff's own code only — the transformed
copy, or the exported graph — never into HF's modules, so the untouched HF reference keeps
computing the right thing and every verdict must notice the difference. Each fault changes what
the graph computes (its logits or the cache it hands back); bugs that change nothing a valid token
can see are not faults (e.g. a pad writing its own values into a slot that a later valid token
overwrites before anyone reads it: ``NON_FAULT`` below, which verification must pass).

``measures`` are the failure labels (the start of each ``Comparison.failures`` entry) that must
name the fault; ``layer`` is the decoder layer the first divergence must name (None: after the
last layer, i.e. the head); ``comparison`` is the comparison that must fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

__all__ = ["Fault", "FAULTS", "NON_FAULT", "corrupt_layer_weight", "FAULT_GEOMETRY", "tiny_arch"]


@dataclass(frozen=True)
class Fault:
    id: str
    card: str  # the model card whose tiny tier every path runs (API, CLI checkpoint, plugin)
    bug: str  # the bug, as a reviewer would describe it
    inject: Callable[[pytest.MonkeyPatch], None]
    measures: tuple[str, ...]  # failure labels that must catch it
    layer: int | None  # the layer the first divergence must name; None = after the last layer
    comparison: str = "hf_vs_pytorch"
    absent: tuple[str, ...] = ()  # measures that cannot see it (shown, so the table is honest)
    geometry: str = "default"  # key of FAULT_GEOMETRY: prompts and shapes that expose it
    at: tuple[int, int] = (0, 0)  # (step, row) the first divergence must name (API geometry)
    #: PyTorch and ONNX Runtime part as well (in the plugin's export stage). The fault makes a valid
    #: token depend on a fully masked attention row (a query that sees nothing; a pad's keys and
    #: values written into a valid slot). Such a row is uniform in PyTorch, whose mask is float32's
    #: min, but weighted by the scores in the exported graph, whose mask constant the fp16 pass
    #: clips to -65504: harmless without the fault, where only pads' discarded rows are fully masked.
    ort_parts_too: bool = False
    card_edits: dict = field(default_factory=dict)  # text replacements in the card for the plugin run


#: Prompt lengths (API), the same shapes in words (CLI; the word tokenizer gives one token per
#: word, punctuation included), prompt_len, ctx_len and steps.
#: - default: 11 (or 13) and 5 tokens in chunks of 8: padding inside a chunk, and a row with no
#:   token in the second chunk;
#: - window: both rows outrun a 16-slot sliding window;
#: - wrap: 40 tokens in chunks of 32 and 48 slots: the second chunk's pad slots wrap around
#:   ctx_len onto the row's own valid slots;
#: - future: both rows have tokens in every chunk and nothing wraps: every pad slot is a future
#:   position of its row.
FAULT_GEOMETRY = {
    "default": {"lengths": (11, 5), "prompt_len": 8, "ctx_len": 32, "steps": 4,
                "text": "Once upon a time, in a land far away, there lived|The capital of France is"},
    "window": {"lengths": (21, 9), "prompt_len": 8, "ctx_len": 32, "steps": 4,
               "text": "Once upon a time, in a land far away, there lived a king and a queen with one child ."
                       "|The capital of France is the city of Paris"},
    "wrap": {"lengths": (40,), "prompt_len": 32, "ctx_len": 48, "steps": 4,
             "text": " ".join(["one two three four five six seven eight nine ten"] * 4)},
    "future": {"lengths": (11, 10), "prompt_len": 8, "ctx_len": 32, "steps": 4, "text": None},
}


def tiny_arch(card_id: str):
    """The card's tiny tier as the architecture tests build it (``tests/arch_configs.py``)."""
    from pytest_qeff.cards import default_cards_dir, load_cards
    from tests.arch_configs import card_tiny

    return card_tiny(load_cards(default_cards_dir())[card_id])


# --- injections ----------------------------------------------------------------------------------


def _replace_spec(monkeypatch: pytest.MonkeyPatch, model_type: str, **changes) -> None:
    from qeff.transforms import get_spec, registry

    monkeypatch.setitem(registry._REGISTRY, model_type, dataclasses.replace(get_spec(model_type), **changes))


def _experts_wrong_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from qeff.transforms.experts import DENSE_EXPERTS, dense_experts_forward

    def faulty(self, hidden_states, top_k_index, top_k_weights):
        # The routing weights land on the neighbouring expert (an off-by-one expert index).
        return dense_experts_forward(self, hidden_states, (top_k_index + 1) % self.num_experts, top_k_weights)

    # The interface's own __setitem__ writes an instance-local override, and monkeypatch's undo
    # writes the original back the same way: that override then outlives the test and shadows any
    # later patch of the registration (tests/test_families.py's expert faults went unexercised
    # after this module ran on the same worker). Patch the registration itself.
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, DENSE_EXPERTS, faulty)


def _mpt_wrong_head_slope(monkeypatch: pytest.MonkeyPatch) -> None:
    from qeff.transforms.mpt import QEffMptAttention

    forward = QEffMptAttention.forward

    def faulty(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        if self.layer_idx == 1:  # layer 1 reads each head's ALiBi slope from the previous head
            position_bias = position_bias.roll(1, dims=0)  # (H, 1, max_seq_len)
        return forward(self, hidden_states, position_bias, cache=cache, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(QEffMptAttention, "forward", faulty)


def _falcon_cache_per_query_head(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.falcon.modeling_falcon import FalconAttention

    from qeff.transforms.falcon import _kv_shape

    def faulty(config):
        kv, head_dim = _kv_shape(config)
        # Multi-query Falcon given one cache row per *query* head: the same logits, a cache (and a
        # graph contract) num_attention_heads times too big: 71x on Falcon-7B.
        return (config.num_attention_heads if config.multi_query else kv), head_dim

    class Widened(FalconAttention):
        """The transformed copy's attention reads the widened cache as it is: the one key/value
        head, broadcast into every row by the scatter, meets each query head once (transformers
        >= 5.25 would otherwise repeat the 71 rows 71 times; older releases never read this)."""

        def forward(self, *args, **kwargs):
            self.num_key_value_groups = 1
            return super().forward(*args, **kwargs)

    _replace_spec(monkeypatch, "falcon", kv_shape=faulty, replace={"FalconAttention": Widened})


def _gemma2_attention_cap_on_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    def faulty(model, hidden):
        logits = model.get_output_embeddings()(hidden)
        cap = model.config.attn_logit_softcapping  # the attention's cap instead of final_logit_softcapping
        return torch.tanh(logits / cap) * cap

    _replace_spec(monkeypatch, "gemma2", head=faulty)


def _granite_scaling_multiplied(monkeypatch: pytest.MonkeyPatch) -> None:
    def faulty(model, hidden):
        return model.get_output_embeddings()(hidden) * model.config.logits_scaling  # should divide

    _replace_spec(monkeypatch, "granite", head=faulty)


def _scatter_next_slot_layer1(monkeypatch: pytest.MonkeyPatch) -> None:
    from qeff.transforms.cache import RetainedStateCache

    init = RetainedStateCache.__init__

    def faulty(self, past, position_ids):
        init(self, past, position_ids)
        layer = self.layers[1]  # layer 1's valid tokens write one slot after their position
        ctx_len = past[0][0].shape[2]
        layer._slots = torch.where(layer._valid, (position_ids + 1) % ctx_len, layer._slots)

    monkeypatch.setattr(RetainedStateCache, "__init__", faulty)


def _mask_hides_own_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    import qeff.transforms.model as model_mod

    additive_mask = model_mod.additive_mask

    def faulty(position_ids, ctx_len, **kwargs):  # slot k visible when k < p: the query misses itself
        return additive_mask(position_ids - 1, ctx_len, **kwargs)

    monkeypatch.setattr(model_mod, "additive_mask", faulty)


def _mask_window_one_wider(monkeypatch: pytest.MonkeyPatch) -> None:
    import qeff.transforms.model as model_mod

    additive_mask = model_mod.additive_mask

    def faulty(position_ids, ctx_len, *, window=None, **kwargs):
        return additive_mask(position_ids, ctx_len, window=None if window is None else window + 1, **kwargs)

    monkeypatch.setattr(model_mod, "additive_mask", faulty)


def _pads_to_slot_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    import qeff.transforms.cache as cache_mod

    # The naive port of the upstream design: a pad's position -1 clamped to 0. In the first chunk
    # the pads then scatter (their gathered stale value) onto slot 0 in the same step as the row's
    # first token: the later index wins, and the first token's keys and values are lost.
    monkeypatch.setattr(cache_mod, "scatter_slots", lambda position_ids, ctx_len: position_ids.clamp(min=0))


def _pads_write_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from qeff.transforms.cache import RetainedStateLayer

    write = RetainedStateLayer._write

    def faulty(self, cache, new):  # the guard that makes a pad write back the slot's old value, gone
        valid = self._valid
        self._valid = torch.ones_like(valid)
        try:
            return write(self, cache, new)
        finally:
            self._valid = valid

    monkeypatch.setattr(RetainedStateLayer, "_write", faulty)


def corrupt_layer_weight(onnx_path: Path, layer: int = 1, scale: float = 1.05) -> str:
    """Scale the first matrix initializer that a node of ``layer`` reads, in place; its name."""
    import re

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))  # weights loaded into memory
    scope = re.compile(rf"/(?:layers|h|blocks)\.{layer}/")
    readers = {name for node in model.graph.node if scope.search(node.name) for name in node.input}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if init.name in readers and array.ndim == 2:
            init.CopyFrom(numpy_helper.from_array((array * scale).astype(array.dtype), init.name))
            break
    else:
        raise LookupError(f"no matrix of layer {layer} in {onnx_path}")
    data = onnx_path.with_name(onnx_path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(onnx_path), save_as_external_data=True, location=data.name, size_threshold=1024)
    return init.name


def _exported_weight_layer1(monkeypatch: pytest.MonkeyPatch) -> None:
    import qeff
    import qeff.exporter

    export = qeff.exporter.export
    assert qeff.export is export

    def faulty(qmodel, out_dir, *args, **kwargs):  # the exported graph's layer 1 drifts from PyTorch
        result = export(qmodel, out_dir, *args, **kwargs)
        corrupt_layer_weight(Path(result.path), layer=1)
        return result

    # qeff.export first: reading it may resolve the lazy attribute from qeff.exporter, which must
    # still hold the real function then (or undoing would "restore" the fault).
    monkeypatch.setattr(qeff, "export", faulty)
    monkeypatch.setattr(qeff.exporter, "export", faulty)


_LOGITS = ("logits MSE", "logits max-abs")

FAULTS: dict[str, Fault] = {
    f.id: f
    for f in (
        Fault("experts-off-by-one-expert", "mixtral-8x7b",
              "dense experts route each token's top-k weights to the next expert", _experts_wrong_expert,
              (*_LOGITS, "cache MSE"), 0),
        Fault("mpt-alibi-slope-of-previous-head", "mpt-7b",
              "MPT attention of layer 1 adds each head the ALiBi slope of the previous head", _mpt_wrong_head_slope,
              _LOGITS, 1, absent=("cache MSE", "cache max-abs")),
        Fault("falcon-mqa-cache-per-query-head", "falcon-7b",
              "multi-query Falcon's cache gets one row per query head (same logits, a 71x cache)",
              _falcon_cache_per_query_head, ("cache shape",), 0, absent=(*_LOGITS, "greedy token")),
        Fault("gemma2-attention-cap-on-logits", "tiny-gemma2",
              "Gemma 2's head soft-caps the logits with attn_logit_softcapping instead of final_logit_softcapping",
              _gemma2_attention_cap_on_logits, _LOGITS, None, absent=("cache MSE", "cache max-abs")),
        Fault("granite-logits-scaling-multiplied", "tiny-granite",
              "Granite's head multiplies the logits by logits_scaling instead of dividing",
              _granite_scaling_multiplied, _LOGITS, None, absent=("greedy token", "cache MSE", "cache max-abs")),
        Fault("scatter-next-slot-layer1", "llama-3-8b",
              "layer 1's cache scatter writes each token one slot after its position", _scatter_next_slot_layer1,
              (*_LOGITS, "cache MSE"), 1),
        Fault("mask-hides-own-slot", "llama-3-8b",
              "the causal mask is built from position - 1: a query no longer sees its own slot", _mask_hides_own_slot,
              _LOGITS, 0, ort_parts_too=True),
        Fault("mask-window-one-wider", "mistral-7b-instruct-v0.1",
              "the sliding-window mask keeps window + 1 slots", _mask_window_one_wider, _LOGITS, 0, geometry="window"),
        Fault("pads-to-slot-zero", "llama-3-8b",
              "pads scatter to slot 0 (position -1 clamped), colliding with the row's first token",
              _pads_to_slot_zero, (*_LOGITS, "cache MSE"), 0, at=(0, 1)),
        Fault("pads-write-their-values-empty-chunk", "llama-3-8b",
              "pads write their own keys and values: a row with no token in the second chunk pads from slot 0, "
              "over its own prompt (seen from its first decode step)",
              _pads_write_their_values, (*_LOGITS, "cache MSE"), 0, at=(1, 1), ort_parts_too=True,
              card_edits={"tiny_lengths = [24]": "tiny_lengths = [24, 8]",
                          "[prompts]": "[[cases]]\nbatch_size = 2\nprompt_len = 16\nctx_len = 64\n\n[prompts]"}),
        Fault("pads-write-their-values-wrap", "llama-3-8b",
              "pads write their own keys and values; where the pad slots wrap around ctx_len they hit valid slots",
              _pads_write_their_values, (*_LOGITS, "cache MSE"), 0, geometry="wrap", ort_parts_too=True,
              card_edits={"tiny_lengths = [24]": "tiny_lengths = [40]", "generation_len = 16": "generation_len = 4",
                          "[prompts]": "[[cases]]\nbatch_size = 1\nprompt_len = 32\nctx_len = 48\n\n[prompts]"}),
        Fault("exported-weight-layer1", "llama-3-8b",
              "the exported graph's first matrix of layer 1 is scaled by 1.05 (PyTorch is right, ONNX is not)",
              _exported_weight_layer1, _LOGITS, 1, comparison="pytorch_vs_ort"),
    )
}

#: Not a fault: without the guard, pads write their own values, but where every row has valid tokens
#: in every chunk and nothing wraps, every pad slot is a future position of its row, overwritten by
#: that position's token before any query can see it. Verification must pass: the checks flag what
#: the model computes, not any change to the code.
NON_FAULT = Fault("pads-write-future-slots", "llama-3-8b",
                  "pads write their own values into slots only later positions use", _pads_write_their_values, (), None,
                  geometry="future")
