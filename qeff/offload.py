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
widened to float32 as it is read: :meth:`qeff.weights.Weights.float32`). Two things make that cost
small (docs/memory.md, "Cost"): a dropped layer's float32 tensors are the next layer's buffers
(*spares*: first-touching fresh pages and unmapping them was most of the extra CPU time), and a
budget of layer tensors may stay resident between forwards (``resident``, shared by a pair's two
trees and checked like the tables), so a model whose layers all fit reads each one once.
"""

from __future__ import annotations

import hashlib
import sys
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

    reads: int = 0  # layer tensors read from the files (a resident one is read once)
    reused: int = 0  # of those, read into the pages of a dropped layer's tensor (:func:`_take_spare`)

    def fill(self, i: int) -> None:
        read: dict[str, nn.Parameter] = {}  # a tensor two slots share is read once
        spares = self.tables.spares if self.tables is not None else {}
        for slot in self.slots[i]:
            if slot.source not in read:
                kept = self.tables.resident_layer(slot.source) if self.tables is not None else None
                if kept is None:
                    kept = _take_spare(spares, self.weights.shape(slot.source))
                    if kept is None:
                        kept = nn.Parameter(self.weights.float32(slot.source), requires_grad=False)
                    else:
                        self.weights.float32(slot.source, out=kept)
                        self.reused += 1
                    self.reads += 1
                    if self.tables is not None:
                        self.tables.keep(slot.source, kept)
                read[slot.source] = kept
            slot.module._parameters[slot.name] = read[slot.source]
        spares.clear()  # what this layer did not reuse is freed: one layer's tensors at most
        self.loads[i] += 1
        self.resident = sum(p.numel() * 4 for p in read.values())
        self.peak_resident = max(self.peak_resident, self.resident)

    def drop(self, i: int) -> None:
        """Put the meta tensors back. The float32 tensors read for this forward (not those kept
        resident) become the next layer's spares: the next fill writes into their pages."""
        spares = self.tables.spares if self.tables is not None else None
        seen: set[int] = set()
        for slot in self.slots[i]:
            param = slot.module._parameters[slot.name]
            slot.module._parameters[slot.name] = slot.meta
            if (spares is not None and param is not None and param is not slot.meta and id(param) not in seen
                    and self.tables.resident_layer(slot.source) is not param):
                seen.add(id(param))
                spares.setdefault(tuple(param.shape), []).append(param)
        self.resident = 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _take_spare(spares: dict[tuple[int, ...], list[nn.Parameter]], shape: tuple[int, ...]) -> nn.Parameter | None:
    """A dropped layer tensor of ``shape`` that nothing but the spares refers to, or None.

    Writing into a tensor something still holds would change what it holds (a hook that kept a
    weight, a view of it): a spare is reused only when no Python name refers to the parameter
    and no other tensor shares its storage; otherwise it is left to be freed and a new tensor is
    read. Without PyTorch's use count (a private call), nothing is reused."""
    pool = spares.get(tuple(shape))
    while pool:
        param = pool.pop()
        # The references: ``param`` here and getrefcount's argument; the storage's: the parameter
        # and the temporary storage object asked for it.
        if (_storage_use_count is not None and sys.getrefcount(param) == 2
                and _storage_use_count(param.untyped_storage()._cdata) == 2):
            return param
        del param
    return None


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
    #: bytes of decoder-layer tensors (float32) that may stay resident between forwards (0: every
    #: forward reads its layers again). Filled in the order read until one does not fit (then no
    #: later one is kept: the first layers), never evicted: the layers
    #: run in the same order every forward, and an LRU of fewer bytes than the layers would evict
    #: each one just before it is needed again (no hit at all); keeping the first ones saves a
    #: read per kept layer per forward. Both trees of a pair read the same sources, so the
    #: candidate finds what the reference kept.
    resident: int = 0
    layers: dict[str, nn.Parameter] = field(default_factory=dict)  # kept layer tensors, by source name
    layer_digests: dict[str, str] = field(default_factory=dict)
    #: dropped layer tensors by shape, which the next layer's fill writes into (Offloaded.drop)
    spares: dict[tuple[int, ...], list[nn.Parameter]] = field(default_factory=dict)
    full: bool = False  # a layer tensor did not fit: nothing more is kept

    def release_spares(self) -> None:
        """Free the dropped layer's tensors kept for the next fill (before other work needs the memory)."""
        self.spares.clear()

    def get(self, source: str) -> nn.Parameter:
        """The parameter of stored tensor ``source`` in float32, read the first time it is asked for."""
        if source not in self.params:
            param = nn.Parameter(self.weights.float32(source), requires_grad=False)
            self.params[source] = param
            self.digests[source] = _digest(param)
        return self.params[source]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors outside the layers (the kept layer tensors: :attr:`resident_bytes`)."""
        return sum(p.numel() * p.element_size() for p in self.params.values())

    @property
    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.layers.values())

    def resident_layer(self, source: str) -> nn.Parameter | None:
        """The kept float32 tensor of layer tensor ``source``, or None (then the caller reads it)."""
        return self.layers.get(source)

    def keep(self, source: str, param: nn.Parameter) -> bool:
        """Keep a layer tensor just read while :attr:`resident` has room for it; digested now, so
        :meth:`check` fails a run in which something wrote into a tensor later forwards reused."""
        size = param.numel() * param.element_size()
        if self.full or source in self.layers:
            return False
        if self.resident_bytes + size > self.resident:
            self.full = True  # what is kept is a prefix of the first forward's reads: the first layers
            return False
        self.layers[source] = param
        self.layer_digests[source] = _digest(param)
        return True

    def check(self, when: str = "during verification") -> None:
        """Raise :class:`~qeff.errors.WeightsChangedError` if a shared tensor's bytes changed (the
        tensors outside the layers, and the layer tensors kept resident)."""
        changed = [name for name, p in self.params.items() if _digest(p) != self.digests[name]]
        kept = [name for name, p in self.layers.items() if _digest(p) != self.layer_digests[name]]
        if changed or kept:
            where = ("outside its decoder layers" if not kept else "kept resident in its decoder layers" if not changed
                     else "outside and inside its decoder layers")
            names = changed + kept
            raise WeightsChangedError(
                f"the reference model's tensors {where} were written {when} "
                f"({', '.join(names[:4])}{' …' if len(names) > 4 else ''}): the verdict would compare "
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
                 tables: SharedTables | None = None, resident: int = 0) -> nn.Module:
    """The untouched HF model of the checkpoint at ``path``, eager attention, in eval mode, its
    decoder layers filled from the files one at a time. ``model.offload`` holds the hooks,
    ``model.offload.tables`` the tensors outside the layers (``tables`` when given: shared) and
    up to ``resident`` bytes of layer tensors kept between forwards (:attr:`SharedTables.resident`)."""
    weights = weights if weights is not None else _weights(path)
    config = config if config is not None else _config(path)
    tables = tables if tables is not None else SharedTables(weights, resident=resident)
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


def offloaded_pair(path: str | Path, *, share_tables: bool = True, resident: int = 0):
    """``(hf_model, qmodel)``: both offloaded, one weight reader, two module trees, and one copy of
    the tensors outside the layers (``hf_model.offload.tables``; ``share_tables=False``: a copy each,
    as before the tables were shared — kept for the memory test that shows the difference).
    ``resident``: bytes of float32 layer tensors kept between forwards, shared by the two trees
    (:attr:`SharedTables.resident`; :func:`qeff.memory.choose_verification` sizes it)."""
    weights = _weights(path)
    config = _config(path)
    hf = offloaded_hf(path, config=config, weights=weights, resident=resident)
    tables = hf.offload.tables if share_tables else None
    return hf, offloaded_transformed(path, config=config, weights=weights, tables=tables)
