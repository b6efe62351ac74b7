"""A GGUF file's own quantized blocks, re-encoded exactly as :class:`NBitsWeight` matrices.

HF transformers loads a GGUF model by de-quantizing every tensor to float (with the ``gguf``
package's decoders) and, for the ``llama`` architecture, undoing llama.cpp's row permutation of
the q/k projections. ``--weights native`` instead keeps the blocks: each GGUF block becomes one
MatMulNBits block (or, for K-quants, each 32- or 16-value sub-block does) with

    W = (q - zero_point) * scale + offset

chosen so that the float32 value of every weight is *the same number* the ``gguf`` decoder
computes (same products of the same float16-born factors), and the q/k rows are permuted as HF
permutes them (a row permutation moves whole blocks). ``tests/test_quant.py`` checks every type
against ``gguf.dequantize`` on synthetic blocks, ``tests/test_ort_fused_real.py`` SmolLM2's file
against the loaded model. (The fused graph's weights from a whole file:
:func:`qeff.compilers.ort_fused_weights.from_gguf`.)

=======  =========  =====  =============================  ==========  ==================
type     block      bits   scale                          zero point  offset
=======  =========  =====  =============================  ==========  ==================
Q4_0     32         4      d                              8           —
Q4_1     32         4      d                              0           m
Q5_0     32         8      d                              16          —
Q5_1     32         8      d                              0           m
Q8_0     32         8      d                              128         —
Q4_K     32 of 256  4      d · sc[j]                      0           −dmin · m[j]
Q5_K     32 of 256  8      d · sc[j]                      0           −dmin · m[j]
Q6_K     16 of 256  8      d · sc[j]                      32          —
=======  =========  =====  =============================  ==========  ==================

(5-, 6- and 8-bit codes are held in 8 bits; the graph runs them as two exact 4-bit halves.)
Float tensors (F32, F16, BF16) and other types become float32 matrices through ``gguf.dequantize``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qeff.quant.blocks import NBitsWeight

__all__ = ["decode_blocks", "tensor_weight", "NATIVE_TYPES", "permute_rows"]

_QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) bytes → (n,) float32 (float16 on disk)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32).reshape(-1)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes → (n, 32) codes: low nibbles are values 0…15, high nibbles 16…31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins → (n, 8) each."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles32(b[:, 2:18]), d[:, None], 8, None, 4, 32


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles32(b[:, 4:20]), d[:, None], 0, m[:, None], 4, 32


def _q5_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes, a little-endian uint32 → (n, 32) bits, bit i for value i."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _q5_0(b):
    d = _f16(b[:, :2])
    return _nibbles32(b[:, 6:22]) | (_q5_bits(b[:, 2:6]) << 4), d[:, None], 16, None, 8, 32


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles32(b[:, 8:24]) | (_q5_bits(b[:, 4:8]) << 4), d[:, None], 0, m[:, None], 8, 32


def _q8_0(b):
    d = _f16(b[:, :2])
    q = np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), d[:, None], 128, None, 8, 32


def _k_low(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes → (n, 8, 32): chunk c's low nibbles are sub-block 2c, its high nibbles 2c+1."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 8, 32)


def _q4_k(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    q = _k_low(b[:, 16:144])  # (n, 8, 32)
    return q, d[:, None] * sc, 0, -(dmin[:, None] * mn), 4, 32


def _q5_k(b):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    q = _k_low(b[:, 48:176]) | ((qh & 1).reshape(-1, 8, 32) << 4)
    return q, d[:, None] * sc, 0, -(dmin[:, None] * mn), 8, 32


def _q6_k(b):
    ql, qh = b[:, :128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)  # (n, 16)
    d = _f16(b[:, 208:210])
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)
    return q.reshape(-1, 16, 16), d[:, None] * sc, 32, None, 8, 16


#: type name → (decoder, bytes per block, values per block)
_DECODERS = {
    "Q4_0": (_q4_0, 18, 32), "Q4_1": (_q4_1, 20, 32), "Q5_0": (_q5_0, 22, 32), "Q5_1": (_q5_1, 24, 32),
    "Q8_0": (_q8_0, 34, 32), "Q4_K": (_q4_k, 144, _QK_K), "Q5_K": (_q5_k, 176, _QK_K), "Q6_K": (_q6_k, 210, _QK_K),
}
NATIVE_TYPES = tuple(_DECODERS)


def decode_blocks(raw: np.ndarray, type_name: str, rows: int, cols: int) -> NBitsWeight:
    """A ``(rows, cols)`` matrix's raw GGUF bytes of type ``type_name`` → its exact NBitsWeight."""
    decoder, type_size, per_block = _DECODERS[type_name]
    if cols % per_block:
        raise ValueError(f"a {type_name} row of {cols} values is not a whole number of {per_block}-value blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows * cols // per_block, type_size)
    codes, scales, zero, offsets, bits, sub = decoder(blocks)
    n_sub = cols // sub
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(rows, cols)
    scales = np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, n_sub)
    zeros = np.full((rows, n_sub), zero, np.uint8)
    if offsets is not None:
        offsets = np.ascontiguousarray(offsets, dtype=np.float32).reshape(rows, n_sub)
    return NBitsWeight(bits, sub, codes, scales, zeros, offsets, type_name)


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """HF's reverse of llama.cpp's q/k permutation, as a row index: hf[i] = gguf[perm[i]]."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(-1)


def tensor_weight(tensor, *, permute_heads: int | None = None):
    """One GGUF tensor (a ``gguf.ReaderTensor``) → NBitsWeight for native types, else float32."""
    import gguf

    type_name = tensor.tensor_type.name
    cols = int(tensor.shape[0])  # GGUF lists the fastest dim first
    rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
    if type_name in _DECODERS and len(tensor.shape) == 2:
        weight = decode_blocks(tensor.data, type_name, rows, cols)
        if permute_heads:
            perm = permute_rows(rows, permute_heads)
            weight = NBitsWeight(weight.bits, weight.block_size, weight.codes[perm], weight.scales[perm],
                                 weight.zero_points[perm], None if weight.offsets is None else weight.offsets[perm], weight.source)
        return weight
    dense = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    dense = dense.reshape(rows, cols) if len(tensor.shape) == 2 else dense.reshape(-1)
    if permute_heads:
        dense = dense[permute_rows(rows, permute_heads)]
    return np.ascontiguousarray(dense)
