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


def _tied_llama(seed: int = 0, untie_by: float = 0.0):
    model = tiny_model("llama", seed=seed)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    if untie_by:
        import torch

        # A separate head equal to the embedding but for one value: not a tied pair.
        head = model.model.embed_tokens.weight.detach().clone()
        head[3, 5] += untie_by
        model.lm_head.weight = torch.nn.Parameter(head)
    return model


def _tables(path, vocab: int, hidden: int) -> dict[tuple, list[str]]:
    graph = onnx.load(str(path)).graph
    return {
        tuple(i.dims): sorted(n.op_type for n in graph.node if i.name in n.input)
        for i in graph.initializer
        if tuple(i.dims) in ((vocab, hidden), (hidden, vocab))
    }


@pytest.mark.parametrize("untie_by", [0.0, 1e-3], ids=["tied", "almost-tied"])
def test_a_tied_embedding_is_stored_once(tmp_path, untie_by):
    """The transposed copy TorchScript folds for ``lm_head`` is dropped only when it is bit for bit
    the embedding's transpose; logits and greedy tokens still equal HF's, through ORT."""
    import torch

    model = _tied_llama(untie_by=untie_by)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    result = qeff.export(qeff.transform(model), tmp_path / "onnx")
    tables = _tables(result.path, vocab, hidden)
    passes = result.metadata["qeff.passes"].split(",")
    if untie_by:
        assert tables == {(vocab, hidden): ["Gather"], (hidden, vocab): ["MatMul"]}
        assert "TiedEmbeddingShared" not in passes
    else:
        assert tables == {(vocab, hidden): ["Gather", "Gemm"]}
        assert "TiedEmbeddingShared" in passes
    report = qeff.verify(model, prompt_token_ids=[[5, 9, 13, 2, 7, 11]], steps=6, prompt_len=4, ctx_len=32)
    assert report.passed, report.describe()
    built = qeff.compile(result.path, batch_size=1, prompt_len=4, ctx_len=32)
    session = qeff.open_session(built.path)
    ids = [5, 9, 13, 2, 7, 11]
    out = qeff.generate(session, prompt_token_ids=[ids], prompt_len=4, generation_len=6, eos_token_id=[])
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.token_ids[0] == want[0, len(ids):].tolist()
    # The compiled copy holds the table once too (the Gemm reads it in place).
    optimized = _tables(built.path / "model.opt.onnx", vocab, hidden)
    assert len(optimized) == (2 if untie_by else 1), optimized


def test_shared_table_is_rounded_only_for_the_head_under_mxfp6(tmp_path):
    """MXFP6 rounds MatMul/Gemm weights only: a shared embedding table is copied for the Gemm,
    and the Gather still reads the table as the rest of the weights are kept (the mxfp6 tier
    computes in fp16, so: the fp16 values)."""
    from qeff.precision.emulate import emulate_model
    from qeff.precision.tiers import parse_tiers

    model = _tied_llama()
    result = qeff.export(qeff.transform(model), tmp_path / "onnx")
    graph_model = onnx.load(str(result.path))
    report = emulate_model(graph_model, parse_tiers("mxfp6")[0])
    assert report.mxfp6_copies == 1
    inits = {i.name: i for i in graph_model.graph.initializer}
    gather = next(n for n in graph_model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                  and tuple(inits[n.input[0]].dims) == (model.config.vocab_size, model.config.hidden_size))
    gemm = next(n for n in graph_model.graph.node if n.op_type == "Gemm")
    exact = model.model.embed_tokens.weight.detach().numpy().astype(np.float16).astype(np.float32)
    assert np.array_equal(numpy_helper.to_array(inits[gather.input[0]]), exact)
    rounded = numpy_helper.to_array(inits[gemm.input[1]])
    assert rounded.shape == exact.shape and not np.array_equal(rounded, exact)
