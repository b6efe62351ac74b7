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

from qeff.errors import NotStreamableError, UsageError

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

    def float32(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in float32, as ``from_pretrained(dtype=torch.float32)`` converts it; written
        into ``out`` (a contiguous float32 tensor of its shape) when given."""
        value = self.get(name)
        if out is None:
            return value.to(torch.float32)
        return out.copy_(value)

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def stored_bytes(self) -> int:
        raise NotImplementedError


class SafetensorsWeights(Weights):
    """The ``*.safetensors`` files of a checkpoint directory. Only their headers are held
    (:func:`qeff.intake.headers.read_safetensors_header`); :meth:`get` reads one tensor's bytes in its
    stored dtype with a positioned read. Not a memory map: mapped pages count in the process's
    resident set and stay there while the map is open (a 1B model's bf16 file would be 2.5 GB of
    "RSS" by the end of an export), while read pages go to the page cache, which the kernel frees."""

    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}

    def __init__(self, directory: str | Path):
        from qeff.intake.headers import read_safetensors_header

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{str(self.directory)!r} holds no .safetensors file to stream weights from")
        self._where: dict[str, tuple] = {}  # name -> (header, info)
        for f in files:
            header = read_safetensors_header(f)
            for key, info in header.tensors.items():
                self._where.setdefault(key, (header, info))

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._where[name][1]["shape"])

    def get(self, name: str) -> torch.Tensor:
        header, info = self._where[name]
        dtype = self._DTYPES.get(info["dtype"])
        if dtype is None:
            raise NotStreamableError(f"weight {name} is stored as {info['dtype']}, which the streamed export does not read")
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(header.path, "rb") as f:
            f.seek(header.data_offset + begin)
            if f.readinto(memoryview(buf.numpy())) != end - begin:
                raise UsageError(f"{header.path.name} is truncated: tensor {name} is cut short")
        return buf.view(dtype).reshape(self.shape(name))

    #: Bytes read at a time by :meth:`float32`.
    CHUNK = 16 << 20

    def float32(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor widened to float32 as it is read, :data:`CHUNK` stored bytes at a time, so the
        stored copy is never whole beside the result (a 1B's bf16 vocabulary table is 0.5 GB).
        bf16 and fp16 widen exactly: the same values as ``get(name).to(torch.float32)``.

        ``out``: a contiguous float32 tensor of the shape to write into instead of a new one. A
        layer-streamed forward fills every layer again (qeff.offload); writing into the pages the
        previous layer used costs a fifth of the CPU time of first-touching fresh ones (measured:
        0.06 s against 0.30 s for 256 MB here, the page faults and the unmapping on free)."""
        header, info = self._where[name]
        dtype = self._DTYPES.get(info["dtype"])
        if out is not None and (tuple(out.shape) != self.shape(name) or out.dtype != torch.float32
                                or not out.is_contiguous()):
            raise ValueError(f"cannot read {name} {self.shape(name)} into a {out.dtype} tensor of shape {tuple(out.shape)}")
        if dtype not in (torch.bfloat16, torch.float16):
            return super().float32(name, out)
        out = torch.empty(self.shape(name), dtype=torch.float32) if out is None else out
        flat, item = out.view(-1), dtype.itemsize
        step = max(1, self.CHUNK // item)
        buf = torch.empty(min(step, flat.numel()) * item, dtype=torch.uint8)
        with open(header.path, "rb") as f:
            f.seek(header.data_offset + info["data_offsets"][0])
            for start in range(0, flat.numel(), step):
                count = min(step, flat.numel() - start)
                chunk = buf[: count * item]
                if f.readinto(memoryview(chunk.numpy())) != count * item:
                    raise UsageError(f"{header.path.name} is truncated: tensor {name} is cut short")
                flat[start: start + count] = chunk.view(dtype)
        return out

    def stored_bytes(self) -> int:
        return sum({h.path: h.file_size for h, _ in self._where.values()}.values())


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
        any(path.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth", "*.gguf"))


@dataclass(frozen=True)
class View:
    """A folded tensor that is a view of a source tensor: ``source.permute(perm).reshape(shape)``
    (a transpose, possibly with size-1 dims added or dropped, as ``bias[:, None, :]`` does)."""

    source: str  # the state-dict name the values come from
    perm: tuple[int, ...]
    shape: tuple[int, ...]

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.permute(self.perm).reshape(self.shape)


class Placeholders:
    """Which placeholder stands for which source tensor (by the storage it owns)."""

    def __init__(self):
        self._by_storage: dict[int, tuple[str, tuple[int, ...]]] = {}  # data_ptr -> (name, strides)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.digests: dict[str, str] = {}  # source name -> blake2b of its float32 bytes, once read

    def make(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = len(shape)
        strides = tuple(range(n, 0, -1))  # distinct: a permutation of the dims permutes them
        size = 1 + sum((d - 1) * s for d, s in zip(shape, strides))
        t = torch.full((size,), float("nan")).as_strided(shape, strides)
        self._by_storage[t.untyped_storage().data_ptr()] = (name, strides)
        self._shapes[name] = tuple(shape)
        return t

    def digest(self, name: str, weights: Weights) -> str:
        """blake2b of the float32 bytes of source ``name`` (read once, a chunk of rows at a time)."""
        if name not in self.digests:
            self.digests[name] = _fp32_digest(weights.get(name))
        return self.digests[name]

    def owns(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self._by_storage

    def __len__(self) -> int:
        return len(self._by_storage)


def view_of(placeholders: Placeholders, tensor: torch.Tensor) -> View | None:
    """The source view ``tensor`` is, or None when it shares no placeholder's storage. Raises
    ValueError when it does but is not a permutation of the source's dims (size-1 dims aside):
    a slice, a broadcast or a reshape that regroups elements."""
    found = placeholders._by_storage.get(tensor.untyped_storage().data_ptr())
    if found is None:
        return None
    name, strides = found
    source_dims = {s: i for i, s in enumerate(strides)}  # stride -> source dim (distinct by construction)
    shape = placeholders._shapes[name]
    order = [source_dims.get(st, -1) for size, st in zip(tensor.shape, tensor.stride()) if size != 1]
    wanted = sorted(i for i, d in enumerate(shape) if d != 1)
    if (tensor.storage_offset() != 0 or sorted(order) != wanted
            or any(tensor.shape[k] != shape[order[j]] for j, k in enumerate(k for k, n in enumerate(tensor.shape) if n != 1))):
        raise ValueError(f"a folded tensor of shape {tuple(tensor.shape)} is a view of {name} other than a permutation")
    perm = tuple(order) + tuple(i for i, d in enumerate(shape) if d == 1)
    return View(name, perm, tuple(tensor.shape))


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
    are kept (a tied ``lm_head.weight`` is the embedding's placeholder). Raises :class:`NotStreamableError`
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
                    raise NotStreamableError(f"the checkpoint holds no tensor {group[0]} of shape {tuple(p.shape)}")
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
            digest = h.hexdigest()
        else:
            digest = placeholders.digest(found[0], weights)
        out[name] = (tuple(tensor.shape), str(tensor.dtype), digest)
    return fingerprint_digest(out)


def _fp32_digest(source: torch.Tensor) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    rows = max(1, (16 << 20) // max(1, 4 * source[0].numel())) if source.dim() else 1
    for start in range(0, max(1, source.shape[0] if source.dim() else 1), rows):
        chunk = source[start:start + rows] if source.dim() else source
        h.update(chunk.to(torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
