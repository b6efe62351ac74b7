"""Compressed weights: MatMulNBits blocks (exact re-encoding of GGUF blocks, RTN) and the graph
that runs them. References: the ``gguf`` package's own decoders (what HF transformers uses to
de-quantize a GGUF file) and float64 numpy matmuls of the de-quantized matrix."""

from __future__ import annotations

import gguf
import numpy as np
import onnxruntime as ort
import pytest

from qeff.compilers.ort_fused import write_linear_graph
from qeff.quant.blocks import NBitsWeight, pack_codes, rtn_quantize
from qeff.quant.gguf import NATIVE_TYPES, decode_blocks, permute_rows

_LAYOUT = {  # type: (bytes per block, values per block, offsets of float16 fields)
    "Q4_0": (18, 32, (0,)), "Q4_1": (20, 32, (0, 2)), "Q5_0": (22, 32, (0,)), "Q5_1": (24, 32, (0, 2)),
    "Q8_0": (34, 32, (0,)), "Q4_K": (144, 256, (0, 2)), "Q5_K": (176, 256, (0, 2)), "Q6_K": (210, 256, (208,)),
}


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0, with_negatives: bool = True) -> np.ndarray:
    """Random raw blocks whose float16 fields are finite (every other byte is any value)."""
    size, per, halves = _LAYOUT[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    for at in halves:
        values = rng.standard_normal(len(raw)) * 0.02
        raw[:, at:at + 2] = (values if with_negatives else np.abs(values)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_every_block_type_decodes_to_exactly_what_gguf_dequantizes(type_name):
    rows, cols = 6, 512
    raw = random_blocks(type_name, rows, cols)
    ref = gguf.dequantize(raw.reshape(rows, -1), getattr(gguf.GGMLQuantizationType, type_name)).reshape(rows, cols)
    weight = decode_blocks(raw, type_name, rows, cols)
    assert np.array_equal(weight.dequantize(), ref)  # bit for bit, not within a tolerance
    if weight.bits == 8:
        high, low = weight.nibbles()
        assert high.bits == low.bits == 4
        np.testing.assert_allclose(high.dequantize() + low.dequantize(), ref, rtol=0, atol=1e-7 * np.abs(ref).max())


def test_a_flipped_nibble_is_seen():
    # The block test above can fail: one changed code changes exactly one value.
    raw = random_blocks("Q4_1", 2, 64)
    ref = decode_blocks(raw, "Q4_1", 2, 64).dequantize()
    raw[0, 4] ^= 0x01
    diff = decode_blocks(raw, "Q4_1", 2, 64).dequantize() != ref
    assert diff.sum() == 1


def test_q_k_permutation_is_hf_s():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    for heads, kv in ((3, 3), (3, 1)):
        expected = LlamaTensorProcessor(config={})._reverse_permute_weights(w, heads, kv)
        assert np.array_equal(w[permute_rows(12, kv)], expected)


def test_pack_codes_low_nibble_first():
    assert pack_codes(np.array([[1, 2, 15, 0]], np.uint8), 4).tolist() == [[0x21, 0x0F]]
    assert pack_codes(np.array([[7, 200]], np.uint8), 8).tolist() == [[7, 200]]


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_within_half_a_step(bits):
    w = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    q = rtn_quantize(w, bits, 32)
    err = np.abs(q.dequantize() - w).reshape(16, 4, 32).max(-1)
    assert (err <= q.scales * 0.5 + 1e-6).all()
    assert err.max() > 0  # it did quantize


def run_linear(weight, tmp_path, x, accuracy_level=0) -> np.ndarray:
    path = write_linear_graph(weight, tmp_path / "linear.onnx", accuracy_level=accuracy_level)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def reference(weight, x) -> np.ndarray:
    w = weight.dequantize() if isinstance(weight, NBitsWeight) else weight
    return x.astype(np.float64) @ w.T.astype(np.float64)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "Q8_0", "Q6_K", "Q5_K", "Q4_0"])
def test_the_graph_computes_the_decoded_matrix(type_name, tmp_path):
    # MatMulNBits + the offset term + (for 8-bit codes) two 4-bit halves = x @ W.T of the very
    # matrix gguf de-quantizes, to float32 accumulation error. Measured ~3e-7 of max |y|.
    rows, cols = 96, 512
    weight = decode_blocks(random_blocks(type_name, rows, cols, seed=3), type_name, rows, cols)
    x = np.random.default_rng(2).standard_normal((2, 3, cols)).astype(np.float32)
    y, ref = run_linear(weight, tmp_path, x), reference(weight, x)
    assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()


def test_a_corrupted_byte_in_the_graph_is_seen(tmp_path):
    rows, cols = 32, 256
    weight = decode_blocks(random_blocks("Q4_K", rows, cols), "Q4_K", rows, cols)
    x = np.random.default_rng(2).standard_normal((1, 1, cols)).astype(np.float32)
    ref = reference(weight, x)
    weight.codes[5, 17] ^= 0x08  # one code of one row
    y = run_linear(weight, tmp_path, x)
    assert np.abs(y - ref).max() > 2e-6 * np.abs(ref).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_graph_matches_its_matrix(bits, tmp_path):
    w = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    weight = rtn_quantize(w, bits, 32)
    x = np.random.default_rng(5).standard_normal((1, 4, 128)).astype(np.float32)
    y, ref = run_linear(weight, tmp_path, x), reference(weight, x)
    assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()


def test_int8_activations_are_close_but_not_exact(tmp_path):
    rows, cols = 96, 512
    weight = decode_blocks(random_blocks("Q4_0", rows, cols), "Q4_0", rows, cols)
    x = np.random.default_rng(6).standard_normal((1, 2, cols)).astype(np.float32)
    y, ref = run_linear(weight, tmp_path, x, accuracy_level=4), reference(weight, x)
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert 1e-6 < rel < 5e-2


def zero_point_inputs(path) -> list[int]:
    """How many inputs each MatMulNBits node of the graph at ``path`` has (4 = with zero points)."""
    import onnx

    return [len(n.input) for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("type_name", ["Q4_1"])
def test_recentred_blocks_are_the_same_numbers(type_name):
    # (q - z) s + o = (q - 8) s + (o + (8 - z) s): each side is one rounding of the same real number
    # (the products are exact for float16-born factors), so the float32 matrices are bit-identical.
    # (Q4_K / Q5_1 blocks recentre only where the new offsets are exact: the random ones here are
    # not always; test_an_inexact_recentring_is_refused covers that case.)
    rows, cols = 16, 512
    weight = decode_blocks(random_blocks(type_name, rows, cols, seed=7), type_name, rows, cols)
    assert (weight.zero_points != 2 ** (weight.bits - 1)).any()
    centred = weight.recentred()
    assert centred is not None and (centred.zero_points == 2 ** (weight.bits - 1)).all()
    assert np.array_equal(centred.dequantize(), weight.dequantize())


@pytest.mark.parametrize("type_name", ["Q4_1"])
def test_the_lowering_drops_the_zero_point_input_and_stays_exact(type_name, tmp_path):
    rows, cols = 96, 512
    weight = decode_blocks(random_blocks(type_name, rows, cols, seed=8), type_name, rows, cols)
    x = np.random.default_rng(9).standard_normal((1, 2, cols)).astype(np.float32)
    ref = reference(weight, x)
    for recentre, inputs in ((True, 3), (False, 4)):
        path = write_linear_graph(weight, tmp_path / f"linear{recentre}.onnx", recentre=recentre)
        assert zero_point_inputs(path) == [inputs]
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
        assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()


def test_an_inexact_recentring_is_refused(tmp_path):
    # o + 8 s = 1 + 2**-27 has no float32: the weight keeps its zero points (and stays exact).
    codes = np.random.default_rng(10).integers(0, 16, (8, 64)).astype(np.uint8)
    weight = NBitsWeight(4, 32, codes, np.full((8, 2), 2.0**-30, np.float32), np.zeros((8, 2), np.uint8),
                         np.ones((8, 2), np.float32), "Q4_1")
    assert weight.recentred() is None
    path = write_linear_graph(weight, tmp_path / "linear.onnx")
    assert zero_point_inputs(path) == [4]
    x = np.random.default_rng(11).standard_normal((1, 1, 64)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    ref = reference(weight, x)
    assert np.abs(y - ref).max() <= 2e-6 * np.abs(ref).max()


def test_a_wrong_recentring_is_seen(tmp_path, monkeypatch):
    # Seeded fault: the offset moved with the wrong sign. The exactness check of the lowering sees it.
    rows, cols = 32, 256
    weight = decode_blocks(random_blocks("Q4_1", rows, cols, seed=12), "Q4_1", rows, cols)
    x = np.random.default_rng(13).standard_normal((1, 1, cols)).astype(np.float32)
    ref = reference(weight, x)

    def wrong(self):
        return NBitsWeight(4, 32, self.codes, self.scales, np.full_like(self.zero_points, 8),
                           (self.offsets - 8 * self.scales).astype(np.float32), self.source)

    monkeypatch.setattr(NBitsWeight, "recentred", wrong)
    y = run_linear(weight, tmp_path, x)
    assert np.abs(y - ref).max() > 2e-6 * np.abs(ref).max()
