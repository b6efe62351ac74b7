"""OCP Microscaling (MX v1.0) encode/decode in NumPy: MXFP6 (E2M3, E3M2) and MXINT8.

An MX block is ``k = 32`` consecutive values along one axis sharing one scale ``X = 2**s``
stored as an E8M0 byte (``s + 127``; ``0xFF`` is NaN). Each element is stored in the element
format ``P_i``; the value is ``X * P_i``. Conversion from float32 follows the spec's algorithm:

    s   = floor(log2(max_i |V_i|)) - emax_elem        # clamped below at -127 (E8M0's smallest)
    P_i = quantize_to_element(V_i / 2**s)               # round to nearest, ties to even; values
                                                        # past the largest normal saturate to it

Special cases (the elements of MXFP6/MXINT8 have no Inf or NaN encodings):

- a block holding NaN or ±Inf gets the NaN scale, so every value of the block decodes to NaN;
- an all-zero block gets the smallest scale (``s = -127``) and zero elements.

Element formats (``max_normal`` is what saturation clamps to):

    fp6_e2m3  1 sign, 2 exponent (bias 1), 3 mantissa bits  emax 2  max 7.5   min normal 1.0   subnormal step 0.125
    fp6_e3m2  1 sign, 3 exponent (bias 3), 2 mantissa bits  emax 4  max 28.0  min normal 0.25  subnormal step 0.0625
    int8      two's complement times 2**-6                   emax 0  max 127/64 (symmetric: -2.0, code 0x80, is never produced)

A partial last block (an axis length that is not a multiple of 32) is quantized as if padded with
zeros, which changes neither its maximum nor its elements.

The arithmetic runs in float64 on values that are float32 to begin with: ``V / 2**s`` and the
element grid are then exact, so the only rounding is the one the spec asks for. ``np.frexp``
gives exact binary exponents (``log2`` in floating point can be off by one next to a power of two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BLOCK",
    "ElementFormat",
    "FP6_E2M3",
    "FP6_E3M2",
    "INT8",
    "FORMATS",
    "MXArray",
    "quantize",
    "dequantize",
    "fake_quantize",
    "element_values",
    "round_fp16",
    "fp16_exact",
]

#: Elements per block (the MX v1.0 block size for every concrete format).
BLOCK = 32
#: E8M0: exponent bias and the NaN encoding.
SCALE_BIAS = 127
SCALE_NAN = 0xFF
SCALE_MIN_EXP = -127
SCALE_MAX_EXP = 127


@dataclass(frozen=True)
class ElementFormat:
    """One MX element format. ``kind`` is ``"float"`` (sign/exponent/mantissa) or ``"int"``."""

    name: str
    kind: str
    ebits: int
    mbits: int  # float: explicit mantissa bits; int: fractional bits of the fixed point
    bias: int
    emax: int  # exponent of the largest normal (what the shared scale is aligned to)
    max_normal: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits if self.kind == "float" else self.mbits + 2

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (floats); below it values are subnormal, step ``2**(emin - mbits)``."""
        return 1 - self.bias


FP6_E2M3 = ElementFormat("fp6_e2m3", "float", ebits=2, mbits=3, bias=1, emax=2, max_normal=7.5)
FP6_E3M2 = ElementFormat("fp6_e3m2", "float", ebits=3, mbits=2, bias=3, emax=4, max_normal=28.0)
INT8 = ElementFormat("int8", "int", ebits=0, mbits=6, bias=0, emax=0, max_normal=127 / 64)
FORMATS = {f.name: f for f in (FP6_E2M3, FP6_E3M2, INT8)}


@dataclass
class MXArray:
    """An MX-encoded array: ``codes`` (uint8, the element bit patterns; int8 as two's complement
    bytes) with the original shape, ``scales`` (uint8 E8M0, one per block) with the blocked axis
    last and of length ``ceil(n / 32)``."""

    fmt: ElementFormat
    axis: int
    shape: tuple[int, ...]
    codes: np.ndarray
    scales: np.ndarray


def _frexp_exponent(a: np.ndarray) -> np.ndarray:
    """floor(log2(a)) for finite a > 0, exactly (float64 a)."""
    _, e = np.frexp(a)
    return e.astype(np.int64) - 1


def _rne(a: np.ndarray) -> np.ndarray:
    """Round to nearest integer, ties to even (IEEE roundTiesToEven; ``np.rint`` does exactly this)."""
    return np.rint(a)


def _shared_exponent(amax: np.ndarray, fmt: ElementFormat) -> np.ndarray:
    """Per-block scale exponent (int64); amax must be finite and > 0 where it matters."""
    safe = np.where(amax > 0, amax, 1.0)
    s = np.where(amax > 0, _frexp_exponent(safe) - fmt.emax, SCALE_MIN_EXP)  # an all-zero block: any scale works
    return np.clip(s, SCALE_MIN_EXP, SCALE_MAX_EXP)


def _quantize_elements(y: np.ndarray, fmt: ElementFormat) -> np.ndarray:
    """Scaled values y (float64, finite) → the nearest element value (float64), saturated."""
    if fmt.kind == "int":
        step = 2.0 ** -fmt.mbits
        return np.clip(_rne(y / step), -127, 127) * step
    mag = np.abs(y)
    e = np.maximum(_frexp_exponent(np.where(mag > 0, mag, 1.0)), fmt.emin)
    quantum = np.ldexp(1.0, (e - fmt.mbits).astype(np.int32))
    q = _rne(mag / quantum) * quantum  # may round up into the next binade: still on the grid
    return np.copysign(np.minimum(q, fmt.max_normal), y)


def _blocks(x: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, int]:
    """Move ``axis`` last, zero-pad it to a multiple of ``block``: (..., nblocks, block) float64."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = moved.shape[-1]
    pad = (-n) % block
    if pad:
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,))], axis=-1)
    return moved.reshape(moved.shape[:-1] + (-1, block)), n


def _quantize_values(x: np.ndarray, fmt: ElementFormat, axis: int, block: int):
    """→ (dequantized values float64 in the blocked layout, scale exponents, NaN-block mask, n)."""
    b, n = _blocks(x, axis, block)
    amax = np.max(np.abs(b), axis=-1, keepdims=True)  # NaN propagates
    bad = ~np.isfinite(amax)  # a NaN or Inf anywhere in the block
    s = _shared_exponent(np.where(bad, 1.0, amax), fmt)
    y = np.where(bad, 0.0, b) / np.ldexp(1.0, s.astype(np.int32))  # exact: a power of two
    q = _quantize_elements(y, fmt)
    return q, s, bad, n


def fake_quantize(x: np.ndarray, fmt: ElementFormat, *, axis: int = -1, block: int = BLOCK) -> np.ndarray:
    """Quantize to MX and decode again, in one pass (what the emulated graphs hold): same shape
    and dtype as ``x``. Blocks of ``block`` along ``axis``."""
    x = np.asarray(x)
    q, s, bad, n = _quantize_values(x, fmt, axis, block)
    values = np.where(bad, np.nan, q * np.ldexp(1.0, s.astype(np.int32)))
    values = values.reshape(values.shape[:-2] + (-1,))[..., :n]
    return np.moveaxis(values, -1, axis).astype(x.dtype if x.dtype.kind == "f" else np.float32)


def element_values(fmt: ElementFormat) -> np.ndarray:
    """The value of every element code, indexed by code (64 for FP6, 256 for INT8; float64)."""
    if fmt.kind == "int":
        codes = np.arange(256)
        return np.where(codes < 128, codes, codes - 256) * 2.0 ** -fmt.mbits
    codes = np.arange(1 << fmt.bits)
    sign = np.where(codes >> (fmt.bits - 1), -1.0, 1.0)
    exp_field = (codes >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    man_field = codes & ((1 << fmt.mbits) - 1)
    normal = np.ldexp(1.0 + man_field / (1 << fmt.mbits), exp_field - fmt.bias)
    subnormal = np.ldexp(man_field / (1 << fmt.mbits), fmt.emin)
    return sign * np.where(exp_field > 0, normal, subnormal)


def _encode_elements(q: np.ndarray, fmt: ElementFormat) -> np.ndarray:
    """Element values on the grid → their codes (uint8)."""
    if fmt.kind == "int":
        return np.rint(q * (1 << fmt.mbits)).astype(np.int64).astype(np.uint8)  # two's complement byte
    mag = np.abs(q)
    e = np.maximum(_frexp_exponent(np.where(mag > 0, mag, 1.0)), fmt.emin)
    subnormal = mag < 2.0 ** fmt.emin
    exp_field = np.where(subnormal, 0, e + fmt.bias)
    frac = np.where(subnormal, mag / 2.0 ** fmt.emin, mag / np.ldexp(1.0, e.astype(np.int32)) - 1.0)
    man_field = np.rint(frac * (1 << fmt.mbits)).astype(np.int64)
    sign = np.signbit(q).astype(np.int64)
    return ((sign << (fmt.bits - 1)) | (exp_field.astype(np.int64) << fmt.mbits) | man_field).astype(np.uint8)


def quantize(x: np.ndarray, fmt: ElementFormat, *, axis: int = -1, block: int = BLOCK) -> MXArray:
    """Encode ``x`` (float) to MX: element codes and E8M0 scales."""
    x = np.asarray(x)
    axis = axis % x.ndim
    q, s, bad, n = _quantize_values(x, fmt, axis, block)
    codes = _encode_elements(q, fmt)
    codes = codes.reshape(codes.shape[:-2] + (-1,))[..., :n]
    scales = np.where(bad[..., 0], SCALE_NAN, s[..., 0] + SCALE_BIAS).astype(np.uint8)
    return MXArray(fmt, axis, tuple(x.shape), np.moveaxis(codes, -1, axis), scales)


def dequantize(mx: MXArray, *, block: int = BLOCK, dtype=np.float32) -> np.ndarray:
    """Decode an :class:`MXArray` by table lookup of the element codes (independent of the encoder's arithmetic)."""
    table = element_values(mx.fmt)
    elems = table[np.moveaxis(mx.codes, mx.axis, -1).astype(np.int64)]
    n = elems.shape[-1]
    scale = np.where(mx.scales == SCALE_NAN, np.nan, np.ldexp(1.0, mx.scales.astype(np.int32) - SCALE_BIAS))
    per_elem = np.repeat(scale, block, axis=-1)[..., :n]
    return np.moveaxis(elems * per_elem, -1, mx.axis).astype(dtype)


def round_fp16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest float16 (ties to even) and back to float32. Finite values
    beyond ±65504 become ±inf, as a float16 cast does (exported graphs clip their constants first)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def fp16_exact(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is representable in float16 (NaN counts as representable)."""
    x = np.asarray(x, dtype=np.float32)
    r = round_fp16(x)
    return bool(np.all((r == x) | (np.isnan(x) & np.isnan(r))))
