"""ONNX export of a retained-state model, and the passes applied to every exported graph.

One graph serves prefill (``seq_len = prompt_len``) and decode (``seq_len = 1``): ``batch_size``,
``seq_len`` and ``ctx_len`` are symbolic. The passes keep the file portable to the Cloud AI
compiler: float constants are clipped to the fp16 range, no ``com.microsoft`` op may appear, and
what produced the file is stamped into its metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qeff._system import OPSET, library_versions
from qeff.errors import NotStreamableError, QEffError
from qeff.store.layout import ONNX_DATA, ONNX_FILE
from qeff.transforms import QEffCausalLM

__all__ = ["export", "fp16_clip", "share_tied_embedding", "stamp_metadata", "check_portable", "ExportResult", "FP16_MAX", "library_versions"]

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
#: Tensors at least this large go to the external data file.
EXTERNAL_THRESHOLD = 1024
DATA_FILE = ONNX_DATA


@dataclass(frozen=True)
class ExportResult:
    path: Path
    clipped_values: int
    metadata: dict[str, str]
    #: TorchScript tracer warnings: each marks a value the trace may have frozen into the graph
    #: (a Python branch or int taken from a tensor). None for the built-in architectures.
    trace_warnings: tuple[str, ...] = ()
    #: bytes of the tied embedding's transposed copy that :func:`share_tied_embedding` dropped
    #: (0: no tied embedding). The export's build still writes them once, in TorchScript's raw file.
    tied_embedding_bytes: int = 0
    #: True when the weights were streamed from their source (:mod:`qeff.weights`), not held in memory.
    streamed: bool = False


def _clip_array(arr: np.ndarray) -> tuple[np.ndarray, int]:
    if arr.dtype.kind != "f":
        return arr, 0
    finite_big = np.isfinite(arr) & (np.abs(arr) > FP16_MAX)
    count = int(finite_big.sum())
    if count:
        arr = np.where(finite_big, np.clip(arr, -FP16_MAX, FP16_MAX), arr).astype(arr.dtype)
    return arr, count


def fp16_clip(model: onnx.ModelProto, skip=()) -> int:
    """Clip every finite float constant (initializers, ``Constant`` nodes, ``ConstantOfShape``
    fills) into ``[-65504, 65504]`` in place; ``±inf``, NaN and integer tensors are left alone.
    Initializers named in ``skip`` (the streamed export's, clipped as they are written) are left
    out. Returns how many values were clipped."""
    total = 0

    def clip_tensor(tensor: onnx.TensorProto) -> int:
        if tensor.name in skip:
            return 0
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise QEffError("fp16_clip needs tensors loaded in memory, not external data")
        arr = numpy_helper.to_array(tensor)
        clipped, count = _clip_array(arr)
        if count:
            tensor.CopyFrom(numpy_helper.from_array(clipped, tensor.name))
        return count

    def visit(graph: onnx.GraphProto) -> None:
        nonlocal total
        for init in graph.initializer:
            total += clip_tensor(init)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += clip_tensor(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(model.graph)
    return total


def share_tied_embedding(model: onnx.ModelProto, lazy: dict | None = None) -> int:
    """Store a tied embedding once; returns the bytes saved (0 when the model has none).

    TorchScript exports ``lm_head(x) = x @ E.T`` with ``E.T`` folded into a second initializer
    beside the embedding ``E`` that ``Gather`` reads: the same numbers twice (SmolLM2-135M: 113 MB
    of 651; Gemma 3 270M: 671 MB of 1.74 GB), and again in every compiled copy. Where a ``MatMul``
    weight is bit for bit the transpose of a ``Gather``'s table, the MatMul becomes
    ``Reshape → Gemm(transB=1) on E → Reshape`` (standard ONNX; ORT and Cloud AI read ``E`` in
    place) and the transposed copy is dropped. Tensors must be in memory (not external data), or
    be ``lazy`` (name → :class:`qeff.weights.View`, the streamed export): a lazy MatMul weight is the
    table's transpose when both are views of the same source tensor with reversed permutations."""
    lazy = lazy or {}
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    tables = {}
    for node in graph.node:
        init = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if init is not None and len(init.dims) == 2 and axis == 0 and (init.name in lazy or init.data_location != onnx.TensorProto.EXTERNAL):
            tables.setdefault((int(init.dims[1]), int(init.dims[0])), init)  # keyed by the transpose's shape
    saved, nodes, dropped = 0, [], []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        table = tables.get((int(weight.dims[0]), int(weight.dims[1]))) if weight is not None and len(weight.dims) == 2 else None
        if (
            table is None
            or users.get(weight.name) != 1
            or table.data_type != weight.data_type
            or (weight.name in lazy) != (table.name in lazy)
            or (weight.name not in lazy and weight.data_location == onnx.TensorProto.EXTERNAL)
            or not _is_transpose(weight, table, lazy)
        ):
            nodes.append(node)
            continue
        hidden, vocab = (int(d) for d in weight.dims)
        x, y, base = node.input[0], node.output[0], f"{node.name or 'lm_head'}/tied"
        consts = {
            f"{base}/flat_shape": np.array([-1, hidden], dtype=np.int64),
            f"{base}/vocab": np.array([vocab], dtype=np.int64),
            f"{base}/start": np.array([0], dtype=np.int64),
            f"{base}/end": np.array([-1], dtype=np.int64),
        }
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        new = [
            onnx.helper.make_node("Reshape", [x, f"{base}/flat_shape"], [f"{base}/x2d"], name=f"{base}/Reshape_in"),
            onnx.helper.make_node("Gemm", [f"{base}/x2d", table.name], [f"{base}/y2d"], name=f"{base}/Gemm", transB=1),
            onnx.helper.make_node("Shape", [x], [f"{base}/x_shape"], name=f"{base}/Shape"),
            onnx.helper.make_node("Slice", [f"{base}/x_shape", f"{base}/start", f"{base}/end"], [f"{base}/lead"],
                                  name=f"{base}/Slice"),
            onnx.helper.make_node("Concat", [f"{base}/lead", f"{base}/vocab"], [f"{base}/y_shape"], name=f"{base}/Concat",
                                  axis=0),
            onnx.helper.make_node("Reshape", [f"{base}/y2d", f"{base}/y_shape"], [y], name=f"{base}/Reshape_out"),
        ]
        nodes.extend(new)
        saved += int(np.prod(weight.dims)) * onnx.helper.tensor_dtype_to_np_dtype(weight.data_type).itemsize
        dropped.append(weight.name)
    if dropped:
        del graph.node[:]
        graph.node.extend(nodes)
        kept = [i for i in graph.initializer if i.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return saved


def _is_transpose(weight: onnx.TensorProto, table: onnx.TensorProto, lazy: dict) -> bool:
    """Is ``weight`` bit for bit the transpose of the 2-D ``table``?"""
    if weight.name in lazy:
        w, t = lazy[weight.name], lazy[table.name]
        return w.source == t.source and w.perm == tuple(reversed(t.perm)) and len(w.perm) == 2
    return np.array_equal(numpy_helper.to_array(weight), numpy_helper.to_array(table).T)


def check_portable(model: onnx.ModelProto) -> None:
    """The exported graph must hold only standard ONNX ops (no ``com.microsoft`` contrib ops)."""
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise QEffError(f"exported graph holds non-standard ops {', '.join(foreign)}; the Cloud AI compiler rejects them")


def stamp_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


#: Tracer warnings from checks that compare against a weight's fixed size: they cannot freeze a
#: value that varies with the inputs. (file suffix, the source line's text)
_BENIGN_TRACE_CHECKS = (
    ("torch/nn/functional.py", "if padding_idx >= weight.size(0):"),  # F.embedding's bounds check
    ("torch/nn/functional.py", "if padding_idx < -weight.size(0):"),
)


def _benign(filename: str, lineno: int) -> bool:
    import linecache

    line = linecache.getline(filename, lineno).strip()
    return any(filename.endswith(suffix) and line == text for suffix, text in _BENIGN_TRACE_CHECKS)


def _fix_logits_shape(model: onnx.ModelProto) -> None:
    # TorchScript cannot prove the gathered row dim is 1; say so in the graph's signature.
    for out in model.graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].Clear()
            out.type.tensor_type.shape.dim[1].dim_value = 1


def _dynamic_axes(qmodel: QEffCausalLM) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "seq_len"},
        "position_ids": {0: "batch_size", 1: "seq_len"},
        "logits": {0: "batch_size"},
    }
    for name in qmodel.input_names[2:] + qmodel.output_names[1:]:
        axes[name] = {0: "batch_size", 2: "ctx_len"}
    return axes


def export(
    qmodel: QEffCausalLM,
    out_dir: str | os.PathLike,
    *,
    model_id: str = "",
    extra_metadata: dict[str, str] | None = None,
    variant=None,
    weights=None,
    placeholders=None,
) -> ExportResult:
    """Export ``qmodel`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``) and run the passes.

    The example inputs only fix the graph's structure: every dim that varies is symbolic.
    ``variant`` (a :class:`qeff.serving.graph.GraphVariant`) adds the serving inputs
    ``batch_index`` / ``num_logits_to_keep``; None or the base variant exports the base graph.

    ``placeholders`` + ``weights``: ``qmodel`` wraps a :func:`qeff.weights.skeleton` and the data
    file is written from ``weights`` one tensor at a time (the streamed export, below); the files
    are byte for byte the in-memory export's.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph, transforms = qmodel, qmodel.transforms
    if variant is not None and not variant.is_base:
        from qeff.serving.graph import ServingGraph

        graph = ServingGraph(qmodel, variant).eval()
        args, axes, transforms = graph.example_inputs(), graph.dynamic_axes(), graph.transforms
    else:
        batch, seq, ctx = 2, 4, 8
        input_ids = torch.zeros((batch, seq), dtype=torch.int64)
        position_ids = torch.arange(seq, dtype=torch.int64)[None].repeat(batch, 1)
        args, axes = (input_ids, position_ids, *qmodel.empty_cache(batch, ctx)), _dynamic_axes(qmodel)
    streamed = placeholders is not None
    raw = out_dir / "raw.onnx"
    for stale in (out_dir / ONNX_FILE, out_dir / DATA_FILE):
        stale.unlink(missing_ok=True)  # onnx appends to an existing external data file
    captured: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings(record=True) as caught:
        # The TorchScript exporter is deprecated in favour of dynamo; it is the one that exports
        # transformers' models in well under a second with plain ops, so its deprecation notice is
        # dropped. Tracer warnings are kept: each one marks a value that may be frozen in the graph.
        warnings.simplefilter("always")
        with torch.no_grad(), (_capture_initializers(captured, placeholders, weights) if streamed else contextlib.nullcontext()):
            torch.onnx.export(
                graph,
                args,
                str(raw),
                input_names=graph.input_names,
                output_names=graph.output_names,
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
                export_params=not streamed,
            )
    trace_warnings = tuple(
        sorted(
            {
                f"{w.filename}:{w.lineno}: {w.message}"
                for w in caught
                if w.category.__name__ == "TracerWarning" and not _benign(w.filename, w.lineno)
            }
        )
    )
    for message in trace_warnings:
        log.warning("export: tracer warning (a value may be frozen into the graph): %s", message)
    model = onnx.load(str(raw))
    for leftover in out_dir.glob("raw.onnx*"):
        leftover.unlink()
    for leftover in out_dir.iterdir():
        # The TorchScript exporter may spill large weights next to the raw file; they are now loaded.
        if leftover.is_file() and leftover.name not in (ONNX_FILE, DATA_FILE):
            leftover.unlink()
    if streamed and not captured:
        # The hook is on a private module of torch's TorchScript exporter: a release that moves it
        # would leave every weight a graph input. Refuse; the pipeline exports in memory instead.
        raise NotStreamableError(f"torch {torch.__version__}'s ONNX exporter did not hand over its initializers")
    lazy = _restore_initializers(model, captured, placeholders) if streamed else {}
    if streamed:
        _match_torch_external_format(model, captured)
    if variant is None or not variant.speculative:
        _fix_logits_shape(model)
    check_portable(model)
    shared = share_tied_embedding(model, lazy)
    clipped = fp16_clip(model, skip=lazy)
    if streamed:
        clipped += _write_external_data(model, lazy, weights, out_dir / DATA_FILE)
    metadata = {
        "qeff.model_id": model_id,
        "qeff.transforms": ",".join(transforms),
        "qeff.passes": "TiedEmbeddingShared,FP16Clip" if shared else "FP16Clip",
        "qeff.fp16_clipped_values": str(clipped),
        "qeff.trace_warnings": str(len(trace_warnings)),
        "qeff.num_layers": str(qmodel.shape.num_layers),
        "qeff.num_kv_heads": str(qmodel.shape.num_kv_heads),
        "qeff.head_dim": str(qmodel.shape.head_dim),
        "qeff.vocab_size": str(qmodel.shape.vocab_size),
        "qeff.versions": json.dumps(library_versions("export"), sort_keys=True),  # the export's key (qeff.code_digest)
        **({"qeff.variant": json.dumps(variant.to_dict(), sort_keys=True)} if variant is not None and not variant.is_base else {}),
        **(extra_metadata or {}),
    }
    stamp_metadata(model, metadata)
    path = out_dir / ONNX_FILE
    if streamed:
        onnx.save_model(model, str(path))  # every large tensor is already in DATA_FILE
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=EXTERNAL_THRESHOLD,
        )
    return ExportResult(path=path, clipped_values=clipped, metadata=metadata, trace_warnings=trace_warnings,
                        tied_embedding_bytes=shared, streamed=streamed)


# --- the streamed export (issue 18) ------------------------------------------------------------
#
# The graph is traced from a :func:`qeff.weights.skeleton`, whose large weights are placeholders,
# with ``export_params=False``; TorchScript's own passes still run on them (the eval peephole,
# constant folding, deduplication), so the graph is the one the in-memory export builds. What those
# passes left as initializers is captured, each placeholder view is recorded as (source tensor,
# permutation), and the data file is written from the weight source one tensor at a time, in the
# order and with the offsets ``onnx.save_model`` would give them.

#: Rows converted to float32 at a time while a tensor is written (bounds the conversion's memory).
_CHUNK_BYTES = 16 << 20


@contextlib.contextmanager
def _capture_initializers(into: dict, placeholders, weights):
    """Keep the initializers TorchScript's exporter computes (it drops them under
    ``export_params=False``), and deduplicate the placeholder views as its value deduplication
    would the real tensors: views of equal sources (by their float32 digests) with the same
    permutation and shape go through the pass again as stand-ins that are equal exactly then
    (a random model's zero-initialised expert biases are such twins)."""
    from torch.onnx._internal.torchscript_exporter import utils as ts_utils

    from qeff.weights import view_of

    real = ts_utils._C

    class _Capturing:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def _jit_pass_onnx_graph_shape_type_inference(graph, params, opset):
            # Handed the placeholders, ONNX shape inference copies each weight into a one-node
            # model per node that reads it (element by element: its strides overlap): 87 s and
            # +2 GB for a 2-layer Llama-3.2-1B shape. Without them it types those inputs from the
            # traced values' types; only a weight's shape matters to it, and that is the same.
            return real._jit_pass_onnx_graph_shape_type_inference(
                graph, {k: v for k, v in params.items() if not placeholders.owns(v)}, opset)

        @staticmethod
        def _jit_pass_onnx_deduplicate_initializers(graph, params, training):
            held = {k: v for k, v in params.items() if placeholders.owns(v)}
            kept = real._jit_pass_onnx_deduplicate_initializers(
                graph, {k: v for k, v in params.items() if k not in held}, training)
            classes: dict = {}
            for k, v in held.items():
                try:
                    view = view_of(placeholders, v)
                except ValueError:
                    continue  # refused when the initializers are restored
                key = (placeholders.digest(view.source, weights), view.perm, view.shape)
                classes.setdefault(key, []).append(k)
            twins = [k for names in classes.values() if len(names) > 1 for k in names]
            if twins:
                code = {k: float(i) for i, names in enumerate(classes.values()) for k in names}
                stand_ins = {k: torch.tensor(code[k]).expand(held[k].shape) for k in twins}
                survivors = real._jit_pass_onnx_deduplicate_initializers(graph, stand_ins, training)
                held = {k: v for k, v in held.items() if k not in stand_ins or k in survivors}
            into.update(kept)
            into.update(held)
            return kept

    ts_utils._C = _Capturing()
    try:
        yield
    finally:
        ts_utils._C = real


def _restore_initializers(model: onnx.ModelProto, captured: dict, placeholders) -> dict:
    """Turn the parameter inputs of a graph exported with ``export_params=False`` back into the
    initializers the in-memory export has (same names, same order): in-memory tensors for the real
    ones, empty float tensors for the placeholder views. Returns name → :class:`qeff.weights.View`."""
    from qeff.weights import view_of

    graph = model.graph
    order = [i.name for i in graph.input if i.name in captured]  # TorchScript's initializer order
    if len(order) != len(captured):
        raise NotStreamableError(f"the streamed export lost track of initializers {sorted(set(captured) - set(order))[:5]}")
    kept = [i for i in graph.input if i.name not in captured]
    del graph.input[:]
    graph.input.extend(kept)
    lazy = {}
    for name in order:
        tensor = captured[name]
        try:
            view = view_of(placeholders, tensor)
        except ValueError as exc:
            raise NotStreamableError(f"the streamed export cannot write initializer {name!r}: {exc}") from None
        if view is not None:
            lazy[name] = view
            init = onnx.TensorProto(name=name, dims=list(tensor.shape), data_type=onnx.TensorProto.FLOAT)
        else:
            if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
                raise NotStreamableError(f"the streamed export cannot write initializer {name!r}: it was computed from a "
                                f"weight that is not in memory; export this model in memory")
            init = numpy_helper.from_array(tensor.detach().contiguous().numpy(), name)
        graph.initializer.append(init)
    return lazy


def _match_torch_external_format(model: onnx.ModelProto, captured: dict) -> bool:
    """Give the graph what TorchScript's encoder gives one it writes in its external data format,
    which it picks when its size estimate passes 2 GiB (``GraphEncoder::GetGraphProtoSize`` in
    torch/csrc/jit/serialization/export.cpp: each initializer's dims + bytes, each ``Constant``
    node with its tensor): every node attribute tensor is named ``<node>_attr::<attr>``, and one
    of more than 1024 elements comes back from its external file with ``data_location`` DEFAULT
    set. The streamed export, which hands the encoder no weights, never passes the limit itself.
    Returns whether the format applies."""
    size = sum(onnx.TensorProto(dims=list(t.shape), data_type=onnx.TensorProto.FLOAT).ByteSize()
               + t.element_size() * t.numel() for t in captured.values())
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    size += node.ByteSize() + len(attr.t.raw_data)
    if size <= 2**31 - 1:
        return False

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                for t in ([attr.t] if attr.type == onnx.AttributeProto.TENSOR else list(attr.tensors)):
                    if not t.name and node.name:
                        t.name = f"{node.name}_attr::{attr.name}"
                    if int(np.prod(t.dims)) > 1024:
                        t.data_location = onnx.TensorProto.DEFAULT
                for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(g)

    visit(model.graph)
    return True


def _external(nbytes: int) -> bool:
    """Does ``onnx.save_model`` move a tensor of ``nbytes`` raw bytes to the data file? (It
    compares ``sys.getsizeof(raw_data)``, the bytes object's size, with the threshold.)"""
    import sys

    return nbytes + sys.getsizeof(b"") >= EXTERNAL_THRESHOLD


def _write_external_data(model: onnx.ModelProto, lazy: dict, weights, path: Path) -> int:
    """Write ``path`` as ``onnx.save_model(..., location=DATA_FILE)`` would: every initializer of
    at least the threshold, in order, end to end; the lazy ones read from ``weights``, converted
    to float32 and fp16-clipped a chunk of rows at a time. Returns the values clipped."""
    from onnx.external_data_helper import _get_initializer_tensors

    clipped, offset = 0, 0
    with open(path, "wb") as out:
        for init in _get_initializer_tensors(model):
            if init.name in lazy:
                view = lazy[init.name]
                source = view.of(weights.get(view.source))  # stored dtype, a view where it can be
                if not source.is_floating_point():
                    raise NotStreamableError(f"weight {view.source} is {source.dtype}, not a float tensor")
                nbytes = source.numel() * 4
                if not _external(nbytes):
                    arr, n = _clip_array(source.to(torch.float32).contiguous().numpy())
                    init.raw_data = arr.tobytes()
                    clipped += n
                    continue
                rows = max(1, _CHUNK_BYTES // max(1, nbytes // max(1, source.shape[0])))
                for start in range(0, source.shape[0], rows):
                    arr, n = _clip_array(source[start:start + rows].to(torch.float32).contiguous().numpy())
                    out.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
                    clipped += n
                del source
            elif init.HasField("raw_data") and _external(len(init.raw_data)):
                nbytes = len(init.raw_data)
                out.write(init.raw_data)
            else:
                continue
            init.ClearField("raw_data")
            del init.external_data[:]  # what onnx's set_external_data writes, in its order
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            offset += nbytes
    return clipped
