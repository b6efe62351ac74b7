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
:func:`qeff.transforms.transform` of a second skeleton), so a module of one cannot show in the
other. What lies outside the layers is read once (:class:`SharedTables`) and held by both trees, as
the in-memory path shares every weight (:func:`qeff.transforms.model.shared_copy`): a 1B's tied
vocabulary table is 1 GB in float32, and a second copy was a fifth of its streamed verification's
peak. The tables are digested when read and :meth:`SharedTables.check` re-digests them after the
verification: a write into them by anything that ran (the candidate, a hook, ONNX Runtime fed
them) fails the run with :class:`~qeff.errors.WeightsChangedError`, so the reference stays the
untouched model computed from the untouched files.
Other hooks compose: :func:`qeff.progress.layer_progress` and :mod:`qeff.divergence`'s output
hooks are registered after these and see the layer with its weights in place.

The cost is time: each forward pass reads every layer's weights from the files again (the page
cache keeps them when it can). The peak is about one layer in float32, the tensors outside the
layers (once, shared), the caches and 16 MB of the tensor being read in its stored dtype (it is
widened to float32 as it is read: :meth:`qeff.weights.Weights.float32`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qeff.errors import NotStreamableError, WeightsChangedError
from qeff.weights import SafetensorsWeights, Weights, _parameters_on_meta

__all__ = ["Offloaded", "SharedTables", "offloaded_hf", "offloaded_transformed", "offloaded_pair", "layer_list"]


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
    tables: SharedTables | None = None  # the tensors outside the layers (shared by a pair's two trees)

    def fill(self, i: int) -> None:
        read: dict[str, nn.Parameter] = {}  # a tensor two slots share is read once
        for slot in self.slots[i]:
            if slot.source not in read:
                read[slot.source] = nn.Parameter(self.weights.float32(slot.source), requires_grad=False)
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


def _digest(tensor: torch.Tensor) -> str:
    """sha1 of a tensor's bytes, read in place (no copy: a 1 GB table digests in 1-3 s)."""
    flat = tensor.detach().reshape(-1)
    return hashlib.sha1(flat.view(torch.uint8).numpy(), usedforsecurity=False).hexdigest()


@dataclass
class SharedTables:
    """The tensors outside the decoder layers (the vocabulary table, the final norm, an untied
    head), read from the files once in float32 and held by every skeleton built with this object.

    ``digests`` are taken as each tensor is read, before any model runs; :meth:`check` digests them
    again and raises :class:`~qeff.errors.WeightsChangedError` naming each one that changed. The
    layer-streamed verification calls it after its comparisons, so a verdict whose reference read a
    table something had written into is never reported."""

    weights: Weights
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # source name -> the shared parameter
    digests: dict[str, str] = field(default_factory=dict)

    def get(self, source: str) -> nn.Parameter:
        """The parameter of stored tensor ``source`` in float32, read the first time it is asked for."""
        if source not in self.params:
            param = nn.Parameter(self.weights.float32(source), requires_grad=False)
            self.params[source] = param
            self.digests[source] = _digest(param)
        return self.params[source]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params.values())

    def check(self, when: str = "during verification") -> None:
        """Raise :class:`~qeff.errors.WeightsChangedError` if a shared tensor's bytes changed."""
        changed = [name for name, p in self.params.items() if _digest(p) != self.digests[name]]
        if changed:
            raise WeightsChangedError(
                f"the reference model's tensors outside its decoder layers were written {when} "
                f"({', '.join(changed[:4])}{' …' if len(changed) > 4 else ''}): the verdict would compare "
                f"against a changed reference, so it is not given")


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


def _skeleton(config, weights: Weights, tables: SharedTables | None = None) -> nn.Module:
    """The HF model of ``config``: parameters on meta except those outside the decoder layers, which
    come from ``tables`` (read from ``weights`` in float32 once, whichever skeleton asks first); ties
    made as from_pretrained makes them; buffers real."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    import copy

    config = copy.deepcopy(config)  # each tree its own: transform() sets the copy's attention mode
    tables = tables if tables is not None else SharedTables(weights)
    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    missing = {name for name, _ in model.named_parameters(remove_duplicate=False) if name not in weights}
    model.tie_weights(missing_keys=missing, recompute_mapping=True)
    model.eval()
    prefix, _ = layer_list(model)
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
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
            module._parameters[pname] = tables.get(source)  # a tie's names share one source
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


def offloaded_hf(path: str | Path, *, config=None, weights: Weights | None = None,
                 tables: SharedTables | None = None) -> nn.Module:
    """The untouched HF model of the checkpoint at ``path``, eager attention, in eval mode, its
    decoder layers filled from the files one at a time. ``model.offload`` holds the hooks,
    ``model.offload.tables`` the tensors outside the layers (``tables`` when given: shared)."""
    weights = weights if weights is not None else _weights(path)
    config = config if config is not None else _config(path)
    tables = tables if tables is not None else SharedTables(weights)
    model = _skeleton(config, weights, tables)
    model.offload = _attach(model, weights)
    model.offload.tables = tables
    return model


def offloaded_transformed(path: str | Path, *, config=None, weights: Weights | None = None,
                          tables: SharedTables | None = None):
    """:func:`qeff.transforms.transform` of a second skeleton of the same checkpoint (no module is
    shared with :func:`offloaded_hf`'s; the tensors outside the layers are when ``tables`` is the
    reference's), its layers filled as they run. ``qmodel.offload``: the hooks."""
    from qeff.transforms import transform

    weights = weights if weights is not None else _weights(path)
    config = config if config is not None else _config(path)
    tables = tables if tables is not None else SharedTables(weights)
    qmodel = transform(_skeleton(config, weights, tables), check_weights=False)
    # The hooks go on the wrapper's own copy of the modules (transform works on a shared copy).
    qmodel.offload = _attach(qmodel.model, weights, qmodel.spec.decoder(qmodel.model))
    qmodel.offload.tables = tables
    return qmodel


def offloaded_pair(path: str | Path, *, share_tables: bool = True):
    """``(hf_model, qmodel)``: both offloaded, one weight reader, two module trees, and one copy of
    the tensors outside the layers (``hf_model.offload.tables``; ``share_tables=False``: a copy each,
    as before the tables were shared — kept for the memory test that shows the difference)."""
    weights = _weights(path)
    config = _config(path)
    hf = offloaded_hf(path, config=config, weights=weights)
    tables = hf.offload.tables if share_tables else None
    return hf, offloaded_transformed(path, config=config, weights=weights, tables=tables)
