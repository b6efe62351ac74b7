"""Block-quantized weight matrices in the layout of ONNX Runtime's ``MatMulNBits``.

A linear layer's weight ``W`` is ``(N, K)`` (out features, in features — torch's ``Linear``
layout). It is cut into blocks of ``block_size`` consecutive values along ``K``; block ``j`` of
row ``n`` holds unsigned codes ``q`` and has one ``scale``, one integer ``zero_point`` and an
optional float ``offset``:

    W[n, k] = (q[n, k] - zero_point[n, j]) * scale[n, j] + offset[n, j]        j = k // block_size

``MatMulNBits`` computes the first term (its float zero points could hold the offset, but ONNX
Runtime's CPU kernel takes a slow path for them — ~14x slower than its fp32 MatMul here); the offset term is
``blocksum(A) @ offset.T``, one small extra MatMul. That makes formats with a per-block minimum
(GGUF's Q4_1, Q4_K, Q5_K) *exact*: every ``W[n, k]`` is the number the file's decoder computes.

A matrix that has offsets anyway is lowered with MatMulNBits's *default* zero point
(``2**(bits-1)``, no zero-point input) when that is exact (:meth:`NBitsWeight.recentred`):
``(q - z) s + o = (q - 8) s + (o + (8 - z) s)``. ONNX Runtime's kernel without a zero-point
input is the faster of the two (docs/cpu.md, "Exact native weights: what was tried").

ONNX Runtime's fp32-accurate CPU kernel is fast for 4-bit codes only (8-bit codes take a slow
path unless activations are quantized — ~12x slower than fp32 here), so an 8-bit matrix runs as
two 4-bit halves — ``q = 16 * hi + lo`` — whose sum is the same matrix, exactly
(see :meth:`NBitsWeight.nibbles`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["NBitsWeight", "rtn_quantize", "pack_codes"]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``(..., n)`` uint8 codes → ``(..., n * bits / 8)`` bytes, first value in the low bits."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    if bits == 4:
        if codes.shape[-1] % 2:
            codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    raise ValueError(f"unsupported bit width {bits}")


@dataclass
class NBitsWeight:
    """An ``(N, K)`` matrix in MatMulNBits blocks (see the module docstring for the formula)."""

    bits: int
    block_size: int
    codes: np.ndarray  # (N, K) uint8, each < 2**bits
    scales: np.ndarray  # (N, K // block_size) float32
    zero_points: np.ndarray  # (N, K // block_size) uint8
    offsets: np.ndarray | None = None  # (N, K // block_size) float32, or None for 0
    #: Where the numbers came from (a GGUF type name, "rtn-int4", …), for manifests and errors.
    source: str = field(default="")

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if k % self.block_size:
            raise ValueError(f"K={k} is not a multiple of the block size {self.block_size}")
        kb = k // self.block_size
        for name in ("scales", "zero_points") + (("offsets",) if self.offsets is not None else ()):
            if getattr(self, name).shape != (n, kb):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {(n, kb)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[1] // self.block_size

    def dequantize(self) -> np.ndarray:
        """The float32 ``(N, K)`` matrix these blocks represent (the reference the graph must match)."""
        n, k = self.shape
        q = self.codes.reshape(n, self.n_blocks, self.block_size).astype(np.float32)
        w = (q - self.zero_points[..., None].astype(np.float32)) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    def packed(self) -> np.ndarray:
        """``B`` of MatMulNBits: ``(N, K // block_size, block_size * bits / 8)`` uint8."""
        n = self.shape[0]
        return pack_codes(self.codes.reshape(n, self.n_blocks, self.block_size), self.bits)

    def packed_zero_points(self) -> np.ndarray:
        """``zero_points`` of MatMulNBits: ``(N, ceil(n_blocks * bits / 8))`` uint8."""
        return pack_codes(self.zero_points, self.bits)

    def nibbles(self) -> tuple[NBitsWeight, NBitsWeight]:
        """An 8-bit matrix as two 4-bit ones whose sum is exactly the same matrix.

        With ``q = 16 hi + lo`` and ``z = 16 zh + zl``: ``(q - z) s = (hi - zh)(16 s) + (lo - zl) s``,
        an identity of integers times ``s``; ``16 s`` is exact (a power of two), and so is every
        product for a float16-born ``s`` (a handful of significant bits times a 4-bit integer).
        The offsets, if any, ride on the high half unchanged.
        """
        if self.bits != 8:
            raise ValueError("nibbles() splits 8-bit matrices")
        high = NBitsWeight(4, self.block_size, self.codes >> 4, (self.scales * np.float32(16)).astype(np.float32),
                           self.zero_points >> 4, self.offsets, self.source)
        low = NBitsWeight(4, self.block_size, self.codes & 15, self.scales, self.zero_points & 15, None, self.source)
        return high, low

    def recentred(self) -> NBitsWeight | None:
        """The same matrix with every zero point at MatMulNBits's default ``c = 2**(bits-1)`` and the
        difference moved into the offsets: ``(q - z) s + o = (q - c) s + (o + (c - z) s)``.

        Returned only when every new offset is *exactly* ``o + (c - z) s`` in float32 (checked in
        float64, where the product is exact and the sum's rounding error is measured), so each
        weight stays the same real number; None otherwise (the caller keeps the zero points). For
        GGUF's float16-born ``d`` and ``m`` (Q4_1: ``m + 8 d``) the sum is exact in practice."""
        centre = 2 ** (self.bits - 1)
        if (self.zero_points == centre).all():
            return self
        shift = (centre - self.zero_points.astype(np.float64)) * self.scales.astype(np.float64)  # exact: <= 8 x 24 bits
        old = np.zeros(self.scales.shape) if self.offsets is None else self.offsets.astype(np.float64)
        total = old + shift
        back = total - old
        rounding = (old - (total - back)) + (shift - back)  # TwoSum: total + rounding == old + shift exactly
        new = total.astype(np.float32)
        if np.any(rounding != 0) or not np.array_equal(new.astype(np.float64), total):
            return None
        return NBitsWeight(self.bits, self.block_size, self.codes, self.scales, np.full_like(self.zero_points, centre), new,
                           self.source)

    @staticmethod
    def concat(parts: list[NBitsWeight]) -> NBitsWeight:
        """Stack along N (e.g. q, k, v into one packed projection); all parts share bits and blocks."""
        first = parts[0]
        if any(p.bits != first.bits or p.block_size != first.block_size for p in parts):
            raise ValueError("cannot concatenate matrices of different bit widths or block sizes")
        offsets = None
        if any(p.offsets is not None for p in parts):
            offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])
        return NBitsWeight(
            first.bits, first.block_size,
            np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
            np.concatenate([p.zero_points for p in parts]), offsets,
            "+".join(sorted({p.source for p in parts})),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form (codes, scales, zero points, offsets)."""
        n, k = self.shape
        total = n * k * self.bits // 8 + self.scales.nbytes + self.packed_zero_points().nbytes
        return total + (self.offsets.nbytes if self.offsets is not None else 0)


def rtn_quantize(w: np.ndarray, bits: int, block_size: int = 32, *, symmetric: bool = False) -> NBitsWeight:
    """Round-to-nearest blockwise quantization of a float ``(N, K)`` matrix.

    Asymmetric (default): each block's [min, max] maps onto ``0 … 2**bits - 1`` with an integer
    zero point; symmetric: ``max |w|`` maps onto the code range around ``2**(bits-1)``.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of the block size {block_size}")
    levels = 2**bits - 1
    blocks = w.reshape(n, k // block_size, block_size)
    if symmetric:
        half = 2 ** (bits - 1)
        amax = np.abs(blocks).max(-1)
        scales = np.where(amax > 0, amax / (half - 1 if bits > 1 else 1), 1.0).astype(np.float32)
        zero = np.full(scales.shape, half, np.uint8)
    else:
        lo = np.minimum(blocks.min(-1), 0.0)
        hi = np.maximum(blocks.max(-1), 0.0)
        scales = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-lo / scales), 0, levels).astype(np.uint8)
    codes = np.clip(np.rint(blocks / scales[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
    return NBitsWeight(bits, block_size, codes.reshape(n, k), scales, zero, None, f"rtn-int{bits}")
