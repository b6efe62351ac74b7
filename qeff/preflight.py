"""Checks of a model's files before anything slow reads them, and the shape of its cache.

``preflight(source)`` reads only headers (milliseconds) and raises one sentence for what would
otherwise be a traceback deep inside a loader (issue 14):

- a ``.gguf`` that is not one (magic bytes), or is truncated (its header says where the last
  tensor ends; the file must reach it);
- a ``.safetensors`` file whose header is corrupt or whose data does not cover what the header
  declares (truncated);
- a ``config.json`` that is not JSON, names a ``model_type`` transformers does not know, or needs
  the repository's own Python code (``auto_map``), which qeff never runs.

It returns a :class:`ModelShape` (layers, KV heads, head dim, parameter bytes where known) for the
memory estimate of :func:`qeff.validation.check_memory`, or None when the files do not say.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from qeff.errors import UsageError

__all__ = ["ModelShape", "preflight", "gguf_header", "check_safetensors", "shape_from_config"]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    weight_bytes: int | None = None  # fp32 bytes of the weights once loaded, when known

    def cache_bytes(self, batch_size: int, ctx_len: int) -> int:
        """fp32 K and V of every layer: [batch_size, n_kv, ctx_len, head_dim] × 2 × layers × 4 bytes."""
        return 2 * self.num_layers * batch_size * self.num_kv_heads * ctx_len * self.head_dim * 4


# -- GGUF ---------------------------------------------------------------------------------------
# Layout (GGUF spec, v2/v3): "GGUF", u32 version, u64 tensor count, u64 metadata count; each
# metadata entry is a string key, a u32 value type and the value; then per tensor: name, u32
# n_dims, u64 dims, u32 ggml type, u64 offset (relative to the aligned start of the data).

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated
        value = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return value

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS:  # skipped, not decoded: vocabularies hold 100k+ entries
                self.pos += struct.calcsize(_SCALARS[item]) * count
                if self.pos > len(self.buf):
                    raise _Truncated
            elif item == _STRING:  # a tight loop: 100k+ strings in a vocabulary
                unpack, buf, pos, end = _U64.unpack_from, self.buf, self.pos, len(self.buf)
                for _ in range(count):
                    if pos + 8 > end:
                        raise _Truncated
                    pos += 8 + unpack(buf, pos)[0]
                if pos > end:
                    raise _Truncated
                self.pos = pos
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def gguf_header(path: Path) -> tuple[dict, int]:
    """(scalar metadata, the byte where the tensor data must end); UsageError for a file that is
    not GGUF or is truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 24:
                raise UsageError(f"{path} is not a GGUF file: it holds only {size} bytes")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if buf[:4] != b"GGUF":
            raise UsageError(f"{path} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not b'GGUF'")
        r = _Reader(buf)
        r.pos = 4
        version = r.take("<I")
        if version < 2:
            return {}, 0  # GGUF v1 (32-bit counts): too old to check here; the loader decides
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            value = r.value(r.take("<I"))
            if value is not None:
                meta[key] = value
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        end = 0
        for _ in range(n_tensors):
            r.string()
            dims = [r.take("<Q") for _ in range(r.take("<I"))]
            ggml_type, offset = r.take("<I"), r.take("<Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                return meta, 0  # a type this gguf package does not know: the size cannot be checked
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // block * type_size)
        alignment = int(meta.get("general.alignment", 32)) or 32
        data_start = (r.pos + alignment - 1) // alignment * alignment
        return meta, data_start + end
    except _Truncated:
        raise UsageError(f"{path} is truncated: its {size:,} bytes end inside the GGUF header") from None
    except (ValueError, struct.error) as exc:
        raise UsageError(f"{path} is not a valid GGUF file ({exc})") from None
    finally:
        buf.close()


def _gguf_shape(path: Path) -> ModelShape | None:
    meta, end = gguf_header(path)
    size = path.stat().st_size
    if end and size < end:
        raise UsageError(f"{path} is truncated: it holds {size:,} bytes but its tensors end at byte {end:,}")
    arch = meta.get("general.architecture")
    try:
        layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        kv = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or int(meta[f"{arch}.embedding_length"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return ModelShape(layers, kv, head_dim)


# -- safetensors --------------------------------------------------------------------------------
# Layout: u64 little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}}),
# then the data; every byte of the data must belong to a tensor.

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def check_safetensors(path: Path) -> int:
    """Check the header of a ``.safetensors`` file; return its parameter count (elements)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UsageError(f"{path} is not a safetensors file: it holds only {size} bytes")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100 * 2**20:
                raise UsageError(f"{path} is corrupt or truncated: its header claims {n:,} bytes in a {size:,}-byte file")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{path} is corrupt: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path} is corrupt: its header is not a JSON object")
    end, elements = 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path} is corrupt: tensor {name!r} has no valid data_offsets/shape") from None
        end = max(end, int(stop))
        elements += count
    if 8 + n + end != size:
        how = "truncated" if 8 + n + end > size else "longer than its header says"
        raise UsageError(f"{path} is {how}: its header describes {8 + n + end:,} bytes, the file holds {size:,}")
    return elements


# -- config.json --------------------------------------------------------------------------------


def shape_from_config(config) -> ModelShape | None:
    """The cache shape of a transformers config, through the architecture's own spec when qeff
    supports it (``UnsupportedModelError`` when it does not)."""
    from qeff.errors import UnsupportedModelError
    from qeff.transforms.registry import get_spec, supported_model_types

    import qeff.transforms  # noqa: F401  (registers the built-in architectures)

    spec = get_spec(config.model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"qeff has no transform for model_type {config.model_type!r} (supported: {', '.join(supported_model_types())})"
        )
    try:
        n_kv, head_dim = spec.kv_shape(config)
        return ModelShape(int(config.num_hidden_layers), int(n_kv), int(head_dim))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


def _config(path: Path):
    from transformers import CONFIG_MAPPING

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a model config (not a JSON object)")
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if data.get("auto_map"):
            raise UsageError(
                f"{path.parent} needs its own Python code (auto_map in config.json, model_type {model_type!r}); "
                f"qeff never runs code from a model directory"
            )
        raise UsageError(f"{path} names model_type {model_type!r}, which this transformers does not know")
    overrides = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "architectures")}
    try:
        return CONFIG_MAPPING[model_type](**overrides)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path} is not a valid {model_type} config ({str(exc).splitlines()[0]})") from None


def _local_shape(directory: Path) -> ModelShape | None:
    config = _config(directory / "config.json")
    elements = 0
    for weights in sorted(directory.glob("*.safetensors")):
        elements += check_safetensors(weights)
    shape = shape_from_config(config)
    if shape is not None and elements:
        shape = ModelShape(shape.num_layers, shape.num_kv_heads, shape.head_dim, weight_bytes=4 * elements)
    return shape


def preflight(source) -> ModelShape | None:
    """Check the files of ``source`` (a :class:`qeff.loading.ModelSource`) and return its shape."""
    if source.kind == "gguf" and source.path is not None:
        return _gguf_shape(source.path)
    if source.kind == "local" and source.path is not None:
        return _local_shape(source.path)
    if source.kind == "hub" and source.repo_id:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.repo_id, "config.json", revision=source.revision)
        if isinstance(found, str) and os.path.isfile(found):
            return shape_from_config(_config(Path(found)))
    return None
