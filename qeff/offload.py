"""Models that run with one decoder layer's weights in memory at a time (issue 18, item 3).

Verification compares the untouched HF model with the transformed one. Loaded with
``from_pretrained`` in float32 the two hold the whole model (a 7B: 27 GB). Here each is built
from its config with its parameters on the meta device; only what lies outside the decoder layers
(the embedding, the final norm, the output head) and the buffers are real. Every decoder layer gets
a forward pre-hook that reads its parameters from the weight files, in float32 as
``from_pretrained(dir, dtype=torch.float32)`` converts them (bf16 and fp16 widen exactly), and a
forward hook that puts the meta tensors back, so the layer's memory is freed as soon as it has run.

HF's classes and forward code are not touched: the hooks live on these instances only, and the
reference and the candidate are two separate module trees (the candidate is
:func:`qeff.transforms.transform` of a second skeleton), so a bug in one cannot show in the other.
Other hooks compose: :func:`qeff.progress.layer_progress` and :mod:`qeff.divergence`'s output
hooks are registered after these and see the layer with its weights in place.

The cost is time: each forward pass reads every layer's weights from the files again (the page
cache keeps them when it can). The peak is about one layer in float32, the tensors outside the
layers, the caches and the one tensor being read in its stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qeff.errors import NotStreamableError
from qeff.weights import SafetensorsWeights, Weights, _parameters_on_meta

__all__ = ["Offloaded", "offloaded_hf", "offloaded_transformed", "offloaded_pair", "layer_list"]


@dataclass
class _Slot:
    """One parameter of a decoder layer: where it lives and which stored tensor fills it."""

    module: nn.Module
    name: str
    source: str
    meta: nn.Parameter


@dataclass
class Offloaded:
    """The hooks of one offloaded model: which layers, how many times each was filled."""

    layers: list[nn.Module]
    slots: list[list[_Slot]]
    weights: Weights
    loads: list[int] = field(default_factory=list)  # per layer: forwards that read its weights
    resident: int = 0  # bytes of layer weights in memory now (0 between layers)
    peak_resident: int = 0
    handles: list = field(default_factory=list)

    def fill(self, i: int) -> None:
        read: dict[str, nn.Parameter] = {}  # a tensor two slots share is read once
        for slot in self.slots[i]:
            if slot.source not in read:
                read[slot.source] = nn.Parameter(self.weights.get(slot.source).to(torch.float32), requires_grad=False)
            slot.module._parameters[slot.name] = read[slot.source]
        self.loads[i] += 1
        self.resident = sum(p.numel() * 4 for p in read.values())
        self.peak_resident = max(self.peak_resident, self.resident)

    def drop(self, i: int) -> None:
        for slot in self.slots[i]:
            slot.module._parameters[slot.name] = slot.meta
        self.resident = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def layer_child(model: nn.Module, decoder: nn.Module | None = None) -> tuple[str, nn.ModuleList] | None:
    """The decoder's list of layers (``layers``, GPT-2's ``h``, MPT's ``blocks``) and its name in
    the decoder: the one ModuleList child as long as ``config.num_hidden_layers``; None if none is."""
    from qeff.transforms import get_spec

    config = model.config
    if decoder is None:
        spec = get_spec(config.model_type)
        decoder = spec.decoder(model) if spec is not None else model.base_model
    for name, child in decoder.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == config.num_hidden_layers:
            return name, child
    return None


def layer_list(model: nn.Module, decoder: nn.Module | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder's list of layers and its full name in ``model`` (``model.layers``)."""
    found = layer_child(model, decoder)
    if found is None:
        name = type(decoder if decoder is not None else model).__name__
        raise NotStreamableError(f"{name} has no list of {model.config.num_hidden_layers} layers to stream")
    child = found[1]
    return next(n for n, m in model.named_modules() if m is child), child


def _skeleton(config, weights: Weights) -> nn.Module:
    """The HF model of ``config``: parameters on meta except those outside the decoder layers, which
    are read from ``weights`` in float32; ties made as from_pretrained makes them; buffers real."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    import copy

    config = copy.deepcopy(config)  # each tree its own: transform() sets the copy's attention mode
    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    missing = {name for name, _ in model.named_parameters(remove_duplicate=False) if name not in weights}
    model.tie_weights(missing_keys=missing, recompute_mapping=True)
    model.eval()
    prefix, _ = layer_list(model)
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            group = names_of[id(p)]
            source = next((n for n in group if n in weights), None)
            if source is None or weights.shape(source) != tuple(p.shape):
                raise NotStreamableError(f"the checkpoint holds no tensor {group[0]} of shape {tuple(p.shape)}")
            if all(n.startswith(prefix + ".") for n in group):
                continue  # a layer's: stays on meta until its pre-hook
            if id(p) not in made:
                made[id(p)] = nn.Parameter(weights.get(source).to(torch.float32), requires_grad=False)
            module._parameters[pname] = made[id(p)]
    for name, buf in model.named_buffers():
        if name in weights:  # a persistent buffer saved with the weights
            module_name, _, bname = name.rpartition(".")
            model.get_submodule(module_name)._buffers[bname] = weights.get(name).to(buf.dtype)
    return model


def _attach(model: nn.Module, weights: Weights, decoder: nn.Module | None = None) -> Offloaded:
    """Fill-and-drop hooks on each decoder layer of ``model`` (which holds meta parameters there)."""
    _, layers = layer_list(model, decoder)
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    slots: list[list[_Slot]] = []
    for layer in layers:
        mine = []
        for module in layer.modules():
            for pname, p in module._parameters.items():
                if p is None or p.device.type != "meta":
                    continue
                source = next((n for n in names_of[id(p)] if n in weights), None)
                if source is None:
                    raise NotStreamableError(f"the checkpoint holds no tensor {names_of[id(p)][0]}")
                mine.append(_Slot(module, pname, source, p))
        slots.append(mine)
    off = Offloaded(list(layers), slots, weights, loads=[0] * len(layers))
    for i, layer in enumerate(layers):
        off.handles.append(layer.register_forward_pre_hook(lambda module, args, i=i: off.fill(i)))
        off.handles.append(layer.register_forward_hook(lambda module, args, output, i=i: off.drop(i)))
    return off


def _weights(source) -> Weights:
    return source if isinstance(source, Weights) else SafetensorsWeights(Path(source))


def _config(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def offloaded_hf(path: str | Path, *, config=None, weights: Weights | None = None) -> nn.Module:
    """The untouched HF model of the checkpoint at ``path``, eager attention, in eval mode, its
    decoder layers filled from the files one at a time. ``model.offload`` holds the hooks."""
    weights = weights if weights is not None else _weights(path)
    config = config if config is not None else _config(path)
    model = _skeleton(config, weights)
    model.offload = _attach(model, weights)
    return model


def offloaded_transformed(path: str | Path, *, config=None, weights: Weights | None = None):
    """:func:`qeff.transforms.transform` of a second skeleton of the same checkpoint (no module is
    shared with :func:`offloaded_hf`'s), its layers filled as they run. ``qmodel.offload``: the hooks."""
    from qeff.transforms import transform

    weights = weights if weights is not None else _weights(path)
    config = config if config is not None else _config(path)
    qmodel = transform(_skeleton(config, weights), check_weights=False)
    # The hooks go on the wrapper's own copy of the modules (transform works on a shared copy).
    qmodel.offload = _attach(qmodel.model, weights, qmodel.spec.decoder(qmodel.model))
    return qmodel


def offloaded_pair(path: str | Path):
    """``(hf_model, qmodel)``: both offloaded, one weight reader, two module trees."""
    weights = _weights(path)
    config = _config(path)
    return offloaded_hf(path, config=config, weights=weights), offloaded_transformed(path, config=config, weights=weights)
