"""The exported graph: symbolic dims, portable ops, external data, fp16-clip pass, metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qeff
from qeff.errors import QEffError
from qeff.exporter import FP16_MAX, check_portable, fp16_clip
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def exported(module_tmp):
    q = qeff.transform(tiny_model("llama"))
    return q, qeff.export(q, module_tmp("export"), model_id="tiny-llama")


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_signature_is_the_retained_state_contract(exported):
    q, result = exported
    model = onnx.load(str(result.path), load_external_data=False)
    inputs = {i.name: _dims(i) for i in model.graph.input}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert list(inputs) == q.input_names and list(outputs) == q.output_names
    assert inputs["input_ids"] == ["batch_size", "seq_len"] == inputs["position_ids"]
    assert inputs["past_key.0"] == ["batch_size", 2, "ctx_len", 16]
    assert outputs["past_value.1_RetainedState"] == ["batch_size", 2, "ctx_len", 16]
    assert outputs["logits"] == ["batch_size", 1, 256]
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["input_ids"] == types["position_ids"] == onnx.TensorProto.INT64
    assert types["past_key.0"] == onnx.TensorProto.FLOAT


def test_only_standard_ops_and_external_data(exported):
    _, result = exported
    model = onnx.load(str(result.path), load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "large weights must live in the external data file"
    assert (result.path.parent / "model.onnx.data").stat().st_size > 0
    assert {t.name for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL} <= {
        t.name for t in model.graph.initializer if np.prod(t.dims) * 4 < 1024
    }


def test_metadata_stamp(exported):
    q, result = exported
    meta = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    assert meta["qeff.model_id"] == "tiny-llama"
    assert meta["qeff.transforms"].split(",") == list(q.transforms)
    versions = json.loads(meta["qeff.versions"])
    assert set(versions) >= {"qeff", "torch", "transformers", "onnx", "onnxruntime"}
    assert versions["qeff"] == qeff.__version__
    assert meta["qeff.num_layers"] == "2"
    assert meta["qeff.trace_warnings"] == "0" and result.trace_warnings == ()  # nothing frozen into the graph


def test_fp16_clip_clips_finite_floats_only():
    big = np.array([1e6, -1e6, 7.0, np.inf, -np.inf, 65504.0, -70000.0], dtype=np.float32)
    ints = np.array([1_000_000, -1_000_000], dtype=np.int64)
    node_const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([-3.4e38], np.float32), "c"))
    graph = helper.make_graph(
        [node_const, helper.make_node("Add", ["w", "c"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [7])],
        initializer=[numpy_helper.from_array(big, "w"), numpy_helper.from_array(ints, "i")],
    )
    model = helper.make_model(graph)
    assert fp16_clip(model) == 4  # 1e6, -1e6, -70000 and the Constant's -3.4e38
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(w, np.array([FP16_MAX, -FP16_MAX, 7.0, np.inf, -np.inf, 65504.0, -FP16_MAX], np.float32))
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[1]), ints)
    assert numpy_helper.to_array(model.graph.node[0].attribute[0].t)[0] == -FP16_MAX


def test_exported_graph_is_fp16_safe(exported):
    _, result = exported
    model = onnx.load(str(result.path))
    assert int({p.key: p.value for p in model.metadata_props}["qeff.fp16_clipped_values"]) >= 1  # the mask constant
    worst = 0.0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size:
            finite = arr[np.isfinite(arr)]
            worst = max(worst, float(np.abs(finite).max()) if finite.size else 0.0)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                arr = numpy_helper.to_array(attr.t)
                if arr.dtype.kind == "f" and arr.size:
                    worst = max(worst, float(np.abs(arr[np.isfinite(arr)]).max(initial=0)))
    assert worst <= FP16_MAX


def test_check_portable_rejects_contrib_ops():
    graph = helper.make_graph(
        [helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft")], "g", [], []
    )
    with pytest.raises(QEffError, match="com.microsoft::FusedMatMul"):
        check_portable(helper.make_model(graph))


def test_tracer_warnings_are_recorded_not_dropped(tmp_path):
    """A data-dependent Python branch gets frozen by the trace: the export must say so."""
    import dataclasses

    from tests.tiny import TINY_CONFIGS

    model_type, config = TINY_CONFIGS["llama"]
    q = qeff.transform(qeff.from_config(model_type, dict(config, pad_token_id=2)))  # embedding bounds check: benign
    assert qeff.export(q, tmp_path / "clean").trace_warnings == ()

    def branchy_head(model, hidden):
        logits = model.get_output_embeddings()(hidden)
        return logits * 2 if hidden.sum() > 0 else logits  # frozen at trace time

    q.spec = dataclasses.replace(q.spec, head=branchy_head)
    result = qeff.export(q, tmp_path / "branchy")
    assert len(result.trace_warnings) == 1 and "test_export.py" in result.trace_warnings[0]
    meta = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    assert meta["qeff.trace_warnings"] == "1"
