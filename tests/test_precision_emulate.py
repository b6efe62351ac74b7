"""The emulated graphs: each tier changes what it says and nothing else; the portable graph stays."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qeff
from qeff.errors import UsageError
from qeff.precision import emulate, mx, tiers
from qeff.runtime.ort import OrtSession

# head_dim 32 (one MX block per head), hidden a multiple of 32: every MatMul weight has full blocks.
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def _run_graph(nodes, inits, x: np.ndarray, out: str = "y") -> np.ndarray:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _kv_like(dim: int, seed: int = 0) -> np.ndarray:
    """(1, 2, 12, dim) rows that exercise the block exponent: powers of two and their neighbours,
    zeros, float32 subnormals, huge values, NaN and Inf, random magnitudes."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 2, 12, dim)) * np.exp(rng.uniform(-8, 8, (1, 2, 12, 1)))).astype(np.float32)
    x[0, 0, 0, :] = 0.0
    x[0, 0, 1, :] = 0.5
    x[0, 0, 1, 0] = 4.0  # amax exactly a power of two
    x[0, 0, 2, :] = 0.25
    x[0, 0, 2, 0] = np.nextafter(np.float32(8.0), np.float32(0))  # just below a power of two
    x[0, 0, 3, :] = np.float32(2.0 ** -140)  # float32 subnormals
    x[0, 0, 4, 0] = np.float32(3e38)
    x[0, 0, 5, 1] = np.nan
    x[0, 0, 6, 2] = -np.inf
    x[0, 1, 7, :] = np.arange(dim, dtype=np.float32) / 64 + 1 / 128  # MXINT8 ties
    return x


@pytest.mark.parametrize("dim", [32, 64, 16, 48])
def test_in_graph_mxint8_equals_the_numpy_encoder(dim):
    x = _kv_like(dim)
    nodes, consts = emulate.mx_fake_quant_nodes("x", "y", dim=dim, prefix="q")
    got = _run_graph(nodes, consts, x)
    expected = mx.fake_quantize(x, mx.INT8, axis=-1)
    np.testing.assert_array_equal(got, expected)  # NaN positions equal too
    assert np.isnan(got[0, 0, 5, :32]).all() and np.isnan(got[0, 0, 6, :32]).all()  # the whole block, not beyond
    np.testing.assert_array_equal(_run_graph(nodes, consts, got), got)  # idempotent: padding slots do not drift


@pytest.mark.parametrize("fault", ["round_floor", "no_exponent_correction"])
def test_seeded_fault_in_the_graph_quantizer_is_caught(fault):
    x = _kv_like(32, seed=1)
    nodes, consts = emulate.mx_fake_quant_nodes("x", "y", dim=32, prefix="q")
    for node in nodes:
        if fault == "round_floor" and node.op_type == "Round":
            node.op_type = "Floor"
        if fault == "no_exponent_correction" and node.output[0] == "q/floor_log2":
            node.input[1] = "q/one"  # always add one: the scale is off by one
    got = _run_graph(nodes, consts, x)
    assert not np.array_equal(got, mx.fake_quantize(x, mx.INT8, axis=-1), equal_nan=True)


@pytest.fixture(scope="module")
def exported(module_tmp):
    model = qeff.from_config("llama", CONFIG, seed=0)
    out = module_tmp("tiny-emulate")
    qeff.export(qeff.transform(model), out, model_id="tiny")
    return out / "model.onnx"


def _digest(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.parent.glob("model.onnx*")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _trace(path, binding="inplace"):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 256, (2, 12))
    s = OrtSession(path, batch_size=2, ctx_len=32, binding=binding)
    steps = [s.run(ids, np.tile(np.arange(12), (2, 1))).copy()]
    for t in range(5):
        steps.append(s.run(ids[:, t : t + 1], np.full((2, 1), 12 + t)).copy())
    return np.stack(steps), s.read_cache()


@pytest.fixture(scope="module")
def traces(exported):
    before = _digest(exported)
    out = {"fp32": _trace(exported)}
    for name in ("fp16", "mxfp6", "mxfp6-e3m2", "mxint8", "mxfp6+mxint8"):
        built = emulate.build_tier(exported, tiers.parse_tier(name))
        out[name] = _trace(built.path / "model.onnx")
    assert _digest(exported) == before  # the portable graph never changes
    return out


def test_fp32_tier_is_the_exported_graph(exported):
    assert emulate.build_tier(exported, tiers.parse_tier("fp32")).path == exported.parent


def test_every_lower_tier_measurably_differs(traces):
    base, _ = traces["fp32"]
    diffs = {name: float(np.abs(logits - base).max()) for name, (logits, _) in traces.items()}
    assert diffs["fp32"] == 0.0
    for name in ("fp16", "mxfp6", "mxfp6-e3m2", "mxint8", "mxfp6+mxint8"):
        assert diffs[name] > 1e-5, (name, diffs)
    # the MX formats cost more than fp16 alone; E3M2 (2 mantissa bits) more than E2M3 (3)
    assert diffs["mxfp6"] > diffs["fp16"] and diffs["mxint8"] > diffs["fp16"]
    assert diffs["mxfp6-e3m2"] > diffs["mxfp6"]


def test_fp16_tier_holds_fp16_values(traces):
    logits, cache = traces["fp16"]
    assert mx.fp16_exact(logits)
    assert all(mx.fp16_exact(c) for c in cache)
    assert not mx.fp16_exact(traces["fp32"][0])


def test_mxint8_tier_holds_mxint8_cache(traces):
    _, cache = traces["mxint8"]
    written = [c[:, :, :17, :] for c in cache]  # 12 prompt + 5 decode slots
    for c in written:
        np.testing.assert_array_equal(mx.fake_quantize(c, mx.INT8, axis=-1), c)
    _, fp16_cache = traces["fp16"]
    assert any(not np.array_equal(mx.fake_quantize(c[:, :, :17], mx.INT8, axis=-1), c[:, :, :17]) for c in fp16_cache)


def test_mxfp6_weights_are_mxfp6_along_the_reduction_axis(exported):
    built = emulate.build_tier(exported, tiers.parse_tier("mxfp6"))
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(exported)).graph.initializer}
    emulated = onnx.load(str(built.path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in emulated.graph.initializer}
    checked = 0
    for node in emulated.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            w0 = original[node.input[1]]  # (K, N): K, the reduction dim, is axis 0
            np.testing.assert_array_equal(inits[node.input[1]], mx.fake_quantize(w0, mx.FP6_E2M3, axis=0))
            assert not np.array_equal(inits[node.input[1]], mx.fake_quantize(w0, mx.FP6_E2M3, axis=1))
            checked += 1
    assert checked == 15  # 7 per layer x 2 + lm_head
    # the embedding is not a MatMul weight: fp16, as the device keeps every other weight
    embedding = original["model.model.embed_tokens.weight"]
    np.testing.assert_array_equal(inits["model.model.embed_tokens.weight"], mx.round_fp16(embedding))


def test_mxfp6_copies_a_weight_that_a_gather_also_reads():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["w", "idx"], ["e"], axis=0), helper.make_node("MatMul", ["e", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("idx", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    report = emulate.EmulationReport("mxfp6")
    emulate.apply_mxfp6(m, mx.FP6_E2M3, report)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    assert report.mxfp6_copies == 1 and m.graph.node[0].input[0] == "w" and m.graph.node[1].input[1] != "w"
    np.testing.assert_array_equal(inits["w"], w)
    np.testing.assert_array_equal(inits[m.graph.node[1].input[1]], mx.fake_quantize(w, mx.FP6_E2M3, axis=0))


@pytest.mark.parametrize("name", ["fp16", "mxfp6+mxint8"])
def test_emulated_graph_is_bit_exact_with_the_cache_bound_in_place(exported, name):
    path = emulate.build_tier(exported, tiers.parse_tier(name)).path / "model.onnx"
    inplace, swap = _trace(path, "inplace"), _trace(path, "swap")
    np.testing.assert_array_equal(inplace[0], swap[0])
    for a, b in zip(inplace[1], swap[1]):
        np.testing.assert_array_equal(a, b)


def test_tier_artifact_is_reused(exported):
    tier = tiers.parse_tier("mxint8")
    first = emulate.build_tier(exported, tier)
    again = emulate.build_tier(exported, tier)
    assert again.reused and again.path == first.path and again.path.name == "tier-mxint8"


def test_tier_names_and_usage_errors():
    assert [t.name for t in tiers.parse_tiers("fp32, FP16,mxfp6,mxint8,mxint8+mxfp6,mxfp6-e3m2,fp16")] == [
        "fp32", "fp16", "mxfp6", "mxint8", "mxfp6+mxint8", "mxfp6-e3m2"]
    assert tiers.parse_tier("mxfp6-e2m3").name == "mxfp6" and tiers.parse_tier("mxfp6").fp16
    for bad in ("fp8", "mxfp4", "fp32+mxfp6", "", "mxfp6-e4m3"):
        with pytest.raises(UsageError, match="valid tiers: fp32, fp16, mxfp6, mxint8, mxfp6\\+mxint8"):
            tiers.parse_tiers(bad)
    tiers.check_backend(tiers.parse_tiers(",".join(tiers.TIERS)), "ort")
    with pytest.raises(UsageError, match="qaic backend cannot run precision tier 'fp32'.*fp16, mxfp6"):
        tiers.check_backend(tiers.parse_tiers("fp32"), "qaic")
    with pytest.raises(UsageError, match="torch backend cannot run precision tier 'fp16'; it runs \\(native\\): fp32"):
        tiers.check_backend(tiers.parse_tiers("fp16"), "torch")


def test_seeded_fault_an_emulation_that_changes_nothing_is_caught(exported, tmp_path, monkeypatch):
    import shutil

    for f in exported.parent.glob("model.onnx*"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(emulate, "apply_fp16", lambda model, report: None)  # a pass that forgot its Casts
    built = emulate.build_tier(tmp_path / "model.onnx", tiers.parse_tier("fp16"))
    logits, _ = _trace(built.path / "model.onnx")
    base, _ = _trace(tmp_path / "model.onnx")
    assert float(np.abs(logits - base).max()) == 0.0  # what test_every_lower_tier_measurably_differs rejects
