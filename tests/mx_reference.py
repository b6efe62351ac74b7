"""An independent, scalar reference of OCP MX v1.0 conversion, written from the spec's text
(section 5: element encodings; section 6.3: float → MX), for testing :mod:`qeff.precision.mx`.

It shares no code with the library: exact rational arithmetic (``fractions.Fraction``), the set
of representable element values enumerated from every bit pattern, and the nearest one chosen by
search — ties go to the code whose least significant bit is 0 (round half to even). Slow by
design; the tests run it on a few thousand values.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

#: name → (kind, exponent bits, mantissa bits, bias, emax of the element format)
SPECS = {
    "fp6_e2m3": ("float", 2, 3, 1, 2),
    "fp6_e3m2": ("float", 3, 2, 3, 4),
    "int8": ("int", 0, 6, 0, 0),
}


@functools.cache
def element_table(name: str) -> dict[int, Fraction]:
    """code → exact value, for every code of the element format (section 5.3 of the spec)."""
    kind, ebits, mbits, bias, _ = SPECS[name]
    table = {}
    if kind == "int":
        for code in range(256):
            signed = code - 256 if code >= 128 else code
            if signed == -128:
                continue  # MXINT8 here is symmetric: -2.0 is never produced
            table[code] = Fraction(signed, 64)
        return table
    nbits = 1 + ebits + mbits
    for code in range(1 << nbits):
        sign = -1 if code >> (nbits - 1) else 1
        e = (code >> mbits) & ((1 << ebits) - 1)
        m = code & ((1 << mbits) - 1)
        if e == 0:  # subnormal: 2^(1-bias) * (0.m)
            mag = Fraction(2) ** (1 - bias) * Fraction(m, 1 << mbits)
        else:  # normal: 2^(e-bias) * (1.m)
            mag = Fraction(2) ** (e - bias) * (1 + Fraction(m, 1 << mbits))
        table[code] = sign * mag
    return table


def nearest_code(name: str, value: Fraction, negative: bool) -> int:
    """The code nearest ``value`` (saturating past the largest magnitude); ties to the even code.
    ``negative`` says which zero/sign a value that rounds to zero keeps."""
    table = element_table(name)
    kind = SPECS[name][0]
    best = None
    for code, v in table.items():
        if kind == "float" and v == 0 and ((code >> (SPECS[name][1] + SPECS[name][2])) == 1) != negative:
            continue  # keep the input's sign on zero
        d = abs(v - value)
        key = (d, code & 1)  # nearer first; on a tie, the even code (LSB 0)
        if kind == "int":
            key = (d, (code - 256 if code >= 128 else code) & 1)
        if best is None or key < best[0]:
            best = (key, code)
    return best[1]


def block_scale_exponent(name: str, block: list[float]) -> int | None:
    """floor(log2(max |v|)) - emax_elem, clamped at -127; None for a NaN scale (Inf/NaN in the block)."""
    if any(math.isnan(v) or math.isinf(v) for v in block):
        return None
    amax = max((abs(Fraction(v)) for v in block), default=Fraction(0))
    if amax == 0:
        return -127
    e = 0  # largest e with 2^e <= amax, by exact comparison
    while Fraction(2) ** e > amax:
        e -= 1
    while Fraction(2) ** (e + 1) <= amax:
        e += 1
    return max(e - SPECS[name][4], -127)


def quantize_block(name: str, block: list[float]) -> tuple[int, list[int], list[float]]:
    """(E8M0 scale byte, element codes, decoded values as floats) of one block."""
    s = block_scale_exponent(name, block)
    if s is None:
        return 0xFF, [0] * len(block), [math.nan] * len(block)
    scale = Fraction(2) ** s
    table = element_table(name)
    codes = [nearest_code(name, Fraction(v) / scale, math.copysign(1.0, v) < 0) for v in block]
    return s + 127, codes, [float(table[c] * scale) for c in codes]


def fake_quantize(name: str, values: list[float], block: int = 32) -> list[float]:
    """Blocks of ``block`` consecutive values (the last may be shorter)."""
    out: list[float] = []
    for start in range(0, len(values), block):
        out += quantize_block(name, values[start : start + block])[2]
    return out
