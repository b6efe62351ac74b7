"""MX encode/decode (qeff.precision.mx) against the independent scalar reference (tests/mx_reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qeff.precision import mx
from tests import mx_reference as ref

FORMATS = [mx.FP6_E2M3, mx.FP6_E3M2, mx.INT8]
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY_SUB = float(np.nextafter(np.float32(0), np.float32(1)))  # 2^-149


def _edge_blocks() -> list[list[float]]:
    """Blocks of 32 that exercise each rule of the spec."""
    blocks = [
        [0.0] * 32,  # an all-zero block
        [-0.0, 0.0] * 16,  # signed zeros
        [1.0] + [0.0] * 31,  # one value, the rest zero
        [F32_MAX, -F32_MAX] + [1.0] * 30,  # the largest finite float32
        [F32_TINY_SUB * k for k in range(1, 33)],  # float32 subnormals only (scale clamps at 2^-127)
        [2.0 ** -126 * (1 + k / 32) for k in range(32)],  # around float32's smallest normal
        [1e6] + [float(v) for v in np.linspace(-3, 3, 31)],  # one large outlier: the rest flush toward 0
        [4.0] + [0.0625 * k for k in range(31)],  # element subnormals (E2M3 step 0.125, E3M2 step 0.0625)
        [8.0] + [k * 0.25 + 0.125 for k in range(31)],  # exact ties between neighbours at several exponents
        [7.75, -7.75, 7.9, 31.0, 30.0, 29.0, 28.0] + [1.0] * 25,  # saturation to the largest normal
        [1.96875, 1.984375, 1.9921875, 3.9375] + [0.5] * 28,  # rounding up into the next binade
        [1.0 + 1 / 128, 1.0 + 3 / 128, 1.0 + 5 / 128, 2.0 - 1 / 128] + [0.0] * 28,  # MXINT8 ties (step 1/64)
        [math.nan] + [1.0] * 31,  # NaN: the whole block is NaN
        [math.inf] + [1.0] * 31,  # Inf: the whole block is NaN (no Inf element)
        [-math.inf, 2.0] + [0.0] * 30,
        [2.0 ** k for k in range(-20, 12)],  # a wide dynamic range
    ]
    rng = np.random.default_rng(7)
    for scale in (1e-3, 1.0, 1e3):
        blocks.append([float(np.float32(v)) for v in rng.standard_normal(32) * scale])
    blocks.append([float(np.float32(v)) for v in rng.standard_t(2, 32)])  # heavy tails
    return [[float(np.float32(v)) for v in b] for b in blocks]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_element_table_matches_the_spec_enumeration(fmt):
    table = mx.element_values(fmt)
    expected = ref.element_table(fmt.name)
    for code, value in expected.items():
        assert table[code] == float(value), (fmt.name, code)
    positives = sorted(float(v) for v in expected.values() if v > 0)
    assert positives[-1] == fmt.max_normal
    if fmt is mx.FP6_E2M3:
        assert positives[:2] == [0.125, 0.25] and 1.0 in positives and positives[-2] == 7.0
    if fmt is mx.FP6_E3M2:
        assert positives[:2] == [0.0625, 0.125] and positives[-2] == 24.0


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_codes_scales_and_values_equal_the_reference_on_edge_cases(fmt):
    for block in _edge_blocks():
        x = np.array(block, dtype=np.float32)
        scale, codes, values = ref.quantize_block(fmt.name, block)
        enc = mx.quantize(x, fmt)
        assert int(enc.scales[0]) == scale, (fmt.name, block[:4])
        if scale != 0xFF:
            assert enc.codes.tolist() == codes, (fmt.name, block[:4])
        got = mx.fake_quantize(x, fmt)
        np.testing.assert_array_equal(got, np.array(values, dtype=np.float32))
        np.testing.assert_array_equal(mx.dequantize(enc), got)  # table decode == arithmetic decode


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_random_tensor_along_an_inner_axis_equals_the_reference(fmt):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 70, 5)) * np.exp(rng.uniform(-6, 6, (3, 1, 5)))).astype(np.float32)
    got = mx.fake_quantize(x, fmt, axis=1)  # 70 = two full blocks and a partial one of 6
    for i in range(3):
        for k in range(5):
            expected = ref.fake_quantize(fmt.name, [float(v) for v in x[i, :, k]])
            np.testing.assert_array_equal(got[i, :, k], np.array(expected, dtype=np.float32))


def test_specific_values_from_the_spec():
    # E2M3, one block whose max is 6.0: scale 2^(2-2) = 1; 0.0625 is half the subnormal step → ties to 0.
    x = np.array([6.0, 0.0625, 0.1875, 1.0625, -7.0] + [0.0] * 27, dtype=np.float32)
    np.testing.assert_array_equal(mx.fake_quantize(x, mx.FP6_E2M3)[:5], [6.0, 0.0, 0.25, 1.0, -7.0])
    # MXINT8 of a block with max 3.0: scale 2^1, step 2/64; 3.0 → 3.0, 0.01 → 0.
    y = np.array([3.0, 0.01, -1.0 / 64] + [0.0] * 29, dtype=np.float32)
    np.testing.assert_array_equal(mx.fake_quantize(y, mx.INT8)[:3], [3.0, 0.0, -0.0])
    enc = mx.quantize(y, mx.INT8)
    assert int(enc.scales[0]) == 127 + 1 and int(enc.codes[0]) == 96  # 3.0 = 96/64 * 2


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fake_quantize_is_idempotent(fmt):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 96)) * 3).astype(np.float32)
    once = mx.fake_quantize(x, fmt)
    np.testing.assert_array_equal(mx.fake_quantize(once, fmt), once)
    assert not np.array_equal(once, x)  # and it did change something


def test_round_fp16():
    x = np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65520.0, 2**-25, -0.0], dtype=np.float32)
    np.testing.assert_array_equal(mx.round_fp16(x), [1.0, 1.0, 1 + 2**-9, 65504.0, np.inf, 0.0, -0.0])
    assert mx.fp16_exact(np.array([0.5, 3.0, np.nan], np.float32))
    assert not mx.fp16_exact(np.array([0.1], np.float32))


# -- the comparison above must catch a wrong encoder: seeded faults ---------------------------


def _mismatches(fmt) -> int:
    count = 0
    for block in _edge_blocks():
        values = ref.quantize_block(fmt.name, block)[2]
        with np.errstate(over="ignore"):  # a faulty scale may overflow float32
            got = mx.fake_quantize(np.array(block, dtype=np.float32), fmt)
        count += int(not np.array_equal(got, np.array(values, dtype=np.float32), equal_nan=True))
    return count


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_seeded_fault_round_half_up_is_caught(fmt, monkeypatch):
    assert _mismatches(fmt) == 0
    monkeypatch.setattr(mx, "_rne", lambda a: np.floor(a + 0.5))
    assert _mismatches(fmt) > 0


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_seeded_fault_scale_off_by_one_is_caught(fmt, monkeypatch):
    original = mx._shared_exponent
    monkeypatch.setattr(mx, "_shared_exponent", lambda amax, f: original(amax, f) + 1)
    assert _mismatches(fmt) > 0


def test_seeded_fault_no_saturation_is_caught(monkeypatch):
    fmt = mx.FP6_E2M3
    monkeypatch.setattr(mx, "FP6_E2M3", fmt)
    broken = mx.ElementFormat(fmt.name, fmt.kind, fmt.ebits, fmt.mbits, fmt.bias, fmt.emax, max_normal=8.0)
    got = mx.fake_quantize(np.array([7.9] + [1.0] * 31, np.float32), broken)
    assert got[0] != ref.fake_quantize(fmt.name, [7.9] + [1.0] * 31)[0]
