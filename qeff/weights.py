"""Weights that stay where they are: read one tensor at a time, and a model that holds none.

The streamed export (issue 18) never holds a float32 copy of the model. Two pieces make that:

- a :class:`Weights` source answers ``name → tensor`` one tensor at a time. For a directory of
  safetensors (:class:`SafetensorsWeights`) each file is memory-mapped and a tensor is read in its
  stored dtype (bf16/fp16) only when asked; :class:`ModuleWeights` serves a model already in memory.
- :func:`skeleton` builds the Hugging Face module tree with the real weights' shapes but no weight
  memory: every parameter of two or more dims is a *placeholder*, a NaN-filled tensor whose strides
  overlap (``(n, n-1, …, 1)``: a (128256, 2048) embedding needs 1 MB of storage, not 1 GB). Small
  parameters (norms, biases) and buffers are the real values.

Why the placeholder's strides are distinct and its values NaN: TorchScript's constant folding
transposes weights (``x @ W.T`` is stored as the folded ``W.T``); a folded tensor that shares a
placeholder's storage tells, from its strides, which permutation of which source tensor it is
(:func:`view_of`). A fold that *computed* from a placeholder instead of viewing it would carry NaN,
which the exporter refuses rather than write a wrong tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qeff.errors import UsageError

__all__ = ["Weights", "SafetensorsWeights", "ModuleWeights", "Placeholders", "View", "skeleton", "view_of",
           "safetensors_dir"]


class Weights:
    """A read-only source of named tensors, read one at a time."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype); the caller converts and drops it."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def stored_bytes(self) -> int:
        raise NotImplementedError


class SafetensorsWeights(Weights):
    """The ``*.safetensors`` files of a checkpoint directory, memory-mapped (safetensors' own
    ``safe_open``); a tensor is copied out of the map only by :meth:`get`."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{str(self.directory)!r} holds no .safetensors file to stream weights from")
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._where: dict[str, Path] = {}
        for f, handle in self._handles.items():
            for key in handle.keys():
                self._where.setdefault(key, f)

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def stored_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._handles)


class ModuleWeights(Weights):
    """The state dict of a model already in memory (a model object handed to the pipeline)."""

    def __init__(self, model: nn.Module):
        # A tied tensor once, under its first name, as save_pretrained writes it.
        self._tensors, seen = {}, set()
        for name, tensor in model.state_dict(keep_vars=False).items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                self._tensors[name] = tensor

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def stored_bytes(self) -> int:
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._tensors.values()}
        return sum(seen.values())


def safetensors_dir(path: Path | None) -> bool:
    """True when ``path`` is a checkpoint directory whose weights are all safetensors."""
    return path is not None and path.is_dir() and any(path.glob("*.safetensors")) and not any(
        path.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth", "*.gguf"))


@dataclass(frozen=True)
class View:
    """A folded tensor that is a permutation of a source tensor: ``source.permute(perm)``."""

    source: str  # the state-dict name the values come from
    perm: tuple[int, ...]


class Placeholders:
    """Which placeholder stands for which source tensor (by the storage it owns)."""

    def __init__(self):
        self._by_storage: dict[int, tuple[str, tuple[int, ...]]] = {}  # data_ptr -> (name, strides)

    def make(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = len(shape)
        strides = tuple(range(n, 0, -1))  # distinct: a permutation of the dims permutes them
        size = 1 + sum((d - 1) * s for d, s in zip(shape, strides))
        t = torch.full((size,), float("nan")).as_strided(shape, strides)
        self._by_storage[t.untyped_storage().data_ptr()] = (name, strides)
        return t

    def owns(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self._by_storage

    def __len__(self) -> int:
        return len(self._by_storage)


def view_of(placeholders: Placeholders, tensor: torch.Tensor) -> View | None:
    """The source view ``tensor`` is, or None when it shares no placeholder's storage. Raises
    ValueError when it does but is not a plain permutation (a slice, a reshape of a placeholder)."""
    found = placeholders._by_storage.get(tensor.untyped_storage().data_ptr())
    if found is None:
        return None
    name, strides = found
    perm = tuple(strides.index(s) if s in strides else -1 for s in tensor.stride())
    if tensor.storage_offset() != 0 or sorted(perm) != list(range(len(strides))):
        raise ValueError(f"a folded tensor of shape {tuple(tensor.shape)} is a view of {name} other than a permutation")
    return View(name, perm)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (buffers stay real: rotary
    frequencies are computed in ``__init__`` and are not in the checkpoint)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(config, weights: Weights) -> tuple[nn.Module, Placeholders]:
    """An HF causal LM of ``config`` whose 2+-dim parameters are placeholders (see the module doc)
    and whose other parameters and persistent buffers are read from ``weights`` as float32. Ties
    are kept (a tied ``lm_head.weight`` is the embedding's placeholder). Raises :class:`UsageError`
    when a parameter has no tensor of its shape in ``weights`` (a checkpoint whose names
    transformers converts on load: it takes the in-memory path)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    # Tie as from_pretrained does (no_init_weights skipped it): symmetric on what the files hold.
    missing = {name for name, _ in model.named_parameters(remove_duplicate=False) if name not in weights}
    model.tie_weights(missing_keys=missing, recompute_mapping=True)
    model.eval()
    placeholders = Placeholders()
    made: dict[int, nn.Parameter] = {}
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                group = names_of[id(p)]
                source = next((n for n in group if n in weights), None)
                if source is None or weights.shape(source) != tuple(p.shape):
                    raise UsageError(f"the checkpoint holds no tensor {group[0]} of shape {tuple(p.shape)}")
                value = placeholders.make(source, tuple(p.shape)) if p.dim() >= 2 else weights.get(source).to(torch.float32)
                made[id(p)] = nn.Parameter(value, requires_grad=False)
            module._parameters[pname] = made[id(p)]
    for name, buf in model.named_buffers():
        if name in weights:  # a persistent buffer saved with the weights
            module_name, _, bname = name.rpartition(".")
            model.get_submodule(module_name)._buffers[bname] = weights.get(name).to(buf.dtype)
    return model, placeholders


def fingerprint(model: nn.Module, weights: Weights, placeholders: Placeholders) -> str:
    """:func:`qeff.transforms.model.fingerprint_digest` of ``model``'s float32 weights as a loaded
    model would hold them, read from ``weights`` one tensor at a time (the export manifest's
    ``weights_digest``, equal to the in-memory path's)."""
    import hashlib

    from qeff.transforms.model import fingerprint_digest

    out = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        h = hashlib.blake2b(digest_size=16)
        found = placeholders._by_storage.get(tensor.untyped_storage().data_ptr())
        if found is None:
            h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            source = weights.get(found[0])
            rows = max(1, (64 << 20) // max(1, 4 * source[0].numel()))
            for start in range(0, source.shape[0], rows):
                h.update(source[start:start + rows].to(torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy())
            del source
        out[name] = (tuple(tensor.shape), str(tensor.dtype), h.hexdigest())
    return fingerprint_digest(out)
