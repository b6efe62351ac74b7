"""Test helpers for the Cloud AI stand-ins: put the fake compiler on PATH, install the fake runtime,
build a small retained-state ONNX graph without torch. TESTS ONLY."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).parent
FAKE_COMPILER = HERE / "fake_qaic_compiler.py"


def load(name: str):
    """Import ``tests/fakes/<name>.py`` by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_qeff_test_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install_fake_compiler(bin_dir: Path, name: str = "qaic-exec") -> Path:
    """Write an executable ``bin_dir/name`` that runs the fake compiler; return its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / name
    wrapper.write_text(f'#!/bin/sh\nFAKE_QAIC_NAME={name} exec "{sys.executable}" "{FAKE_COMPILER}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def install_fake_runtime(monkeypatch):
    """Make ``import qaicrt`` / ``import QAicApi_pb2`` give the stand-ins; return the fake qaicrt."""
    qaicrt = load("fake_qaicrt")
    monkeypatch.setitem(sys.modules, "qaicrt", qaicrt)
    monkeypatch.setitem(sys.modules, "QAicApi_pb2", qaicrt.aicapi)
    return qaicrt


def tiny_retained_onnx(
    path: Path, num_layers: int = 2, vocab: int = 16, *, continuous_batching: bool = False, speculative: bool = False
) -> Path:
    """A structurally valid graph with the retained-state contract's IO (it computes nothing useful),
    optionally with the serving inputs (``batch_index`` / ``num_logits_to_keep``, qeff.serving.graph)."""
    import onnx
    from onnx import TensorProto, helper

    past = ["full_batch_size" if continuous_batching else "batch_size", 2, "ctx_len", 8]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq_len"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "seq_len"]),
    ]
    if continuous_batching:
        inputs.append(helper.make_tensor_value_info("batch_index", TensorProto.INT64, ["batch_size", 1]))
    if speculative:
        inputs.append(helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, ["num_logits_to_keep", 1]))
    rows = "num_logits_to_keep" if speculative else 1
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", rows, vocab])]
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [3], [1, 1, vocab])),
        helper.make_node("ConstantOfShape", ["shape"], ["logits"]),
    ]
    for i in range(num_layers):
        for kind in ("key", "value"):
            name = f"past_{kind}.{i}"
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, past))
            outputs.append(helper.make_tensor_value_info(f"{name}_RetainedState", TensorProto.FLOAT, past))
            nodes.append(helper.make_node("Identity", [name], [f"{name}_RetainedState"]))
    graph = helper.make_graph(nodes, "tiny_retained", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
