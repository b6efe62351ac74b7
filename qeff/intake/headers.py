"""Weight-file headers, read without touching tensor data: GGUF and safetensors.

Both formats put every tensor's name, type, shape and byte range in a header at the start of the
file, so the architecture, the parameter count, the storage types and whether the file is
complete are all known from the first few kilobytes to megabytes.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count × (key string, value type u32, value)          string = u64 length + UTF-8 bytes
    tensor_count × (name string, n_dims u32, dims u64×n_dims, ggml type u32, offset u64)
    padding to general.alignment (default 32), then the tensor data; offsets count from there

safetensors: ``u64 N`` then ``N`` bytes of JSON ``{name: {dtype, shape, data_offsets: [begin,
end]}, "__metadata__": {...}}``, then the data; offsets count from the end of the header.

Why not ``gguf.GGUFReader``: it builds one NumPy view per element of every metadata array, and
the tokenizer's vocabulary is such an array; it took 4.7 s for SmolLM2's 49k-token header (and
grows with the vocabulary: Gemma 3 has 262k tokens). This reader keeps numeric arrays as one
``frombuffer`` each and only counts long string arrays, in ~0.1 s. It uses the ``gguf`` package's
own type tables (``GGUFValueType``, ``GGML_QUANT_SIZES``), so new quantization types need no change.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qeff.errors import CorruptWeightsError

__all__ = [
    "GGUFHeader",
    "GGUFTensorInfo",
    "SafetensorsHeader",
    "StringArray",
    "read_gguf_header",
    "read_safetensors_header",
]

_GGUF_MAGIC = b"GGUF"
#: String arrays longer than this are counted, not decoded (tokenizer vocabularies, merges).
_MAX_DECODED_STRINGS = 256
#: A safetensors header above this is not a header (the format's own limit is 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000


@dataclass(frozen=True)
class StringArray:
    """A long string array of GGUF metadata, counted but not decoded (e.g. the vocabulary)."""

    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    ggml_type: str  # GGMLQuantizationType name: F32, F16, BF16, Q8_0, Q4_K, ...
    offset: int  # from the start of the data section
    n_elements: int
    n_bytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars, lists of numbers/short strings, StringArray for long ones
    metadata_types: dict[str, tuple[int, ...]]  # GGUFValueType ids: (type,) or (ARRAY, element type)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    data_offset: int = 0  # where the tensor data section starts
    file_size: int = 0

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def tensor_types(self) -> dict[str, int]:
        """How many tensors are stored in each ggml type, most frequent first."""
        return dict(Counter(t.ggml_type for t in self.tensors).most_common())


class _Cursor:
    """Sequential little- (or big-) endian reads from a memory map, with bounds checked."""

    def __init__(self, buf: mmap.mmap, path: Path, endian: str = "<"):
        self.buf, self.path, self.pos, self.endian = buf, path, 0, endian

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise CorruptWeightsError(
                f"{self.path.name} is truncated or corrupt: its GGUF header runs past the end of the file "
                f"({len(self.buf)} bytes, needed {self.pos + n})"
            )
        chunk = self.buf[self.pos : self.pos + n]  # a copy: no view outlives the map
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        size = struct.calcsize(self.endian + fmt)
        return struct.unpack(self.endian + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptWeightsError(f"{self.path.name} is corrupt: a GGUF string at byte {self.pos - n} is not UTF-8") from None


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as T

    return {
        T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
        T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d",
    }


def _read_value(cur: _Cursor, vtype: int, formats: dict[int, str]) -> tuple[Any, tuple[int, ...]]:
    from gguf import GGUFValueType as T

    if vtype == T.STRING:
        return cur.string(), (vtype,)
    if vtype in formats:
        return cur.unpack(formats[vtype]), (vtype,)
    if vtype != T.ARRAY:
        raise CorruptWeightsError(f"{cur.path.name} is corrupt: unknown GGUF value type {vtype} at byte {cur.pos - 4}")
    etype = cur.unpack("I")
    count = cur.unpack("Q")
    if etype == T.STRING:
        if count > _MAX_DECODED_STRINGS:
            for _ in range(count):  # skip: only the lengths are read
                length = cur.unpack("Q")
                cur.pos += length
            if cur.pos > len(cur.buf):
                cur.take(0)
            return StringArray(count), (vtype, etype)
        return [cur.string() for _ in range(count)], (vtype, etype)
    if etype not in formats:
        raise CorruptWeightsError(f"{cur.path.name} is corrupt: GGUF array of unknown type {etype} at byte {cur.pos - 12}")
    import numpy as np

    fmt = formats[etype]
    dtype = np.dtype(cur.endian + ("?" if fmt == "?" else fmt))
    data = np.frombuffer(cur.take(count * dtype.itemsize), dtype=dtype)
    return data.tolist(), (vtype, etype)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file; the tensor data is never read. Raises
    :class:`CorruptWeightsError` (one sentence) for a file that is not GGUF, is cut short, or whose
    tensors would lie beyond its end."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise CorruptWeightsError(f"{path.name} is not a GGUF file: it holds only {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != _GGUF_MAGIC:
                raise CorruptWeightsError(f"{path.name} is not a GGUF file: it starts with {bytes(buf[:4])!r}, not b'GGUF'")
            cur = _Cursor(buf, path)
            cur.pos = 4
            version = cur.unpack("I")
            if version & 0xFFFF == 0:  # written on a big-endian machine
                cur.endian, cur.pos = ">", 4
                version = cur.unpack("I")
            if version not in (2, 3):
                raise CorruptWeightsError(f"{path.name}: GGUF version {version} is not supported (versions 2 and 3 are)")
            n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
            formats = _scalar_formats()
            metadata: dict[str, Any] = {}
            types: dict[str, tuple[int, ...]] = {}
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.unpack("I")
                metadata[key], types[key] = _read_value(cur, vtype, formats)
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("I")
                if n_dims > 8:
                    raise CorruptWeightsError(f"{path.name} is corrupt: tensor {name!r} claims {n_dims} dimensions")
                shape = tuple(cur.unpack("Q") for _ in range(n_dims))
                type_id, offset = cur.unpack("I"), cur.unpack("Q")
                try:
                    qtype = GGMLQuantizationType(type_id)
                    block, type_size = GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError):
                    raise CorruptWeightsError(
                        f"{path.name}: tensor {name!r} has ggml type {type_id}, unknown to the installed gguf package"
                    ) from None
                n = 1
                for d in shape:
                    n *= d
                infos.append(GGUFTensorInfo(name, shape, qtype.name, offset, n, n // block * type_size))
            alignment = metadata.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0:
                raise CorruptWeightsError(f"{path.name} is corrupt: general.alignment is {alignment!r}")
            data_offset = -(-cur.pos // alignment) * alignment
    header = GGUFHeader(path, version, metadata, types, infos, data_offset, size)
    end = max((t.offset + t.n_bytes for t in infos), default=0)
    if data_offset + end > size:
        raise CorruptWeightsError(
            f"{path.name} is truncated: its header places tensor data up to byte {data_offset + end}, "
            f"but the file holds {size} bytes"
        )
    return header


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, dict[str, Any]]  # name → {dtype, shape, data_offsets}
    metadata: dict[str, str]
    data_offset: int
    file_size: int

    #: bytes per element of each safetensors dtype (sub-byte and exotic types by their storage)
    ITEM_BYTES = {
        "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
        "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    }

    @property
    def n_elements(self) -> int:
        total = 0
        for info in self.tensors.values():
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
        return total

    @property
    def n_bytes(self) -> int:
        return sum(info["data_offsets"][1] - info["data_offsets"][0] for info in self.tensors.values())

    def dtypes(self) -> dict[str, int]:
        return dict(Counter(info["dtype"] for info in self.tensors.values()).most_common())


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The tensor table of a safetensors file (its first ``8 + N`` bytes only); a
    :class:`CorruptWeightsError` when the header is unreadable, inconsistent, or the file is shorter
    than the header says."""
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise CorruptWeightsError(f"{path.name} is not a safetensors file: it holds only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise CorruptWeightsError(
                f"{path.name} is corrupt: its first 8 bytes announce a {n}-byte header, but the file holds {size} bytes"
            )
        raw = f.read(n)
    try:
        table = json.loads(raw)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptWeightsError(f"{path.name} is corrupt: its safetensors header is not valid JSON ({exc})") from None
    metadata = table.pop("__metadata__", None) or {}
    end = 0
    for name, info in table.items():
        try:
            begin, stop = info["data_offsets"]
            shape, dtype = list(info["shape"]), str(info["dtype"])
            count = 1
            for d in shape:
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            raise CorruptWeightsError(f"{path.name} is corrupt: tensor {name!r} has no valid dtype/shape/data_offsets") from None
        item = SafetensorsHeader.ITEM_BYTES.get(dtype)
        if not 0 <= begin <= stop or (item is not None and stop - begin != count * item):
            raise CorruptWeightsError(
                f"{path.name} is corrupt: tensor {name!r} ({dtype} {shape}) spans bytes {begin}..{stop}, "
                f"which does not match its shape"
            )
        end = max(end, stop)
    if 8 + n + end > size:
        raise CorruptWeightsError(
            f"{path.name} is truncated: its header places tensor data up to byte {8 + n + end}, but the file holds {size} bytes"
        )
    return SafetensorsHeader(path, table, metadata, 8 + n, size)
